"""The adaptive sampler: draw samples in steps, ask a stopping rule after each, vote.

Stage k of a question is its first k+1 samples. After each sample the rule's online stopper
(``rule.stopper(n, lam)``) sees a :class:`~stopwise.StageBatch` built exactly like a column of a
recorded trace (running vote as predictions; ``sample``, ``confidence`` and ``tokens`` signals),
so a λ certified offline on a trace decides the same way online.

:meth:`AdaptiveSampler.run` is synchronous and batches all questions still sampling into one
backend call per step (right for a local model). :meth:`AdaptiveSampler.arun` runs questions
concurrently against an asynchronous backend (an endpoint), keeps up to ``step`` requests in
flight per question, feeds samples in the order they finish, and cancels the requests still in
flight as soon as the rule stops.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stopwise.core.certificate import Certificate
from stopwise.core.errors import StopwiseError, check_choice, check_int
from stopwise.core.rules import Rule
from stopwise.core.trace import StageBatch, hash_answers
from stopwise.sampling.data import Question
from stopwise.sampling.extract import Extractor, make_extractor, safe_extract
from stopwise.sampling.rules import register, sampling_rule
from stopwise.sampling.types import Completion, prompt_seed
from stopwise.sampling.vote import dense_codes, running_votes


@dataclass
class QuestionResult:
    """What the sampler did for one question. ``answer`` is None when no sample had an answer."""

    id: str
    answer: str | None
    n_samples: int
    n_generated: int
    n_tokens: int
    stopped_early: bool
    answers: list[str | None] = field(default_factory=list)
    confidences: list[float] = field(default_factory=list)
    cancelled: int = 0

    @property
    def no_answer(self) -> bool:
        return self.answer is None


class Tally:
    """One question's samples so far, and the StageBatch row they make."""

    def __init__(self, weighted: bool) -> None:
        self.answers: list[str | None] = []
        self.conf: list[float] = []
        self.tokens: list[int] = []
        self.weighted = weighted

    def add(self, answer: str | None, c: Completion) -> None:
        self.answers.append(answer)
        self.conf.append(float(c.confidence))
        self.tokens.append(int(c.n_tokens))

    def current(self, stage: int) -> tuple[int, str | None, int]:
        """(hashed vote, vote string, dense code of sample ``stage``) over samples 0..stage only
        (a step may have drawn more samples than the stopper has seen yet)."""
        codes, names = dense_codes(self.answers[: stage + 1])
        w = np.asarray(self.conf[: stage + 1])[None, :] if self.weighted else None
        winner = int(running_votes(codes[None, :], w)[0, -1])
        vote = None if winner < 0 else names[winner]
        return int(hash_answers([vote])[0]), vote, int(codes[-1])

    def result(self, qid: str, used: int, generated: int, early: bool, cancelled: int = 0) -> QuestionResult:
        """The (weighted) vote over the first ``used`` samples; tokens count every sample drawn."""
        answers = self.answers[:used]
        codes, names = dense_codes(answers)
        w = np.asarray(self.conf[:used])[None, :] if self.weighted else None
        winner = int(running_votes(codes[None, :], w)[0, -1]) if used else -1
        return QuestionResult(id=qid, answer=None if winner < 0 else names[winner], n_samples=used,
                              n_generated=generated, n_tokens=int(sum(self.tokens)), stopped_early=early,
                              answers=answers, confidences=self.conf[:used], cancelled=cancelled)


def check_questions(questions: Sequence[Question | str], owner: str) -> list[Question]:
    """Questions as :class:`Question` (plain strings get their position as id); none is an error."""
    if not questions:
        raise StopwiseError(f"The 'questions' parameter of {owner} must hold at least one question. Got an empty list instead.")
    return [q if isinstance(q, Question) else Question(id=str(i), prompt=str(q)) for i, q in enumerate(questions)]


def draw(backend: Any, prompts: Sequence[str], *, n: int, seeds: Sequence[int], temperature: float,
         max_tokens: int) -> list[list[Completion]]:
    """``n`` completions for each prompt from one batched ``backend.generate`` call, checked."""
    outs: list[list[Completion]] = backend.generate(list(prompts), n=n, temperature=temperature,
                                                    max_tokens=max_tokens, seeds=list(seeds))
    if len(outs) != len(prompts) or any(len(c) != n for c in outs):
        raise StopwiseError(f"The backend must return {n} completions for each of the {len(prompts)} prompts.")
    return outs


