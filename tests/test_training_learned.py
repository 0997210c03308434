"""LearnedStopping and the boosted trees under it: the fit, the JSON params, online = offline, the
disjointness and horizon checks, aux metrics through curves_to_trace and RunMonitor, and the
promise over random splits of the recorded sklearn-MLP runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

import stopwise as sw
from stopwise.core.boosting import BoostedTrees, fit_boosted_trees
from stopwise.training import (
    EpochPatience,
    LearnedStopping,
    RunMonitor,
    certify,
    curves_to_trace,
    fit_learned_stopping,
    regret_at,
    run_hashes,
)

DATA = Path(__file__).parent.parent / "benchmarks" / "data" / "training_sklearn_mlp.npz"
DELTA = 0.1


def _curves() -> tuple[np.ndarray, np.ndarray]:
    if not DATA.exists():
        pytest.skip("benchmarks/data/training_sklearn_mlp.npz not recorded")
    with np.load(DATA) as d:
        return d["val_acc"].astype(np.float64), d["val_loss"].astype(np.float64)


def _trace(rows: np.ndarray | None = None) -> sw.Trace:
    acc, loss = _curves()
    if rows is not None:
        acc, loss = acc[rows], loss[rows]
    return curves_to_trace(list(acc), mode="max", monitor="val_acc", population="sklearn-mlp",
                           aux={"val_loss": list(loss)})


def _fit(trace: sw.Trace) -> LearnedStopping:
    return fit_learned_stopping(trace, aux=["val_loss"], log_aux=["val_loss"], rounds=40)


# -- boosted trees ---------------------------------------------------------------------------
def _problem(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6))
    return x, np.sin(2 * x[:, 0]) + (x[:, 1] > 0.5) * x[:, 2]


def test_trees_fit_a_nonlinear_function_and_beat_the_mean() -> None:
    x, y = _problem(4000, 0)
    xt, yt = _problem(2000, 1)
    model = fit_boosted_trees(x, y + 0.1 * np.random.default_rng(2).normal(size=y.size), rounds=100, depth=3)
    r2 = 1 - np.mean((model.predict(xt) - yt) ** 2) / yt.var()
    assert r2 > 0.95
    assert model.depth == 3 and model.leaves.shape == (100, 8)


def test_trees_are_deterministic_and_round_trip_through_json() -> None:
    x, y = _problem(1000, 3)
    a, b = fit_boosted_trees(x, y, rounds=20), fit_boosted_trees(x, y, rounds=20)
    assert np.array_equal(a.predict(x), b.predict(x))
    back = BoostedTrees.from_dict(json.loads(json.dumps(a.to_dict(), allow_nan=False)))
    assert np.array_equal(back.predict(x), a.predict(x))


def test_a_constant_target_makes_no_split() -> None:
    x, _ = _problem(200, 4)
    model = fit_boosted_trees(x, np.full(200, 0.25), rounds=5)
    assert np.isinf(model.thresholds).all()
    assert np.allclose(model.predict(x), 0.25)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"x": [[np.nan, 1.0]] * 50, "y": [0.0] * 50}, "must be finite"),
    ({"x": np.zeros(50), "y": np.zeros(50)}, "shape"),
    ({"x": np.zeros((50, 2)), "y": np.zeros(49)}, "'y' parameter"),
    ({"x": np.zeros((50, 2)), "y": np.zeros(50), "learning_rate": 0.0}, "'learning_rate' parameter"),
    ({"x": np.zeros((50, 2)), "y": np.zeros(50), "rounds": -1}, "'rounds'"),
    ({"x": np.zeros((10, 2)), "y": np.zeros(10)}, "at least 2 \\* min_leaf"),
])
def test_trees_refuse_bad_input(kwargs: dict, match: str) -> None:
    with pytest.raises(sw.StopwiseError, match=match):
        fit_boosted_trees(**kwargs)


def test_trees_from_dict_names_what_does_not_fit() -> None:
    x, y = _problem(300, 5)
    body = fit_boosted_trees(x, y, rounds=3).to_dict()
    with pytest.raises(sw.StopwiseError, match="lack \\['leaves'\\]"):
        BoostedTrees.from_dict({k: v for k, v in body.items() if k != "leaves"})
    with pytest.raises(sw.StopwiseError, match="'features' parameter"):
        BoostedTrees.from_dict({**body, "features": [[99] * 7] * 3})
    with pytest.raises(sw.StopwiseError, match="'thresholds' parameter"):
        BoostedTrees.from_dict({**body, "thresholds": body["thresholds"][:2]})
    with pytest.raises(sw.StopwiseError, match="shape \\(rows, 6\\)"):
        BoostedTrees.from_dict(body).predict(np.zeros((2, 5)))


# -- aux metrics in traces -------------------------------------------------------------------
def test_curves_to_trace_keeps_aux_metrics_and_checks_them() -> None:
    acc = [[0.5, 0.6, 0.7], [0.4, 0.5, 0.45]]
    loss = [[1.0, 0.8, 0.7], [1.2, 1.0, 1.1]]
    trace = curves_to_trace(acc, mode="max", monitor="acc", population="p", aux={"val_loss": loss})
    assert np.array_equal(trace.signals["val_loss"], np.array(loss))
    with pytest.raises(sw.StopwiseError, match="Run 1 has 2 values of the aux metric 'val_loss' but 3"):
        curves_to_trace(acc, mode="max", monitor="acc", population="p", aux={"val_loss": [loss[0], loss[1][:2]]})
    with pytest.raises(sw.StopwiseError, match="other than 'score'"):
        curves_to_trace(acc, mode="max", monitor="acc", population="p", aux={"score": loss})
    diverged = [loss[0], [1.2, float("nan"), 1.1]]
    with pytest.raises(sw.StopwiseError, match="Run 1 has val_loss = nan at evaluation 1"):
        curves_to_trace(acc, mode="max", monitor="acc", population="p", aux={"val_loss": diverged})
    cut = curves_to_trace(acc, mode="max", monitor="acc", population="p", aux={"val_loss": diverged},
                          on_nonfinite="truncate", allow_ragged=True)
    assert cut.lengths.tolist() == [3, 1]


# -- the rule --------------------------------------------------------------------------------
def test_online_equals_offline_and_the_certificate_round_trips() -> None:
    acc, loss = _curves()
    rule = _fit(_trace(np.arange(300)))
    cert = certify(_trace(np.arange(300, 1200)), rule, epsilon=0.02, delta=DELTA)
    assert cert.certified
    test_rows = np.arange(300, 420)
    offline = cert.make_rule().halts(_trace(test_rows))
    assert 0 < offline.mean() < 31  # it stops some runs early, not all at once
    loaded = sw.Certificate.from_dict(json.loads(json.dumps(cert.to_dict())))
    online = []
    for i in test_rows:
        monitor = RunMonitor(certificate=loaded, monitor="val_acc", mode="max")
        k = 0
        while not monitor.step(acc[i, k], aux={"val_loss": loss[i, k]}):
            k += 1
        online.append(k)
    assert online == offline.tolist()


def test_monitor_state_replays_aux_history() -> None:
    acc, loss = _curves()
    rule = _fit(_trace(np.arange(300))).with_lam(0.01)
    a = RunMonitor(rule=rule, monitor="val_acc", mode="max")
    for k in range(5):
        a.step(acc[500, k], aux={"val_loss": loss[500, k]})
    b = RunMonitor(rule=rule, monitor="val_acc", mode="max")
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert b.aux_history == a.aux_history and b.stage == 5
    for k in range(5, 32):
        assert a.step(acc[500, k], aux={"val_loss": loss[500, k]}) == b.step(acc[500, k], aux={"val_loss": loss[500, k]})
    with pytest.raises(sw.StopwiseError, match="reads the metric\\(s\\) \\['val_loss'\\] beside 'val_acc'"):
        RunMonitor(rule=rule, monitor="val_acc", mode="max").step(0.5)


def test_certify_refuses_runs_the_model_was_fitted_on() -> None:
    rule = _fit(_trace(np.arange(300)))
    with pytest.raises(sw.StopwiseError, match="fitted on 50 of the 950 calibration runs"):
        certify(_trace(np.arange(250, 1200)), rule, epsilon=0.02)
    with pytest.raises(sw.StopwiseError, match="does not know the runs"):
        certify(_trace(np.arange(300, 1200)), LearnedStopping(**rule.params()), epsilon=0.02)
    short = curves_to_trace(list(_curves()[0][300:, :20]), mode="max", monitor="val_acc", population="sklearn-mlp",
                            aux={"val_loss": list(_curves()[1][300:, :20])})
    with pytest.raises(sw.StopwiseError, match="runs of 32 evaluations; the calibration trace has 20"):
        certify(short, rule, epsilon=0.02)


def test_rule_refuses_bad_params_and_missing_signals() -> None:
    rule = _fit(_trace(np.arange(200)))
    params = rule.params()
    with pytest.raises(sw.StopwiseError, match="reads 14 features; with aux = \\[\\] the rule computes 11"):
        LearnedStopping(**{**params, "aux": [], "log_aux": []})
    with pytest.raises(sw.StopwiseError, match="'log_aux' parameter"):
        LearnedStopping(**{**params, "log_aux": ["train_loss"]})
    no_aux = curves_to_trace(list(_curves()[0][:5]), mode="max", monitor="val_acc", population="sklearn-mlp")
    with pytest.raises(sw.StopwiseError, match="auxiliary metric\\(s\\) \\['val_loss'\\] at evaluation 0"):
        rule.with_lam(0.01).halts(no_aux)
    with pytest.raises(sw.StopwiseError, match="must be > 0"):
        RunMonitor(rule=rule.with_lam(0.01), monitor="val_acc", mode="max").step(0.5, aux={"val_loss": 0.0})


def test_run_hashes_tell_runs_apart_by_what_the_rule_reads() -> None:
    trace = _trace(np.arange(40))
    assert np.array_equal(run_hashes(trace, aux=["val_loss"]), run_hashes(_trace(np.arange(40)), aux=["val_loss"]))
    assert len(set(run_hashes(trace, aux=["val_loss"]).tolist())) == 40
    with pytest.raises(sw.StopwiseError, match="lacks the aux metric"):
        run_hashes(trace, aux=["train_loss"])


# -- the promise -----------------------------------------------------------------------------
def _violations(splits: int, eps: float) -> tuple[float, float, float]:
    trace = _trace()
    n_cal = int(0.7 * trace.n)
    bad, saved, saved_patience = 0, [], []
    for s in range(splits):
        perm = np.random.default_rng(s).permutation(trace.n)
        fit, rest, test = perm[: n_cal // 4], perm[n_cal // 4 : n_cal], np.sort(perm[n_cal:])
        fit_t, rest_t, test_t = trace[np.sort(fit)], trace[np.sort(rest)], trace[test]
        fit_t = fit_t[np.flatnonzero(~np.isin(run_hashes(fit_t, aux=["val_loss"]), run_hashes(rest_t, aux=["val_loss"])))]
        halts = certify(rest_t, _fit(fit_t), epsilon=eps, delta=DELTA).make_rule().halts(test_t)
        bad += int(regret_at(test_t, halts).mean() > eps)
        saved.append(1 - test_t.cost_at(halts).sum() / test_t.full_cost.sum())
        p10 = EpochPatience(lam=10).halts(test_t)
        saved_patience.append(1 - test_t.cost_at(p10).sum() / test_t.full_cost.sum())
    return bad / splits, float(np.mean(saved)), float(np.mean(saved_patience))


def _slack(splits: int) -> float:
    return float(stats.binom.ppf(0.999, splits, DELTA)) / splits


def test_learned_stopping_keeps_its_promise_short() -> None:
    share, saved, patience = _violations(12, 0.02)
    assert share <= _slack(12)
    assert saved > patience  # it saves more than patience 10, so the check is not vacuous


@pytest.mark.slow
@pytest.mark.validity
@pytest.mark.parametrize("eps", [0.01, 0.02])
def test_learned_stopping_keeps_its_promise(eps: float) -> None:
    share, _, _ = _violations(200, eps)
    assert share <= _slack(200)


def test_optuna_pruner_refuses_a_rule_that_reads_aux_metrics() -> None:
    pytest.importorskip("optuna")
    from stopwise.training.optuna import CertifiedPruner

    rule = _fit(_trace(np.arange(200)))
    with pytest.raises(sw.StopwiseError, match="reports one value per step"):
        CertifiedPruner(rule=rule, lam=0.01, monitor="val_acc")
    plain = fit_learned_stopping(curves_to_trace(list(_curves()[0][:200]), mode="max", monitor="val_acc",
                                                 population="sklearn-mlp"), rounds=5)
    assert CertifiedPruner(rule=plain, lam=0.01, monitor="val_acc").rule is plain
