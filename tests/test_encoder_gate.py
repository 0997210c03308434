"""The learned exit gate: same decisions offline and online, disjoint from calibration, valid."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

import stopwise as sw
from stopwise.encoder.gate import (
    ExitGate,
    calibrate_gate,
    check_disjoint,
    load_gate,
    row_hashes,
    save_gate,
    train_gate,
)
from stopwise.rules import halts_from_z
from stopwise.synthetic import synthetic_trace
from stopwise.trace import StageBatch, Trace


def _meta(trace: Trace, **meta: str) -> Trace:
    return Trace(predictions=trace.predictions, probs=trace.probs, labels=trace.labels, meta={**trace.meta, **meta})


@pytest.fixture(scope="module")
def parts() -> tuple[Trace, Trace]:
    tr = _meta(synthetic_trace(3000, stages=6, classes=4, seed=3), base_model="bert-6x8-abc", heads="h1")
    return tr.split(1000, seed=0)


@pytest.fixture(scope="module")
def gate(parts: tuple[Trace, Trace]) -> ExitGate:
    return train_gate(parts[0])


def test_online_stopper_matches_offline_halts(gate: ExitGate, parts: tuple[Trace, Trace]) -> None:
    trace = parts[1][np.arange(400)]
    rule = gate.with_lam(0.8)
    halts = rule.halts(trace)
    assert 0 < (halts < trace.n_stages - 1).mean() < 1  # the threshold is neither trivial nor never met
    stopper = rule.stopper(trace.n)
    online = np.full(trace.n, -1)
    for k in range(trace.n_stages):
        rows = stopper.active
        stop = stopper.step(trace.stage(k, rows), last=k == trace.n_stages - 1)
        online[rows[stop]] = k
    np.testing.assert_array_equal(online, halts)


def test_monotone_in_lambda(gate: ExitGate, parts: tuple[Trace, Trace]) -> None:
    lams = np.linspace(0.0, 1.0, 21)
    halts = np.stack([gate.halts(parts[1], lam) for lam in lams])
    assert (np.diff(halts, axis=0) >= 0).all()
    assert halts[0].mean() < halts[-1].mean()


def test_gate_predicts_agreement(gate: ExitGate, parts: tuple[Trace, Trace]) -> None:
    test = parts[1]
    score = gate.z(test)[:, :-1].ravel()
    agrees = (test.predictions[:, :-1] == test.reference[:, None]).ravel()
    assert score[agrees].mean() > score[~agrees].mean() + 0.2


def test_calibration_split_never_touches_training(gate: ExitGate, parts: tuple[Trace, Trace]) -> None:
    train, cal = parts
    assert gate.train_rows == frozenset(int(h) for h in row_hashes(train))
    assert not gate.train_rows & frozenset(int(h) for h in row_hashes(cal))
    before = gate.params()
    cert = calibrate_gate(cal, gate, epsilon=0.05, delta=0.1)
    assert cert.certified and gate.params() == before  # calibration does not retrain the gate
    # One shared row is enough to refuse, and the message counts them.
    leaked = Trace.concat([cal, train[np.arange(1)]])
    with pytest.raises(sw.StopwiseError, match="trained on 1 of the 2001 calibration rows"):
        calibrate_gate(leaked, gate, epsilon=0.05, delta=0.1)
    with pytest.raises(sw.StopwiseError, match="does not know its training rows"):
        check_disjoint(ExitGate(**gate.params()), cal)


def test_certificate_round_trip_reloads_the_gate(gate: ExitGate, parts: tuple[Trace, Trace], tmp_path: Path) -> None:
    cert = calibrate_gate(parts[1], gate, epsilon=0.05, delta=0.1)
    cert.save(tmp_path / "c.json")
    again = sw.Certificate.load(tmp_path / "c.json")
    rule = again.make_rule()
    assert isinstance(rule, ExitGate)
    np.testing.assert_array_equal(rule.halts(parts[1]), cert.make_rule().halts(parts[1]))


def test_save_load_refuses_other_base_or_heads(gate: ExitGate, tmp_path: Path) -> None:
    save_gate(gate, tmp_path)
    body = json.loads((tmp_path / "gate.json").read_text())
    assert list(body) == sorted(body)
    loaded = load_gate(tmp_path, base_model="bert-6x8-abc", heads="h1")
    assert loaded.params() == gate.params() and loaded.train_rows == gate.train_rows
    with pytest.raises(sw.StopwiseError, match="base_model = 'bert-6x8-abc'; this classifier has base_model = 'llama-30x576-zzz'"):
        load_gate(tmp_path, base_model="llama-30x576-zzz")
    with pytest.raises(sw.StopwiseError, match="heads = 'h1'; this classifier has heads = 'h2'"):
        load_gate(tmp_path, base_model="bert-6x8-abc", heads="h2")


def test_missing_features_name_the_value(gate: ExitGate, parts: tuple[Trace, Trace]) -> None:
    stage = parts[1].stage(2)
    with pytest.raises(sw.StopwiseError, match="'probs'.*layer 3"):
        gate.update(gate.init_state(len(stage)), StageBatch(index=2, predictions=stage.predictions))
    with pytest.raises(sw.StopwiseError, match="4 classes"):
        gate.update(gate.init_state(len(stage)), StageBatch(index=2, predictions=stage.predictions,
                                                             probs=stage.probs[:, :3]))
    with pytest.raises(sw.StopwiseError, match="6 layers. Got layer 7"):
        gate.update(gate.init_state(len(stage)), StageBatch(index=6, predictions=stage.predictions, probs=stage.probs))
    with_signal = train_gate(Trace(predictions=parts[0].predictions, probs=parts[0].probs,
                                   signals={"saturation": np.ones(parts[0].predictions.shape)}), signals=("saturation",))
    with pytest.raises(sw.StopwiseError, match=r"signal\(s\) \['saturation'\] at layer 3"):
        with_signal.update(with_signal.init_state(len(stage)), stage)
    with pytest.raises(sw.StopwiseError, match="The 'weights' parameter of ExitGate"):
        ExitGate(**{**gate.params(), "weights": [1.0]})


def test_guarantee_holds_over_random_calibrations_and_naive_fails() -> None:
    """MAPIE-style: over many calibration draws the gate's true gap (on a large fresh population)
    exceeds ε in at most δ (+ binomial slack) of them; picking λ by the empirical risk alone fails."""
    eps, delta, repeats, n_cal = 0.05, 0.1, 60, 400
    gate = train_gate(synthetic_trace(1500, stages=6, classes=4, seed=11))
    population = synthetic_trace(20000, stages=6, classes=4, seed=12)
    z, ref, lengths = gate.z(population), population.reference, population.lengths
    lams = np.linspace(0.5, 1.0, 101)

    def gaps(rows: np.ndarray) -> np.ndarray:
        """The gap on ``rows`` of the population at every λ of the grid."""
        wrong = population.predictions[rows] != ref[rows, None]
        return np.array([wrong[np.arange(len(rows)), halts_from_z(z[rows], lengths[rows], lam)].mean() for lam in lams])

    true_gap = gaps(np.arange(population.n))
    violations, naive = 0, 0
    rng = np.random.default_rng(0)
    for _ in range(repeats):
        rows = rng.choice(population.n, n_cal, replace=False)
        cert = sw.calibrate(population[rows], gate, epsilon=eps, delta=delta, risk="gap")
        if cert.certified:
            halts = halts_from_z(z, lengths, cert.lam)  # the certified rule on the whole population
            violations += float(np.mean(population.predictions_at(halts) != ref)) > eps
        naive += true_gap[int(np.argmax(gaps(rows) <= eps))] > eps  # the smallest λ whose empirical gap is within ε
    slack = 3 * np.sqrt(delta * (1 - delta) / repeats)
    assert violations / repeats <= delta + slack
    assert naive / repeats > delta + slack


@pytest.mark.model
def test_gate_through_predict_and_save_pretrained(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from stopwise.encoder import EarlyExitClassifier
    from stopwise.encoder.data import bbc_news

    torch.set_num_threads(2)
    data = bbc_news()
    rows = np.random.default_rng(0).permutation(len(data))
    train, gate_rows, cal = data.take(rows[:60]), data.take(rows[60:120]), data.take(rows[120:200])
    clf = EarlyExitClassifier.from_base("minilm", class_names=train.class_names, max_length=24)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf.fit(train.texts, train.labels, objective="distill", temperature=2.0, epochs=30, progress=False)
        gate_trace = clf.record(gate_rows.texts, gate_rows.labels, progress=False)
        cal_trace = clf.record(cal.texts, cal.labels, progress=False)
    gate = train_gate(gate_trace)
    assert gate.base_model == clf.base_id and gate.heads == clf.heads_id
    cert = calibrate_gate(cal_trace, gate, epsilon=0.3, delta=0.2)
    clf.certificate = cert
    offline = cert.make_rule().halts(cal_trace) + 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        online = clf.predict(cal.texts, certificate=cert, batch_size=8).exit_layer
        lone = [int(clf.predict([t], certificate=cert).exit_layer[0]) for t in cal.texts[:5]]
    np.testing.assert_array_equal(online, offline)
    np.testing.assert_array_equal(lone, offline[:5])
    clf.save_pretrained(tmp_path)
    save_gate(gate, tmp_path)
    again = EarlyExitClassifier.from_pretrained(None, tmp_path)
    assert again.certificate is not None and isinstance(again.certificate.make_rule(), ExitGate)
    assert load_gate(tmp_path, base_model=again.base_id, heads=again.heads_id).params() == gate.params()
    with pytest.raises(sw.StopwiseError, match="base_model"):
        load_gate(tmp_path, base_model="llama-30x576-000000000000", heads=again.heads_id)