def _batch(index: int, tallies: Sequence[Tally]) -> StageBatch:
    rows = [t.current(index) for t in tallies]
    return StageBatch(
        index=index,
        predictions=np.asarray([r[0] for r in rows], dtype=np.int64),
        signals={
            "sample": np.asarray([r[2] for r in rows], dtype=np.float64),
            "confidence": np.asarray([t.conf[index] for t in tallies], dtype=np.float64),
            "tokens": np.asarray([t.tokens[index] for t in tallies], dtype=np.float64),
        },
        cost=np.asarray([float(sum(t.tokens[: index + 1])) for t in tallies]),
    )


class AdaptiveSampler:
    """Self-consistency with early stopping.

    Args:
        backend: anything with ``generate`` (sync) and/or ``agenerate`` (async): the local HF
            backend, :class:`~stopwise.sampling.backends.HTTPBackend`, or
            :class:`~stopwise.sampling.backends.CallableBackend`.
        rule: a :class:`~stopwise.rules.Rule` with λ set, a preset name ("esc", "asc",
            "dirichlet", "dsc", "first_finish", "confidence", "settled"), or a
            :class:`~stopwise.Certificate` (its certified rule; full budget if uncertified).
        max_samples: the budget N per question.
        step: samples drawn per question per step (ESC: its window; async: requests in flight).
        vote: "majority" or "weighted" (confidence-weighted).
        on_error: in :meth:`arun`, a request that fails for good (after the backend's retries)
            either stops the run ("raise", default) or counts as a sample with no answer
            ("no_answer"), so one bad request does not lose a long run.
    """

    def __init__(self, backend: Any, rule: Rule | str | Certificate = "settled", *, lam: float | None = None,
                 max_samples: int = 16, step: int = 1, extract: str | Extractor = "number",
                 temperature: float = 0.7, max_tokens: int = 96, vote: str = "majority", seed: int = 0,
                 on_error: str = "raise") -> None:
        register()
        self.backend = backend
        self.max_samples = check_int(max_samples, "max_samples", "AdaptiveSampler", minimum=1)
        self.step = check_int(step, "step", "AdaptiveSampler", minimum=1)
        if isinstance(rule, Certificate):
            rule = rule.make_rule()
        elif isinstance(rule, str):
            rule = sampling_rule(rule, max_samples=max_samples)
        if not isinstance(rule, Rule):
            raise StopwiseError(f"The 'rule' parameter of AdaptiveSampler must be a Rule, a preset name or a Certificate. Got {rule!r} instead.")
        self.rule = rule
        self.lam = lam
        rule.threshold(lam)  # fail now, not mid-run, when no λ is known
        self.extractor = make_extractor(extract)
        self.temperature = float(temperature)
        self.max_tokens = check_int(max_tokens, "max_tokens", "AdaptiveSampler", minimum=1)
        self.weighted = check_choice(vote, "vote", "AdaptiveSampler", ("majority", "weighted")) == "weighted"
        self.seed = int(seed)
        self.on_error = check_choice(on_error, "on_error", "AdaptiveSampler", ("raise", "no_answer"))

    @staticmethod
    def _check_questions(questions: Sequence[Question | str]) -> list[Question]:
        return check_questions(questions, "AdaptiveSampler.run")

    def _result(self, q: Question, tally: Tally, used: int, generated: int, early: bool, cancelled: int = 0) -> QuestionResult:
        return tally.result(q.id, used, generated, early, cancelled)

    # -- synchronous: one batched backend call per step ---------------------------------------------
    def run(self, questions: Sequence[Question | str]) -> list[QuestionResult]:
        qs = self._check_questions(questions)
        stopper = self.rule.stopper(len(qs), self.lam)
        tallies = [Tally(self.weighted) for _ in qs]
        results: dict[int, QuestionResult] = {}
        stage = 0
        round_ = 0
        while len(stopper.active) and stage < self.max_samples:
            active = stopper.active.copy()
            m = min(self.step, self.max_samples - stage)
            outs = draw(self.backend, [qs[i].prompt for i in active], n=m, temperature=self.temperature,
                        max_tokens=self.max_tokens,
                        seeds=[prompt_seed(self.seed, f"{qs[i].id}:{round_}") for i in active])
            for i, comps in zip(active, outs, strict=True):
                for c in comps:
                    tallies[i].add(safe_extract(self.extractor, c.text), c)
            for _j in range(m):
                alive = stopper.active.copy()
                last = stage == self.max_samples - 1
                stop = stopper.step(_batch(stage, [tallies[i] for i in alive]), last=last)
                for i in alive[stop]:
                    results[int(i)] = self._result(qs[i], tallies[i], stage + 1, len(tallies[i].answers), not last)
                stage += 1
                if not len(stopper.active):
                    break
            round_ += 1
        return [results[i] for i in range(len(qs))]

    # -- asynchronous: per-question in-flight requests, cancelled on stop ---------------------------
    def arun_sync(self, questions: Sequence[Question | str], *, concurrency: int = 8) -> list[QuestionResult]:
        """:meth:`arun` from synchronous code."""
        return asyncio.run(self.arun(questions, concurrency=concurrency))

    async def arun(self, questions: Sequence[Question | str], *, concurrency: int = 8) -> list[QuestionResult]:
        qs = self._check_questions(questions)
        if not hasattr(self.backend, "agenerate"):
            raise StopwiseError(f"The backend {type(self.backend).__name__} has no asynchronous 'agenerate'; use run().")
        gate = asyncio.Semaphore(max(1, int(concurrency)))
        client = self.backend.client() if hasattr(self.backend, "client") else None
        try:
            return list(await asyncio.gather(*(self._one(q, gate, client) for q in qs)))
        finally:
            if client is not None:
                await client.aclose()

    async def _one(self, q: Question, gate: asyncio.Semaphore, client: Any) -> QuestionResult:
        stopper = self.rule.stopper(1, self.lam)
        tally = Tally(self.weighted)
        launched = 0
        pending: set[asyncio.Task[list[Completion]]] = set()

        async def draw(k: int) -> list[Completion]:
            kwargs: dict[str, Any] = {"n": 1, "temperature": self.temperature, "max_tokens": self.max_tokens,
                                      "seed": prompt_seed(self.seed, f"{q.id}:{k}") % (2**31)}
            if client is not None:
                kwargs["client"] = client
            async with gate:
                try:
                    result: list[Completion] = await self.backend.agenerate(q.prompt, **kwargs)
                except StopwiseError:
                    if self.on_error == "raise":
                        raise
                    result = [Completion(text="", n_tokens=0, finish_reason="error")]
                return result

        def top_up() -> None:
            nonlocal launched
            while len(pending) < self.step and launched < self.max_samples:
                pending.add(asyncio.ensure_future(draw(launched)))
                launched += 1

        top_up()
        try:
            while pending:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:  # in finishing order: stage k is the k-th sample to finish
                    pending.discard(task)
                    comp = task.result()[0]
                    tally.add(safe_extract(self.extractor, comp.text), comp)
                    stage = len(tally.answers) - 1
                    last = stage == self.max_samples - 1
                    if stopper.step(_batch(stage, [tally]), last=last)[0]:
                        cancelled = len(pending)
                        return self._result(q, tally, stage + 1, stage + 1, not last, cancelled)
                top_up()
            return self._result(q, tally, len(tally.answers), len(tally.answers), False)
        finally:
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)


def summarise(results: Sequence[QuestionResult], *, max_samples: int) -> dict[str, Any]:
    """Mean samples and tokens, share stopped early and share with no answer."""
    n = len(results)
    if not n:
        return {"n": 0}
    return {
        "n": n,
        "mean_samples": float(np.mean([r.n_samples for r in results])),
        "samples_fraction": float(np.mean([r.n_samples for r in results]) / max_samples),
        "mean_tokens": float(np.mean([r.n_tokens for r in results])),
        "stopped_early": float(np.mean([r.stopped_early for r in results])),
        "no_answer": float(np.mean([r.no_answer for r in results])),
    }
