"""DSC's batch allocation: share one sample budget across a set of questions by their difficulty.

Difficulty-Adaptive Self-Consistency (Wang et al. 2024, "Make Every Penny Count") spends a fixed
budget over a *set* of questions instead of one question at a time:

1. pre-sample ``pre`` answers for every question (one batched backend call);
2. a question whose pre-samples all agree on a real answer is easy: settled at ``pre`` samples;
3. the others are ranked by difficulty d = 1 - (leader count / samples drawn), ties broken by the
   entropy of their answers (no answer counts as one more answer), and in rounds the hardest
   first get another window of max(1, ceil(d × ``window``)) samples, until Adaptive-Consistency's
   Beta criterion holds (P(leader more likely than runner-up) >= λ), the question has
   ``max_samples``, or the budget ``total_samples`` is spent.

Neither the budget nor any question's ``max_samples`` is ever exceeded: a window is cut to what is
left. Each round draws one batched backend call per distinct window size (:meth:`run`), or, with
an endpoint, one request per question of the round, all in flight together (:meth:`arun`): the
same plan, so the same samples from a backend that answers by seed. The paper ranks
questions by an LLM-judged prior before any sampling and searches the easy/hard boundary in that
ranking; here difficulty comes from the pre-samples, so every question costs at least ``pre``.
:class:`~stopwise.sampling.rules.DifficultyAdaptive` is the per-question version of the same
idea for :class:`~stopwise.sampling.sampler.AdaptiveSampler`.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stopwise.core.errors import StopwiseError, check_choice, check_int, check_open_unit, param_error
from stopwise.sampling.data import Question
from stopwise.sampling.extract import Extractor, make_extractor, safe_extract
from stopwise.sampling.posteriors import beta_leader_probability
from stopwise.sampling.sampler import QuestionResult, Tally, check_questions, draw, summarise
from stopwise.sampling.types import Completion, prompt_seed

#: Why a question stopped: pre-samples agreed, the Beta criterion held, it reached
#: ``max_samples``, or the total budget ran out first.
REASONS = ("unanimous", "criterion", "max_samples", "budget")


@dataclass
class Allocation:
    """What :meth:`DifficultyAllocator.run` did: one result per question in input order, why each
    stopped (``reasons``, one of :data:`REASONS`), samples ``spent`` of ``total_samples``, and
    sampling ``rounds`` (the pre-sampling round included).

    A result's answer is the vote over all its samples (every sample drawn is used, so
    ``n_generated == n_samples``); ``stopped_early`` means settled by the pre-samples or the
    criterion with fewer than ``max_samples``, not cut short by the budget.
    """

    results: list[QuestionResult]
    reasons: list[str]
    total_samples: int
    spent: int
    rounds: int
    max_samples: int

    def summary(self) -> dict[str, Any]:
        """:func:`~stopwise.sampling.sampler.summarise` plus the budget spent, rounds and stop reasons."""
        counts = Counter(self.reasons)
        return {**summarise(self.results, max_samples=self.max_samples), "total_samples": self.total_samples,
                "spent": self.spent, "budget_fraction": self.spent / self.total_samples, "rounds": self.rounds,
                "reasons": {r: counts.get(r, 0) for r in REASONS}}


def check_budget(total_samples: int, *, pre: int, n_questions: int) -> int:
    """Raise unless ``total_samples`` pays for the pre-samples; return what they cost."""
    need = pre * n_questions
    if total_samples < need:
        raise param_error("total_samples", "DifficultyAllocator",
                          f">= pre × questions = {pre} × {n_questions} = {need}", total_samples)
    return need


def _valid_counts(answers: Sequence[str | None]) -> list[int]:
    """Counts of each real answer, largest first."""
    return sorted(Counter(a for a in answers if a is not None).values(), reverse=True)


def _lag(answers: Sequence[str | None]) -> int:
    """Samples not for the leading real answer: difficulty d = lag / samples drawn."""
    return len(answers) - max(_valid_counts(answers), default=0)


def _entropy(answers: Sequence[str | None]) -> float:
    counts = np.asarray(sorted(Counter(answers).values()), dtype=np.float64)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def _unanimous(answers: Sequence[str | None]) -> bool:
    return answers[0] is not None and all(a == answers[0] for a in answers)


@dataclass
class _State:
    """One run's tallies, stop reasons by question, samples spent and rounds drawn."""

    tallies: list[Tally]
    reasons: dict[int, str] = field(default_factory=dict)
    spent: int = 0
    rounds: int = 0


