"""BBC News articles read as word streams by MiniLM exit heads: a certified early label, and the
stream fed chunk by chunk decides as offline prediction does."""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")

from stopwise.encoder import EarlyExitClassifier  # noqa: E402
from stopwise.encoder.data import bbc_news, group_split  # noqa: E402
from stopwise.stream import EarlyStreamClassifier, TextPrefixes  # noqa: E402


@pytest.mark.model
def test_bbc_articles_stream_to_a_certified_early_label() -> None:
    torch.set_num_threads(2)
    data = bbc_news()
    train_rows, cal_rows, test_rows = (r[:n] for r, n in zip(group_split(data, (0.3, 0.4, 0.3), seed=0), (40, 60, 12),
                                                            strict=True))
    train, cal, test = data.take(train_rows), data.take(cal_rows), data.take(test_rows)
    clf = EarlyExitClassifier.from_base("minilm", class_names=data.class_names, max_length=96)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf.fit(train.texts, train.labels, progress=False, epochs=60)

    # predict without a rule is the full model: the final head, the same values as the recorded one.
    prefixes = TextPrefixes(lambda texts: clf.predict(texts).probs, classes=data.class_names, words_per_stage=8, n_stages=8)
    model = EarlyStreamClassifier(prefixes, epsilon=0.1, delta=0.2).calibrate(cal.texts, cal.labels)
    assert model.certificate_.certified
    offline = model.decide(test.texts)
    assert (offline.stages < prefixes.n_stages - 1).any(), "no article stopped early: a vacuous check"
    assert offline.earliness.mean() < 0.2  # articles run to hundreds of words; 64 at most are read
    for i, text in enumerate(test.texts):
        words, stream = text.split(), model.stream()
        decision = stream.update(" ".join(words[:5]))
        start = 5
        while not decision.decided:
            decision = stream.update(" ".join(words[start:start + 7]))
            start += 7
        assert (decision.stage, decision.label) == (offline.stages[i], offline.labels[i])
