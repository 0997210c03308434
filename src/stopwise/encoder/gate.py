"""A learned exit gate: a logistic model of "this exit already agrees with the final one".

After each layer the gate reads features that the online path has for free: the exit's top
probability, margin and normalised entropy, whether its prediction changed since the previous
exit, how many exits in a row have given it, the previous exit's probability of it, the total
variation between successive exits, and the layer index (with interactions), plus any per-stage
signal named in ``signals`` (e.g. the ``saturation`` cosine of successive pooled states, where a
trace records it). Its score, the predicted probability that the exit's prediction equals the
final exit's, is a rule statistic like any other: the rule stops at the first layer whose score
is >= λ, monotone in λ, and LTT (:func:`stopwise.calibrate`) certifies λ. The score is a logistic
model of the standardised features, or (``train_gate(..., hidden=h)``) a 2-layer perceptron with
``h`` tanh units (:mod:`stopwise.encoder.gate_mlp`): the same rule, threshold and certificate.

This is the learned-decision idea of CALM's early-exit classifier (Schuster et al., 2022),
PALBERT's Q-exit (Balagansky & Gavrilov, 2022) and JEI-DNN's gates (Regol et al., 2024), kept to a
small convex model trained on the frozen heads' probabilities. The guarantee holds because the
gate is a fixed function when calibrated: it is trained on rows disjoint from the calibration
rows, which :func:`calibrate_gate` checks row by row.

Pure numpy (no torch), so a saved certificate naming ``exit_gate`` reloads without the model.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stopwise.core.calibrate import calibrate
from stopwise.core.certificate import Certificate
from stopwise.core.errors import StopwiseError, check_int, param_error
from stopwise.core.jsonfile import read_tagged_json
from stopwise.core.rules import Rule, register_rule
from stopwise.core.stage import hash_rows, hashes_digest
from stopwise.core.trace import FloatArray, IntArray, StageBatch, Trace
from stopwise.encoder.gate_mlp import MLPParams, fit_mlp, mlp_logit

GATE_NAME = "gate.json"
GATE_FORMAT = "stopwise.encoder.gate"
#: Per-stage features read from the probabilities, in this order, before the interactions.
PROB_FEATURES = ("log_odds_top", "log_odds_margin", "log_entropy", "changed", "run", "log_odds_prev_prob",
                 "tv_change")
#: What computes the score from the features: ``ExitGate.kind``, saved in gate.json.
KINDS = ("logistic", "mlp")
#: Default L2 strength of each kind (on the summed cross-entropy over the training stages). The
#: perceptron's 10 kept MiniLM's certified layers at gap ε = 0.01 and 0.02 (CHAMP steps, BBC
#: sentences; 8, 16 and 32 units) lowest or within 0.1 layer of it among 1, 10 and 100.
LOGISTIC_L2 = 100.0
MLP_L2 = 10.0


def _log_odds(p: FloatArray) -> FloatArray:
    # Confidence in log-odds: the exits that agree with the final one sit in the last few
    # thousandths of top probability, which a linear model over p itself cannot tell apart.
    q = np.clip(p, 1e-12, 1 - 1e-12)
    out: FloatArray = np.log(q) - np.log1p(-q)
    return out


def _stage_features(state: Any, probs: FloatArray, index: int, n_layers: int, signals: list[FloatArray]
                    ) -> tuple[Any, FloatArray]:
    """The gate's input for one stage, and the state the next stage needs (prev probs, prev
    prediction, run length): the same code offline (over a trace's stages) and online."""
    n, c = probs.shape
    pred = probs.argmax(axis=1)
    srt = np.sort(probs, axis=1)
    top = srt[:, -1]
    margin = top - srt[:, -2]
    entropy = -(probs * np.log(np.maximum(probs, 1e-300))).sum(axis=1) / np.log(c)
    prev_probs, prev_pred, run = state
    if prev_probs is None:
        changed = np.zeros(n)
        run = np.ones(n)
        prev_prob = top
        tv = np.zeros(n)
    else:
        same = pred == prev_pred
        changed = (~same).astype(np.float64)
        run = np.where(same, run + 1.0, 1.0)
        prev_prob = prev_probs[np.arange(n), pred]
        tv = 0.5 * np.abs(probs - prev_probs).sum(axis=1)
    layer = np.full(n, index / max(n_layers - 1, 1))
    base = [_log_odds(top), _log_odds(margin), np.log(np.maximum(entropy, 1e-12)), changed, run / n_layers,
            _log_odds(prev_prob), tv, *signals]
    x = np.stack([*base, *(b * layer for b in base), layer], axis=1)
    return (probs, pred, run), x


@register_rule
class ExitGate(Rule):
    """Stop at the first layer whose learned gate score is >= λ; see the module docstring.

    Build with :func:`train_gate`; the parameters (weights over standardised features; for the
    perceptron also ``hidden_weights`` (features x units) and ``hidden_bias``, with ``weights``
    then one per unit) are the rule's params, so a certificate carries the whole gate.
    """

    name = "exit_gate"
    default_lam = 0.9

    def __init__(self, *, weights: Sequence[float] | FloatArray, bias: float, mean: Sequence[float] | FloatArray,
                 scale: Sequence[float] | FloatArray,
                 n_layers: int, n_classes: int, signals: Sequence[str] = (), base_model: str | None = None,
                 heads: str | None = None, train_digest: str | None = None, lam: float | None = None,
                 hidden_weights: Sequence[Sequence[float]] | FloatArray | None = None,
                 hidden_bias: Sequence[float] | FloatArray | None = None) -> None:
        super().__init__(lam=lam)
        self.n_layers = check_int(n_layers, "n_layers", "ExitGate", minimum=1)
        self.n_classes = check_int(n_classes, "n_classes", "ExitGate", minimum=2)
        self.signals = [str(s) for s in signals]
        dim = 2 * (len(PROB_FEATURES) + len(self.signals)) + 1
        if (hidden_weights is None) != (hidden_bias is None):
            raise param_error("hidden_bias", "ExitGate", "given together with 'hidden_weights' (an MLP gate) or "
                              "both None (a logistic gate)", hidden_bias)
        self.mlp: MLPParams | None = None
        units = dim
        if hidden_weights is not None:
            w1 = np.asarray(hidden_weights, dtype=np.float64)
            if w1.ndim != 2 or w1.shape[0] != dim or w1.shape[1] < 1 or not np.isfinite(w1).all():
                raise param_error("hidden_weights", "ExitGate", f"a finite {dim} x units matrix (features x "
                                  "hidden units)", hidden_weights)
            units = w1.shape[1]
            b1 = np.asarray(hidden_bias, dtype=np.float64)
            if b1.shape != (units,) or not np.isfinite(b1).all():
                raise param_error("hidden_bias", "ExitGate", f"{units} finite numbers (one per hidden unit)", hidden_bias)
        arrays = {}
        per_weight = "feature" if hidden_weights is None else "hidden unit"
        for key, value, size, what in (("weights", weights, units, per_weight), ("mean", mean, dim, "feature"),
                                       ("scale", scale, dim, "feature")):
            arr = np.asarray(value, dtype=np.float64)
            if arr.shape != (size,) or not np.isfinite(arr).all():
                raise param_error(key, "ExitGate", f"{size} finite numbers (one per {what})", value)
            arrays[key] = arr
        if hidden_weights is not None:
            self.mlp = MLPParams(w1, b1, arrays["weights"], float(bias))
        if (arrays["scale"] <= 0).any():
            raise param_error("scale", "ExitGate", "positive numbers", scale)
        self.weights, self.mean, self.scale = arrays["weights"], arrays["mean"], arrays["scale"]
        self.bias = float(bias)
        self.base_model, self.heads, self.train_digest = base_model, heads, train_digest
        #: Hashes of the rows the gate was trained on (see :func:`row_hashes`); not a param, so a
        #: certificate stays small, but saved with the gate by :func:`save_gate`.
        self.train_rows: frozenset[int] | None = None

    @property
    def kind(self) -> str:
        """``"mlp"`` for the 2-layer perceptron, else ``"logistic"`` (one of :data:`KINDS`)."""
        return "logistic" if self.mlp is None else "mlp"

    def params(self) -> dict[str, Any]:
        out = {"weights": self.weights.tolist(), "bias": self.bias, "mean": self.mean.tolist(),
               "scale": self.scale.tolist(), "n_layers": self.n_layers, "n_classes": self.n_classes,
               "signals": list(self.signals), "base_model": self.base_model, "heads": self.heads,
               "train_digest": self.train_digest}
        if self.mlp is not None:
            # Only the perceptron names these, so a logistic gate's params (and certificates) are unchanged.
            out["hidden_weights"] = self.mlp.hidden_weights.tolist()
            out["hidden_bias"] = self.mlp.hidden_bias.tolist()
        return out

    def with_lam(self, lam: float | None) -> ExitGate:
        out = ExitGate(lam=lam, **self.params())
        out.train_rows = self.train_rows
        return out

    def init_state(self, n: int) -> Any:
        return (None, None, None)

    def features(self, state: Any, batch: StageBatch) -> tuple[Any, FloatArray]:
        """(new state, (rows, features)) for one stage; raises naming what is missing."""
        if batch.probs is None:
            raise StopwiseError(f"ExitGate needs the exits' class probabilities ('probs') at layer {batch.index + 1}. Got none.")
        if batch.probs.ndim != 2 or batch.probs.shape[1] != self.n_classes:
            raise StopwiseError(f"The gate was trained for {self.n_classes} classes; the 'probs' at layer "
                                f"{batch.index + 1} have shape {batch.probs.shape}.")
        if not 0 <= batch.index < self.n_layers:
            raise StopwiseError(f"The gate was trained for {self.n_layers} layers. Got layer {batch.index + 1}.")
        missing = [s for s in self.signals if s not in batch.signals]
        if missing:
            raise StopwiseError(f"ExitGate needs the signal(s) {missing} at layer {batch.index + 1}. "
                                f"Got signals {sorted(batch.signals)}.")
        sig = [np.asarray(batch.signals[s], dtype=np.float64) for s in self.signals]
        return _stage_features(state, np.asarray(batch.probs, dtype=np.float64), batch.index, self.n_layers, sig)

    def update(self, state: Any, batch: StageBatch) -> tuple[Any, FloatArray]:
        state, x = self.features(state, batch)
        z = (x - self.mean) / self.scale
        logit = z @ self.weights + self.bias if self.mlp is None else mlp_logit(z, self.mlp)
        score: FloatArray = 1.0 / (1.0 + np.exp(-logit))
        return state, score


def gate_features(trace: Trace, *, n_layers: int, n_classes: int, signals: Sequence[str] = ()) -> FloatArray:
    """(n, K, d) gate inputs of every stage of ``trace``, as the rule computes them online."""
    dim = 2 * (len(PROB_FEATURES) + len(signals)) + 1
    probe = ExitGate(weights=np.zeros(dim), bias=0.0, mean=np.zeros(dim), scale=np.ones(dim), n_layers=n_layers,
                     n_classes=n_classes, signals=signals)
    state = probe.init_state(trace.n)
    out = []
    for k in range(trace.n_stages):
        state, x = probe.features(state, trace.stage(k))
        out.append(x)
    return np.stack(out, axis=1)


def row_hashes(trace: Trace) -> IntArray:
    """One 63-bit hash per row of its predictions and probabilities (float32): the identity of an
    input's recorded exits, so two traces can be checked for shared rows."""
    if trace.probs is None:
        raise StopwiseError("row_hashes needs a trace with class probabilities ('probs').")
    return hash_rows(np.asarray(trace.probs, dtype=np.float32), np.asarray(trace.predictions, dtype=np.int64))


def _newton_logistic(z: FloatArray, y: FloatArray, *, l2: float, iterations: int) -> FloatArray:
    """Weights (intercept last, not shrunk) of L2-regularised logistic regression by Newton's method."""
    w = np.zeros(z.shape[1])
    reg = np.full(z.shape[1], l2)
    reg[-1] = 0.0
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(z @ w)))
        grad = z.T @ (p - y) + reg * w
        hess = (z * (p * (1 - p))[:, None]).T @ z + np.diag(reg + 1e-9)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return w


