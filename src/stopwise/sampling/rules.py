"""Stopping rules for self-consistency sampling (stage k = the first k+1 samples of a question).

In a sampling trace ``predictions`` hold the running majority vote (what the user would get by
stopping), while the rules need each sample's own answer: they read it from the ``sample`` signal
(dense per-question codes, -1 = no answer) and fall back to ``predictions`` when it is absent.
:class:`OnSamples` lends that view to the core rules (ESC's window agreement, Adaptive-Consistency's
Beta posterior).

Importing this module registers the rules in the core registry (``stopwise.rules.RULES``), so
that certificates naming them can rebuild them with ``Certificate.make_rule()``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from scipy.stats import betabinom

from stopwise.core.errors import StopwiseError, check_choice, check_int
from stopwise.core.rules import RULES, BetaPosterior, Rule, WindowAgreement, register_rule, rule_from_config
from stopwise.core.rules.base import State
from stopwise.core.trace import NO_ANSWER, FloatArray, IntArray, StageBatch
from stopwise.sampling.posteriors import beta_leader_probability, dirichlet_top_probability, urn_keep_probability

SAMPLE = "sample"
CONFIDENCE = "confidence"


def sample_answers(batch: StageBatch) -> IntArray:
    """Each row's own answer at this stage (the ``sample`` signal if present, else predictions)."""
    if SAMPLE in batch.signals:
        return np.asarray(np.rint(batch.signals[SAMPLE]), dtype=np.int64)
    return batch.predictions


def as_samples(batch: StageBatch) -> StageBatch:
    return dataclasses.replace(batch, predictions=sample_answers(batch))


def _counts(hist: IntArray) -> FloatArray:
    """(rows, k) counts of each distinct valid answer, sorted descending (zeros pad the rest)."""
    valid = hist != NO_ANSWER
    same = (hist[:, :, None] == hist[:, None, :]) & valid[:, None, :] & valid[:, :, None]
    k = hist.shape[1]
    earlier = np.tril(np.ones((k, k), dtype=bool), -1)
    # Count each answer once, at its first occurrence.
    first = valid & ~(same & earlier[None, :, :]).any(axis=2)
    counts = np.where(first, same.sum(axis=2), 0).astype(np.float64)
    return -np.sort(-counts, axis=1)


class OnSamples(Rule):
    """Run a core rule on each sample's own answer instead of the running vote."""

    name = "on_samples"

    def __init__(self, *, rule: Rule, lam: float | None = None) -> None:
        if not isinstance(rule, Rule):
            raise StopwiseError(f"The 'rule' parameter of OnSamples must be a stopping rule. Got {rule!r} instead.")
        self.rule = rule
        self.direction = rule.direction  # type: ignore[misc]
        self.integer = rule.integer  # type: ignore[misc]
        super().__init__(lam=rule.lam if lam is None else lam)

    def params(self) -> dict[str, Any]:
        return {"rule": self.rule.with_lam(None)}

    def sign(self) -> int:
        return self.rule.sign()

    def init_state(self, n: int) -> State:
        return self.rule.init_state(n)

    def select_state(self, state: State, rows: Any) -> State:
        return self.rule.select_state(state, rows)

    def update(self, state: State, batch: StageBatch) -> tuple[State, FloatArray]:
        return self.rule.update(state, as_samples(batch))

    def __repr__(self) -> str:
        return f"OnSamples({self.rule!r}{'' if self.lam is None else f', lam={self.lam:g}'})"


class _History(Rule):
    """Rules whose state is the (rows, stages) history of sample answers."""

    def init_state(self, n: int) -> State:
        return np.zeros((n, 0), dtype=np.int64)

    def _append(self, state: State, batch: StageBatch) -> IntArray:
        return np.concatenate([state, sample_answers(batch)[:, None]], axis=1)


class DirichletPosterior(_History):
    """Adaptive-Consistency's Dirichlet criterion (Aggarwal et al. 2023) over the top answers.

    With counts of the ``top`` most common answers and a uniform Dirichlet prior, stop when the
    posterior probability that the leading answer is the most likely one is >= λ (paper: 0.95).
    With ``top = 2`` it equals the Beta criterion.
    """

    name = "dirichlet"
    default_lam = 0.95

    def __init__(self, *, top: int = 5, lam: float | None = None) -> None:
        super().__init__(lam=lam)
        self.top = check_int(top, "top", "DirichletPosterior", minimum=2)

    def params(self) -> dict[str, Any]:
        return {"top": self.top}

    def update(self, state: State, batch: StageBatch) -> tuple[State, FloatArray]:
        hist = self._append(state, batch)
        counts = _counts(hist)
        m = max(2, min(self.top, counts.shape[1]))
        if counts.shape[1] < m:
            counts = np.pad(counts, ((0, 0), (0, m - counts.shape[1])))
        counts = counts[:, :m]
        stat = dirichlet_top_probability(counts) if len(hist) else np.zeros(0)
        return hist, np.where(counts[:, 0] > 0, stat, -np.inf)


