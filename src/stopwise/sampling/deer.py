"""Reasoning early exit (DEER, Yang et al. 2025): stop thinking once a trial answer is confident.

While a chain of thought is generated, at each transition point ("Wait", a blank line, ...) we
append a trial-answer prompt, decode the trial answer greedily, and score it by its token
probabilities (mean, geometric mean or minimum). When the score is >= λ the model stops thinking
and the trial answer is final; otherwise the trial is discarded and thinking continues.

Greedy thinking does not depend on the discarded trials, so the trace of a full chain of thought
with a trial at every transition (:meth:`DEER.trace_rows`) is exactly what the online loop would
see: λ can be certified on such traces with :func:`stopwise.calibrate` (risk "gap": the answer
differs from the answer after full thinking; or "accuracy_drop" with labels) and the rule
``Signal(signal="deer_<score>")``.

Works with the local model and with any endpoint whose ``/completions`` returns logprobs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stopwise.core.errors import StopwiseError, check_choice
from stopwise.core.trace import Trace, hash_answers
from stopwise.sampling.data import Question
from stopwise.sampling.extract import Extractor, NumberExtractor, make_extractor, safe_extract
from stopwise.sampling.types import SCORES, token_score

CHATML = "<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
DEFAULT_TRANSITIONS = ("\n\n", "Wait")
DEER_SUFFIX = "\nThink step by step."
ANSWER_PROMPT = "\nFinal answer: "


@dataclass
class Step:
    """A chunk of thinking up to a transition, and what the model would answer there."""

    think_tokens: int
    trial_tokens: int
    answer: str | None
    scores: dict[str, float]
    trial_text: str


@dataclass
class DeerResult:
    id: str
    answer: str | None
    think_tokens: int
    trial_tokens: int
    stopped_early: bool
    steps: list[Step] = field(default_factory=list)
    thinking: str = ""


class _Local:
    """Greedy continuation on the local backend, keeping the KV cache of the thinking so far
    (trials run on a copy of it)."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.session: Any = None

    def start(self, question: str) -> None:
        self.session = self.backend.session(self.backend.encode_prompt(question))

    def think(self, *, max_tokens: int, stop: Sequence[str]) -> tuple[str, int, bool]:
        c = self.session.generate(max_tokens, stop)
        return c.text, c.n_tokens, c.finish_reason == "stop"

    def trial(self, answer_prompt: str, *, max_tokens: int) -> tuple[str, int, tuple[float, ...]]:
        fork = self.session.fork()
        fork.extend(self.backend.encode(answer_prompt))
        c = fork.generate(max_tokens, ("\n",))
        return c.text, c.n_tokens, c.logprobs or ()


class _Endpoint:
    """The same on an OpenAI-compatible ``/completions`` endpoint with logprobs (the prompt is
    resent each time: endpoints keep no state)."""

    def __init__(self, backend: Any, template: str) -> None:
        if getattr(backend, "api", None) != "completions" or not getattr(backend, "logprobs", False):
            raise StopwiseError("DEER on an endpoint needs HTTPBackend(api='completions', logprobs=True) "
                                "to continue raw text and score tokens.")
        self.backend = backend
        self.template = template
        self.text = ""

    def start(self, question: str) -> None:
        self.text = self.template.format(question=question)

    def _complete(self, text: str, max_tokens: int, stop: Sequence[str]) -> Any:
        return self.backend.generate([text], n=1, temperature=0.0, max_tokens=max_tokens, seeds=[0], raw=True,
                                     stop=list(stop))[0][0]

    def think(self, *, max_tokens: int, stop: Sequence[str]) -> tuple[str, int, bool]:
        c = self._complete(self.text, max_tokens, stop)
        self.text += c.text
        # Servers report "stop" for EOS and for stop strings alike: an empty chunk means the end.
        return c.text, c.n_tokens, c.n_tokens == 0

    def trial(self, answer_prompt: str, *, max_tokens: int) -> tuple[str, int, tuple[float, ...]]:
        c = self._complete(self.text + answer_prompt, max_tokens, ("\n",))
        return c.text, c.n_tokens, c.logprobs or ()


