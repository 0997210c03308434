"""The stopping-rule protocol: one causal statistic per stage, one threshold λ.

Every rule computes, stage by stage, a statistic that may depend only on the stages seen so far,
and fires when the statistic crosses λ. ``direction`` says which way: +1 fires when the statistic
is >= λ (max probability), -1 when it is <= λ (entropy). Internally we work with
``z = direction * statistic`` and ``t = direction * λ`` so that "fire" is always ``z >= t`` and a
larger ``t`` is always more conservative (more compute). That makes every rule monotone in λ: the
halt stage can only move later as ``t`` grows.

The same :meth:`Rule.update` code serves the offline path (one call per stage over all n inputs)
and the online path (one call per stage over the rows still running), so both decide alike.
An online :class:`Stopper` may give every row its own threshold (``rule.stopper(n, lams=...)``):
rows are independent, so row i then stops exactly where a stopper with λ = ``lams[i]`` alone would.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from stopwise.core.errors import StopwiseError, param_error
from stopwise.core.trace import BoolArray, FloatArray, IntArray, StageBatch, Trace

State = Any
#: Rows per block in offline halting.
HALT_BLOCK = 1 << 14
#: Methods that describe :meth:`Rule.update`'s statistic to adapters that skip the Stopper.
_SHORTCUTS = ("stage_statistic", "top_prob_band")


class Rule(ABC):
    """A family of stopping rules indexed by one parameter λ (``lam``)."""

    #: Registry name, used by the CLI and in certificates.
    name: ClassVar[str] = ""
    #: +1: fire when statistic >= λ; -1: fire when statistic <= λ.
    direction: ClassVar[int] = 1
    #: λ takes integer values (patience, budget).
    integer: ClassVar[bool] = False
    #: A sensible λ when nothing is calibrated (the papers' defaults).
    default_lam: ClassVar[float | None] = None

    def __init__(self, *, lam: float | None = None) -> None:
        if lam is not None and (not isinstance(lam, (int, float)) or isinstance(lam, bool) or np.isnan(lam)):
            raise StopwiseError(f"The 'lam' parameter of {type(self).__name__} must be a number or None. Got {lam!r} instead.")
        self.lam = None if lam is None else float(lam)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # The shortcuts state what update computes, so a subclass that rewrites update without
        # them must not inherit them: it falls back to the Stopper, which calls its update.
        if "update" in cls.__dict__:
            for name in _SHORTCUTS:
                if name not in cls.__dict__:
                    setattr(cls, name, getattr(Rule, name))
        # A band describes the statistic it was derived for: a new statistic drops it.
        if "stage_statistic" in cls.__dict__ and "top_prob_band" not in cls.__dict__:
            cls.top_prob_band = Rule.top_prob_band  # type: ignore[method-assign]

    # -- what subclasses write --------------------------------------------------------------
    def init_state(self, n: int) -> State:
        """State before the first stage for n rows; stateless rules return None."""
        return None

    @abstractmethod
    def update(self, state: State, batch: StageBatch) -> tuple[State, FloatArray]:
        """Fold in one stage; return the new state and this stage's statistic per row."""

    def select_state(self, state: State, rows: IntArray | BoolArray) -> State:
        """Keep the state of some rows only (the others left the batch)."""
        return _select(state, rows)

    def params(self) -> dict[str, Any]:
        """Constructor arguments other than ``lam`` (for configs and certificates)."""
        return {}

    # -- derived behaviour ------------------------------------------------------------------
    @property
    def free(self) -> bool:
        """True when λ is left to calibration."""
        return self.lam is None

    def with_lam(self, lam: float | None) -> Rule:
        """A copy of this rule with λ set (None: free)."""
        return type(self)(lam=lam, **self.params())

    def statistic_all(self, trace: Trace, rows: slice) -> FloatArray | None:
        """Optional vectorised statistic for all stages of ``trace[rows]`` at once; None: loop
        over update(). Overrides must agree with :meth:`update` (the property tests check)."""
        return None

    def z(self, trace: Trace, rows: slice | None = None) -> FloatArray:
        """(n, K) statistic oriented so that a rule fires when z >= t; -inf on missing stages.

        ``rows`` restricts the computation to a contiguous block of inputs."""
        sel = slice(None) if rows is None else rows
        n = len(range(*sel.indices(trace.n)))
        with np.errstate(divide="ignore", invalid="ignore"):
            stat = self.statistic_all(trace, sel)
            if stat is None:
                state = self.init_state(n)
                stat = np.empty((n, trace.n_stages), dtype=np.float64)
                for k in range(trace.n_stages):
                    state, stat[:, k] = self.update(state, trace.stage(k, sel))  # type: ignore[arg-type]
            out = np.empty((n, trace.n_stages), dtype=np.float64)
            np.multiply(stat, self.direction, out=out)
        nan = np.isnan(out)
        if nan.any():
            out[nan] = -np.inf
        if not trace.full:
            assert trace.mask is not None
            out[~trace.mask[sel]] = -np.inf
        return out

    def sign(self) -> int:
        """Maps λ to the internal threshold t = sign * λ (and back)."""
        return self.direction

    def threshold(self, lam: float | None = None) -> float:
        lam = self.lam if lam is None else lam
        if lam is None:
            raise StopwiseError(
                f"{self!r} has no λ: pass lam=..., set it in the constructor, or calibrate it "
                "(stopwise.calibrate) and use certificate.rule()."
            )
        return self.sign() * float(lam)

    def lam_from_threshold(self, t: float) -> float:
        return self.sign() * float(t)

    def earliest_stop(self, lam: float | None = None) -> float:
        """The earliest 0-based stage at which this rule can fire at λ, whatever the stages hold
        (``inf``: never). 0 unless the rule knows better, which is always safe. An adapter skips
        the exit heads of a rule that cannot fire before the last stage: it is the full model."""
        return math.inf if self.threshold(lam) == math.inf else 0.0

    def stage_statistic(self, probs: FloatArray) -> FloatArray | None:
        """For a rule whose statistic at a stage is a function of that stage's class
        probabilities alone (no state, no signals, nothing from earlier stages): the statistic of
        each row of ``probs`` (n, C) float64, exactly as :meth:`update` computes it; None for any
        other rule. An adapter may then decide a lone row on it without a :class:`Stopper`."""
        return None

    def top_prob_band(self, n_classes: int, lam: float | None = None) -> tuple[float, float] | None:
        """(a, b) with a <= b such that this rule, at λ, does not stop a row at a stage whose
        largest class probability (``top``, as a float) is < a, and stops it when ``top`` >= b,
        whatever came before; None for any other rule. a == b says ``top`` alone decides on any
        floats (max_prob). With a < b the band holds for a float32 (or float64) softmax output over
        ``n_classes`` classes, rounding included, and within [a, b) :meth:`stage_statistic`
        decides. An adapter may then decide a lone row on the head's largest value, without a
        :class:`Stopper`, and compute the statistic only inside the band: the same decisions."""
        return None

    def halts(self, trace: Trace, lam: float | None = None) -> IntArray:
        """Offline: the stage at which each input stops (its last stage when the rule never fires)."""
        t = self.threshold(lam)
        lengths = trace.lengths
        out = np.empty(trace.n, dtype=np.int64)
        # Row blocks: small temporaries are reused by the allocator instead of page-faulting
        # fresh (n, K) arrays, which dominates the cost on large traces.
        for start in range(0, trace.n, HALT_BLOCK):
            sel = slice(start, start + HALT_BLOCK)
            out[sel] = halts_from_z(self.z(trace, sel), lengths[sel], t)
        return out

    def stopper(self, n: int, lam: float | None = None, *, lams: Sequence[float | None] | FloatArray | None = None
                ) -> Stopper:
        """Online: a stopper for a batch of n rows fed one stage at a time.

        ``lams`` gives every row its own λ instead of one ``lam`` for all (row i decides as this
        rule with λ = ``lams[i]`` would); a None entry never fires, so that row runs to its last
        stage."""
        if lams is None:
            return Stopper(self, n, self.threshold(lam))
        return Stopper(self, n, self.row_thresholds(n, lams, lam=lam))

    def row_thresholds(self, n: int, lams: Sequence[float | None] | FloatArray, *, lam: float | None = None,
                       owner: str | None = None) -> FloatArray:
        """Internal thresholds t for n rows with one λ each (None: +inf, never fires); ``owner``
        names the caller in errors (default: this rule's ``stopper``)."""
        owner = owner or f"{type(self).__name__}.stopper"
        if lam is not None:
            raise StopwiseError(f"{owner} takes one of 'lam' (all rows) or 'lams' (one per row). Got both: lam={lam!r}.")
        allowed = f"a sequence of {n} λ values, one per row (None: never stop)"
        if isinstance(lams, (str, bytes)) or not isinstance(lams, (Sequence, np.ndarray)) \
                or (isinstance(lams, np.ndarray) and lams.ndim != 1) or len(lams) != n:
            raise param_error("lams", owner, allowed, lams)
        out = np.empty(n, dtype=np.float64)
        for i, value in enumerate(lams):
            if value is None:
                out[i] = np.inf
                continue
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)) \
                    or np.isnan(value):
                raise param_error("lams", owner, allowed, lams)
            out[i] = self.threshold(float(value))
        return out

    def to_config(self) -> dict[str, Any]:
        return {"name": self.name, "lam": self.lam, "params": _jsonable(self.params())}

    def __repr__(self) -> str:
        args = [f"{k}={v!r}" for k, v in self.params().items()]
        if self.lam is not None:
            args.append(f"lam={self.lam:g}")
        return f"{type(self).__name__}({', '.join(args)})"


