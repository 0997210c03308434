"""Certified early stopping of training runs vs patience, Optuna's MedianPruner and Hyperband.

Per curve collection (real runs: sklearn MLPs recorded by ``record_training_curves.py``, and the
Learning Curve Database shipped by the ``lcdb`` package) and per ε, over random calibration /
test splits of the runs:

* ``certified``: four rule families (epoch_patience, plateau_gain with windows 8 and 12,
  curve_extrapolation) each certified by ``stopwise.training.certify`` (WSR p-value) at δ/4
  (Bonferroni), the cheapest certified one on the calibration runs kept; measured on the
  held-out runs. ``--pvalue hoeffding_bentkus`` repeats it with the core's default p-value.
* ``certified_learned``: :class:`stopwise.training.LearnedStopping` (boosted trees predicting the
  regret of stopping now from the curve so far and, for the MLP runs, the validation loss in log
  scale) fitted on a quarter of the calibration runs (:data:`FIT_SHARE`; runs identical to a
  certification run left out) and certified by WSR on the other three quarters at the full δ: one
  family chosen before any calibration, so no Bonferroni. Its own ratios to the baselines are
  ``learned_saved_ratio_vs_that_baseline`` / ``..._within_epsilon``.
* ``patience_3/5/10``: Lightning's EarlyStopping(patience), restore-best.
* ``optuna_median`` / ``optuna_hyperband``: a real Optuna study per search (data set) that replays
  the held-out runs as trials, reporting each evaluation and stopping when ``should_prune()``.
* ``oracle``: every run stops at its best evaluation (zero regret).

``compute_saved`` is the fraction of the compute (epochs, or training-set size for LCDB) not
spent; ``regret`` the mean held-out regret (best metric of the full run minus the best kept);
``violations`` the share of splits whose held-out regret exceeds ε (the promise: <= δ).

    python benchmarks/training.py --json      # writes benchmarks/results/training.json (+ .png)
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
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

import stopwise as sw
from stopwise.training import (
    CurveExtrapolation,
    EpochPatience,
    PlateauGain,
    certify,
    curves_to_trace,
    fit_learned_stopping,
    run_hashes,
    scores_of,
)
from stopwise.training.curves import REGRET
from stopwise.training.lcdb import load_lcdb

HERE = Path(__file__).parent
EPSILONS = (0.005, 0.01, 0.02)
DELTA = 0.1
PATIENCES = (3, 5, 10)
#: Share of the calibration runs that fit the learned rule (the rest certify it). Of 1/4, 1/3 and
#: 1/2 of the MLP runs' 840, 1/4 kept the most compute at ε = 0.01 over 5 splits (0.33, 0.33, 0.28).
FIT_SHARE = 0.25


def load_collections(lcdb_runs: int) -> dict[str, tuple[sw.Trace, np.ndarray]]:
    """Each collection: its trace and the search (data set) of every run."""
    out: dict[str, tuple[sw.Trace, np.ndarray]] = {}
    with np.load(HERE / "data" / "training_sklearn_mlp.npz") as d:
        acc, loss, groups = d["val_acc"].astype(np.float64), d["val_loss"].astype(np.float64), d["dataset"].astype(np.int64)
    out["sklearn_mlp_val_acc"] = (curves_to_trace(list(acc), mode="max", monitor="val_acc", population="sklearn-mlp",
                                                  on_nonfinite="truncate", allow_ragged=True,
                                                  aux={"val_loss": list(loss)}), groups)
    lc = load_lcdb(metric="accuracy", max_runs=lcdb_runs, seed=0)
    out["lcdb_accuracy"] = (lc, np.asarray(lc.meta["openmlid"]))
    return out


def measure(trace: sw.Trace, halts: np.ndarray, groups: np.ndarray) -> tuple[float, float, float]:
    """(compute_saved, mean regret, search regret) of stopping each run of ``trace`` at ``halts``;
    the search regret is, per search, the best final score minus the best score kept (averaged)."""
    regret = trace.signals[REGRET][np.arange(trace.n), halts] * float(trace.meta.get("regret_bound", 1.0))
    saved = 1.0 - trace.cost_at(halts).sum() / trace.full_cost.sum()
    scores = scores_of(trace)
    final = np.nanmax(scores, axis=1)
    kept = final - regret
    search = [final[groups == g].max() - kept[groups == g].max() for g in np.unique(groups)]
    return float(saved), float(regret.mean()), float(np.mean(search))


def certified_halts(cal: sw.Trace, test: sw.Trace, eps: float, pvalue: str) -> tuple[np.ndarray, str]:
    """Certify four families at δ/4 each on ``cal``; the cheapest certified one stops ``test``."""
    families: list[tuple[str, sw.Rule]] = [
        ("epoch_patience", EpochPatience()), ("plateau_gain_8", PlateauGain(horizon=cal.n_stages, window=8)),
        ("plateau_gain_12", PlateauGain(horizon=cal.n_stages, window=12)),
        ("curve_extrapolation", CurveExtrapolation(horizon=cal.n_stages)),
    ]
    best: tuple[float, np.ndarray, str] | None = None
    for name, rule in families:
        try:
            cert = certify(cal, rule, epsilon=eps, delta=DELTA / len(families), pvalue=pvalue)
        except sw.CalibrationError:
            continue
        if cert.certified and (best is None or cert.expected_cost / cert.full_cost < best[0]):
            best = (cert.expected_cost / cert.full_cost, cert.make_rule().halts(test), f"{name} λ={cert.lam:g}")
    if best is None:
        return test.lengths - 1, "none certified"
    return best[1], best[2]


def fit_learned(cal: sw.Trace) -> tuple[sw.Rule, sw.Trace]:
    """LearnedStopping fitted on the first FIT_SHARE of ``cal`` (a random order already), and the
    rest of ``cal``, which certifies it (once per split: the fit does not depend on ε)."""
    n_fit = int(round(FIT_SHARE * cal.n))
    fit, rest = _rows(cal, np.arange(n_fit)), _rows(cal, np.arange(n_fit, cal.n))
    aux = ["val_loss"] if "val_loss" in cal.signals else []
    # A fit run identical to a certification run (a few small-data runs repeat their curves) is left out.
    fit = _rows(fit, np.flatnonzero(~np.isin(run_hashes(fit, aux=aux), run_hashes(rest, aux=aux))))
    return fit_learned_stopping(fit, aux=aux, log_aux=aux), rest


def learned_halts(rule: sw.Rule, rest: sw.Trace, test: sw.Trace, eps: float, pvalue: str) -> tuple[np.ndarray, str]:
    """Certify the fitted rule on ``rest`` at the full δ; stop ``test``."""
    try:
        cert = certify(rest, rule, epsilon=eps, delta=DELTA, pvalue=pvalue)
    except sw.CalibrationError:
        return test.lengths - 1, "too few runs"
    if not cert.certified:
        return test.lengths - 1, "none certified"
    return cert.make_rule().halts(test), f"learned_stopping λ={cert.lam:g}"


def _rows(trace: sw.Trace, rows: np.ndarray) -> sw.Trace:
    cost = trace.cost if trace.cost is None or np.ndim(trace.cost) == 1 else trace.cost[rows]
    assert trace.mask is not None
    return sw.Trace(predictions=trace.predictions[rows], mask=trace.mask[rows], cost=cost,
                    signals={k: v[rows] for k, v in trace.signals.items()}, meta=trace.meta)


def optuna_halts(test: sw.Trace, groups: np.ndarray, make_pruner: Callable[[int], Any], seed: int) -> np.ndarray:
    """Replay the held-out runs through real Optuna studies (one per search), as trials."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    scores = scores_of(test)
    halts = test.lengths - 1
    for g in np.unique(groups):
        rows = np.flatnonzero(groups == g)
        order = iter(np.random.default_rng(seed).permutation(rows))
        study = optuna.create_study(direction="maximize", pruner=make_pruner(test.n_stages),
                                    sampler=optuna.samplers.RandomSampler(seed=seed))

        def objective(trial: optuna.Trial, order: Any = order) -> float:
            i = int(next(order))
            for k in range(int(test.lengths[i])):
                trial.report(float(scores[i, k]), k)
                if k < test.lengths[i] - 1 and trial.should_prune():
                    halts[i] = k
                    raise optuna.TrialPruned()
            return float(np.nanmax(scores[i]))

        study.optimize(objective, n_trials=rows.size)
    return halts


