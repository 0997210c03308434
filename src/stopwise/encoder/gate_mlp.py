"""The exit gate's optional 2-layer perceptron: its forward pass and its deterministic fit.

One hidden layer of ``tanh`` units over the gate's standardised features, then a logistic output:
the score is still the predicted probability that the exit's prediction equals the final exit's,
so :class:`stopwise.encoder.gate.ExitGate` thresholds it at λ exactly as it does the logistic
gate's. This is the small learned exit classifier of CALM (Schuster et al., 2022) and JEI-DNN's
gates (Regol et al., 2024), on the frozen heads' outputs.

The fit is L2-regularised cross-entropy minimised by L-BFGS (Nocedal, 1980; two-loop recursion,
Armijo backtracking) from a seeded start, so the same rows and seed give the same gate. It is
written here rather than taken from scipy: on the 2-core machine shared with other work, scipy's
L-BFGS-B spent 4x longer in its own threaded linear algebra on ~150 weights than in the model;
these vector operations start no thread.

Pure numpy (no torch), and it imports nothing of the gate, which builds on it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from stopwise.core.errors import StopwiseError, check_int, param_error
from stopwise.core.trace import FloatArray

Objective = Callable[[FloatArray], tuple[float, FloatArray]]


@dataclass(frozen=True)
class MLPParams:
    """Weights of the perceptron: ``hidden_weights`` (d, h), ``hidden_bias`` (h,), output
    ``weights`` (h,) and ``bias``."""

    hidden_weights: FloatArray
    hidden_bias: FloatArray
    weights: FloatArray
    bias: float


def mlp_logit(z: FloatArray, params: MLPParams) -> FloatArray:
    """The output logit for standardised features ``z`` (n, d), in five numpy operations: the
    online path runs it after every layer, where each call counts for a lone row."""
    out: FloatArray = np.tanh(z @ params.hidden_weights + params.hidden_bias) @ params.weights + params.bias
    return out


def _columns(a: FloatArray, b: FloatArray) -> FloatArray:
    """``a @ b`` as one matrix-vector product per column of ``b``, for the fit's products over all
    training stages: on a loaded machine a threaded BLAS matrix product spins on these tall thin
    shapes (10,000 x 15 by 15 x 8: 22 ms, against 0.4 ms on one thread, on the shared 2-core VM),
    its matrix-vector products do not (1 ms for the eight)."""
    out: FloatArray = np.stack([a @ b[:, j] for j in range(b.shape[1])], axis=1)
    return out


def _unpack(theta: FloatArray, d: int, h: int) -> MLPParams:
    w1 = theta[: d * h].reshape(d, h)
    b1 = theta[d * h : d * h + h]
    w2 = theta[d * h + h : d * h + 2 * h]
    return MLPParams(w1, b1, w2, float(theta[-1]))


def lbfgs(objective: Objective, x0: FloatArray, *, iterations: int, memory: int = 10, gtol: float = 1e-6
          ) -> FloatArray:
    """Minimise ``objective`` (value, gradient) from ``x0`` by L-BFGS: at most ``iterations``
    steps, stopping once the largest gradient entry is below ``gtol`` times max(1, |value|)."""
    x = np.array(x0, dtype=np.float64)
    fx, g = objective(x)
    steps: list[tuple[FloatArray, FloatArray, float]] = []  # (s, y, 1 / y.s), oldest first
    for _ in range(iterations):
        if float(np.abs(g).max()) < gtol * max(1.0, abs(fx)):
            break
        q = g.copy()
        alphas = []
        for s_k, y_k, rho in reversed(steps):
            a = rho * float(s_k @ q)
            q -= a * y_k
            alphas.append(a)
        if steps:
            s_k, y_k, _ = steps[-1]
            q *= float(s_k @ y_k) / float(y_k @ y_k)
        else:
            q /= max(1.0, float(np.abs(g).max()))  # a first step of unit length at most
        for (s_k, y_k, rho), a in zip(steps, reversed(alphas), strict=True):
            q += s_k * (a - rho * float(y_k @ q))
        direction = -q
        slope = float(g @ direction)
        if not slope < 0:  # curvature pairs gone stale: start again from steepest descent
            steps.clear()
            direction = -g / max(1.0, float(np.abs(g).max()))
            slope = float(g @ direction)
        step = 1.0
        while True:
            x_new = x + step * direction
            f_new, g_new = objective(x_new)
            if np.isfinite(f_new) and f_new <= fx + 1e-4 * step * slope:
                break
            step *= 0.5
            if step < 1e-12:
                return x
        s_k, y_k = x_new - x, g_new - g
        if float(s_k @ y_k) > 1e-12:
            steps.append((s_k, y_k, 1.0 / float(s_k @ y_k)))
            del steps[:-memory]
        x, fx, g = x_new, f_new, g_new
    return x


def fit_mlp(z: FloatArray, y: FloatArray, *, hidden: int, l2: float, seed: int = 0,
            iterations: int = 500) -> MLPParams:
    """Minimise sum cross-entropy + ``l2``/2 * (squared weights, biases not shrunk) over ``z``
    (n, d) and 0/1 targets ``y`` by :func:`lbfgs` from weights drawn with ``seed``."""
    hidden = check_int(hidden, "hidden", "fit_mlp", minimum=1)
    iterations = check_int(iterations, "iterations", "fit_mlp", minimum=1)
    if not isinstance(l2, (int, float)) or isinstance(l2, bool) or not l2 > 0:
        raise param_error("l2", "fit_mlp", "a positive number", l2)
    if z.ndim != 2 or y.shape != (z.shape[0],):
        raise StopwiseError(f"fit_mlp needs features (n, d) and n targets. Got {z.shape} and {y.shape}.")
    n, d = z.shape
    rng = np.random.default_rng(seed)
    # A start whose units are not saturated: tanh's inputs have unit scale on standardised features.
    theta0 = np.concatenate([rng.normal(0.0, 1.0 / np.sqrt(d), d * hidden), np.zeros(hidden),
                             rng.normal(0.0, 1.0 / np.sqrt(hidden), hidden), [0.0]])
    shrink = np.zeros_like(theta0)
    shrink[: d * hidden] = 1.0
    shrink[d * hidden + hidden : d * hidden + 2 * hidden] = 1.0
    sign = 2.0 * y - 1.0
    zt = np.ascontiguousarray(z.T)

    def loss(theta: FloatArray) -> tuple[float, FloatArray]:
        p = _unpack(theta, d, hidden)
        a = np.tanh(_columns(z, p.hidden_weights) + p.hidden_bias)
        logit = a @ p.weights + p.bias
        # log(1 + exp(-s * logit)) without overflow; its derivative in logit is sigmoid(logit) - y.
        value = float(np.logaddexp(0.0, -sign * logit).sum())
        g_logit = 0.5 * (1.0 + np.tanh(0.5 * logit)) - y
        g_w2 = a.T @ g_logit
        g_pre = np.outer(g_logit, p.weights) * (1.0 - a * a)
        grad = np.concatenate([_columns(zt, g_pre).ravel(), g_pre.sum(axis=0), g_w2, [g_logit.sum()]])
        value += 0.5 * float(l2) * float((shrink * theta * theta).sum())
        return value, grad + float(l2) * shrink * theta

    theta = lbfgs(loss, theta0, iterations=iterations)
    if not np.isfinite(theta).all():
        raise StopwiseError(f"fit_mlp diverged on {n} rows (non-finite weights); raise 'l2'.")
    return _unpack(theta, d, hidden)