def halts_from_z(z: FloatArray, lengths: IntArray, t: float) -> IntArray:
    """First stage with z >= t, else the last existing stage."""
    fires = z >= t
    first = fires.argmax(axis=1)
    fired = fires[np.arange(z.shape[0]), first]
    return np.where(fired, first, lengths - 1).astype(np.int64)


class Stopper:
    """Online stopping for a shrinking batch.

    Call :meth:`step` once per stage with that stage's outputs for the rows still running, in the
    order they were given. It returns which of them stop now and forgets those rows, so the next
    call takes only the survivors (exactly how a batched model drops exited rows).

    ``t`` is the internal threshold (``rule.threshold(lam)``), one float for all rows or a 1-D
    array of n, one per original row (+inf: never fires); each step compares the rows still
    running against their own ``t[rows]``.
    """

    def __init__(self, rule: Rule, n: int, t: float | FloatArray) -> None:
        self.rule = rule
        self.t: float | FloatArray
        if np.ndim(t) == 0:
            self.t = float(t)
        else:
            arr = np.array(t, dtype=np.float64)
            if arr.shape != (n,) or np.isnan(arr).any():
                raise StopwiseError(
                    f"The 't' parameter of Stopper must be a float or a 1-D array of {n} thresholds (one per row, "
                    f"no NaN). Got an array of shape {arr.shape} instead."
                )
            self.t = arr
        self.state = rule.init_state(n)
        self.rows = np.arange(n)
        self.stage = 0

    @property
    def active(self) -> IntArray:
        """Original row indices still running."""
        return self.rows

    def step(self, batch: StageBatch, *, last: bool | BoolArray = False) -> BoolArray:
        """Decide for this stage; ``last`` marks rows (or all rows) at their final stage, which
        stop whatever the rule says. Returns the stop mask over the rows given."""
        if len(batch) != len(self.rows):
            raise StopwiseError(
                f"Stopper.step expects outputs for the {len(self.rows)} rows still running. Got {len(batch)} rows."
            )
        if batch.index != self.stage:
            raise StopwiseError(f"Stopper.step expects stage {self.stage} next. Got stage {batch.index}.")
        with np.errstate(divide="ignore", invalid="ignore"):
            self.state, stat = self.rule.update(self.state, batch)
        s = np.asarray(stat, dtype=np.float64)
        # This runs after every layer of every batch, so it is written for batch 1, where each
        # numpy call costs more than the arithmetic: NaN never fires (the comparison is False),
        # a threshold of +inf never fires even when z = +inf, and nothing is copied when no row
        # stops. z = direction * s is not formed: -s >= t is exactly s <= -t.
        neg = self.rule.direction < 0
        if isinstance(self.t, float):
            if self.t == np.inf:
                stop = np.zeros(len(s), dtype=bool)
            else:
                stop = s <= -self.t if neg else s >= self.t
        else:
            t = self.t[self.rows]
            stop = ((s <= -t) if neg else (s >= t)) & (t < np.inf)
        if last is True:
            stop[:] = True
        elif last is not False:
            stop |= np.asarray(last, dtype=bool)
        if stop.any():
            keep = ~stop
            self.state = self.rule.select_state(self.state, keep)
            self.rows = self.rows[keep]
        self.stage += 1
        result: BoolArray = stop
        return result


def _select(state: State, rows: IntArray | BoolArray) -> State:
    if state is None:
        return None
    if isinstance(state, np.ndarray):
        return state[rows]
    if isinstance(state, tuple):
        return tuple(_select(s, rows) for s in state)
    if isinstance(state, list):
        return [_select(s, rows) for s in state]
    raise TypeError(f"cannot select rows of state of type {type(state).__name__}")


def _jsonable(params: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in params.items():
        if isinstance(v, Rule):
            out[k] = v.to_config()
        elif isinstance(v, (list, tuple)) and v and isinstance(v[0], Rule):
            out[k] = [r.to_config() for r in v]
        elif isinstance(v, np.ndarray):
            out[k] = v.tolist()
        else:
            out[k] = v
    return out
