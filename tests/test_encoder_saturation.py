"""The encoder's saturation signal (cosine of successive pooled states): recorded by
trace_from_features / record, passed online by predict to the rules that read it, with the same
values, so that a rule on it exits online where it exits offline."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest

import stopwise as sw
from stopwise.core.rules import Rule
from stopwise.core.trace import StageBatch
from stopwise.encoder.gate import calibrate_gate, train_gate
from stopwise.encoder.predict import reads_signal
from stopwise.synthetic import synthetic_trace


def test_reads_signal_sees_through_wrappers() -> None:
    gate = train_gate(synthetic_trace(200, stages=4, classes=3, seed=0))
    assert reads_signal(sw.Saturation(), "saturation")
    assert reads_signal(sw.MinStage(sw.Saturation(), min_stages=2), "saturation")
    assert reads_signal(sw.AnyOf(sw.MaxProb(), sw.Saturation()), "saturation")
    assert not reads_signal(sw.MaxProb(), "saturation")
    assert not reads_signal(sw.Signal(signal="other"), "saturation")
    assert not reads_signal(gate, "saturation")


def test_a_gate_on_saturation_names_it_when_a_trace_lacks_it() -> None:
    tr = synthetic_trace(300, stages=4, classes=3, seed=1)
    rng = np.random.default_rng(0)
    with_sat = sw.Trace(predictions=tr.predictions, probs=tr.probs, cost=tr.cost, labels=tr.labels,
                        signals={"saturation": rng.uniform(size=(tr.n, tr.n_stages))})
    gate = train_gate(with_sat, signals=["saturation"])
    with pytest.raises(sw.StopwiseError, match=r"needs the signal\(s\) \['saturation'\] at layer 1"):
        gate.halts(tr, lam=0.5)
    with pytest.raises(sw.StopwiseError, match="saturation"):
        train_gate(tr, signals=["saturation"])


class _Spy(Rule):
    """Saturation that also writes down the signal it was shown, by input row (its state is the
    rows' input indices, narrowed as rows stop)."""

    name = "saturation_spy"
    signal = "saturation"

    def __init__(self, seen: dict[tuple[int, int], float], *, lam: float | None = None) -> None:
        super().__init__(lam=lam)
        self.seen = seen

    def params(self) -> dict[str, Any]:
        return {"seen": self.seen}

    def with_lam(self, lam: float | None) -> _Spy:
        return _Spy(self.seen, lam=lam)

    def init_state(self, n: int) -> Any:
        return np.arange(n)

    def update(self, state: Any, batch: StageBatch) -> tuple[Any, np.ndarray]:
        value = np.asarray(batch.signals["saturation"], dtype=np.float64)
        for row, v in zip(state, value, strict=True):
            self.seen[(int(row), batch.index)] = float(v)
        return state, value


@pytest.fixture(scope="module")
def bbc_minilm(bbc_sentence_features: Any) -> Any:
    pytest.importorskip("transformers")
    return bbc_sentence_features(seed=0, n=240, n_fit=80, pooling="mean")


@pytest.mark.model
def test_recorded_saturation_is_the_cosine_of_successive_features(bbc_minilm: Any) -> None:
    clf, texts, labels, feats = bbc_minilm
    tr = clf.trace_from_features(feats[160:], labels[160:])
    f = feats[160:].double().numpy()
    direct = (f[:, 1:] * f[:, :-1]).sum(-1) / (np.linalg.norm(f[:, 1:], axis=-1) * np.linalg.norm(f[:, :-1], axis=-1))
    sat = tr.signals["saturation"]
    assert sat.shape == (80, clf.n_layers) and sat.dtype == np.float64
    np.testing.assert_array_equal(sat[:, 0], 0.0)
    np.testing.assert_allclose(sat[:, 1:], direct, atol=1e-6)
    assert sat[:, 1:].std() > 1e-3  # the signal varies, so the exits below decide something
    # record() runs its own forward pass (other batches, so float32 rounding may differ) and
    # records the same signal.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        recorded = clf.record(texts[160:176], labels[160:176], progress=False)
    np.testing.assert_allclose(recorded.signals["saturation"], sat[:16], rtol=0, atol=1e-6)


@pytest.mark.model
def test_online_saturation_equals_offline_with_repacking(bbc_minilm: Any) -> None:
    clf, texts, labels, feats = bbc_minilm
    test = clf.trace_from_features(feats[160:], labels[160:])
    sat = test.signals["saturation"]
    seen: dict[tuple[int, int], float] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Batches in input order (sort=False), one group, so the spy's state is the input row.
        online = clf.predict(texts[160:], rule=_Spy(seen, lam=float(np.median(sat[:, 1:]))), batch_size=8,
                             in_flight=128, sort=False)
    assert len(set(online.exit_layer.tolist())) >= 3  # rows leave at different layers: the batches shrink and re-pack
    got = np.array([v for _, v in sorted(seen.items())])
    want = np.array([sat[r, k] for r, k in sorted(seen)])
    # Equal up to float32 rounding (2.4e-7 at most here): the recorded features came from other
    # batches (sorted, 32 rows), whose pooled states round differently.
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    print("max |online - offline| saturation:", float(np.abs(got - want).max()))
    for lam in np.quantile(sat[:, 1:], [0.4, 0.8]):
        rule = sw.Saturation(lam=float(lam))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exits = clf.predict(texts[160:220], rule=rule, batch_size=8).exit_layer
            alone = [int(clf.predict([t], rule=rule).exit_layer[0]) for t in texts[160:164]]
        offline = rule.halts(test[np.arange(60)]) + 1
        assert len(np.unique(offline)) >= 2
        np.testing.assert_array_equal(exits, offline)
        np.testing.assert_array_equal(alone, offline[:4])  # a lone row (batch 1) takes the same path


@pytest.mark.model
def test_gate_on_saturation_online_equals_offline_and_off_is_bare(bbc_minilm: Any) -> None:
    clf, texts, labels, feats = bbc_minilm
    gate_trace = clf.trace_from_features(feats[80:160], labels[80:160])
    cal = clf.trace_from_features(feats[160:], labels[160:])
    gate = train_gate(gate_trace, signals=["saturation"])
    cert = calibrate_gate(cal, gate, epsilon=0.2, delta=0.2)
    assert cert.certified
    offline = cert.make_rule().halts(cal) + 1
    assert len(np.unique(offline)) >= 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        online = clf.predict(texts[160:], certificate=cert, batch_size=8)
        never = [clf.predict(texts[160:180], rule=rule, batch_size=64, sort=False) for rule in (None, sw.Never())]
    np.testing.assert_array_equal(online.exit_layer, offline)
    # Stopping off: the bare model's final head, bit for bit (one padded batch, as the model runs it).
    import torch

    from stopwise.encoder.backbone import pool

    enc = clf.tokenizer(texts[160:180], truncation=True, max_length=clf.max_length, padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = clf.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        ref = torch.softmax(clf.heads.logits(clf.n_layers - 1, pool(hidden, enc["attention_mask"], clf.pooling)), dim=-1)
    for pred in never:
        np.testing.assert_array_equal(pred.exit_layer, clf.n_layers)
        assert np.array_equal(pred.probs, ref.double().numpy())
    # Without the signal in the trace the gate cannot decide, and says which signal it lacks.
    bare_trace = sw.Trace(predictions=cal.predictions, probs=cal.probs, cost=cal.cost)
    with pytest.raises(sw.StopwiseError, match="saturation"):
        cert.make_rule().halts(bare_trace)
