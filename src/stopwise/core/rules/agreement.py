"""Rules on how predictions agree across stages: patience (PABEE), window agreement (ESC),
Beta posterior (Adaptive-Consistency) and an anytime-valid betting test."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.special import betainc

from stopwise.core.errors import check_choice, check_int, param_error
from stopwise.core.rules.base import Rule, State
from stopwise.core.trace import NO_ANSWER, FloatArray, IntArray, StageBatch, Trace


class Patience(Rule):
    """Stop once the prediction has stayed the same for λ consecutive stages (PABEE, Zhou et al. 2020).

    The statistic counts how many stages in a row repeated the previous stage's prediction, so
    λ = 6 means "unchanged over 6 consecutive internal classifiers" as in the paper.
    """

    name = "patience"
    integer = True
    default_lam = 6.0

    def init_state(self, n: int) -> State:
        return (np.full(n, NO_ANSWER - 1, dtype=np.int64), np.zeros(n, dtype=np.int64))

    def update(self, state: State, batch: StageBatch) -> tuple[State, FloatArray]:
        last, run = state
        pred = batch.predictions
        same = (pred == last) & (pred != NO_ANSWER)
        run = np.where(same, run + 1, 0)
        return (pred.copy(), run), run.astype(np.float64)

    def earliest_stop(self, lam: float | None = None) -> float:
        # The run at stage k counts at most k repeats, so λ repeats need stage ceil(λ).
        t = self.threshold(lam)
        if t == math.inf:
            return math.inf
        return float(math.ceil(t)) if t > 0 else 0.0

    def statistic_all(self, trace: Trace, rows: slice) -> FloatArray | None:
        # Stage-major copy of the block: each stage is then one short contiguous vector op.
        q = np.ascontiguousarray(trace.predictions[rows].T)
        out = np.zeros(q.shape, dtype=np.float64)
        for k in range(1, q.shape[0]):
            same = (q[k] == q[k - 1]) & (q[k] != NO_ANSWER)
            np.multiply(out[k - 1] + 1.0, same, out=out[k])
        return out.T


def _history_append(state: State, pred: IntArray) -> IntArray:
    hist: IntArray = state
    return np.concatenate([hist, pred[:, None]], axis=1)


def _vote_counts(hist: IntArray) -> tuple[IntArray, IntArray, IntArray]:
    """Per row: (count of each position's answer, top count, runner-up count), ignoring NO_ANSWER."""
    valid = hist != NO_ANSWER
    same = (hist[:, :, None] == hist[:, None, :]) & valid[:, None, :]
    counts = np.where(valid, same.sum(axis=2), 0)
    top_pos = counts.argmax(axis=1)
    rows = np.arange(hist.shape[0])
    top = counts[rows, top_pos]
    other = hist != hist[rows, top_pos][:, None]
    second = np.where(other, counts, 0).max(axis=1, initial=0)
    return counts, top, second


class WindowAgreement(Rule):
    """Early-stopping self-consistency (ESC, Li et al. 2024).

    Samples arrive in windows of ``window`` answers; at the end of each window, stop when the share
    of the window's answers equal to its most common answer is >= λ. λ = 1 is the paper's rule
    (all answers in the window agree); unparseable answers never agree.
    """

    name = "esc"
    default_lam = 1.0

    def __init__(self, *, window: int = 5, lam: float | None = None) -> None:
        super().__init__(lam=lam)
        self.window = check_int(window, "window", "WindowAgreement", minimum=1)

    def params(self) -> dict[str, Any]:
        return {"window": self.window}

    def init_state(self, n: int) -> State:
        return np.zeros((n, 0), dtype=np.int64)

    def update(self, state: State, batch: StageBatch) -> tuple[State, FloatArray]:
        hist = _history_append(state, batch.predictions)
        n = hist.shape[0]
        if (batch.index + 1) % self.window:
            return hist, np.full(n, -np.inf)
        _, top, _ = _vote_counts(hist[:, -self.window :])
        return hist, top / self.window


class BetaPosterior(Rule):
    """Adaptive-Consistency's Beta stopping criterion (Aggarwal et al. 2023).

    With a, b the counts of the two most common answers so far and a uniform prior, the posterior
    probability that the leader is truly more likely is P(p1 > p2) = 1 - I_{1/2}(a + 1, b + 1),
    with I the regularised incomplete beta function. Stop when it is >= λ (paper: 0.95).
    """

    name = "beta"
    default_lam = 0.95

    def init_state(self, n: int) -> State:
        return np.zeros((n, 0), dtype=np.int64)

    def update(self, state: State, batch: StageBatch) -> tuple[State, FloatArray]:
        hist = _history_append(state, batch.predictions)
        _, a, b = _vote_counts(hist)
        stat = 1.0 - betainc(a + 1.0, b + 1.0, 0.5)
        return hist, np.where(a > 0, stat, -np.inf)


class Betting(Rule):
    """An anytime-valid test by betting that the prediction has settled (Shekhar & Ramdas 2023).

    Null hypothesis: each new stage agrees with the current leader with probability at most
    ``p0`` (the answer is still unsettled). The wealth K_k = prod_j (1 + kappa * (A_j - p0)), with
    A_j = 1 when stage j agrees with the leader chosen before seeing it, is a nonnegative
    supermartingale under the null, so by Ville's inequality P(sup_k K_k >= 1/alpha) <= alpha
    however often it is checked. The statistic is 1/K_k (an anytime-valid p-value); the rule fires
    when it is <= λ = alpha. ``leader`` is the previous stage's prediction ("previous", suited to
    layers) or the most common answer so far ("mode", suited to samples).
    """

    name = "betting"
    direction = -1
    default_lam = 0.05

    def __init__(self, *, p0: float = 0.5, kappa: float | None = None, leader: str = "previous", lam: float | None = None) -> None:
        super().__init__(lam=lam)
        if not isinstance(p0, (int, float)) or not 0.0 < p0 < 1.0:
            raise param_error("p0", "Betting", "a float in (0, 1)", p0)
        self.p0 = float(p0)
        # Default bet: the largest that keeps every factor >= 1/2, so one miss cannot ruin us.
        self.kappa = 0.5 / self.p0 if kappa is None else float(kappa)
        if not 0.0 < self.kappa <= 1.0 / self.p0:
            raise param_error("kappa", "Betting", f"in (0, 1/p0] = (0, {1.0 / self.p0:g}]", kappa)
        self.leader = check_choice(leader, "leader", "Betting", ("previous", "mode"))

    def params(self) -> dict[str, Any]:
        return {"p0": self.p0, "kappa": self.kappa, "leader": self.leader}

    def init_state(self, n: int) -> State:
        return (np.zeros((n, 0), dtype=np.int64), np.zeros(n))

    def update(self, state: State, batch: StageBatch) -> tuple[State, FloatArray]:
        hist, log_wealth = state
        pred = batch.predictions
        if hist.shape[1] == 0:
            return (_history_append(hist, pred), log_wealth), np.ones(len(pred))
        if self.leader == "previous":
            lead = hist[:, -1]
        else:
            counts, _, _ = _vote_counts(hist)
            # Ties go to the most recent answer: argmax over the reversed history.
            rev = counts[:, ::-1].argmax(axis=1)
            lead = hist[np.arange(len(hist)), hist.shape[1] - 1 - rev]
        agree = ((pred == lead) & (pred != NO_ANSWER)).astype(np.float64)
        log_wealth = log_wealth + np.log1p(self.kappa * (agree - self.p0))
        return (_history_append(hist, pred), log_wealth), np.exp(-np.maximum(log_wealth, 0.0))
