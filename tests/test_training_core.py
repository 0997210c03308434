"""stopwise.training core: curves as traces, training rules, the online RunMonitor, certify."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import stopwise as sw
from stopwise.training import (
    CurveExtrapolation,
    CurveRecorder,
    EpochPatience,
    PercentileStopping,
    PlateauGain,
    RunMonitor,
    certify,
    check_certificate,
    curves_to_trace,
    pruning_trace,
    read_run,
    regret_at,
    scores_of,
)

DATA = Path(__file__).parent.parent / "benchmarks" / "data" / "training_sklearn_mlp.npz"


def _real_curves() -> tuple[np.ndarray, np.ndarray]:
    """Recorded sklearn MLP validation losses and accuracies (finite runs only)."""
    if not DATA.exists():
        pytest.skip("benchmarks/data/training_sklearn_mlp.npz not recorded")
    with np.load(DATA) as d:
        loss, acc = d["val_loss"].astype(np.float64), d["val_acc"].astype(np.float64)
    ok = np.isfinite(loss).all(axis=1)
    return loss[ok], acc[ok]


def _toy(n: int = 400, k: int = 30, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rate = rng.uniform(0.05, 0.5, size=(n, 1))
    top = rng.uniform(0.6, 0.95, size=(n, 1))
    t = np.arange(1, k + 1)[None, :]
    return np.clip(top * (1 - np.exp(-rate * t)) + rng.normal(0, 0.01, (n, k)), 0, 1)


def _rules(k: int, trace: sw.Trace) -> list[tuple[sw.Rule, float]]:
    return [
        (EpochPatience(), 3.0), (EpochPatience(min_delta=0.002), 5.0),
        (PercentileStopping.from_runs(scores_of(trace)[:50], warmup=3), 0.01),
        (CurveExtrapolation(horizon=k), 0.002), (PlateauGain(horizon=k, window=5), 0.01),
    ]


@pytest.mark.parametrize("mode", ["min", "max"])
def test_monitor_matches_offline_halts_and_restore_best(mode: str) -> None:
    loss, acc = _real_curves()
    rows = np.random.default_rng(0).choice(len(acc), size=120, replace=False)
    values = (loss if mode == "min" else acc)[rows]
    trace = curves_to_trace(values, mode=mode, monitor="m", population="mlp", bound=50.0)  # type: ignore[arg-type]
    for rule, lam in _rules(values.shape[1], trace):
        halts = rule.halts(trace, lam)
        assert (halts < trace.n_stages - 1).any(), rule
        for i in range(trace.n):
            mon = RunMonitor(rule=rule, lam=lam, monitor="m", mode=mode)  # type: ignore[arg-type]
            stop_at = next((k for k, v in enumerate(values[i]) if mon.step(float(v))), None)
            expected = None if halts[i] == trace.n_stages - 1 and not mon.stopped else int(halts[i])
            assert stop_at == expected, (rule, i)
            last = mon.stage - 1
            assert mon.best_stage == trace.predictions[i, last]
            assert mon.best_value == pytest.approx(values[i, mon.best_stage])


def test_patience_rule_is_lightning_semantics() -> None:
    # Lightning: improvement iff current < best - min_delta; stop when wait >= patience.
    vals = [1.0, 0.9, 0.95, 0.91, 0.899, 0.97, 0.98]
    mon = RunMonitor.patience(2, min_delta=0.01)
    stops = [mon.step(v) for v in vals]
    # 0.9 improves; 0.95, 0.91 do not -> wait 2 at evaluation 3; 0.899 is never seen.
    assert stops.index(True) == 3
    assert mon.reason.startswith("patience 2 reached at evaluation 3")
    assert (mon.best_value, mon.best_stage) == (0.9, 1)
    assert mon.step(0.1) is True and mon.stage == 4  # idempotent after the stop


def test_nan_stops_at_once_and_check_finite_off() -> None:
    mon = RunMonitor.patience(10)
    assert not mon.step(0.5)
    assert mon.step(float("nan"))
    assert "became nan at evaluation 1: diverged" in mon.reason
    off = RunMonitor(rule=EpochPatience(lam=10), check_finite=False)
    assert not off.step(0.5) and not off.step(float("inf")) and not off.stopped


def test_state_dict_round_trip_is_json() -> None:
    mon = RunMonitor.patience(3, monitor="val_acc", mode="max")
    for v in (0.1, 0.5, 0.4):
        mon.step(v)
    state = json.loads(json.dumps(mon.state_dict()))
    again = RunMonitor.patience(3, monitor="val_acc", mode="max")
    again.load_state_dict(state)
    assert (again.stage, again.best_stage, again.best_value) == (3, 1, 0.5)
    assert [again.step(v) for v in (0.45, 0.3)] == [mon.step(v) for v in (0.45, 0.3)] == [False, True]
    with pytest.raises(sw.StopwiseError, match="mode"):
        RunMonitor.patience(3, monitor="val_acc", mode="min").load_state_dict(state)


def test_certify_then_monitor_and_mismatches() -> None:
    trace = curves_to_trace(_toy(), mode="max", monitor="val_acc", population="toy")
    cert = certify(trace, EpochPatience(), epsilon=0.02, delta=0.1)
    assert cert.certified and cert.savings > 0
    assert regret_at(trace, cert.make_rule().halts(trace)).mean() <= 0.02
    mon = RunMonitor(certificate=sw.Certificate.from_json(cert.to_json()), monitor="val_acc", mode="max")
    curve = _toy(1, seed=5)[0]
    stop = next(k for k, v in enumerate(curve) if mon.step(float(v)))
    assert stop == cert.make_rule().halts(curves_to_trace([curve], mode="max", monitor="val_acc", population="toy"))[0]
    with pytest.raises(sw.StopwiseError, match="mode = 'max'.*mode = 'min'"):
        RunMonitor(certificate=cert, monitor="val_acc", mode="min")
    with pytest.raises(sw.StopwiseError, match="monitor = 'val_acc'.*monitor = 'val_loss'"):
        RunMonitor(certificate=cert, monitor="val_loss", mode="max")
    with pytest.raises(sw.StopwiseError, match="population = 'toy'.*population = 'cifar'"):
        RunMonitor(certificate=cert, monitor="val_acc", mode="max", population="cifar")
    other = curves_to_trace(_toy(), mode="max", monitor="val_acc", population="other-search")
    with pytest.raises(sw.StopwiseError, match="'toy'.*'other-search'"):
        check_certificate(cert, other)
    with pytest.raises(sw.CalibrationError, match=r"n = 20.*needs at least n = \d+"):
        certify(curves_to_trace(_toy(20), mode="max", monitor="val_acc", population="toy"), EpochPatience(), epsilon=0.005)
    with pytest.raises(sw.StopwiseError, match="monitor = 'val_acc'.*certify was given monitor = 'val_loss'"):
        certify(trace, EpochPatience(), epsilon=0.02, monitor="val_loss")
    # A certificate of another task (here: layers of a classifier) is refused, not read as curves.
    from stopwise.synthetic import synthetic_trace

    layers = sw.calibrate(synthetic_trace(2000, stages=6, seed=0), sw.MaxProb(), epsilon=0.05, delta=0.1)
    with pytest.raises(sw.StopwiseError, match="not calibrated on learning curves"):
        RunMonitor(certificate=layers, monitor="val_acc", mode="max")


def test_bad_curves_raise_naming_the_value() -> None:
    with pytest.raises(sw.StopwiseError, match="Run 1 has m = nan at evaluation 2"):
        curves_to_trace([[1, 2, 3], [1, 2, np.nan]], mode="max", monitor="m", population="p")
    t = curves_to_trace([[1, 2, 3], [1, 2, np.inf]], mode="max", monitor="m", population="p", on_nonfinite="truncate",
                        bound=5, allow_ragged=True)
    assert t.lengths.tolist() == [3, 2]
    with pytest.raises(sw.StopwiseError, match="unequal lengths.*run 1 has 2"):
        curves_to_trace([[1, 2, 3], [1, 2]], mode="max", monitor="m", population="p")
    with pytest.raises(sw.StopwiseError, match="more than bound = 1"):
        curves_to_trace([[3.0, 1.0, 0.5]], mode="min", monitor="val_loss", population="p")
    with pytest.raises(sw.StopwiseError, match="'mode' parameter of curves_to_trace"):
        curves_to_trace([[1.0]], mode="maximize", monitor="m", population="p")  # type: ignore[arg-type]
    with pytest.raises(sw.StopwiseError, match="exactly one of"):
        RunMonitor()


def test_regret_signal_and_restore_best_stage() -> None:
    t = curves_to_trace([[0.5, 0.7, 0.6, 0.7, 0.9]], mode="max", monitor="acc", population="p")
    assert t.predictions[0].tolist() == [0, 1, 1, 1, 4]
    assert np.allclose(t.signals["regret"][0], [0.4, 0.2, 0.2, 0.2, 0.0])
    assert regret_at(t, np.array([2]))[0] == pytest.approx(0.2)


def test_recorder_reads_hf_keras_lightning_logs(tmp_path: Path) -> None:
    hf = [{"loss": 2.0, "step": 10}, {"eval_loss": 1.5, "epoch": 1}, {"loss": 1.0}, {"eval_loss": 1.2, "epoch": 2}]
    assert read_run(hf, monitor="eval_loss") == [1.5, 1.2]
    assert read_run({"val_loss": [0.3, 0.2]}, monitor="val_loss") == [0.3, 0.2]
    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text("epoch,step,train_loss,val_loss\n0,9,1.0,\n0,9,,0.8\n1,19,0.7,\n1,19,,0.6\n")
    assert read_run(csv_path, monitor="val_loss") == [0.8, 0.6]
    with pytest.raises(sw.StopwiseError, match="no column 'val_acc'"):
        read_run(csv_path, monitor="val_acc")
    rec = CurveRecorder(monitor="val_loss", mode="min", population="p")
    rec.add(csv_path)
    rec.add([0.9, 0.5])
    assert rec.to_trace().n == 2


def test_pruning_trace_marks_good_runs() -> None:
    curves = np.array([[0.5, 0.6, 0.9], [0.5, 0.6, 0.85], [0.2, 0.3, 0.3], [0.4, 0.5, 0.6]])
    t = curves_to_trace(curves, mode="max", monitor="acc", population="p")
    pt = pruning_trace(t, within=0.06, groups=["a", "a", "a", "b"])
    assert pt.n == 3 and pt.signals["pruned"].tolist() == [[1, 1, 0]] * 3


def test_rules_registered_and_package_is_light() -> None:
    code = ("import sys, stopwise as sw; r = sw.make_rule('epoch_patience', lam=3); import stopwise.training; "
            "bad = {'torch', 'optuna', 'lightning', 'transformers'} & set(sys.modules); assert not bad, bad; "
            "print(type(r).__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "stopwise.training.rules"
    cfg = PercentileStopping(curve=[0.1, 0.2], lam=0.0).to_config()
    assert sw.make_rule(cfg["name"], lam=cfg["lam"], **cfg["params"]).params() == cfg["params"]


def test_cli_certify_then_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from stopwise.cli import main

    curves = tmp_path / "runs.json"
    curves.write_text(json.dumps(_toy().tolist()))
    cert = tmp_path / "cert.json"
    common = ["--monitor", "val_acc", "--mode", "max", "--population", "toy", "--json"]
    assert main(["training", "certify", str(curves), *common, "--epsilon", "0.02", "-o", str(cert)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["certified"] and out["compute_saved"] > 0
    new = tmp_path / "new.json"
    new.write_text(json.dumps(_toy(seed=9).tolist()))
    assert main(["training", "check", str(cert), str(new), *common]) == 0
    assert json.loads(capsys.readouterr().out)["regret"] <= 0.02
    bad = ["--monitor", "val_acc", "--mode", "min", "--population", "toy", "--bound", "5"]
    assert main(["training", "check", str(cert), str(new), *bad]) == 2
    assert "mode = 'max'" in capsys.readouterr().err


def test_lcdb_loader_reads_installed_csv() -> None:
    import importlib.util

    if importlib.util.find_spec("lcdb") is None:  # its __init__ imports openml: look for the files only
        pytest.skip("the lcdb package is not installed")
    from stopwise.training.lcdb import load_lcdb

    trace = load_lcdb(learners=["SVC_linear"], max_runs=200, seed=1)
    assert trace.n == 200 and trace.meta["model"] == "lcdb-accuracy" and set(trace.meta["learner"]) == {"SVC_linear"}
    assert (np.diff(trace.cost_matrix, axis=1) >= 0).all() and trace.cost_matrix[0, 0] == 16
    halts = EpochPatience(lam=3).halts(trace)
    assert (regret_at(trace, halts) >= 0).all()
    with pytest.raises(sw.StopwiseError, match="absent from database-accuracy.csv: \\['NoSuchLearner'\\]"):
        load_lcdb(learners=["NoSuchLearner"])


def test_pruning_risk_certifies_median_stopping_on_real_runs() -> None:
    _, acc = _real_curves()
    with np.load(DATA) as d:
        groups = d["dataset"][np.isfinite(d["val_loss"]).all(axis=1)]
    trace = curves_to_trace(acc, mode="max", monitor="val_acc", population="mlp")
    rule = PercentileStopping.from_runs(scores_of(trace)[::5], warmup=2)
    good = pruning_trace(trace, within=0.02, groups=groups)
    assert 0 < good.n < trace.n
    cert = sw.calibrate(good, rule, epsilon=0.1, delta=0.1, risk=sw.LossMatrix(signal="pruned"))
    assert cert.certified
    pruned = (cert.make_rule().halts(good) < good.lengths - 1).mean()
    assert pruned <= 0.1
    assert (rule.halts(trace, 0.0) < trace.lengths - 1).mean() > pruned  # it does prune the others


def test_uncertified_certificate_trains_to_the_horizon() -> None:
    import dataclasses

    trace = curves_to_trace(_toy(400), mode="max", monitor="val_acc", population="toy")
    cert = dataclasses.replace(certify(trace, EpochPatience(), epsilon=0.02), certified=False, lam=None)
    mon = RunMonitor(certificate=cert, monitor="val_acc", mode="max")
    stops = [mon.step(float(v)) for v in _toy(1, seed=3)[0]]
    assert stops.index(True) == trace.n_stages - 1 and "certified no early stop" in mon.reason
    assert json.loads(json.dumps(mon.state_dict()))["lam"] == "inf"


def test_tiny_epsilon_refused_at_once_naming_the_size() -> None:
    trace = curves_to_trace(_toy(400), mode="max", monitor="val_acc", population="toy")
    with pytest.raises(sw.CalibrationError, match=r"n = 400 runs.*ε = 1e-06.*at least n = 2302584"):
        certify(trace, EpochPatience(), epsilon=1e-6)
