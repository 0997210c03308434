"""Record real epoch learning curves: sklearn MLPClassifier, one ``partial_fit`` pass per epoch.

Runs a grid of learning rates, widths, weight decays (``alpha``) and seeds on the data sets
scikit-learn bundles (digits, breast_cancer, wine), each run on its own seed's 60/20/20
train/validation/test split, and stores per epoch the validation accuracy and log loss, the test
accuracy and the cumulative training seconds. Diverged epochs are stored as NaN.

    nice -n 10 python benchmarks/record_training_curves.py --seeds 20 --epochs 32   # 210 s on 2 shared cores
    # -> benchmarks/data/training_sklearn_mlp.npz
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import platform
import subprocess
import time
import warnings
from pathlib import Path

import numpy as np
from sklearn.datasets import load_breast_cancer, load_digits, load_wine
from sklearn.metrics import log_loss
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier
from sklearn.preprocessing import StandardScaler
from tqdm import tqdm

DATASETS = {"digits": load_digits, "breast_cancer": load_breast_cancer, "wine": load_wine}
LRS = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
WIDTHS = (16, 64)
ALPHAS = (1e-4, 1e-2)
OUT = Path(__file__).parent / "data" / "training_sklearn_mlp.npz"


def record_run(x: np.ndarray, y: np.ndarray, *, lr: float, width: int, alpha: float, seed: int,
               epochs: int) -> dict[str, np.ndarray]:
    """One run: per-epoch validation accuracy / log loss, test accuracy, cumulative seconds."""
    x_tr, x_rest, y_tr, y_rest = train_test_split(x, y, test_size=0.4, random_state=seed, stratify=y)
    x_va, x_te, y_va, y_te = train_test_split(x_rest, y_rest, test_size=0.5, random_state=seed, stratify=y_rest)
    scaler = StandardScaler().fit(x_tr)
    x_tr, x_va, x_te = scaler.transform(x_tr), scaler.transform(x_va), scaler.transform(x_te)
    classes = np.unique(y)
    model = MLPClassifier(hidden_layer_sizes=(width,), learning_rate_init=lr, alpha=alpha, random_state=seed)
    out = {k: np.full(epochs, np.nan) for k in ("val_acc", "val_loss", "test_acc", "seconds")}
    spent = 0.0
    for e in range(epochs):
        t0 = time.perf_counter()
        model.partial_fit(x_tr, y_tr, classes=classes)
        spent += time.perf_counter() - t0
        out["seconds"][e] = spent
        with np.errstate(all="ignore"):
            proba = model.predict_proba(x_va)
        if not np.isfinite(proba).all():
            break  # diverged: the rest of the run stays NaN
        out["val_acc"][e] = float((classes[proba.argmax(axis=1)] == y_va).mean())
        out["val_loss"][e] = float(log_loss(y_va, proba, labels=classes))
        out["test_acc"][e] = float((model.predict(x_te) == y_te).mean())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=32)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # ConvergenceWarning after each single-epoch partial_fit
    grid = list(itertools.product(DATASETS, LRS, WIDTHS, ALPHAS, range(args.seeds)))
    data = {name: load(return_X_y=True) for name, load in DATASETS.items()}
    rows: dict[str, list[np.ndarray]] = {k: [] for k in ("val_acc", "val_loss", "test_acc", "seconds")}
    config: dict[str, list[float]] = {k: [] for k in ("dataset", "lr", "width", "alpha", "seed")}
    start = time.time()
    for name, lr, width, alpha, seed in tqdm(grid, desc="runs", mininterval=5):
        x, y = data[name]
        run = record_run(np.asarray(x, dtype=np.float64), np.asarray(y), lr=lr, width=width, alpha=alpha,
                         seed=seed, epochs=args.epochs)
        for k, v in run.items():
            rows[k].append(v)
        for k, v in zip(config, (list(DATASETS).index(name), lr, width, alpha, seed), strict=True):
            config[k].append(float(v))
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
    meta = {"command": "python benchmarks/record_training_curves.py " + " ".join(f"--{k} {v}" for k, v in
                                                                              (("seeds", args.seeds), ("epochs", args.epochs))),
            "commit": commit, "machine": f"{platform.platform()} ({platform.processor() or platform.machine()}), "
                                         f"{__import__('os').cpu_count()} CPUs",
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "datasets": list(DATASETS),
            "model": "sklearn MLPClassifier, one partial_fit epoch per evaluation, adam, batch auto",
            "split": "per seed: 60% train, 20% validation, 20% test (stratified)",
            "wall_seconds": round(time.time() - start, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **{k: np.stack(v).astype(np.float32) for k, v in rows.items()},
                        **{k: np.array(v) for k, v in config.items()}, meta=json.dumps(meta))
    print(f"wrote {args.out} ({len(grid)} runs x {args.epochs} epochs, {meta['wall_seconds']} s)")


if __name__ == "__main__":
    main()