PRUNERS: dict[str, Callable[[int], Any]] = {
    "optuna_median": lambda k: __import__("optuna").pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=2),
    "optuna_hyperband": lambda k: __import__("optuna").pruners.HyperbandPruner(min_resource=1, max_resource=k,
                                                                                 reduction_factor=3),
}


def run_collection(name: str, trace: sw.Trace, groups: np.ndarray, *, splits: int, optuna_splits: int,
                   cal_fraction: float, pvalue: str) -> dict[str, Any]:
    n_cal = int(round(cal_fraction * trace.n))
    rows: dict[str, list[tuple[float, float, float]]] = {}
    chosen: dict[str, list[str]] = {f"{e:g}": [] for e in EPSILONS}
    learned_what: dict[str, list[str]] = {}
    for s in tqdm(range(splits), desc=name, mininterval=5):
        perm = np.random.default_rng(1000 + s).permutation(trace.n)
        cal_idx, test_idx = np.sort(perm[:n_cal]), np.sort(perm[n_cal:])
        cal, test = _rows(trace, cal_idx), _rows(trace, test_idx)
        g_test = groups[test_idx]
        learned, rest = fit_learned(_rows(trace, perm[:n_cal]))
        for eps in EPSILONS:
            halts, what = certified_halts(cal, test, eps, pvalue)
            rows.setdefault(f"certified@{eps:g}", []).append(measure(test, halts, g_test))
            chosen[f"{eps:g}"].append(what)
            halts, what = learned_halts(learned, rest, test, eps, pvalue)
            rows.setdefault(f"learned@{eps:g}", []).append(measure(test, halts, g_test))
            learned_what.setdefault(f"{eps:g}", []).append(what)
        for p in PATIENCES:
            rows.setdefault(f"patience_{p}", []).append(measure(test, EpochPatience(lam=p).halts(test), g_test))
        rows.setdefault("oracle", []).append(measure(test, _oracle(test), g_test))
        if s < optuna_splits:
            for pname, make in PRUNERS.items():
                rows.setdefault(pname, []).append(measure(test, optuna_halts(test, g_test, make, seed=s), g_test))
    methods = {m: _summary(v) for m, v in rows.items()}
    per_eps = {}
    for eps in EPSILONS:
        base = {m: v for m, v in methods.items() if not m.startswith(("certified", "learned", "oracle"))}
        table = {m: {**v, "violations": float(np.mean([r > eps for _, r, _ in rows[m]]))} for m, v in base.items()}
        block: dict[str, Any] = {"baselines": table, "oracle": methods["oracle"]}
        for prefix, key, what in (("", "certified", chosen), ("learned_", "learned", learned_what)):
            cert = methods[f"{key}@{eps:g}"]
            block["certified_learned" if prefix else "certified"] = {
                **cert, "violations": float(np.mean([r > eps for _, r, _ in rows[f"{key}@{eps:g}"]])),
                "chosen": _counts(what[f"{eps:g}"])}
            block.update(_ratios(cert, base, table, prefix))
        per_eps[f"{eps:g}"] = block
    return {"n_runs": trace.n, "n_stages": trace.n_stages, "n_calibration": n_cal, "splits": splits,
            "optuna_splits": optuna_splits, "delta": DELTA, "per_epsilon": per_eps}