def _appearance_counts(row: IntArray) -> tuple[tuple[int, ...], int]:
    """Counts of each valid answer in order of first appearance, and the number of no-answers."""
    order: dict[int, int] = {}
    for code in row.tolist():
        if code != NO_ANSWER:
            order[code] = order.get(code, 0) + 1
    return tuple(order.values()), int((row == NO_ANSWER).sum())


class VoteSettled(_History):
    """Probability that the current vote winner still wins the vote over the full budget.

    With r = ``budget`` - k samples still to come after k:

    - ``model="urn"`` (default): future samples follow a Pólya urn / Chinese restaurant process
      on the answers seen so far (new answers with weight ``alpha``; "auto": 1 + the number of
      answers seen once, a Good-Turing estimate from the question's own samples); the statistic is the
      posterior-predictive probability that the final vote equals the current one
      (:func:`urn_keep_probability`).
    - ``model="pessimistic"``: every future sample goes to the leader or the runner-up, with the
      leader's share p ~ Beta(a + 1, b + 1); the leader keeps the lead when its future count
      X ~ BetaBinomial(r, a + 1, b + 1) satisfies a + X > b + r - X.

    Both give 1 when the vote is decided (the lead exceeds r). Stop when the statistic is >= λ.
    This targets exactly the risk "answer differs from the full-budget majority vote" and is
    stopwise's default family for a calibrated stop.
    """

    name = "vote_settled"
    default_lam = 0.95

    def __init__(self, *, budget: int = 16, model: str = "urn", alpha: float | str = "auto", draws: int = 2000,
                 lam: float | None = None) -> None:
        super().__init__(lam=lam)
        self.budget = check_int(budget, "budget", "VoteSettled", minimum=1)
        self.model = check_choice(model, "model", "VoteSettled", ("urn", "pessimistic"))
        if alpha != "auto" and (not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0):
            raise StopwiseError(f"The 'alpha' parameter of VoteSettled must be 'auto' or a number > 0. Got {alpha!r} instead.")
        self.alpha: float | str = alpha if alpha == "auto" else float(alpha)
        self.draws = check_int(draws, "draws", "VoteSettled", minimum=100)

    def params(self) -> dict[str, Any]:
        return {"budget": self.budget, "model": self.model, "alpha": self.alpha, "draws": self.draws}

    def update(self, state: State, batch: StageBatch) -> tuple[State, FloatArray]:
        hist = self._append(state, batch)
        r = max(self.budget - hist.shape[1], 0)
        if self.model == "urn":
            stat = np.empty(len(hist))
            for i, row in enumerate(hist):
                seen, n_none = _appearance_counts(row)
                # "auto": Good-Turing, P(new answer) ~ singletons / k, i.e. alpha ~ 1 + singletons.
                alpha = 1.0 + sum(c == 1 for c in seen) if self.alpha == "auto" else float(self.alpha)
                stat[i] = urn_keep_probability(seen, n_none, r, alpha, self.draws) if seen else -np.inf
            return hist, stat
        counts = _counts(hist)
        a = counts[:, 0]
        b = counts[:, 1] if counts.shape[1] > 1 else np.zeros_like(a)
        need = np.floor((b - a + r) / 2.0)  # X must exceed this
        if r == 0:
            stat = (a > b).astype(np.float64)
        else:
            stat = np.where(need < 0, 1.0, betabinom.sf(need, r, a + 1.0, b + 1.0))
        return hist, np.where(a > 0, stat, -np.inf)


class DifficultyAdaptive(_History):
    """Difficulty-adaptive self-consistency (DSC, Wang et al. 2024), simplified to one rule.

    Pre-sample ``pre`` answers. If they all agree the question is easy: stop. Otherwise its
    difficulty d = 1 - (leader count / pre) sets a budget pre + ceil(d * (``max_samples`` - pre));
    within it, stop once the Beta posterior (Adaptive-Consistency) is >= λ. Easy questions thus
    cost ``pre`` samples and hard ones get more. (The paper also ranks questions by a cheap prior
    difficulty estimate and batches samples per difficulty; the sampler's ``step`` covers batching.)
    """

    name = "dsc"
    default_lam = 0.95

    def __init__(self, *, pre: int = 3, max_samples: int = 16, lam: float | None = None) -> None:
        super().__init__(lam=lam)
        self.pre = check_int(pre, "pre", "DifficultyAdaptive", minimum=1)
        self.max_samples = check_int(max_samples, "max_samples", "DifficultyAdaptive", minimum=self.pre)

    def params(self) -> dict[str, Any]:
        return {"pre": self.pre, "max_samples": self.max_samples}

    def init_state(self, n: int) -> State:
        return (np.zeros((n, 0), dtype=np.int64), np.full(n, np.inf))

    def update(self, state: State, batch: StageBatch) -> tuple[State, FloatArray]:
        hist, budget = state
        hist = np.concatenate([hist, sample_answers(batch)[:, None]], axis=1)
        k = hist.shape[1]
        n = hist.shape[0]
        if k < self.pre:
            return (hist, budget), np.full(n, -np.inf)
        counts = _counts(hist)
        a = counts[:, 0]
        beta = beta_leader_probability(counts)
        if k == self.pre:
            unanimous = (hist[:, 0] != NO_ANSWER) & (hist == hist[:, :1]).all(axis=1)
            d = 1.0 - a / self.pre
            budget = self.pre + np.ceil(d * (self.max_samples - self.pre))
            stat = np.where(unanimous, np.inf, beta)
        else:
            stat = beta
        return (hist, budget), np.where(k >= budget, np.inf, stat)


