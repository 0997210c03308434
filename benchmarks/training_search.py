"""Search time and pruning risk: Optuna studies over the recorded MLP grid, one per pruner (issue #38).

A search is a real Optuna study over one data set's grid (``lr`` x ``width`` x ``alpha``: 20
configurations, categorical parameters) with ``TPESampler(seed=s)`` or ``RandomSampler(seed=s)``,
the same sampler and seed for every pruner. Each trial replays the recorded curve of its
configuration (``benchmarks/data/training_sklearn_mlp.npz``) for one recording seed chosen from
the search seeds by (data set, s, trial number) alone, so every pruner sees the same run at the
same trial number: ``trial.report(val_acc, epoch)`` epoch by epoch, ``should_prune()`` after each
epoch but the last, and the best epoch's accuracy as the objective (restore-best).

Pruners: none (``NopPruner``), ``MedianPruner`` and ``PercentilePruner(25)`` (both 2 warm-up
steps, like the certified rule), ``SuccessiveHalvingPruner()``, ``HyperbandPruner(1, 32, 3)``,
and stopwise's ``CertifiedPruner`` with a certificate (median-stopping rule,
``PercentileStopping.from_runs(warmup=2)``, λ by :func:`stopwise.training.risks.certify_pruning`):
P(a run ending within 0.02 of its search's best is pruned) <= ε_p in {0.01, 0.05}, δ = 0.1.
Disjoint data: the certificates are calibrated on the recording seeds 0-9 of all three data sets
(30 calibration searches = (data set, seed) over the 20 configurations); the searches replay
seeds 10-19 only. The rule's median curve is fitted on those calibration runs too, which makes
the promise approximate (tests/test_training_search.py checks it over random splits).

Per search: ``compute_to_eps`` is the number of epochs reported until the study first holds a
COMPLETED trial whose configuration's true metric (mean over seeds 10-19 of its best validation
accuracy) is within ε of the grid's best (ε in 0.005, 0.01, 0.02, and 0: the best itself), None
when it does not happen within the budget of ``BUDGET`` epochs (20 full trials, as many as the
grid has configurations; at most ``MAX_TRIALS`` trials). Pruning risk: the share of searches in which a trial that would
have ended within ε of the search's best (over its trials' full curves) was pruned, the share of
such trials pruned (what the certificate bounds, at 0.02), and the share of searches that tried
the grid's best configuration and pruned it.

    nice -n 10 python benchmarks/training_search.py --json     # benchmarks/results/training_search.json (+ .png)
    python benchmarks/training_search.py --quick               # 1-minute smoke run, written to a temp dir
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

import stopwise as sw
from stopwise.training import PercentileStopping, curves_to_trace, scores_of
from stopwise.training.risks import certify_pruning

HERE = Path(__file__).parent
DATA = HERE / "data" / "training_sklearn_mlp.npz"
EPSILONS = (0.0, 0.005, 0.01, 0.02)  # 0: the grid's best configuration itself
RISK_EPSILONS = (0.01, 0.05)
DELTA = 0.1
WITHIN = 0.02  # the certificate's "good run": within this of its search's best
WARMUP = 2
CAL_SEEDS = tuple(range(10))
SEARCH_SEEDS = tuple(range(10, 20))
BUDGET = 640  # epochs per search: 20 full trials
MAX_TRIALS = 200
MONITOR = "val_acc"
POPULATION = "sklearn-mlp-grid"
OPTUNA_PRUNERS = ("median", "percentile_25", "successive_halving", "hyperband")
DESIGN = {
    "search": "one Optuna study per (sampler, data set, search seed s): categorical lr x width x alpha over the data "
              "set's 20 configurations, TPESampler(seed=s) / RandomSampler(seed=s) for every pruner; trial t replays "
              "its configuration's run for the recording seed fixed by (data set, s, t), one report per epoch",
    "true_metric": "a configuration's mean best validation accuracy over the search seeds",
    "calibration": "PercentileStopping.from_runs(warmup=2) fitted on the runs of recording seeds 0-9 (all data sets), "
                   "certify_pruning(within=0.02, groups=(data set, seed)) on the same runs; searches: seeds 10-19",
    "risk": "searches_with_good_trial_pruned: share of searches that pruned a trial whose full run ends within ε of "
            "the search's best full run; good_trials_pruned: share of such trials pruned (bounded at ε = 0.02)",
}


@dataclass(frozen=True)
class Grid:
    """The recorded runs: curves, their data set, recording seed and configuration index."""

    acc: np.ndarray
    dataset: np.ndarray
    seed: np.ndarray
    config: np.ndarray
    configs: tuple[tuple[float, float, float], ...]
    datasets: tuple[str, ...]

    def row(self, dataset: int, config: int, seed: int) -> int:
        hit = np.flatnonzero((self.dataset == dataset) & (self.config == config) & (self.seed == seed))
        if hit.size != 1:
            raise ValueError(f"expected one run for data set {dataset}, config {config}, seed {seed}; got {hit.size}")
        return int(hit[0])


def load_grid(path: Path = DATA) -> Grid:
    """The recorded grid from ``record_training_curves.py``'s file."""
    with np.load(path) as d:
        keys = np.stack([d["lr"], d["width"], d["alpha"]], axis=1).astype(np.float64)
        configs = tuple(sorted({(float(a), float(b), float(c)) for a, b, c in keys}))
        index = {c: i for i, c in enumerate(configs)}
        return Grid(acc=d["val_acc"].astype(np.float64), dataset=d["dataset"].astype(np.int64),
                    seed=d["seed"].astype(np.int64), config=np.array([index[tuple(k)] for k in keys.tolist()]),
                    configs=configs, datasets=tuple(json.loads(str(d["meta"]))["datasets"]))


