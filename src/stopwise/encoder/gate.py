"""A learned exit gate: a logistic model of "this exit already agrees with the final one".

After each layer the gate reads features that the online path has for free: the exit's top
probability, margin and normalised entropy, whether its prediction changed since the previous
exit, how many exits in a row have given it, the previous exit's probability of it, the total
variation between successive exits, and the layer index (with interactions), plus any per-stage
signal named in ``signals`` (e.g. the ``saturation`` cosine of successive pooled states, where a
trace records it). Its score, the predicted probability that the exit's prediction equals the
final exit's, is a rule statistic like any other: the rule stops at the first layer whose score
is >= λ, monotone in λ, and LTT (:func:`stopwise.calibrate`) certifies λ.

This is the learned-decision idea of CALM's early-exit classifier (Schuster et al., 2022),
PALBERT's Q-exit (Balagansky & Gavrilov, 2022) and JEI-DNN's gates (Regol et al., 2024), kept to a
small convex model trained on the frozen heads' probabilities. The guarantee holds because the
gate is a fixed function when calibrated: it is trained on rows disjoint from the calibration
rows, which :func:`calibrate_gate` checks row by row.

Pure numpy (no torch), so a saved certificate naming ``exit_gate`` reloads without the model.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stopwise.core.calibrate import calibrate
from stopwise.core.certificate import Certificate
from stopwise.core.errors import StopwiseError, check_int, param_error
from stopwise.core.rules import Rule, register_rule
from stopwise.core.trace import FloatArray, IntArray, StageBatch, Trace

GATE_NAME = "gate.json"
GATE_FORMAT = "stopwise.encoder.gate"
#: Per-stage features read from the probabilities, in this order, before the interactions.
PROB_FEATURES = ("log_odds_top", "log_odds_margin", "log_entropy", "changed", "run", "log_odds_prev_prob",
                 "tv_change")


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

    Build with :func:`train_gate`; the parameters (weights over standardised features) are the
    rule's params, so a certificate carries the whole gate.
    """

    name = "exit_gate"
    default_lam = 0.9

    def __init__(self, *, weights: Sequence[float] | FloatArray, bias: float, mean: Sequence[float] | FloatArray,
                 scale: Sequence[float] | FloatArray,
                 n_layers: int, n_classes: int, signals: Sequence[str] = (), base_model: str | None = None,
                 heads: str | None = None, train_digest: str | None = None, lam: float | None = None) -> None:
        super().__init__(lam=lam)
        self.n_layers = check_int(n_layers, "n_layers", "ExitGate", minimum=1)
        self.n_classes = check_int(n_classes, "n_classes", "ExitGate", minimum=2)
        self.signals = [str(s) for s in signals]
        dim = 2 * (len(PROB_FEATURES) + len(self.signals)) + 1
        arrays = {}
        for key, value in (("weights", weights), ("mean", mean), ("scale", scale)):
            arr = np.asarray(value, dtype=np.float64)
            if arr.shape != (dim,) or not np.isfinite(arr).all():
                raise param_error(key, "ExitGate", f"{dim} finite numbers (one per feature)", value)
            arrays[key] = arr
        if (arrays["scale"] <= 0).any():
            raise param_error("scale", "ExitGate", "positive numbers", scale)
        self.weights, self.mean, self.scale = arrays["weights"], arrays["mean"], arrays["scale"]
        self.bias = float(bias)
        self.base_model, self.heads, self.train_digest = base_model, heads, train_digest
        #: Hashes of the rows the gate was trained on (see :func:`row_hashes`); not a param, so a
        #: certificate stays small, but saved with the gate by :func:`save_gate`.
        self.train_rows: frozenset[int] | None = None

    def params(self) -> dict[str, Any]:
        return {"weights": self.weights.tolist(), "bias": self.bias, "mean": self.mean.tolist(),
                "scale": self.scale.tolist(), "n_layers": self.n_layers, "n_classes": self.n_classes,
                "signals": list(self.signals), "base_model": self.base_model, "heads": self.heads,
                "train_digest": self.train_digest}

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
        logit = ((x - self.mean) / self.scale) @ self.weights + self.bias
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
    probs = np.ascontiguousarray(trace.probs, dtype=np.float32)
    preds = np.ascontiguousarray(trace.predictions, dtype=np.int64)
    out = np.empty(trace.n, dtype=np.int64)
    for i in range(trace.n):
        h = hashlib.blake2b(probs[i].tobytes() + preds[i].tobytes(), digest_size=8).digest()
        out[i] = int.from_bytes(h, "little") & 0x7FFF_FFFF_FFFF_FFFF
    return out


