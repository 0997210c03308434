"""Budget, minimum stage, per-stage thresholds and combinations of rules by wrapping.

Wrappers follow optuna's ``PatientPruner(wrapped, ...)`` pattern: they hold other rules and stay
monotone in one λ. A wrapped rule whose λ is fixed acts as a fixed gate; the wrapper's λ goes to
its free children (which must then share one direction).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from stopwise.core.errors import StopwiseError, check_int
from stopwise.core.rules.base import Rule, State
from stopwise.core.trace import BoolArray, FloatArray, IntArray, StageBatch, Trace


class Budget(Rule):
    """Stop after λ stages, whatever the model says (a hard compute budget)."""

    name = "budget"
    integer = True

    def update(self, state: State, batch: StageBatch) -> tuple[State, FloatArray]:
        return state, np.full(len(batch), batch.index + 1.0)

    def statistic_all(self, trace: Trace, rows: slice) -> FloatArray | None:
        n = len(range(*rows.indices(trace.n)))
        return np.broadcast_to(np.arange(1.0, trace.n_stages + 1.0), (n, trace.n_stages))


class Never(Rule):
    """Never stop early: full compute. What an uncertified certificate falls back to."""

    name = "never"

    def __init__(self, *, lam: float | None = 0.0) -> None:
        super().__init__(lam=lam)

    def update(self, state: State, batch: StageBatch) -> tuple[State, FloatArray]:
        return state, np.full(len(batch), -np.inf)

    def earliest_stop(self, lam: float | None = None) -> float:
        return math.inf


class _Wrapper(Rule):
    """Shared plumbing: children states travel as a list; the wrapper's z is built from theirs."""

    def __init__(self, rules: Sequence[Rule], lam: float | None) -> None:
        if not rules or not all(isinstance(r, Rule) for r in rules):
            raise StopwiseError(f"{type(self).__name__} wraps stopping rules. Got {rules!r} instead.")
        self.rules = list(rules)
        free = [r for r in self.rules if r.free]
        if len({r.sign() for r in free}) > 1:
            raise StopwiseError(
                f"{type(self).__name__} can give one λ only to free rules of one direction. Got "
                f"{[repr(r) for r in free]}; fix λ on all but one of them."
            )
        super().__init__(lam=lam)

    @property
    def direction(self) -> int:  # type: ignore[override]
        free = [r for r in self.rules if r.free]
        return free[0].sign() if free else 1

    def init_state(self, n: int) -> State:
        return [r.init_state(n) for r in self.rules]

    def select_state(self, state: State, rows: IntArray | BoolArray) -> State:
        return [r.select_state(s, rows) for r, s in zip(self.rules, state, strict=False)]

    def child_z(self, state: State, batch: StageBatch) -> tuple[State, list[FloatArray], list[BoolArray]]:
        """New states, z of the free children, and the fire decisions of the fixed ones."""
        new_states, free_z, fixed_fire = [], [], []
        for rule, s in zip(self.rules, state, strict=False):
            s, stat = rule.update(s, batch)
            z = np.nan_to_num(rule.direction * np.asarray(stat, dtype=np.float64), nan=-np.inf)
            new_states.append(s)
            if rule.free:
                free_z.append(z)
            else:
                fixed_fire.append(z >= rule.threshold())
        return new_states, free_z, fixed_fire

    def z_to_stat(self, z: FloatArray) -> FloatArray:
        return self.direction * z

    def params(self) -> dict[str, Any]:
        return {"rules": self.rules}

    def with_lam(self, lam: float | None) -> Rule:
        cls: Any = type(self)
        rule: Rule = cls(*self.rules, lam=lam)
        return rule


class AnyOf(_Wrapper):
    """Stop when any wrapped rule fires (e.g. confident OR out of budget)."""

    name = "any_of"

    def __init__(self, *rules: Rule, lam: float | None = None) -> None:
        super().__init__(rules, lam)

    def update(self, state: State, batch: StageBatch) -> tuple[State, FloatArray]:
        state, free_z, fixed = self.child_z(state, batch)
        z = np.max(free_z, axis=0) if free_z else np.full(len(batch), -np.inf)
        if fixed:
            z = np.where(np.any(fixed, axis=0), np.inf, z)
        return state, self.z_to_stat(z)

    def threshold(self, lam: float | None = None) -> float:
        if not any(r.free for r in self.rules):
            return 0.0  # only fixed gates: z is +inf or -inf
        return super().threshold(lam)


