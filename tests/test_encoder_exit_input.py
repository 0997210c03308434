"""exit_input="mean": every exit reads the running mean of the pooled states of the layers run so
far. Offline (cached features) and online (predict, with rows leaving and batches re-packing)
compute it by the same function, so the exits agree; it is saved with the heads."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import stopwise as sw


@pytest.fixture(scope="module")
def mean_minilm(bbc_sentence_features: Any) -> Any:
    pytest.importorskip("transformers")
    return bbc_sentence_features(seed=1, n=200, n_fit=100, exit_input="mean")


@pytest.mark.model
def test_heads_read_the_running_mean_of_layers(mean_minilm: Any) -> None:
    import torch

    clf, texts, labels, feats = mean_minilm
    f = feats[100:].double().numpy()
    mean = np.cumsum(f, axis=1) / np.arange(1, clf.n_layers + 1)[None, :, None]
    probs = clf.probs_from_features(feats[100:])
    with torch.inference_mode():
        direct = np.stack([torch.softmax(clf.heads.logits(k, torch.as_tensor(mean[:, k], dtype=torch.float32)), -1).numpy()
                           for k in range(clf.n_layers)], axis=1)
    np.testing.assert_allclose(probs, direct, atol=1e-5)
    with torch.inference_mode():
        own_layer = np.stack([torch.softmax(clf.heads.logits(k, feats[100:, k]), -1).numpy() for k in range(clf.n_layers)], 1)
    assert np.abs(probs[:, 2:] - own_layer[:, 2:]).max() > 1e-3  # reading the layer alone is another model


@pytest.mark.model
def test_online_exits_equal_offline_with_repacking_and_alone(mean_minilm: Any) -> None:
    clf, texts, labels, feats = mean_minilm
    test = clf.trace_from_features(feats[100:], labels[100:])
    top = test.probs.max(axis=2)
    for lam in np.quantile(top[:, :3], [0.3, 0.7]):
        rule = sw.MaxProb(lam=float(lam))
        offline = rule.halts(test) + 1
        assert len(np.unique(offline)) >= 3  # rows leave at different layers
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            online = clf.predict(texts[100:], rule=rule, batch_size=8)
            alone = [int(clf.predict([t], rule=rule).exit_layer[0]) for t in texts[100:104]]
        np.testing.assert_array_equal(online.exit_layer, offline)
        np.testing.assert_array_equal(alone, offline[:4])
        early = test.probs[np.arange(test.n), offline - 1]
        np.testing.assert_allclose(online.probs, early, atol=1e-5)


@pytest.mark.model
def test_stopping_off_is_the_full_mean_model_and_never_equals_it(mean_minilm: Any) -> None:
    clf, texts, labels, feats = mean_minilm
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = clf.predict(texts[100:140], batch_size=16, sort=False)
        never = clf.predict(texts[100:140], rule=sw.Never(), batch_size=16, sort=False)
    np.testing.assert_array_equal(full.exit_layer, clf.n_layers)
    assert np.array_equal(full.probs, never.probs)  # the rule path and the full model: bit for bit
    final = clf.probs_from_features(feats[100:140])[:, -1]
    np.testing.assert_allclose(full.probs, final, atol=1e-5)


@pytest.mark.model
def test_exit_input_is_saved_named_and_checked(mean_minilm: Any, tmp_path: Path) -> None:
    from stopwise.encoder import EarlyExitClassifier

    clf, texts, labels, feats = mean_minilm
    clf.save_pretrained(tmp_path / "heads")
    back = EarlyExitClassifier.from_pretrained(None, tmp_path / "heads")
    assert back.exit_input == "mean" and back.heads_id == clf.heads_id
    np.testing.assert_array_equal(back.probs_from_features(feats[100:110]), clf.probs_from_features(feats[100:110]))
    same_weights = EarlyExitClassifier.from_base("minilm", class_names=clf.class_names, max_length=32)
    same_weights.heads.load_state_dict(clf.heads.state_dict())
    assert same_weights.heads_id != clf.heads_id  # other inputs, another model: a certificate will not pass
    with pytest.raises(sw.StopwiseError, match="'exit_input' parameter.*'layer', 'mean'"):
        EarlyExitClassifier.from_base("minilm", class_names=clf.class_names, exit_input="sum")
