"""The learned exit gate (logistic and 2-layer perceptron): same decisions offline and online,
disjoint from calibration, valid."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

import stopwise as sw
from stopwise.encoder.gate import (
    GATE_NAME,
    ExitGate,
    calibrate_gate,
    check_disjoint,
    load_gate,
    row_hashes,
    save_gate,
    train_gate,
)
from stopwise.encoder.gate_mlp import fit_mlp
from stopwise.rules import halts_from_z
from stopwise.synthetic import synthetic_trace
from stopwise.trace import StageBatch, Trace


def _meta(trace: Trace, **meta: str) -> Trace:
    return Trace(predictions=trace.predictions, probs=trace.probs, labels=trace.labels, meta={**trace.meta, **meta})


@pytest.fixture(scope="module")
def parts() -> tuple[Trace, Trace]:
    tr = _meta(synthetic_trace(3000, stages=6, classes=4, seed=3), base_model="bert-6x8-abc", heads="h1")
    return tr.split(1000, seed=0)


@pytest.fixture(scope="module", params=["logistic", "mlp"])
def gate(parts: tuple[Trace, Trace], request: pytest.FixtureRequest) -> ExitGate:
    out = train_gate(parts[0]) if request.param == "logistic" else train_gate(parts[0], hidden=8, seed=0)
    assert out.kind == request.param
    return out


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


@pytest.mark.parametrize("hidden", [None, 8])
def test_guarantee_holds_over_random_calibrations_and_naive_fails(hidden: int | None) -> None:
    """MAPIE-style: over many calibration draws the gate's true gap (on a large fresh population)
    exceeds ε in at most δ (+ binomial slack) of them; picking λ by the empirical risk alone fails."""
    eps, delta, repeats, n_cal = 0.05, 0.1, 60, 400
    gate = train_gate(synthetic_trace(1500, stages=6, classes=4, seed=11), hidden=hidden)
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


def test_mlp_fit_learns_what_a_linear_model_cannot() -> None:
    """XOR of two signs: no linear logit beats chance, four tanh units fit it."""
    rng = np.random.default_rng(0)
    z = rng.normal(size=(2000, 2))
    y = ((z[:, 0] > 0) ^ (z[:, 1] > 0)).astype(np.float64)
    mlp = fit_mlp(z, y, hidden=4, l2=1e-2, seed=0)
    logit = np.tanh(z @ mlp.hidden_weights + mlp.hidden_bias) @ mlp.weights + mlp.bias
    assert np.mean((logit > 0) == (y > 0.5)) > 0.95


def test_mlp_gate_is_deterministic_and_checks_its_options(parts: tuple[Trace, Trace]) -> None:
    a, b = train_gate(parts[0], hidden=8, seed=0), train_gate(parts[0], hidden=8, seed=0)
    assert a.params() == b.params()
    c = train_gate(parts[0], hidden=8, seed=1)
    assert c.params()["hidden_weights"] != a.params()["hidden_weights"]  # the seed draws the start
    logistic = train_gate(parts[0])
    assert "hidden_weights" not in logistic.params()  # a logistic gate's params are as before the MLP
    with pytest.raises(sw.StopwiseError, match="The 'hidden' parameter of train_gate must be an int >= 1. Got 0"):
        train_gate(parts[0], hidden=0)
    with pytest.raises(sw.StopwiseError, match="The 'l2' parameter of train_gate must be a positive number. Got -1"):
        train_gate(parts[0], hidden=4, l2=-1.0)


def test_mlp_params_are_checked(parts: tuple[Trace, Trace]) -> None:
    params = train_gate(parts[0], hidden=4).params()
    with pytest.raises(sw.StopwiseError, match="The 'hidden_weights' parameter of ExitGate must be a finite 15 x units"):
        ExitGate(**{**params, "hidden_weights": [[1.0] * 4] * 14})
    with pytest.raises(sw.StopwiseError, match="The 'hidden_bias' parameter of ExitGate must be 4 finite numbers"):
        ExitGate(**{**params, "hidden_bias": [0.0] * 3})
    with pytest.raises(sw.StopwiseError, match="The 'weights' parameter of ExitGate must be 4 finite numbers \\(one per hidden unit"):
        ExitGate(**{**params, "weights": [0.0] * 15})
    with pytest.raises(sw.StopwiseError, match="The 'hidden_bias' parameter of ExitGate must be given together"):
        ExitGate(**{k: v for k, v in params.items() if k != "hidden_weights"})


def test_save_load_keeps_the_kind_and_the_decisions(gate: ExitGate, parts: tuple[Trace, Trace], tmp_path: Path) -> None:
    save_gate(gate, tmp_path)
    body = json.loads((tmp_path / GATE_NAME).read_text())
    assert body["kind"] == gate.kind
    loaded = load_gate(tmp_path, base_model="bert-6x8-abc", heads="h1")
    assert loaded.kind == gate.kind
    np.testing.assert_array_equal(loaded.z(parts[1]), gate.z(parts[1]))
    for lam in (0.5, 0.8, 0.95):
        np.testing.assert_array_equal(loaded.halts(parts[1], lam), gate.halts(parts[1], lam))
    other = "mlp" if gate.kind == "logistic" else "logistic"
    (tmp_path / GATE_NAME).write_text(json.dumps({**body, "kind": other}))
    with pytest.raises(sw.StopwiseError, match=f"which make a '{gate.kind}' gate\\). Got '{other}' instead"):
        load_gate(tmp_path, base_model="bert-6x8-abc", heads="h1")


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


def _engine_round_trip(clf: object, texts: list[str], labels: np.ndarray, *, epsilon: float) -> None:
    """Heads, then a logistic and an MLP gate on one third of the texts, each calibrated on another
    third and predicted through the engine on those texts: the online exits equal ``rule.halts``
    on the recorded trace."""
    from stopwise.encoder import EarlyExitClassifier

    assert isinstance(clf, EarlyExitClassifier)
    third = len(texts) // 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf.fit(texts[:third], labels[:third], epochs=20, progress=False)
        gate_trace = clf.record(texts[third : 2 * third], labels[third : 2 * third], progress=False)
        cal_trace = clf.record(texts[2 * third :], labels[2 * third :], progress=False)
    for hidden in (None, 4):
        gate = train_gate(gate_trace, hidden=hidden)
        assert gate.base_model == clf.base_id and gate.heads == clf.heads_id and gate.n_layers == clf.n_layers
        with pytest.raises(sw.StopwiseError, match="calibration split must be disjoint"):
            calibrate_gate(gate_trace, gate, epsilon=epsilon, delta=0.2)
        cert = calibrate_gate(cal_trace, gate, epsilon=epsilon, delta=0.2)
        assert cert.certified
        offline = cert.make_rule().halts(cal_trace) + 1
        assert offline.min() < clf.n_layers  # some rows exit early, so the comparison decides something
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            online = clf.predict(texts[2 * third :], certificate=cert, batch_size=4).exit_layer
        np.testing.assert_array_equal(online, offline)


@pytest.mark.model
def test_gate_on_a_tiny_llama_decides_online_as_recorded() -> None:
    """The decoder path of the engine (RMSNorm folded into mean pooling) with a random 3-layer
    LLaMA, as SmolLM2 runs it, in seconds."""
    torch = pytest.importorskip("torch")
    tf = pytest.importorskip("transformers")
    from stopwise.encoder import EarlyExitClassifier
    from stopwise.encoder.data import bbc_news
    from stopwise.hf.bundled import model_path

    torch.set_num_threads(2)
    cfg = tf.LlamaConfig(hidden_size=32, num_hidden_layers=3, intermediate_size=64, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=30522)
    torch.manual_seed(0)
    model = tf.AutoModel.from_config(cfg).eval()
    tokenizer = tf.AutoTokenizer.from_pretrained(model_path("minilm"))
    data = bbc_news()
    rows = np.random.default_rng(1).permutation(len(data))[:90]
    clf = EarlyExitClassifier.from_base((model, tokenizer), class_names=data.class_names, max_length=16, pooling="mean")
    _engine_round_trip(clf, [data.texts[i] for i in rows], data.labels[rows], epsilon=0.5)


@pytest.mark.model
@pytest.mark.slow
def test_gate_on_smollm2_decides_online_as_recorded() -> None:
    """SmolLM2-135M (30 layers) as a classifier: a handful of texts, logistic and MLP gates."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from stopwise.encoder import EarlyExitClassifier
    from stopwise.encoder.data import bbc_news

    torch.set_num_threads(2)
    data = bbc_news()
    rows = np.random.default_rng(2).permutation(len(data))[:45]
    clf = EarlyExitClassifier.from_base("smollm2", class_names=data.class_names, max_length=16, pooling="mean")
    _engine_round_trip(clf, [data.texts[i] for i in rows], data.labels[rows], epsilon=0.3)


def test_lbfgs_reaches_the_minimum_of_a_convex_quadratic() -> None:
    from stopwise.encoder.gate_mlp import lbfgs

    rng = np.random.default_rng(0)
    a = rng.normal(size=(20, 20))
    hess, b = a @ a.T + np.eye(20), rng.normal(size=20)
    x = lbfgs(lambda v: (float(0.5 * v @ hess @ v - b @ v), hess @ v - b), np.zeros(20), iterations=500, gtol=1e-10)
    np.testing.assert_allclose(x, np.linalg.solve(hess, b), rtol=1e-6, atol=1e-8)
