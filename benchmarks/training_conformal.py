"""Conformalized early stopping (CES) against naive and split calibration, on real checkpoints.

Per data set, hold-out size n and α, over random hold-out / test splits of the recorded pool
(``benchmarks/record_conformal_checkpoints.py``: 40 per-epoch checkpoints of an sklearn MLP):

* ``ces``: ``ConformalEarlyStopping`` / ``ConformalEarlyStoppingRegressor`` (Liang, Zhou & Sesia
  2023): the checkpoint is re-chosen on the hold-out set plus the test point; valid.
* ``naive``: the best checkpoint on the hold-out set, calibrated on the same points (no guarantee).
* ``split``: half the hold-out set selects, the other half calibrates (valid, fewer points).

Reported: mean coverage over the splits and its spread (sd over splits, and the standard error of
the mean), mean set size (classification) or interval width (regression), and how often CES's set
differs from naive's. A ``synthetic_noise_checkpoints`` block (100 checkpoints that are pure noise,
fresh data per split) shows the failure the guarantee protects against. Test points per split are
fixed (the pool minus the largest hold-out), so sizes compare across n.

    nice -n 10 python benchmarks/training_conformal.py --json    # about 3 min on 2 shared cores
    # -> benchmarks/results/training_conformal.json (+ training_conformal.png)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from stopwise.core.errors import StopwiseError
from stopwise.training import ConformalEarlyStopping, ConformalEarlyStoppingRegressor

HERE = Path(__file__).parent
ALPHAS = (0.05, 0.1, 0.2)
METHODS = ("ces", "naive", "split")
Evaluate = Callable[[str, float, np.ndarray, np.ndarray], tuple[float, float, np.ndarray]]


def classification(probs: np.ndarray, labels: np.ndarray) -> Evaluate:
    def run(method: str, alpha: float, hold: np.ndarray, test: np.ndarray) -> tuple[float, float, np.ndarray]:
        model = ConformalEarlyStopping(alpha=alpha, method=method, random_state=int(hold[0]))
        sets = model.fit(probs[:, hold], labels[hold]).predict_sets(probs[:, test])
        return float(sets[np.arange(len(test)), labels[test]].mean()), float(sets.sum(axis=1).mean()), sets
    return run


def regression(preds: np.ndarray, targets: np.ndarray) -> Evaluate:
    def run(method: str, alpha: float, hold: np.ndarray, test: np.ndarray) -> tuple[float, float, np.ndarray]:
        model = ConformalEarlyStoppingRegressor(alpha=alpha, method=method, random_state=int(hold[0]))
        iv = model.fit(preds[:, hold], targets[hold]).predict_intervals(preds[:, test])
        covered = (iv[:, 0] <= targets[test]) & (targets[test] <= iv[:, 1])
        return float(covered.mean()), float((iv[:, 1] - iv[:, 0]).mean()), iv
    return run


def summarize(cov: list[float], size: list[float], size_key: str) -> dict[str, Any]:
    c = np.asarray(cov)
    return {"coverage_mean": round(float(c.mean()), 5), "coverage_sd": round(float(c.std(ddof=1)), 5),
            "coverage_se": round(float(c.std(ddof=1) / np.sqrt(len(c))), 5),
            size_key: round(float(np.mean(size)), 4)}


def sweep(name: str, evaluate: Evaluate, pool: int, holdouts: list[int], splits: int,
          size_key: str, fresh: Callable[[int], Evaluate] | None = None) -> list[dict[str, Any]]:
    """Every (n, α, method) over ``splits`` random splits; ``fresh(seed)`` redraws the data per split."""
    n_test = pool - max(holdouts)
    rows = []
    for n, alpha in tqdm([(n, a) for n in holdouts for a in ALPHAS], desc=name):
        cov: dict[str, list[float]] = {m: [] for m in METHODS}
        size: dict[str, list[float]] = {m: [] for m in METHODS}
        skipped: dict[str, str] = {}
        differs = []
        for s in range(splits):
            perm = np.random.default_rng(s).permutation(pool)
            hold, test = perm[:n], perm[pool - n_test:]
            run = fresh(s) if fresh is not None else evaluate
            outs = {}
            for method in METHODS:
                try:
                    c, z, outs[method] = run(method, alpha, hold, test)
                except StopwiseError as exc:  # split's calibration half below ⌈1/α⌉ - 1
                    skipped[method] = str(exc)
                    continue
                cov[method].append(c)
                size[method].append(z)
            differs.append(float(np.any(outs["ces"] != outs["naive"], axis=1).mean()))
        row: dict[str, Any] = {"holdout": n, "test": n_test, "alpha": alpha,
                               "ces_differs_from_naive": round(float(np.mean(differs)), 5)}
        for method in METHODS:
            row[method] = summarize(cov[method], size[method], size_key) if cov[method] else {"skipped": skipped[method]}
        rows.append(row)
    return rows


def noise_checkpoints(seed: int) -> Evaluate:
    rng = np.random.default_rng(10_000 + seed)
    probs = rng.dirichlet(np.full(3, 0.5), size=(100, 220))
    return classification(probs, rng.integers(0, 3, 220))


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    blocks = (("classification", "set_size_mean", "digits: mean set size"),
              ("regression", "width_mean", "diabetes: mean interval width"))
    for ax, (block, key, title) in zip(axes[1:], blocks, strict=True):
        rows = [r for r in result[block]["results"] if r["alpha"] == 0.1]
        for method in METHODS:
            pts = [(r["holdout"], r[method][key]) for r in rows if key in r[method]]
            ax.plot(*zip(*pts, strict=True), marker="o", label=method)
        ns = [r["holdout"] for r in rows]
        ax.set(xscale="log", xlabel="hold-out points n", title=f"{title} (α = 0.1)")
        ax.minorticks_off()
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.legend()
    ax = axes[0]
    for block, style in (("classification", "-"), ("synthetic_noise_checkpoints", ":")):
        for method in METHODS:
            smallest = min(r["holdout"] for r in result[block]["results"])
            rows = [r for r in result[block]["results"] if "coverage_mean" in r[method] and r["holdout"] == smallest]
            ax.errorbar([r["alpha"] for r in rows], [r[method]["coverage_mean"] - (1 - r["alpha"]) for r in rows],
                        yerr=[2 * r[method]["coverage_se"] for r in rows], ls=style, marker="o",
                        label=f"{method} ({'digits, smallest n' if block == 'classification' else 'noise ckpts'})")
    ax.axhline(0, color="k", lw=0.8)
    ax.set(xlabel="α", ylabel="coverage − (1 − α)", title="coverage gap (±2 SE); digits at n = 20")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--json", action="store_true", help="write benchmarks/results/training_conformal.json")
    parser.add_argument("--splits", type=int, default=200)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "training_conformal.json")
    args = parser.parse_args()
    start = time.perf_counter()
    with np.load(HERE / "data" / "training_conformal_digits.npz") as d:
        probs, labels, meta_c = d["probs"].astype(np.float64), d["labels"], json.loads(str(d["meta"]))
    probs /= probs.sum(axis=2, keepdims=True)  # stored as float32: renormalize in float64
    with np.load(HERE / "data" / "training_conformal_diabetes.npz") as d:
        preds, targets, meta_r = d["preds"].astype(np.float64), d["targets"].astype(np.float64), json.loads(str(d["meta"]))
    result: dict[str, Any] = {"benchmark": "training_conformal", "splits": args.splits, "alphas": list(ALPHAS)}
    result["classification"] = {
        "data": "digits: MLPClassifier, 40 epoch checkpoints, 300 training points (20% labels randomized)",
        "recorded_by": meta_c["command"], "checkpoints": int(probs.shape[0]), "pool": int(probs.shape[1]),
        "results": sweep("digits", classification(probs, labels), probs.shape[1], [20, 50, 200, 748], args.splits,
                         "set_size_mean")}
    result["regression"] = {
        "data": "diabetes: MLPRegressor, 40 epoch checkpoints, 150 training points, standardized target",
        "recorded_by": meta_r["command"], "checkpoints": int(preds.shape[0]), "pool": int(preds.shape[1]),
        "results": sweep("diabetes", regression(preds, targets), preds.shape[1], [30, 146], args.splits,
                         "width_mean")}
    result["synthetic_noise_checkpoints"] = {
        "data": "synthetic: 100 checkpoints of Dirichlet(0.5) noise probabilities, K = 3, fresh per split",
        "checkpoints": 100, "pool": 220,
        "results": sweep("noise", classification(probs, labels), 220, [20], args.splits, "set_size_mean",
                         fresh=noise_checkpoints)}
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=HERE,
                            check=False).stdout.strip()
    result.update({"command": "python benchmarks/training_conformal.py --json" + (
        f" --splits {args.splits}" if args.splits != 200 else ""), "commit": commit or None,
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs",
        "date": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
        "wall_seconds": round(time.perf_counter() - start, 1)})
    text = json.dumps(result, indent=1, sort_keys=True) + "\n"
    if args.json:
        args.out.write_text(text)
        plot(result, args.out.with_suffix(".png"))
        print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    else:
        print(text)


if __name__ == "__main__":
    main()
