"""stopwise.stream on a real aeon set: offline/online equality, bad inputs, metrics by hand."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

import stopwise as sw
from stopwise.stream import (
    EarlyStreamClassifier,
    SeriesPrefixes,
    TextPrefixes,
    accuracy,
    earliness,
    erde,
    erde_macro,
    harmonic_mean,
    prefix_lengths,
    stream_rule,
)

pytest.importorskip("aeon")
pytest.importorskip("sklearn")

from stopwise.stream.data import bundled_sets, load_pooled, stratified_split  # noqa: E402


@pytest.fixture(scope="module")
def italy() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    X, y = load_pooled("ItalyPowerDemand")
    tr, rest = stratified_split(y, (0.3, 0.7), seed=0)
    return X[tr], y[tr], X[rest], y[rest]


@pytest.fixture(scope="module")
def prefixes(italy: tuple[np.ndarray, ...]) -> SeriesPrefixes:
    Xtr, ytr, _, _ = italy
    return SeriesPrefixes(n_stages=20).fit(Xtr, ytr)


def _model(prefixes: SeriesPrefixes, X: np.ndarray, y: np.ndarray, **kw: object) -> EarlyStreamClassifier:
    m = EarlyStreamClassifier(prefixes, **kw)  # type: ignore[arg-type]
    return m.calibrate(X, y)


def test_bundled_sets_load_offline_and_ragged_ones_are_refused() -> None:
    names = bundled_sets()
    assert {"GunPoint", "ArrowHead", "BasicMotions", "JapaneseVowels_eq", "PickupGestureWiimoteZ_eq"} <= set(names)
    assert "JapaneseVowels" not in names
    X, y = load_pooled("BasicMotions")
    assert X.shape == (80, 6, 100) and len(y) == 80
    with pytest.raises(sw.StopwiseError, match="unequal lengths.*JapaneseVowels_eq"):
        load_pooled("JapaneseVowels")


def test_prefix_lengths_end_at_the_full_length() -> None:
    assert prefix_lengths(24, 20).tolist() == [3, 4, 5, 6, 8, 9, 10, 11, 12, 14, 15, 16, 17, 18, 20, 21, 22, 23, 24]
    assert prefix_lengths(150, 5).tolist() == [30, 60, 90, 120, 150]


@pytest.mark.parametrize("rule", ["max_prob", "margin", "stability", "combined"])
def test_stream_fed_in_chunks_decides_exactly_as_predict(prefixes: SeriesPrefixes, italy: tuple[np.ndarray, ...],
                                                         rule: str) -> None:
    _, _, X, y = italy
    model = _model(prefixes, X[:500], y[:500], rule=rule, epsilon=0.1)
    test = X[500:620]
    offline = model.decide(test)
    assert model.certificate_.certified
    assert (offline.stages < prefixes.n_stages - 1).any(), "the certified rule never stopped early: a vacuous check"
    rng = np.random.default_rng(0)
    for i in range(len(test)):
        stream, pos = model.stream(), 0
        while True:
            step = int(rng.integers(1, 6))
            decision = stream.update(test[i, 0, pos:pos + step])  # univariate chunks of shape (t,)
            pos += step
            if decision.decided:
                break
            assert decision.label is None and decision.seen == pos
        assert decision.stage == offline.stages[i] and decision.label == offline.labels[i]
        assert decision.seen == offline.seen[i] and decision.certificate is model.certificate_
        # One row against a batch: BLAS may round the last bit differently; the decisions are equal.
        np.testing.assert_allclose(decision.probabilities, offline.probabilities[i], rtol=1e-12, atol=1e-15)
    assert model.earliness_ == pytest.approx(float(np.mean(offline.earliness)))
    np.testing.assert_array_equal(model.predict(test), offline.labels)


def test_predict_is_full_length_when_nothing_is_certified(prefixes: SeriesPrefixes,
                                                         italy: tuple[np.ndarray, ...]) -> None:
    _, _, X, y = italy
    model = _model(prefixes, X[:300], y[:300], epsilon=0.05, method="conditional")
    assert not model.certificate_.certified
    labels = model.predict(X[300:400])
    full = prefixes.classes_[prefixes.stage_probs(prefixes.n_stages - 1, X[300:400]).argmax(axis=1)]
    np.testing.assert_array_equal(labels, full)
    assert model.earliness_ == 1.0


def test_both_certificates_are_kept_and_a_too_small_set_names_its_minimum(prefixes: SeriesPrefixes,
                                                                          italy: tuple[np.ndarray, ...]) -> None:
    _, _, X, y = italy
    model = _model(prefixes, X[:700], y[:700], epsilon=0.1)
    assert set(model.certificates_) == {"ltt", "conditional"}
    cond = model.certificates_["conditional"]
    assert cond is not None and cond.method == "conditional" and cond.thresholds is not None
    small = EarlyStreamClassifier(prefixes, epsilon=0.01, method="conditional")
    with pytest.raises(sw.CalibrationError, match="at least n = "):
        small.calibrate(X[:100], y[:100])


def test_fit_splits_trains_and_calibrates(italy: tuple[np.ndarray, ...]) -> None:
    Xtr, ytr, X, y = italy
    model = EarlyStreamClassifier(SeriesPrefixes(n_stages=8), epsilon=0.1, calibration_size=0.6).fit(X, y)
    assert model.certificate_.n == round(0.6 * len(X))
    assert set(model.predict(Xtr[:20])) <= set(model.classes_)
    assert 0.0 < model.earliness_ <= 1.0


def test_bad_inputs_raise_clear_errors(prefixes: SeriesPrefixes, italy: tuple[np.ndarray, ...]) -> None:
    _, _, X, y = italy
    model = _model(prefixes, X[:500], y[:500], epsilon=0.1)
    nan = X[500:503].copy()
    nan[1, 0, 5] = np.nan
    with pytest.raises(sw.StopwiseError, match="NaN or inf .*series 1"):
        model.predict(nan)
    with pytest.raises(sw.StopwiseError, match="training length 24. Got length 20"):
        model.predict(X[500:503, :, :20])
    with pytest.raises(sw.StopwiseError, match="one length; got lengths \\[20, 24\\]"):
        SeriesPrefixes().fit([X[0, 0], X[1, 0, :20]], y[:2])
    with pytest.raises(sw.StopwiseError, match="1 channels"):
        model.predict(np.zeros((2, 3, 24)))
    full = _model(prefixes, X[:300], y[:300], epsilon=0.05, method="conditional")  # not certified: never early
    stream = full.stream()
    with pytest.raises(sw.StopwiseError, match="non-empty .* Got shape \\(1, 0\\)"):
        stream.update(np.zeros(0))
    with pytest.raises(sw.StopwiseError, match="NaN"):
        stream.update(np.array([1.0, np.nan]))
    stream.update(X[500, 0, :20])
    with pytest.raises(sw.StopwiseError, match="holds 26 points, more than the training length 24"):
        stream.update(np.zeros(6))
    decided = stream.update(X[500, 0, 20:])  # the last stage always decides
    assert decided.decided and decided.stage == prefixes.n_stages - 1 and isinstance(decided.label, str)
    with pytest.raises(sw.StopwiseError, match="decided .* takes no more data"):
        stream.update(np.zeros(1))
    with pytest.raises(sw.StopwiseError, match="'epsilon' parameter of EarlyStreamClassifier"):
        EarlyStreamClassifier(prefixes, epsilon=1.5)
    with pytest.raises(sw.StopwiseError, match="'rule' parameter of stream_rule must be one of"):
        stream_rule("teaser")
    with pytest.raises(sw.StopwiseError, match="not calibrated"):
        EarlyStreamClassifier(prefixes).predict(X[:2])
    with pytest.raises(sw.StopwiseError, match="needs fitted prefix classifiers"):
        SeriesPrefixes().prepare(X[:2], owner="x")


def test_text_stream_chunks_match_offline_and_close_ends_the_text() -> None:
    # A toy probability function (counts of the word "good"): the stream mechanics, no model.
    def probs(texts: list[str]) -> np.ndarray:
        good = np.array([t.split().count("good") / max(len(t.split()), 1) for t in texts])
        return np.stack([1 - good, good], axis=1)

    rng = np.random.default_rng(1)
    texts = [" ".join(rng.choice(["good", "bad", "meh"], size=int(rng.integers(1, 40)), p=[0.5, 0.3, 0.2]))
             for _ in range(400)]
    labels = np.array([int(t.split().count("good") * 2 > len(t.split())) for t in texts])
    model = EarlyStreamClassifier(TextPrefixes(probs, classes=[0, 1], words_per_stage=4, n_stages=6), epsilon=0.1)
    model.calibrate(texts[:300], labels[:300])
    offline = model.decide(texts[300:])
    assert (offline.stages < model.prefixes.stage_counts(model.prefixes.prepare(texts[300:], owner="t")) - 1).any()
    for i, text in enumerate(texts[300:]):
        words, stream = text.split(), model.stream()
        decision = None
        for start in range(0, len(words), 3):
            decision = stream.update(" ".join(words[start:start + 3]))
            if decision.decided:
                break
        assert decision is not None
        if not decision.decided:
            decision = stream.close()
        assert (decision.stage, decision.label, decision.seen) == (offline.stages[i], offline.labels[i], offline.seen[i])
    with pytest.raises(sw.StopwiseError, match="string with at least one word"):
        model.stream().update("   ")
    with pytest.raises(sw.StopwiseError, match="empty text"):
        model.predict(["fine", ""])


def test_metrics_against_hand_computed_values() -> None:
    assert accuracy([1, 2, 3, 1], [1, 2, 1, 1]) == 0.75
    assert earliness([10, 20, 30], [40, 40, 60]) == pytest.approx((0.25 + 0.5 + 0.5) / 3)
    assert harmonic_mean(0.9, 0.4) == pytest.approx(2 * 0.9 * 0.6 / 1.5)
    assert harmonic_mean(0.0, 1.0) == 0.0
    # ERDE_5: TP at k=5 costs lc = 1 - 1/(1+e^0) = 0.5; TP at k=1: 1 - 1/(1+e^-4); FP costs the
    # positive share (3/5 = 0.6); FN costs 1; TN 0.
    y, p, k = [1, 1, 0, 1, 0], [1, 1, 1, 0, 0], [5, 1, 2, 3, 9]
    lc1 = 1 - 1 / (1 + math.exp(-4))
    assert erde(y, p, k, o=5) == pytest.approx((0.5 + lc1 + 0.6 + 1.0 + 0.0) / 5)
    assert erde(y, p, k, o=5, c_fp=0.1) == pytest.approx((0.5 + lc1 + 0.1 + 1.0) / 5)
    assert erde_macro([0, 1, 1, 0], [0, 1, 1, 0], [1, 1, 1, 1], o=50) == pytest.approx((1 - 1 / (1 + math.exp(-49))) / 2)
    with pytest.raises(sw.StopwiseError, match="binary"):
        erde([0, 2], [0, 1], [1, 1], o=5)
    with pytest.raises(sw.StopwiseError, match="'acc' parameter of harmonic_mean"):
        harmonic_mean(1.2, 0.5)
    with pytest.raises(sw.StopwiseError, match="seen <= total"):
        earliness([5], [4])


def test_importing_stopwise_stream_loads_neither_torch_nor_aeon() -> None:
    code = ("import sys, stopwise.stream, stopwise.stream.cli, stopwise.stream.rules; "
            "bad = [m for m in ('torch', 'aeon', 'sklearn') if m in sys.modules]; assert not bad, bad")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_cli_lists_the_sets_and_runs_one(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from stopwise.cli import main

    assert main(["stream", "datasets", "--json"]) == 0
    assert "GunPoint" in json.loads(capsys.readouterr().out)["datasets"]
    assert main(["stream", "run", "ItalyPowerDemand", "--epsilon", "0.1", "--stages", "6", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["certificate"]["certified"] and 0 < out["earliness"] < 1 and out["n_calibration"] > 400
    assert main(["stream", "run", "JapaneseVowels"]) == 2
    assert "JapaneseVowels_eq" in capsys.readouterr().err