def rows_of(grid: Grid, seeds: Sequence[int]) -> np.ndarray:
    """The runs recorded with one of ``seeds`` (all data sets)."""
    return np.flatnonzero(np.isin(grid.seed, list(seeds)))


def calibrate(grid: Grid, rows: np.ndarray, epsilon: float) -> sw.Certificate:
    """The pruning certificate on ``rows``: searches = (data set, seed), see the module docstring."""
    trace = curves_to_trace(grid.acc[rows], mode="max", monitor=MONITOR, population=POPULATION)
    rule = PercentileStopping.from_runs(scores_of(trace), warmup=WARMUP)
    return certify_pruning(trace, rule, within=WITHIN, groups=grid.dataset[rows] * 1000 + grid.seed[rows],
                           epsilon=epsilon, delta=DELTA)


def truth(grid: Grid, seeds: Sequence[int]) -> np.ndarray:
    """(data sets, configs): each configuration's true metric, its mean best accuracy over ``seeds``."""
    best = np.nanmax(grid.acc, axis=1)
    out = np.zeros((len(grid.datasets), len(grid.configs)))
    for g in range(len(grid.datasets)):
        for c in range(len(grid.configs)):
            out[g, c] = best[(grid.dataset == g) & (grid.config == c) & np.isin(grid.seed, list(seeds))].mean()
    return out


def make_pruners(certificates: dict[str, sw.Certificate]) -> dict[str, Callable[[], Any]]:
    """A fresh pruner per study, by name."""
    import optuna

    from stopwise.training.optuna import CertifiedPruner

    k = 32
    out: dict[str, Callable[[], Any]] = {
        "none": optuna.pruners.NopPruner,
        "median": lambda: optuna.pruners.MedianPruner(n_warmup_steps=WARMUP),
        "percentile_25": lambda: optuna.pruners.PercentilePruner(25.0, n_warmup_steps=WARMUP),
        "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
        "hyperband": lambda: optuna.pruners.HyperbandPruner(min_resource=1, max_resource=k, reduction_factor=3),
    }
    for name, cert in certificates.items():
        out[name] = partial(CertifiedPruner, certificate=cert, monitor=MONITOR)
    return out


@dataclass
class SearchLog:
    """One study's trials in order: configuration, replayed run, epochs reported, pruned or not."""

    config: np.ndarray
    row: np.ndarray
    reported: np.ndarray
    pruned: np.ndarray
    study: Any


def trial_seed(dataset: int, search_seed: int, number: int, run_seeds: Sequence[int]) -> int:
    """The recording seed trial ``number`` replays: fixed by (data set, search seed, number) alone."""
    return int(run_seeds[int(np.random.default_rng([dataset, search_seed, number]).integers(len(run_seeds)))])