class DifficultyAllocator:
    """Difficulty-adaptive self-consistency over a set of questions under a total sample budget.

    Args:
        backend: anything with a batched ``generate`` for :meth:`run` (the local HF backend,
            :class:`~stopwise.sampling.backends.HTTPBackend`,
            :class:`~stopwise.sampling.backends.CallableBackend`) or an awaitable ``agenerate``
            for :meth:`arun` (HTTPBackend, CallableBackend).
        total_samples: the budget over all questions of one :meth:`run`; at least ``pre`` per question.
        pre: pre-samples per question; a question whose ``pre`` samples agree is settled.
        max_samples: the most samples one question may get.
        window: the window of the hardest question (d = 1); one of difficulty d gets
            max(1, ceil(d × window)) more samples per round.
        lam: stop a question once the Beta posterior P(leader more likely than runner-up) >= λ
            (Adaptive-Consistency's 0.95).
        extract, temperature, max_tokens, vote, seed: as for
            :class:`~stopwise.sampling.sampler.AdaptiveSampler`; ``vote`` sets only the final answer
            (difficulty and the stop criterion use plain counts).
    """

    def __init__(self, backend: Any, *, total_samples: int, pre: int = 3, max_samples: int = 16, window: int = 4,
                 lam: float = 0.95, extract: str | Extractor = "number", temperature: float = 0.7,
                 max_tokens: int = 96, vote: str = "majority", seed: int = 0) -> None:
        owner = "DifficultyAllocator"
        if not any(callable(getattr(backend, m, None)) for m in ("generate", "agenerate")):
            raise StopwiseError(f"The backend {type(backend).__name__} has neither a batched 'generate' nor an "
                                "asynchronous 'agenerate'.")
        self.backend = backend
        self.total_samples = check_int(total_samples, "total_samples", owner, minimum=1)
        self.pre = check_int(pre, "pre", owner, minimum=1)
        self.max_samples = check_int(max_samples, "max_samples", owner, minimum=self.pre)
        self.window = check_int(window, "window", owner, minimum=1)
        self.lam = check_open_unit(lam, "lam", owner)
        self.extractor = make_extractor(extract)
        self.temperature = float(temperature)
        self.max_tokens = check_int(max_tokens, "max_tokens", owner, minimum=1)
        self.weighted = check_choice(vote, "vote", owner, ("majority", "weighted")) == "weighted"
        self.seed = int(seed)

    def run(self, questions: Sequence[Question | str]) -> Allocation:
        """Allocate the budget, each round's windows drawn by one batched ``generate`` per window size."""
        if not callable(getattr(self.backend, "generate", None)):
            raise StopwiseError(f"The backend {type(self.backend).__name__} has no batched 'generate'; use arun().")
        qs = check_questions(questions, "DifficultyAllocator.run")
        state = self._start(qs)
        for draws in self._rounds(qs, state):
            for rows, n in draws:
                self._draw(qs, state.tallies, rows, n)
        return self._finish(qs, state)

    def arun_sync(self, questions: Sequence[Question | str], *, concurrency: int = 8) -> Allocation:
        """:meth:`arun` from synchronous code."""
        return asyncio.run(self.arun(questions, concurrency=concurrency))

    async def arun(self, questions: Sequence[Question | str], *, concurrency: int = 8) -> Allocation:
        """Allocate the budget as :meth:`run` does, each round's windows requested together (at most
        ``concurrency`` in flight): an endpoint serves a round in about the time of its slowest window
        instead of one request after another. A failed request cancels the rest of its round."""
        if not callable(getattr(self.backend, "agenerate", None)):
            raise StopwiseError(f"The backend {type(self.backend).__name__} has no asynchronous 'agenerate'; use run().")
        qs = check_questions(questions, "DifficultyAllocator.arun")
        gate = asyncio.Semaphore(check_int(concurrency, "concurrency", "DifficultyAllocator.arun", minimum=1))
        client = self.backend.client() if hasattr(self.backend, "client") else None
        try:
            state = self._start(qs)
            for draws in self._rounds(qs, state):
                jobs = [(i, n) for rows, n in draws for i in rows]
                tasks = [asyncio.ensure_future(self._adraw(qs[i], state.tallies[i], n, gate, client)) for i, n in jobs]
                try:
                    outs = await asyncio.gather(*tasks)
                finally:  # on a failure, the round's other requests are not left running
                    for task in tasks:
                        task.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)
                # Tallied in question order once the round is in: completion order must not change results.
                for (i, _), comps in zip(jobs, outs, strict=True):
                    self._tally(state.tallies[i], comps)
            return self._finish(qs, state)
        finally:
            if client is not None:
                await client.aclose()

    # -- the rounds, shared by run and arun --------------------------------------------------------
    def _start(self, qs: Sequence[Question]) -> _State:
        check_budget(self.total_samples, pre=self.pre, n_questions=len(qs))
        return _State(tallies=[Tally(self.weighted) for _ in qs])

    def _rounds(self, qs: Sequence[Question], state: _State) -> Iterator[list[tuple[list[int], int]]]:
        """Yield each round's draws as (questions, window size) groups; the caller draws them into
        ``state.tallies`` before resuming, and the next round is planned on what came back."""
        yield [(list(range(len(qs))), self.pre)]
        state.spent, state.rounds = self.pre * len(qs), 1
        state.reasons.update({i: "unanimous" for i, t in enumerate(state.tallies) if _unanimous(t.answers)})
        while True:
            self._close(state.tallies, state.reasons)
            open_ = [i for i in range(len(qs)) if i not in state.reasons]
            if not open_ or state.spent >= self.total_samples:
                break
            plan = self._plan(open_, state.tallies, self.total_samples - state.spent)
            yield [([i for i, m in plan.items() if m == size], size) for size in sorted(set(plan.values()))]
            state.spent += sum(plan.values())
            state.rounds += 1
        for i in open_:
            state.reasons[i] = "budget"

    def _finish(self, qs: Sequence[Question], state: _State) -> Allocation:
        reasons = [state.reasons[i] for i in range(len(qs))]
        results = [self._result(q, t, r) for q, t, r in zip(qs, state.tallies, reasons, strict=True)]
        return Allocation(results=results, reasons=reasons, total_samples=self.total_samples, spent=state.spent,
                          rounds=state.rounds, max_samples=self.max_samples)

    def _seed(self, q: Question, tally: Tally) -> int:
        # Keyed by the index of a window's first sample: independent of which questions share the call.
        return prompt_seed(self.seed, f"{q.id}:{len(tally.answers)}")

    def _draw(self, qs: Sequence[Question], tallies: Sequence[Tally], rows: Sequence[int], n: int) -> None:
        outs = draw(self.backend, [qs[i].prompt for i in rows], n=n, seeds=[self._seed(qs[i], tallies[i]) for i in rows],
                    temperature=self.temperature, max_tokens=self.max_tokens)
        for i, comps in zip(rows, outs, strict=True):
            self._tally(tallies[i], comps)

    async def _adraw(self, q: Question, tally: Tally, n: int, gate: asyncio.Semaphore, client: Any) -> list[Completion]:
        kwargs: dict[str, Any] = {"n": n, "temperature": self.temperature, "max_tokens": self.max_tokens,
                                  "seed": self._seed(q, tally)}
        if client is not None:
            kwargs["client"] = client
        async with gate:
            comps: list[Completion] = await self.backend.agenerate(q.prompt, **kwargs)
        if len(comps) != n:
            raise StopwiseError(f"The backend must return {n} completions for the prompt of question {q.id!r}; "
                                f"it returned {len(comps)}.")
        return comps

    def _tally(self, tally: Tally, comps: Sequence[Completion]) -> None:
        for c in comps:
            tally.add(safe_extract(self.extractor, c.text), c)

    def _close(self, tallies: Sequence[Tally], reasons: dict[int, str]) -> None:
        """Mark the open questions whose Beta criterion holds, or that have ``max_samples``."""
        open_ = [i for i in range(len(tallies)) if i not in reasons]
        if not open_:
            return
        top2 = np.zeros((len(open_), 2))
        for row, i in enumerate(open_):
            counts = _valid_counts(tallies[i].answers)[:2]
            top2[row, : len(counts)] = counts
        stat = beta_leader_probability(top2)
        for row, i in enumerate(open_):
            if stat[row] >= self.lam:
                reasons[i] = "criterion"
            elif len(tallies[i].answers) >= self.max_samples:
                reasons[i] = "max_samples"

    def _plan(self, open_: Sequence[int], tallies: Sequence[Tally], left: int) -> dict[int, int]:
        """Windows for this round, hardest question first, until the budget ``left`` is used."""

        def key(i: int) -> tuple[float, float, int]:
            answers = tallies[i].answers
            return (-_lag(answers) / len(answers), -_entropy(answers), i)

        plan: dict[int, int] = {}
        for i in sorted(open_, key=key):
            if left <= 0:
                break
            k = len(tallies[i].answers)
            # ceil(d * window) in integers: with d = lag / k a float product can land just above a whole number.
            size = max(1, -(-self.window * _lag(tallies[i].answers) // k))
            size = min(size, self.max_samples - k, left)
            plan[i] = size
            left -= size
        return plan

    def _result(self, q: Question, tally: Tally, reason: str) -> QuestionResult:
        used = len(tally.answers)
        early = reason in ("unanimous", "criterion") and used < self.max_samples
        return tally.result(q.id, used, used, early)
