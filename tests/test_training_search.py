"""benchmarks/training_search.py on a tiny slice, and certify_pruning's grid (issue #38)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

import stopwise as sw
from stopwise.training import EpochPatience, PercentileStopping, curves_to_trace, pruning_trace, scores_of
from stopwise.training.risks import certify_pruning, pruning_grid

ROOT = Path(__file__).parent.parent
K = 32  # evaluations per recorded curve


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    pytest.importorskip("optuna")
    if not (ROOT / "benchmarks" / "data" / "training_sklearn_mlp.npz").exists():
        pytest.skip("benchmarks/data/training_sklearn_mlp.npz not recorded")
    spec = importlib.util.spec_from_file_location("training_search", ROOT / "benchmarks" / "training_search.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def grid(bench: ModuleType) -> Any:
    return bench.load_grid()


@pytest.fixture(scope="module")
def certificate(bench: ModuleType, grid: Any) -> sw.Certificate:
    cert: sw.Certificate = bench.calibrate(grid, bench.rows_of(grid, bench.CAL_SEEDS), 0.05)
    return cert


def _certified(certificate: sw.Certificate) -> Any:
    from stopwise.training.optuna import CertifiedPruner

    return CertifiedPruner(certificate=certificate, monitor="val_acc")


def test_replayed_study_reports_the_recorded_runs_and_counts_their_epochs(bench: ModuleType, grid: Any,
                                                                          certificate: sw.Certificate) -> None:
    log = bench.run_search(grid, dataset=2, search_seed=0, pruner=_certified(certificate), sampler="tpe", budget=200)
    trials = log.study.trials
    assert log.pruned.any() and not log.pruned.all()  # the slice exercises both paths
    for t, row, reported, pruned, config in zip(trials, log.row, log.reported, log.pruned, log.config, strict=True):
        steps = sorted(t.intermediate_values)
        assert steps == list(range(len(steps)))
        np.testing.assert_array_equal([t.intermediate_values[s] for s in steps], grid.acc[row, : len(steps)])
        assert (grid.dataset[row], grid.config[row]) == (2, config)
        assert grid.configs[config] == (t.params["lr"], t.params["width"], t.params["alpha"])
        assert reported == len(steps)  # compute = the epochs actually reported
        assert (reported < K) == pruned == (t.state.name == "PRUNED")
        if not pruned:
            assert t.value == pytest.approx(np.nanmax(grid.acc[row]))
    out = bench.analyse(log, grid, bench.truth(grid, bench.SEARCH_SEEDS)[2], budget=200)
    assert out["compute"] == sum(len(t.intermediate_values) for t in trials) >= 200
    assert out["compute"] - int(log.reported[-1]) < 200  # it stops at the first trial past the budget


def test_trials_replay_the_same_run_whatever_the_pruner(bench: ModuleType, grid: Any,
                                                        certificate: sw.Certificate) -> None:
    import optuna

    nop = bench.run_search(grid, dataset=1, search_seed=3, pruner=optuna.pruners.NopPruner(), sampler="random",
                           budget=160)
    cut = bench.run_search(grid, dataset=1, search_seed=3, pruner=_certified(certificate), sampler="random",
                           budget=160)
    n = min(nop.row.size, cut.row.size)
    # The random sampler's draws do not depend on pruning, and the seed is fixed by the trial number.
    np.testing.assert_array_equal(nop.row[:n], cut.row[:n])
    assert [bench.trial_seed(1, 3, i, bench.SEARCH_SEEDS) for i in range(n)] == grid.seed[nop.row[:n]].tolist()


def test_a_search_is_reproducible_with_hyperband(bench: ModuleType, grid: Any) -> None:
    import optuna

    def run() -> Any:
        pruner = optuna.pruners.HyperbandPruner(min_resource=1, max_resource=K, reduction_factor=3)
        return bench.run_search(grid, dataset=0, search_seed=2, pruner=pruner, sampler="tpe", budget=480)

    a, b = run(), run()
    assert a.pruned.any()
    np.testing.assert_array_equal(a.row, b.row)
    np.testing.assert_array_equal(a.reported, b.reported)


def test_a_nop_pruner_search_never_prunes(bench: ModuleType, grid: Any) -> None:
    import optuna

    log = bench.run_search(grid, dataset=0, search_seed=1, pruner=optuna.pruners.NopPruner(), sampler="tpe",
                           budget=5 * K)
    assert not log.pruned.any() and (log.reported == K).all() and log.row.size == 5
    out = bench.analyse(log, grid, bench.truth(grid, bench.SEARCH_SEEDS)[0], budget=5 * K)
    assert all(out[f"{e:g}"]["good_pruned"] == 0 for e in bench.EPSILONS)
    assert out["best_config_pruned"] is False


def test_calibration_runs_are_disjoint_from_the_searched_runs(bench: ModuleType, grid: Any,
                                                              certificate: sw.Certificate) -> None:
    cal = bench.rows_of(grid, bench.CAL_SEEDS)
    assert not set(bench.CAL_SEEDS) & set(bench.SEARCH_SEEDS)
    assert cal.size == len(bench.CAL_SEEDS) * len(grid.datasets) * len(grid.configs)
    # The certificate saw exactly the good runs of those calibration searches.
    trace = curves_to_trace(grid.acc[cal], mode="max", monitor="val_acc", population=bench.POPULATION)
    assert certificate.n == pruning_trace(trace, within=bench.WITHIN,
                                          groups=grid.dataset[cal] * 1000 + grid.seed[cal]).n
    replayed = np.concatenate([bench.run_search(grid, dataset=g, search_seed=s, pruner=_certified(certificate),
                                                sampler="random", budget=96).row for g in range(3) for s in range(2)])
    assert np.intersect1d(replayed, cal).size == 0
    assert set(grid.seed[replayed].tolist()) <= set(bench.SEARCH_SEEDS)
    # The truth a search is scored by is measured on the search seeds only.
    best = np.nanmax(grid.acc, axis=1)
    rows = np.flatnonzero((grid.dataset == 0) & (grid.config == 7) & np.isin(grid.seed, bench.SEARCH_SEEDS))
    assert bench.truth(grid, bench.SEARCH_SEEDS)[0, 7] == pytest.approx(best[rows].mean())


def test_analyse_counts_compute_to_eps_misses_and_pruned_good_trials(bench: ModuleType, grid: Any) -> None:
    rows = [grid.row(0, c, 10) for c in (0, 1, 2, 3)]
    true_metric = np.zeros(len(grid.configs))
    true_metric[[0, 1, 2, 3]] = [0.5, 0.99, 0.995, 1.0]
    log = bench.SearchLog(config=np.array([0, 3, 1, 2]), row=np.array(rows), reported=np.array([32, 4, 32, 32]),
                          pruned=np.array([False, True, False, False]), study=None)
    out = bench.analyse(log, grid, true_metric, budget=90)
    assert out["compute"] == 100 and out["trials"] == 4
    assert out["0"]["compute_to_eps"] is None  # config 3 (the best) was pruned
    assert out["0.005"]["compute_to_eps"] is None  # config 2 completes at 100 epochs, past the budget of 90
    assert out["0.01"]["compute_to_eps"] == 68  # config 1 completes after 32 + 4 + 32 epochs
    assert out["best_config_tried"] is True and out["best_config_pruned"] is True
    would = np.nanmax(grid.acc[rows], axis=1)
    good = would >= would.max() - 0.02
    assert out["0.02"]["good_trials"] == good.sum() and out["0.02"]["good_pruned"] == int(good[1])
    summary = bench.summarise([out, out], 90)
    assert summary["0.01"]["compute_median"] == 68 and summary["0"]["never_within_budget"] == 1.0
    assert summary["0"]["compute_median"] is None and summary["0"]["compute_mean_miss_as_budget"] == 90
    early = bench.analyse(bench.SearchLog(config=np.array([1]), row=np.array(rows[2:3]), reported=np.array([32]),
                                          pruned=np.array([False]), study=None), grid, true_metric, budget=90)
    ratio = bench.paired({"a": [early, out], "b": [out, out]}, "a", ("b",), 90)
    assert ratio["0.01"]["vs"] == "b" and ratio["0.01"]["pairs"] == 2
    assert ratio["0.01"]["ratio_median"] == pytest.approx((32 / 68 + 1) / 2)
    assert ratio["0"]["pairs"] == 0 and ratio["0"]["ratio_median"] is None


# -- certify_pruning: the λ beyond every good run's statistic ---------------------------------------------
def _calibration_set(grid: Any, bench: ModuleType, seeds: Any) -> tuple[sw.Trace, np.ndarray, PercentileStopping]:
    rows = bench.rows_of(grid, seeds)
    trace = curves_to_trace(grid.acc[rows], mode="max", monitor="val_acc", population="mlp")
    return trace, grid.dataset[rows] * 1000 + grid.seed[rows], PercentileStopping.from_runs(scores_of(trace), warmup=2)


def test_certify_pruning_certifies_where_the_default_grid_cannot(bench: ModuleType, grid: Any) -> None:
    trace, groups, rule = _calibration_set(grid, bench, bench.CAL_SEEDS)
    good = pruning_trace(trace, within=0.02, groups=groups)
    assert 0.99 ** good.n <= 0.1 < 0.99 ** good.n * (1 + good.n * 0.01 / 0.99)  # only zero prunes certify ε = 0.01
    plain = sw.calibrate(good, rule, epsilon=0.01, delta=0.1, risk=sw.LossMatrix(signal="pruned"))
    assert not plain.certified
    cert = certify_pruning(trace, rule, within=0.02, groups=groups, epsilon=0.01, delta=0.1)
    assert cert.certified and cert.n == good.n
    assert (cert.make_rule().halts(good) == good.lengths - 1).all()  # no good calibration run pruned
    pruned_all = (cert.make_rule().halts(trace) < trace.lengths - 1).mean()
    assert 0.2 < pruned_all  # yet it prunes bad runs
    grid_lams = pruning_grid(good, rule)
    assert grid_lams[-1] > np.nanmax(rule.with_lam(None).z(good)[np.isfinite(rule.with_lam(None).z(good))])
    integer = pruning_grid(good, EpochPatience())
    assert integer[-1] == np.max(EpochPatience().z(good)) + 1


@pytest.mark.validity
def test_certify_pruning_guarantee_over_random_splits_of_searches(bench: ModuleType, grid: Any) -> None:
    """P(a run within 0.02 of its search's best is pruned) <= 0.05 with prob. >= 0.9: over 200 random
    20/10 splits of the 30 (data set, seed) searches of seeds 0-9, the held-out good runs pruned
    exceed 0.05 in at most δ + slack of the splits; the median rule at λ = 0 fails the same test."""
    trace, groups, _ = _calibration_set(grid, bench, bench.CAL_SEEDS)
    names, acc = np.unique(groups), grid.acc[bench.rows_of(grid, bench.CAL_SEEDS)]
    rng = np.random.default_rng(0)
    over, naive, reps = 0, 0, 200
    for _ in range(reps):
        cal = np.isin(groups, rng.permutation(names)[:20])
        tr = curves_to_trace(acc[cal], mode="max", monitor="val_acc", population="mlp")
        rule = PercentileStopping.from_runs(scores_of(tr), warmup=2)
        cert = certify_pruning(tr, rule, within=0.02, groups=groups[cal], epsilon=0.05, delta=0.1)
        test = pruning_trace(curves_to_trace(acc[~cal], mode="max", monitor="val_acc", population="mlp"), within=0.02,
                             groups=groups[~cal])
        pruned = (cert.make_rule().halts(test) < test.lengths - 1).mean() if cert.certified else 0.0
        over += pruned > 0.05
        naive += (rule.halts(test, 0.0) < test.lengths - 1).mean() > 0.05
    slack = 3 * math.sqrt(0.1 * 0.9 / reps)
    assert over / reps <= 0.1 + slack
    assert naive / reps > 0.1 + slack


def test_certify_pruning_bad_inputs(bench: ModuleType, grid: Any) -> None:
    trace, groups, rule = _calibration_set(grid, bench, (0, 1))
    with pytest.raises(sw.CalibrationError, match=r"certify_pruning: \d+ of 120 runs end within 0.02"):
        certify_pruning(trace, rule, within=0.02, groups=groups, epsilon=0.01)
    with pytest.raises(sw.StopwiseError, match="The 'epsilon' parameter of certify_pruning must be a probability"):
        certify_pruning(trace, rule, within=0.02, groups=groups, epsilon=1.5)
    with pytest.raises(sw.StopwiseError, match="chooses its own grid"):
        certify_pruning(trace, rule, within=0.02, groups=groups, epsilon=0.1, grid=10)