class AllOf(_Wrapper):
    """Stop only when every wrapped rule fires (e.g. confident AND stable)."""

    name = "all_of"

    def __init__(self, *rules: Rule, lam: float | None = None) -> None:
        super().__init__(rules, lam)

    def update(self, state: State, batch: StageBatch) -> tuple[State, FloatArray]:
        state, free_z, fixed = self.child_z(state, batch)
        z = np.min(free_z, axis=0) if free_z else np.full(len(batch), np.inf)
        if fixed:
            z = np.where(np.all(fixed, axis=0), z, -np.inf)
        return state, self.z_to_stat(z)

    def threshold(self, lam: float | None = None) -> float:
        if not any(r.free for r in self.rules):
            return 0.0
        return super().threshold(lam)


class MinStage(_Wrapper):
    """Never stop before ``min_stages`` stages have run; otherwise defer to the wrapped rule."""

    name = "min_stage"

    def __init__(self, rule: Rule, *, min_stages: int, lam: float | None = None) -> None:
        self.min_stages = check_int(min_stages, "min_stages", "MinStage", minimum=1)
        super().__init__([rule], rule.lam if lam is None else lam)
        self.rules = [rule.with_lam(None)]

    def params(self) -> dict[str, Any]:
        return {"rule": self.rules[0], "min_stages": self.min_stages}

    def with_lam(self, lam: float | None) -> Rule:
        return MinStage(self.rules[0], min_stages=self.min_stages, lam=lam)

    @property
    def direction(self) -> int:  # type: ignore[override]
        return self.rules[0].sign()

    @property
    def integer(self) -> bool:  # type: ignore[override]
        return self.rules[0].integer

    def update(self, state: State, batch: StageBatch) -> tuple[State, FloatArray]:
        (s,), (z,), _ = self.child_z(state, batch)
        if batch.index + 1 < self.min_stages:
            z = np.full(len(batch), -np.inf)
        return [s], self.z_to_stat(z)

    def earliest_stop(self, lam: float | None = None) -> float:
        return max(float(self.min_stages - 1), self.rules[0].earliest_stop(self.lam if lam is None else lam))


class StageThresholds(Rule):
    """A rule with one threshold per stage, fire when z_k >= t_k (Early Time Classification).

    ``thresholds`` are in the wrapped rule's own units (λ per stage); +inf / -inf entries
    (by the rule's direction) mean "never stop at this stage".
    """

    name = "stage_thresholds"

    def __init__(self, rule: Rule, *, thresholds: Sequence[float], lam: float | None = 0.0) -> None:
        super().__init__(lam=0.0)
        self.rule = rule.with_lam(None)
        self.thresholds = np.asarray(thresholds, dtype=np.float64)
        if self.thresholds.ndim != 1 or np.isnan(self.thresholds).any():
            raise StopwiseError(f"The 'thresholds' parameter of StageThresholds must be a 1-D list of numbers. Got {thresholds!r}.")

    def params(self) -> dict[str, Any]:
        return {"rule": self.rule, "thresholds": [float(t) for t in self.thresholds]}

    def with_lam(self, lam: float | None) -> Rule:
        return self

    def init_state(self, n: int) -> State:
        return self.rule.init_state(n)

    def select_state(self, state: State, rows: IntArray | BoolArray) -> State:
        return self.rule.select_state(state, rows)

    def update(self, state: State, batch: StageBatch) -> tuple[State, FloatArray]:
        state, stat = self.rule.update(state, batch)
        z = np.nan_to_num(self.rule.direction * np.asarray(stat, dtype=np.float64), nan=-np.inf)
        k = batch.index
        t = self.rule.sign() * self.thresholds[k] if k < len(self.thresholds) else np.inf
        return state, np.where(z >= t, 1.0, -1.0)

    def earliest_stop(self, lam: float | None = None) -> float:
        for k, t in enumerate(self.thresholds):
            if self.rule.sign() * t < math.inf and self.rule.earliest_stop(float(t)) <= k:
                return float(k)
        return math.inf