def train_gate(trace: Trace, *, l2: float = 100.0, iterations: int = 50, signals: Sequence[str] = ()) -> ExitGate:
    """Fit the gate on ``trace`` (rows that must not be used for calibration): L2-regularised
    logistic regression by Newton's method, deterministic, on every stage but the last, target
    1{the stage's prediction equals the reference (final exit)}. The strong default ``l2`` kept
    the certified layers lowest on MiniLM's CHAMP steps among 0.1, 1, 10 and 100."""
    if trace.probs is None:
        raise StopwiseError("train_gate needs a trace with class probabilities ('probs').")
    if not isinstance(l2, (int, float)) or isinstance(l2, bool) or not l2 > 0:
        raise param_error("l2", "train_gate", "a positive number", l2)
    iterations = check_int(iterations, "iterations", "train_gate", minimum=1)
    n_layers, n_classes = trace.n_stages, int(trace.probs.shape[2])
    if n_layers < 2:
        raise StopwiseError(f"train_gate needs a trace with at least 2 stages. Got {n_layers}.")
    feats = gate_features(trace, n_layers=n_layers, n_classes=n_classes, signals=signals)
    ref = trace.reference if trace.reference is not None else trace.predictions[:, -1]
    x = feats[:, :-1].reshape(-1, feats.shape[2])
    y = (trace.predictions[:, :-1] == ref[:, None]).reshape(-1).astype(np.float64)
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale = np.where(scale > 1e-9, scale, 1.0)
    z = np.hstack([(x - mean) / scale, np.ones((len(x), 1))])
    w = np.zeros(z.shape[1])
    reg = np.full(z.shape[1], float(l2))
    reg[-1] = 0.0  # the intercept is not shrunk
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(z @ w)))
        grad = z.T @ (p - y) + reg * w
        hess = (z * (p * (1 - p))[:, None]).T @ z + np.diag(reg + 1e-9)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    hashes = row_hashes(trace)
    digest = hashlib.sha256(np.sort(hashes).tobytes()).hexdigest()[:16]
    gate = ExitGate(weights=w[:-1], bias=float(w[-1]), mean=mean, scale=scale, n_layers=n_layers,
                    n_classes=n_classes, signals=signals, base_model=trace.meta.get("base_model"),
                    heads=trace.meta.get("heads"), train_digest=digest)
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
    body = {"format": GATE_FORMAT, "params": gate.params(),
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
    try:
        body = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise StopwiseError(f"'{path}' is not valid JSON: {exc}") from None
    if not isinstance(body, dict) or body.get("format") != GATE_FORMAT:
        raise StopwiseError(f"'{path}' is not a stopwise exit gate.")
    params = dict(body["params"])
    for key, mine in (("base_model", base_model), ("heads", heads)):
        theirs = params.get(key)
        if mine is not None and theirs is not None and theirs != mine:
            raise StopwiseError(f"The gate in '{path}' was trained for {key} = {theirs!r}; this classifier has "
                                f"{key} = {mine!r}. Train a gate for these heads.")
    gate = ExitGate(**params)
    rows = body.get("train_rows")
    gate.train_rows = None if rows is None else frozenset(int(r) for r in rows)
    return gate