def train_gate(trace: Trace, *, l2: float | None = None, iterations: int | None = None, signals: Sequence[str] = (),
               hidden: int | None = None, seed: int = 0) -> ExitGate:
    """Fit the gate on ``trace`` (rows that must not be used for calibration), on every stage but
    the last, target 1{the stage's prediction equals the reference (final exit)}.

    ``hidden=None``: L2-regularised logistic regression by Newton's method (``iterations`` 50),
    deterministic; its strong default ``l2`` = 100 kept the certified layers lowest on MiniLM's
    CHAMP steps among 0.1, 1, 10 and 100. ``hidden=h``: a 2-layer perceptron with ``h`` tanh units
    fitted by L-BFGS from weights drawn with ``seed`` (:func:`stopwise.encoder.gate_mlp.fit_mlp`,
    ``iterations`` 500, default ``l2`` = :data:`MLP_L2`)."""
    if trace.probs is None:
        raise StopwiseError("train_gate needs a trace with class probabilities ('probs').")
    if hidden is not None:
        hidden = check_int(hidden, "hidden", "train_gate", minimum=1)
    l2 = (LOGISTIC_L2 if hidden is None else MLP_L2) if l2 is None else l2
    if not isinstance(l2, (int, float)) or isinstance(l2, bool) or not l2 > 0:
        raise param_error("l2", "train_gate", "a positive number", l2)
    iterations = check_int((50 if hidden is None else 500) if iterations is None else iterations, "iterations",
                           "train_gate", minimum=1)
    n_layers, n_classes = trace.n_stages, int(trace.probs.shape[2])
    if n_layers < 2:
        raise StopwiseError(f"train_gate needs a trace with at least 2 stages. Got {n_layers}.")
    feats = gate_features(trace, n_layers=n_layers, n_classes=n_classes, signals=signals)
    ref = trace.reference if trace.reference is not None else trace.predictions[:, -1]
    x = feats[:, :-1].reshape(-1, feats.shape[2])
    y = (trace.predictions[:, :-1] == ref[:, None]).reshape(-1).astype(np.float64)
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale = np.where(scale > 1e-9, scale, 1.0)
    hidden_params: dict[str, Any] = {}
    if hidden is None:
        w = _newton_logistic(np.hstack([(x - mean) / scale, np.ones((len(x), 1))]), y, l2=float(l2),
                             iterations=iterations)
        weights, bias = w[:-1], float(w[-1])
    else:
        mlp = fit_mlp((x - mean) / scale, y, hidden=hidden, l2=float(l2), seed=seed, iterations=iterations)
        weights, bias = mlp.weights, mlp.bias
        hidden_params = {"hidden_weights": mlp.hidden_weights, "hidden_bias": mlp.hidden_bias}
    hashes = row_hashes(trace)
    digest = hashes_digest(hashes)
    gate = ExitGate(weights=weights, bias=bias, mean=mean, scale=scale, n_layers=n_layers, n_classes=n_classes,
                    signals=signals, base_model=trace.meta.get("base_model"), heads=trace.meta.get("heads"),
                    train_digest=digest, **hidden_params)
    gate.train_rows = frozenset(int(h) for h in hashes)
    return gate


