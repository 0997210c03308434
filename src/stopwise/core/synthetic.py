"""Synthetic traces with a known data-generating process, for tests, benchmarks and docs.

Each input has a true class and a difficulty; a stage's logits are the true class's signal
(growing with depth, shrinking with difficulty) plus noise that persists across stages (AR(1)),
so predictions settle the way real early-exit classifiers' do. Drawing a very large trace from
the same process gives the population risk of any rule to high precision.
"""

from __future__ import annotations

import numpy as np

from stopwise.core.trace import Trace


def synthetic_trace(n: int, *, stages: int = 8, classes: int = 4, seed: int = 0, signal: float = 3.0,
                    persistence: float = 0.6, with_loss: bool = False) -> Trace:
    """Draw ``n`` i.i.d. inputs. ``with_loss`` adds a continuous loss signal ``"loss"`` in [0, 1]
    (the total-variation distance between a stage's and the last stage's class distribution)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    difficulty = rng.beta(2.0, 2.0, n)
    depth = np.arange(1, stages + 1) / stages
    noise = np.empty((n, stages, classes))
    noise[:, 0] = rng.normal(size=(n, classes))
    for k in range(1, stages):
        fresh = rng.normal(size=(n, classes))
        noise[:, k] = persistence * noise[:, k - 1] + np.sqrt(1 - persistence**2) * fresh
    logits = noise.copy()
    logits[np.arange(n), :, y] += signal * depth[None, :] * (1.2 - difficulty)[:, None] * 1.5
    logits -= logits.max(axis=2, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=2, keepdims=True)
    signals = {}
    if with_loss:
        signals["loss"] = 0.5 * np.abs(probs - probs[:, -1:, :]).sum(axis=2)
    return Trace(
        predictions=probs.argmax(axis=2),
        probs=probs.astype(np.float32),
        labels=y,
        signals=signals,
        meta={"source": "stopwise.synthetic", "seed": seed},
    )