def _ratios(cert: dict[str, float], base: dict[str, dict[str, float]], table: dict[str, dict[str, float]],
            prefix: str) -> dict[str, Any]:
    """Compute saved by a certified method over the best baseline at equal or lower held-out
    regret, and over the best baseline that itself kept regret <= ε on >= 1 - δ of the splits
    (the other reading of "at equal regret"; found after the fact, so it promises nothing)."""
    ok = {m: v for m, v in base.items() if v["regret"] <= cert["regret"]}
    best_m = max(ok, key=lambda m: ok[m]["compute_saved"]) if ok else None
    meets = {m: v for m, v in table.items() if v["violations"] <= DELTA}
    best_e = max(meets, key=lambda m: meets[m]["compute_saved"]) if meets else None
    return {
        f"{prefix}best_baseline_at_lower_regret": best_m,
        f"{prefix}saved_ratio_vs_that_baseline": None if best_m is None or ok[best_m]["compute_saved"] <= 0
        else cert["compute_saved"] / ok[best_m]["compute_saved"],
        f"{prefix}best_baseline_within_epsilon": best_e,
        f"{prefix}saved_ratio_vs_baseline_within_epsilon": None if best_e is None or meets[best_e]["compute_saved"] <= 0
        else cert["compute_saved"] / meets[best_e]["compute_saved"],
    }