def check_disjoint(gate: ExitGate, trace: Trace) -> None:
    """Raise unless ``trace`` (a calibration trace) shares no row with the gate's training rows
    and was recorded with the heads and base the gate was trained on."""
    if gate.train_rows is None:
        raise StopwiseError("The gate does not know its training rows (made from params alone?): load it with "
                            "load_gate or train it with train_gate so that calibration can be checked disjoint from them.")
    for key, mine in (("base_model", gate.base_model), ("heads", gate.heads)):
        theirs = trace.meta.get(key)
        if mine is not None and theirs is not None and theirs != mine:
            raise StopwiseError(f"The gate was trained on traces with {key} = {mine!r}; the calibration trace has "
                                f"{key} = {theirs!r}. Train the gate on traces of these heads.")
    shared = int(np.isin(row_hashes(trace), np.fromiter(gate.train_rows, dtype=np.int64)).sum())
    if shared:
        raise StopwiseError(f"The gate was trained on {shared} of the {trace.n} calibration rows: the calibration "
                            "split must be disjoint from the gate's training split, or the certificate does not hold.")


def calibrate_gate(trace: Trace, gate: ExitGate, **kwargs: Any) -> Certificate:
    """:func:`stopwise.calibrate` of the gate on ``trace`` after :func:`check_disjoint`."""
    check_disjoint(gate, trace)
    return calibrate(trace, gate, **kwargs)