class DEER:
    """Dynamic early exit in reasoning.

    Args:
        backend: a LocalBackend, or an HTTPBackend(api="completions", logprobs=True).
        lam: stop thinking when the trial answer's score is >= λ (paper: 0.95).
        score: "mean", "geometric" or "min" token probability of the trial answer.
        transitions: strings after which a trial answer is tried.
        max_think_tokens: thinking budget.
        trial_tokens: at most this many tokens per trial answer (stops at a newline).
        template: prompt template for endpoints (``{question}``); local models use their chat template.
    """

    def __init__(self, backend: Any, *, lam: float = 0.95, score: str = "mean",
                 transitions: Sequence[str] = DEFAULT_TRANSITIONS, answer_prompt: str = ANSWER_PROMPT,
                 max_think_tokens: int = 256, trial_tokens: int = 12, extract: str | Extractor = "number",
                 template: str = CHATML) -> None:
        self.model = _Endpoint(backend, template) if hasattr(backend, "base_url") else _Local(backend)
        self.lam = float(lam)
        self.score = check_choice(score, "score", "DEER", SCORES)
        if not transitions or not all(isinstance(t, str) and t for t in transitions):
            raise StopwiseError(f"The 'transitions' parameter of DEER must be non-empty strings. Got {transitions!r} instead.")
        self.transitions = tuple(transitions)
        self.answer_prompt = answer_prompt
        self.max_think_tokens = int(max_think_tokens)
        self.trial_tokens = int(trial_tokens)
        # Trial answers often restate the sum ("87 - 64 = 23"): read the number after the last "=".
        self.extractor = NumberExtractor(markers=("=",)) if extract == "number" else make_extractor(extract)

    def _trial(self) -> tuple[Step, int]:
        trial, n_tok, lps = self.model.trial(self.answer_prompt, max_tokens=self.trial_tokens)
        scores = {how: token_score(lps, how) for how in SCORES}
        answer = safe_extract(self.extractor, trial)
        return Step(think_tokens=0, trial_tokens=n_tok, answer=answer, scores=scores, trial_text=trial), n_tok

    def run(self, question: Question | str, *, lam: float | None = None, full: bool = False) -> DeerResult:
        """Think with early exit at λ (``full=True``: never exit; try a trial at every transition)."""
        q = question if isinstance(question, Question) else Question(id="0", prompt=str(question))
        lam = self.lam if lam is None else float(lam)
        self.model.start(q.prompt)
        thinking, think_tokens, trial_total, steps = "", 0, 0, []
        while think_tokens < self.max_think_tokens:
            chunk, n_tok, ended = self.model.think(max_tokens=self.max_think_tokens - think_tokens, stop=self.transitions)
            thinking += chunk
            think_tokens += n_tok
            if ended or n_tok == 0 or think_tokens >= self.max_think_tokens:
                break
            step, n_trial = self._trial()
            step.think_tokens = think_tokens
            trial_total += n_trial
            steps.append(step)
            if not full and step.scores[self.score] >= lam:
                return DeerResult(id=q.id, answer=step.answer, think_tokens=think_tokens, trial_tokens=trial_total,
                                  stopped_early=True, steps=steps, thinking=thinking)
        final, n_trial = self._trial()
        final.think_tokens = think_tokens
        steps.append(final)
        return DeerResult(id=q.id, answer=final.answer, think_tokens=think_tokens, trial_tokens=trial_total + n_trial,
                          stopped_early=False, steps=steps, thinking=thinking)

    def trace_rows(self, questions: Sequence[Question]) -> list[DeerResult]:
        """Full thinking with a trial at every transition, for calibration (see :func:`deer_trace`)."""
        return [self.run(q, full=True) for q in questions]


def deer_trace(results: Sequence[DeerResult], *, labels: Sequence[str | None] | None = None,
               extract: str | Extractor = "number", meta: dict[str, Any] | None = None) -> Trace:
    """A trace whose stage k is the k-th transition point (the last stage: end of thinking).

    predictions: the trial answer there; reference: the answer after full thinking; cost:
    thinking tokens plus the trial tokens spent so far; signals ``deer_mean``,
    ``deer_geometric``, ``deer_min`` (the last stage's scores are set to 1: it always stops).
    """
    if not results:
        raise StopwiseError("deer_trace needs at least one DEER result. Got none.")
    k = max(len(r.steps) for r in results)
    n = len(results)
    lengths = np.asarray([len(r.steps) for r in results])
    preds = np.zeros((n, k), dtype=np.int64)
    cost = np.zeros((n, k))
    sig = {f"deer_{how}": np.zeros((n, k)) for how in SCORES}
    for i, r in enumerate(results):
        hashed = hash_answers([s.answer for s in r.steps])
        trials = np.cumsum([s.trial_tokens for s in r.steps])
        for j, s in enumerate(r.steps):
            preds[i, j] = hashed[j]
            cost[i, j] = s.think_tokens + trials[j]
            for how in SCORES:
                sig[f"deer_{how}"][i, j] = 1.0 if j == len(r.steps) - 1 else s.scores[how]
        preds[i, len(r.steps):] = hashed[-1]
        cost[i, len(r.steps):] = cost[i, len(r.steps) - 1]
    mask = np.arange(k)[None, :] < lengths[:, None]
    lab = None
    if labels is not None and all(x is not None for x in labels):
        ex = make_extractor(extract)
        lab = hash_answers([safe_extract(ex, str(x)) or str(x) for x in labels])
    return Trace(predictions=preds, reference=preds[np.arange(n), lengths - 1], mask=mask, cost=cost, labels=lab,
                 signals=sig, meta={"task": "deer", "stage": "transition", **(meta or {})})


def result_to_json(r: DeerResult, *, label: str | None = None) -> dict[str, Any]:
    return {"type": "question", "id": r.id, "label": label, "answer": r.answer, "think_tokens": r.think_tokens,
            "trial_tokens": r.trial_tokens, "thinking": r.thinking,
            "steps": [{"think_tokens": s.think_tokens, "trial_tokens": s.trial_tokens, "answer": s.answer,
                       "scores": s.scores, "trial_text": s.trial_text} for s in r.steps]}


def result_from_json(row: dict[str, Any], *, extract: Extractor | None = None) -> DeerResult:
    """A recorded DEER result; ``extract`` re-reads the trial answers from their stored text."""
    steps = [Step(think_tokens=s["think_tokens"], trial_tokens=s["trial_tokens"],
                  answer=s["answer"] if extract is None else safe_extract(extract, s.get("trial_text", "")),
                  scores=dict(s["scores"]), trial_text=s.get("trial_text", "")) for s in row["steps"]]
    return DeerResult(id=str(row["id"]), answer=steps[-1].answer if steps else row.get("answer"),
                      think_tokens=int(row["think_tokens"]),
                      trial_tokens=int(row["trial_tokens"]), stopped_early=False, steps=steps,
                      thinking=row.get("thinking", ""))
