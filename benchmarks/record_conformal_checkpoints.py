"""Record real per-epoch checkpoints for conformalized early stopping (one prediction per epoch).

Classification: an sklearn ``MLPClassifier`` trained by one ``partial_fit`` pass per epoch on a
small training split of ``load_digits`` whose labels are 20% replaced by random ones (wide, no
weight decay: it memorizes them, and the hold-out cross-entropy turns up after a few epochs, so
which checkpoint is chosen matters; hold-out and test labels are untouched), keeping
after every epoch ``predict_proba`` on the pool of every point it was not trained on.
Regression: an ``MLPRegressor`` on ``load_diabetes`` (standardized target), keeping ``predict``.
The pool is what ``benchmarks/training_conformal.py`` splits into hold-out and test points.

    nice -n 10 python benchmarks/record_conformal_checkpoints.py      # about 20 s on 2 shared cores
    # -> benchmarks/data/training_conformal_digits.npz, benchmarks/data/training_conformal_diabetes.npz
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.datasets import load_diabetes, load_digits
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier, MLPRegressor
from sklearn.preprocessing import StandardScaler
from tqdm import tqdm

DATA = Path(__file__).parent / "data"


def provenance(command: str) -> dict[str, object]:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent, check=False).stdout.strip()
    return {"command": command, "commit": commit or None, "date": dt.datetime.now(dt.timezone.utc).isoformat(),
            "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()}}


def record_digits(*, n_train: int, epochs: int, seed: int, label_noise: float) -> dict[str, np.ndarray]:
    x, y = load_digits(return_X_y=True)
    x_tr, x_pool, y_tr, y_pool = train_test_split(x, y, train_size=n_train, random_state=seed, stratify=y)
    rng = np.random.default_rng(seed)
    flip = rng.random(n_train) < label_noise
    y_tr = y_tr.copy()
    y_tr[flip] = rng.integers(0, 10, int(flip.sum()))
    scaler = StandardScaler().fit(x_tr)
    x_tr, x_pool = scaler.transform(x_tr), scaler.transform(x_pool)
    classes = np.unique(y)
    model = MLPClassifier(hidden_layer_sizes=(256,), learning_rate_init=3e-3, alpha=0.0, batch_size=32,
                          random_state=seed)
    probs = np.empty((epochs, len(y_pool), len(classes)), dtype=np.float32)
    for e in tqdm(range(epochs), desc="digits epochs"):
        model.partial_fit(x_tr, y_tr, classes=classes)
        probs[e] = model.predict_proba(x_pool)
    return {"probs": probs, "labels": y_pool.astype(np.int64)}


def record_diabetes(*, n_train: int, epochs: int, seed: int, label_noise: float) -> dict[str, np.ndarray]:
    del label_noise  # the regression run overfits without it
    x, y = load_diabetes(return_X_y=True)
    x_tr, x_pool, y_tr, y_pool = train_test_split(x, y, train_size=n_train, random_state=seed)
    xs = StandardScaler().fit(x_tr)
    mu, sd = float(y_tr.mean()), float(y_tr.std())
    x_tr, x_pool = xs.transform(x_tr), xs.transform(x_pool)
    model = MLPRegressor(hidden_layer_sizes=(256,), learning_rate_init=3e-4, alpha=0.0, batch_size=16,
                         random_state=seed)
    preds = np.empty((epochs, len(y_pool)), dtype=np.float32)
    for e in tqdm(range(epochs), desc="diabetes epochs"):
        model.partial_fit(x_tr, (y_tr - mu) / sd)
        preds[e] = model.predict(x_pool)
    return {"preds": preds, "targets": ((y_pool - mu) / sd).astype(np.float32)}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--digits-train", type=int, default=300)
    parser.add_argument("--diabetes-train", type=int, default=150)
    parser.add_argument("--label-noise", type=float, default=0.2, help="share of digits training labels randomized")
    parser.add_argument("--out", type=Path, default=DATA)
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # ConvergenceWarning after each single-epoch partial_fit
    command = "python benchmarks/record_conformal_checkpoints.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out")
    for name, record, n_train in (("digits", record_digits, args.digits_train),
                                  ("diabetes", record_diabetes, args.diabetes_train)):
        start = time.perf_counter()
        arrays = record(n_train=n_train, epochs=args.epochs, seed=args.seed, label_noise=args.label_noise)
        meta = provenance(command) | {"dataset": name, "n_train": n_train, "epochs": args.epochs,
                                      "seed": args.seed, "label_noise": args.label_noise if name == "digits" else 0.0,
                                      "seconds": round(time.perf_counter() - start, 2)}
        path = args.out / f"training_conformal_{name}.npz"
        payload: dict[str, Any] = {**arrays, "meta": np.array(json.dumps(meta, sort_keys=True))}
        np.savez_compressed(path, **payload)
        print(f"{path}: {', '.join(f'{k} {v.shape}' for k, v in arrays.items())}, {path.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