def run_search(grid: Grid, *, dataset: int, search_seed: int, pruner: Any, sampler: str,
               run_seeds: Sequence[int] = SEARCH_SEEDS, budget: int = BUDGET,
               max_trials: int = MAX_TRIALS) -> SearchLog:
    """A real Optuna study replaying recorded runs until ``budget`` epochs are spent."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    make = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler}[sampler]
    lrs, widths, alphas = (sorted({c[i] for c in grid.configs}) for i in range(3))
    index = {c: i for i, c in enumerate(grid.configs)}
    spent: dict[int, int] = {}

    def objective(trial: optuna.Trial) -> float:
        key = (trial.suggest_categorical("lr", lrs), trial.suggest_categorical("width", widths),
               trial.suggest_categorical("alpha", alphas))
        row = grid.row(dataset, index[key], trial_seed(dataset, search_seed, trial.number, run_seeds))
        trial.set_user_attr("row", row)
        curve = grid.acc[row]
        spent[trial.number] = 0
        for k, value in enumerate(curve):
            trial.report(float(value), k)
            spent[trial.number] += 1
            if k < curve.size - 1 and trial.should_prune():
                raise optuna.TrialPruned()
        return float(np.nanmax(curve))

    def stop(study: optuna.Study, _: Any) -> None:
        if sum(spent.values()) >= budget:
            study.stop()

    # Named: HyperbandPruner assigns brackets by a hash of the study name, random by default.
    study = optuna.create_study(study_name=f"search-{sampler}-{dataset}-{search_seed}", direction="maximize",
                                sampler=make(seed=search_seed), pruner=pruner)
    study.optimize(objective, n_trials=max_trials, callbacks=[stop])
    trials = study.trials
    return SearchLog(config=grid.config[[t.user_attrs["row"] for t in trials]],
                     row=np.array([t.user_attrs["row"] for t in trials], dtype=np.int64),
                     reported=np.array([spent[t.number] for t in trials], dtype=np.int64),
                     pruned=np.array([t.state == optuna.trial.TrialState.PRUNED for t in trials]), study=study)


def analyse(log: SearchLog, grid: Grid, true_metric: np.ndarray, *, budget: int = BUDGET) -> dict[str, Any]:
    """One search's figures (see the module docstring); ``true_metric``: its data set's row of :func:`truth`."""
    cum = np.cumsum(log.reported)
    done = ~log.pruned
    top = true_metric.max()
    out: dict[str, Any] = {"trials": int(log.row.size), "compute": int(cum[-1]) if cum.size else 0}
    would = np.nanmax(grid.acc[log.row], axis=1)
    for eps in EPSILONS:
        hit = np.flatnonzero(done & (true_metric[log.config] >= top - eps))
        first = int(cum[hit[0]]) if hit.size and cum[hit[0]] <= budget else None
        good = would >= would.max() - eps
        out[f"{eps:g}"] = {"compute_to_eps": first, "good_trials": int(good.sum()),
                           "good_pruned": int((good & log.pruned).sum())}
    best = np.flatnonzero(true_metric == top)
    tried = np.isin(log.config, best)
    out["best_config_tried"] = bool(tried.any())
    out["best_config_pruned"] = bool((tried & log.pruned).any())
    # The true metric of the best completed configuration after each trial, for the plot.
    found = np.maximum.accumulate(np.where(done, true_metric[log.config], -np.inf))
    out["curve"] = (cum.tolist(), (top - found).tolist())
    return out


def summarise(per_search: list[dict[str, Any]], budget: int) -> dict[str, Any]:
    """Median, quartiles and misses of compute-to-ε, and the pruning risks, over searches."""
    out: dict[str, Any] = {"searches": len(per_search),
                           "mean_trials": float(np.mean([s["trials"] for s in per_search])),
                           "mean_compute": float(np.mean([s["compute"] for s in per_search])),
                           "best_config_tried": float(np.mean([s["best_config_tried"] for s in per_search])),
                           "best_config_pruned": float(np.mean([s["best_config_pruned"] for s in per_search]))}
    for eps in EPSILONS:
        key = f"{eps:g}"
        # A miss counts as beyond the budget, so the quantiles stay honest (inf shows as None).
        c = np.array([np.inf if s[key]["compute_to_eps"] is None else s[key]["compute_to_eps"] for s in per_search])
        q = np.quantile(c, [0.25, 0.5, 0.75], method="lower")
        good = sum(s[key]["good_trials"] for s in per_search)
        out[key] = {"compute_median": _finite(q[1]), "compute_q25": _finite(q[0]), "compute_q75": _finite(q[2]),
                    "compute_mean_miss_as_budget": float(np.minimum(c, budget).mean()),
                    "never_within_budget": float(np.mean(~np.isfinite(c))),
                    "searches_with_good_trial_pruned": float(np.mean([s[key]["good_pruned"] > 0 for s in per_search])),
                    "good_trials_pruned": sum(s[key]["good_pruned"] for s in per_search) / max(good, 1)}
    return out


def paired(results: dict[str, list[dict[str, Any]]], name: str, others: Sequence[str], budget: int) -> dict[str, Any]:
    """compute-to-ε of ``name`` over the best of ``others``, paired by search. The best has the
    smallest mean compute-to-ε with a miss counted as the whole budget (medians tie: most searches
    end on the same full trial)."""
    out: dict[str, Any] = {}
    for eps in EPSILONS:
        key = f"{eps:g}"
        mean = {o: np.mean([budget if s[key]["compute_to_eps"] is None else s[key]["compute_to_eps"]
                            for s in results[o]]) for o in others}
        best = min(others, key=lambda o: (mean[o], others.index(o)))
        a = [s[key]["compute_to_eps"] for s in results[name]]
        b = [s[key]["compute_to_eps"] for s in results[best]]
        both = [(x, y) for x, y in zip(a, b, strict=True) if x is not None and y is not None]
        ratios = np.array([x / y for x, y in both]) if both else np.array([])
        out[key] = {"vs": best, "pairs": len(both),
                    "ratio_median": float(np.median(ratios)) if both else None,
                    "ratio_geomean": float(np.exp(np.log(ratios).mean())) if both else None,
                    "only_this_reached": sum(x is not None and y is None for x, y in zip(a, b, strict=True)),
                    "only_other_reached": sum(x is None and y is not None for x, y in zip(a, b, strict=True))}
    return out


def describe(pruner: Any) -> str:
    """A pruner's class and settings (a certificate's λ and horizon), without its state."""
    if hasattr(pruner, "certificate"):
        return f"CertifiedPruner(PercentileStopping(warmup={WARMUP}), lam={pruner.lam:.4g}, horizon={pruner.horizon})"
    simple = {k.lstrip("_"): v for k, v in vars(pruner).items() if isinstance(v, (int, float, str, type(None)))}
    return f"{type(pruner).__name__}(" + ", ".join(f"{k}={v!r}" for k, v in sorted(simple.items())) + ")"


def _finite(v: float) -> float | None:
    return float(v) if np.isfinite(v) else None


def plot(curves: dict[str, dict[str, list[Any]]], budget: int, path: Path) -> None:
    """Best found so far vs epochs, one line per pruner: the mean gap of the best completed
    configuration to the grid's best (top), and the share of searches holding the best itself."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = np.arange(0, budget + 1, 2)
    fig, axes = plt.subplots(2, len(curves), figsize=(6.5 * len(curves), 8), squeeze=False, sharex=True)
    for col, (sampler, by_pruner) in enumerate(curves.items()):
        for pruner, runs in by_pruner.items():
            gaps = []
            for cum, gap in runs:
                at = np.searchsorted(np.asarray(cum), xs, side="right") - 1
                # Before the first completed trial nothing is found: drawn at the cap.
                gaps.append(np.where(at >= 0, np.minimum(np.asarray(gap)[np.maximum(at, 0)], 0.2), 0.2))
            style = {"ls": "-" if pruner.startswith("certified") else "--", "label": pruner}
            axes[0, col].plot(xs, np.mean(gaps, axis=0), **style)
            axes[1, col].plot(xs, np.mean(np.asarray(gaps) <= 0, axis=0), **style)
        axes[0, col].set(title=f"{sampler} sampler ({len(runs)} searches)", ylim=(0, 0.2),
                         ylabel="mean gap to the grid's best (val acc)")
        axes[0, col].set_yscale("symlog", linthresh=1e-3)
        axes[1, col].set(xlabel="epochs spent", ylabel="share holding the grid's best config", ylim=(0, 1))
        axes[0, col].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--quick", action="store_true", help="a 1-minute smoke run (2 searches per data set, TPE)")
    parser.add_argument("--searches", type=int, default=34, help="search seeds per data set (default 34: 102 searches)")
    parser.add_argument("--budget", type=int, default=BUDGET, help=f"epochs per search (default {BUDGET})")
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default benchmarks/results/"
                        "training_search.json; a temp dir with --quick)")
    args = parser.parse_args()
    out_path = args.out or (Path(tempfile.gettempdir()) / "training_search_quick.json" if args.quick
                            else HERE / "results" / "training_search.json")
    searches, samplers = (2, ("tpe",)) if args.quick else (args.searches, ("tpe", "random"))
    logging.getLogger("optuna").setLevel(logging.WARNING)
    start = time.time()
    grid = load_grid()
    cal_rows, search_rows = rows_of(grid, CAL_SEEDS), rows_of(grid, SEARCH_SEEDS)
    if np.intersect1d(cal_rows, search_rows).size:
        raise SystemExit("calibration and search runs overlap")
    certificates, calibration = {}, {}
    for eps in RISK_EPSILONS:
        cert = calibrate(grid, cal_rows, eps)
        certificates[f"certified_{eps:g}"] = cert
        calibration[f"certified_{eps:g}"] = {"epsilon": eps, "delta": DELTA, "within": WITHIN, "lam": cert.lam,
                                             "certified": cert.certified, "n_good_runs": cert.n}
    makers = make_pruners(certificates)
    true_metric = truth(grid, SEARCH_SEEDS)
    results: dict[str, dict[str, list[dict[str, Any]]]] = {s: {p: [] for p in makers} for s in samplers}
    jobs = [(s, g, seed) for s in samplers for seed in range(searches) for g in range(len(grid.datasets))]
    for sampler, g, seed in tqdm(jobs, desc="searches", mininterval=10):
        for name, make in makers.items():
            log = run_search(grid, dataset=g, search_seed=seed, pruner=make(), sampler=sampler, budget=args.budget)
            if np.isin(log.row, cal_rows).any():
                raise SystemExit("a search replayed a calibration run")
            results[sampler][name].append(analyse(log, grid, true_metric[g], budget=args.budget))
    summary = {s: {p: summarise(v, args.budget) for p, v in r.items()} for s, r in results.items()}
    ratios = {s: {c: {"vs_best_optuna": paired(r, c, OPTUNA_PRUNERS, args.budget),
                      "vs_none": paired(r, c, ("none",), args.budget)}
                  for c in certificates} for s, r in results.items()}
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
    out = {"command": "python " + " ".join(sys.argv), "commit": commit,
           "machine": f"{platform.platform()}, {os.cpu_count()} CPUs",
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "wall_seconds": round(time.time() - start, 1), "epsilons": list(EPSILONS), "budget_epochs": args.budget,
           "max_trials": MAX_TRIALS, "searches_per_sampler": len(jobs) // len(samplers),
           "datasets": list(grid.datasets), "n_configs": len(grid.configs),
           "calibration_seeds": list(CAL_SEEDS), "search_seeds": list(SEARCH_SEEDS),
           "calibration": calibration, "summary": summary, "certified_compute_ratio": ratios,
           "pruners": {name: describe(make()) for name, make in makers.items()},
           "design": {**DESIGN, "budget": f"{args.budget} epochs per search, whole trials (it stops after the trial "
                                          f"reaching it; at most {MAX_TRIALS}); a target found past it is a miss"}}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    plot({s: {p: [v["curve"] for v in runs] for p, runs in r.items()} for s, r in results.items()}, args.budget,
         out_path.with_suffix(".png"))
    if args.json:
        print(json.dumps(out, indent=1, sort_keys=True))
    else:
        for s, by in summary.items():
            for p, v in by.items():
                cells = [f"ε={e}: median {v[e]['compute_median']}, miss {v[e]['never_within_budget']:.2f}, "
                         f"good pruned {v[e]['searches_with_good_trial_pruned']:.2f}"
                         for e in (f"{x:g}" for x in EPSILONS)]
                print(f"{s:6s} {p:18s}", *cells, sep=" | ")


if __name__ == "__main__":
    main()