def save_gate(gate: ExitGate, directory: str | Path) -> Path:
    """Write the gate as sorted JSON (``gate.json``) beside saved heads, with its training rows."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    body = {"format": GATE_FORMAT, "kind": gate.kind, "params": gate.params(),
            "train_rows": None if gate.train_rows is None else sorted(gate.train_rows)}
    out = path / GATE_NAME
    out.write_text(json.dumps(body, indent=1, sort_keys=True) + "\n")
    return out


def load_gate(directory: str | Path, *, base_model: str, heads: str | None = None) -> ExitGate:
    """Read ``gate.json``; refuse a gate trained for another base model (or other heads).

    ``base_model`` and ``heads`` are the classifier's (``clf.base_id``, ``clf.heads_id``)."""
    path = Path(directory) / GATE_NAME
    if not path.is_file():
        raise StopwiseError(f"'{path.parent}' holds no exit gate ({GATE_NAME}).")
    body = read_tagged_json(path, fmt=GATE_FORMAT, what="a stopwise exit gate")
    params = dict(body["params"])
    for key, mine in (("base_model", base_model), ("heads", heads)):
        theirs = params.get(key)
        if mine is not None and theirs is not None and theirs != mine:
            raise StopwiseError(f"The gate in '{path}' was trained for {key} = {theirs!r}; this classifier has "
                                f"{key} = {mine!r}. Train a gate for these heads.")
    gate = ExitGate(**params)
    # A file without "kind" predates the perceptron: its params say which gate it is.
    kind = body.get("kind", gate.kind)
    if kind not in KINDS or kind != gate.kind:
        raise StopwiseError(f"The 'kind' of the gate in '{path}' must be one of {list(KINDS)} and match its params "
                            f"(which make a {gate.kind!r} gate). Got {kind!r} instead.")
    rows = body.get("train_rows")
    gate.train_rows = None if rows is None else frozenset(int(r) for r in rows)
    return gate