def _oracle(trace: sw.Trace) -> np.ndarray:
    out: np.ndarray = trace.predictions[np.arange(trace.n), trace.lengths - 1]
    return out


def _summary(values: list[tuple[float, float, float]]) -> dict[str, float]:
    arr = np.array(values)
    return {"compute_saved": float(arr[:, 0].mean()), "regret": float(arr[:, 1].mean()),
            "search_regret": float(arr[:, 2].mean()),
            "regret_p90": float(np.quantile(arr[:, 1], 0.9)), "n_splits": len(values)}


def _counts(items: list[str]) -> dict[str, int]:
    fams = [i.split(" ")[0] for i in items]
    return {f: fams.count(f) for f in sorted(set(fams))}


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5))
    for ax, (name, res) in zip(np.atleast_1d(axes), results.items(), strict=True):
        first = next(iter(res["per_epsilon"].values()))
        for m, v in first["baselines"].items():
            ax.scatter(v["regret"], v["compute_saved"], marker="s", label=m)
        for eps, block in res["per_epsilon"].items():
            c = block["certified"]
            ax.scatter(c["regret"], c["compute_saved"], marker="*", s=140, label=f"certified ε={eps}")
            c = block["certified_learned"]
            ax.scatter(c["regret"], c["compute_saved"], marker="P", s=110, label=f"certified learned ε={eps}")
            ax.axvline(float(eps), color="grey", lw=0.5, ls=":")
        o = first["oracle"]
        ax.scatter(o["regret"], o["compute_saved"], marker="x", color="k", label="oracle")
        ax.set(title=name, xlabel="held-out mean regret", ylabel="compute saved")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description="Certified training early stopping vs baselines.")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--splits", type=int, default=100)
    parser.add_argument("--optuna-splits", type=int, default=10)
    parser.add_argument("--lcdb-runs", type=int, default=3000)
    parser.add_argument("--cal-fraction", type=float, default=0.7)
    parser.add_argument("--pvalue", default="wsr", help="p-value of the certified rules (default wsr)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "training.json")
    args = parser.parse_args()
    logging.getLogger("optuna").setLevel(logging.WARNING)
    start = time.time()
    results = {}
    for name, (trace, groups) in load_collections(args.lcdb_runs).items():
        results[name] = run_collection(name, trace, groups, splits=args.splits, optuna_splits=args.optuna_splits,
                                       cal_fraction=args.cal_fraction, pvalue=args.pvalue)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
    out = {"command": "python " + " ".join(sys.argv), "commit": commit,
           "machine": f"{platform.platform()}, {os.cpu_count()} CPUs",
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "wall_seconds": round(time.time() - start, 1), "epsilons": list(EPSILONS), "delta": DELTA, "pvalue": args.pvalue,
           "collections": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    plot(results, args.out.with_suffix(".png"))
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for name, res in results.items():
            for eps, b in res["per_epsilon"].items():
                for prefix, key in (("", "certified"), ("learned_", "certified_learned")):
                    c = b[key]
                    print(f"{name} ε={eps} {key}: saved {c['compute_saved']:.3f} regret {c['regret']:.4f} "
                          f"viol {c['violations']:.2f}; best baseline {b[prefix + 'best_baseline_at_lower_regret']} "
                          f"ratio {b[prefix + 'saved_ratio_vs_that_baseline']}; within ε: "
                          f"{b[prefix + 'best_baseline_within_epsilon']} ratio {b[prefix + 'saved_ratio_vs_baseline_within_epsilon']}")


if __name__ == "__main__":
    main()