class FirstFinish(_History):
    """First Finish Search: return the first completed sample that has an answer.

    The statistic counts valid answers so far; λ = 1 (default) stops at the first one. With an
    asynchronous endpoint the sampler feeds samples in completion order, so "first" is the first
    to finish, as in the paper; the rest are cancelled.
    """

    name = "first_finish"
    integer = True
    default_lam = 1.0

    def init_state(self, n: int) -> State:
        return np.zeros(n)

    def update(self, state: State, batch: StageBatch) -> tuple[State, FloatArray]:
        seen = state + (sample_answers(batch) != NO_ANSWER)
        return seen, seen.copy()


class ConfidenceStop(_History):
    """Confidence-based early stopping of best-of-N (Self-Calibration, Huang et al. 2025).

    ``mode="max"``: stop once some sample with an answer has confidence >= λ (paper: 0.7).
    ``mode="share"``: stop once the leader's share of the confidence-weighted vote is >= λ, after
    at least ``min_samples``. Confidence is the ``confidence`` signal (token-probability based).
    Pair with the confidence-weighted vote (``vote="weighted"``).
    """

    name = "confidence_stop"
    default_lam = 0.7

    def __init__(self, *, mode: str = "max", min_samples: int = 1, lam: float | None = None) -> None:
        super().__init__(lam=lam)
        self.mode = check_choice(mode, "mode", "ConfidenceStop", ("max", "share"))
        self.min_samples = check_int(min_samples, "min_samples", "ConfidenceStop", minimum=1)

    def params(self) -> dict[str, Any]:
        return {"mode": self.mode, "min_samples": self.min_samples}

    def init_state(self, n: int) -> State:
        return (np.zeros((n, 0), dtype=np.int64), np.zeros((n, 0)))

    def update(self, state: State, batch: StageBatch) -> tuple[State, FloatArray]:
        hist, conf = state
        if CONFIDENCE not in batch.signals:
            raise StopwiseError(f"ConfidenceStop needs the {CONFIDENCE!r} signal. Got signals {sorted(batch.signals)}.")
        hist = np.concatenate([hist, sample_answers(batch)[:, None]], axis=1)
        conf = np.concatenate([conf, np.asarray(batch.signals[CONFIDENCE], dtype=np.float64)[:, None]], axis=1)
        valid = hist != NO_ANSWER
        if self.mode == "max":
            stat = np.where(valid, conf, -np.inf).max(axis=1)
        else:
            w = np.where(valid, np.maximum(conf, 1e-12), 0.0)
            same = hist[:, :, None] == hist[:, None, :]
            mass = (same * w[:, None, :]).sum(axis=2)
            total = w.sum(axis=1)
            stat = np.where(total > 0, mass.max(axis=1) / np.maximum(total, 1e-300), -np.inf)
        if hist.shape[1] < self.min_samples:
            stat = np.full(len(hist), -np.inf)
        return (hist, conf), stat


SAMPLING_RULES: dict[str, type[Rule]] = {
    cls.name: cls for cls in (OnSamples, DirichletPosterior, VoteSettled, DifficultyAdaptive, FirstFinish, ConfidenceStop)
}


def register() -> None:
    """Add the sampling rules to the core registry (idempotent)."""
    for name, cls in SAMPLING_RULES.items():
        if name not in RULES:
            register_rule(cls)


register()

#: Named presets: the papers' rules with their defaults, all reading per-sample answers.
PRESETS = ("esc", "asc", "dirichlet", "dsc", "first_finish", "confidence", "settled")


def sampling_rule(name: str, *, max_samples: int = 16, window: int = 5, lam: float | None = None) -> Rule:
    """A sampling rule by preset name, with the paper's default λ unless ``lam`` is given."""
    check_choice(name, "rule", "sampling_rule", PRESETS)
    rule: Rule
    if name == "esc":
        rule = OnSamples(rule=WindowAgreement(window=window), lam=1.0)
    elif name == "asc":
        rule = OnSamples(rule=BetaPosterior(), lam=0.95)
    elif name == "dirichlet":
        rule = DirichletPosterior(lam=0.95)
    elif name == "dsc":
        rule = DifficultyAdaptive(max_samples=max_samples, lam=0.95)
    elif name == "first_finish":
        rule = FirstFinish(lam=1.0)
    elif name == "confidence":
        rule = ConfidenceStop(lam=0.7)
    else:
        rule = VoteSettled(budget=max_samples, lam=0.95)
    return rule if lam is None else rule.with_lam(lam)


def rule_from_certificate_config(config: dict[str, Any]) -> Rule:
    """Like :func:`stopwise.rules.rule_from_config`, for configs that may name sampling rules."""
    register()
    return rule_from_config(config)
