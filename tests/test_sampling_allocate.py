"""DSC's allocation of a total sample budget across questions (stopwise.sampling.allocate), no model."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stopwise import StopwiseError
from stopwise.sampling import Allocation, CallableBackend, Completion, DifficultyAllocator, Question
from stopwise.sampling.allocate import REASONS
from stopwise.sampling.vote import vote

EASY = {"7": 1.0}
MEDIUM = {"1": 0.75, "2": 0.25}
HARD = {"1": 0.4, "2": 0.35, "3": 0.25}


class Dist:
    """Answers drawn from a known distribution per prompt, seeded by the allocator's seed; logs
    every answer given per prompt, in order."""

    def __init__(self, dists: dict[str, dict[str | None, float]]) -> None:
        self.dists = dists
        self.drawn: dict[str, list[str | None]] = {p: [] for p in dists}

    def __call__(self, prompt: str, *, n: int, temperature: float, max_tokens: int, seed: int) -> list[Completion]:
        rng = np.random.default_rng(seed)
        names = list(self.dists[prompt])
        p = np.asarray([self.dists[prompt][a] for a in names])
        out = []
        for j in rng.choice(len(names), size=n, p=p / p.sum()):
            ans = names[int(j)]
            self.drawn[prompt].append(ans)
            out.append(Completion(text="No idea." if ans is None else f"So.\nAnswer: {ans}", n_tokens=5))
        return out


class Logged(CallableBackend):
    """A callable backend that logs the (prompts, n) of every batched call."""

    def __init__(self, fn: Any) -> None:
        super().__init__(fn)
        self.calls: list[tuple[list[str], int]] = []

    def generate(self, prompts: Sequence[str], **kwargs: Any) -> list[list[Completion]]:
        self.calls.append((list(prompts), kwargs["n"]))
        return super().generate(prompts, **kwargs)


def cycle(pools: dict[str, list[str]]) -> Logged:
    """Each prompt answers its pool in a cycle, whatever the seed."""
    seen: dict[str, int] = {}

    def fn(prompt: str, *, n: int, temperature: float, max_tokens: int, seed: int) -> list[str]:
        start = seen.get(prompt, 0)
        seen[prompt] = start + n
        return [f"Answer: {pools[prompt][(start + j) % len(pools[prompt])]}" for j in range(n)]

    return Logged(fn)


def mixed(per_kind: int = 10) -> tuple[list[Question], dict[str, dict[str | None, float]]]:
    qs, dists = [], {}
    for kind, dist in (("easy", EASY), ("medium", MEDIUM), ("hard", HARD)):
        for i in range(per_kind):
            q = Question(id=f"{kind}{i}", prompt=f"{kind} question {i}")
            qs.append(q)
            dists[q.prompt] = dict(dist)
    return qs, dists


def run(qs: list[Question], dists: dict[str, dict[str | None, float]], **kwargs: Any) -> tuple[Allocation, Dist, Logged]:
    model = Dist(dists)
    backend = Logged(model)
    return DifficultyAllocator(backend, **kwargs).run(qs), model, backend


def kind_mean(alloc: Allocation, kind: str) -> float:
    return float(np.mean([r.n_samples for r in alloc.results if r.id.startswith(kind)]))


def test_easy_questions_cost_exactly_pre_and_pre_sampling_is_one_batched_call() -> None:
    qs, dists = mixed(5)
    alloc, _, backend = run(qs, dists, total_samples=200, pre=3, max_samples=16)
    for r, reason in zip(alloc.results, alloc.reasons, strict=True):
        if r.id.startswith("easy"):
            assert (r.n_samples, r.answer, reason, r.stopped_early) == (3, "7", "unanimous", True)
    assert backend.calls[0] == ([q.prompt for q in qs], 3)
    # Later rounds only ask for unsettled questions, one call per distinct window size.
    easy = {q.prompt for q in qs if q.id.startswith("easy")}
    assert not any(easy & set(p) for p, _ in backend.calls[1:])
    assert alloc.rounds > 1 and len(backend.calls) >= alloc.rounds


@pytest.mark.parametrize("total", [90, 91, 130, 200, 320, 480])
def test_budget_is_never_exceeded_and_goes_to_harder_questions(total: int) -> None:
    qs, dists = mixed(10)
    alloc, model, _ = run(qs, dists, total_samples=total, pre=3, max_samples=16, seed=1)
    drawn = sum(len(v) for v in model.drawn.values())
    assert alloc.spent == drawn == sum(r.n_samples for r in alloc.results) <= total
    assert all(r.n_generated == r.n_samples <= 16 for r in alloc.results)
    if total == 90:  # exactly the pre-samples
        assert alloc.rounds == 1 and all(r.n_samples == 3 for r in alloc.results)
    else:
        assert kind_mean(alloc, "hard") > kind_mean(alloc, "medium") >= kind_mean(alloc, "easy") == 3
    if total < 200:  # a tight budget is spent to the last sample
        assert alloc.spent == total and "budget" in alloc.reasons


def test_max_samples_is_respected_and_a_dead_question_ends_there() -> None:
    qs, dists = mixed(4)
    qs.append(Question(id="dead", prompt="unanswerable"))
    dists["unanswerable"] = {None: 1.0}
    alloc, _, _ = run(qs, dists, total_samples=10_000, pre=3, max_samples=7, window=5)
    assert all(r.n_samples <= 7 for r in alloc.results)
    assert "max_samples" in alloc.reasons and "budget" not in alloc.reasons
    dead = alloc.results[-1]
    assert (dead.answer, dead.n_samples, dead.no_answer, dead.stopped_early) == (None, 7, True, False)
    assert alloc.reasons[-1] == "max_samples"


def test_answers_are_the_majority_of_the_drawn_samples() -> None:
    qs, dists = mixed(10)
    alloc, model, _ = run(qs, dists, total_samples=250, pre=3, max_samples=16, seed=3)
    for q, r in zip(qs, alloc.results, strict=True):
        assert r.answers == model.drawn[q.prompt]
        assert r.answer == vote(r.answers)
        assert r.n_tokens == 5 * r.n_samples
    stopped = [r for r, why in zip(alloc.results, alloc.reasons, strict=True) if why == "criterion"]
    assert stopped and all(r.stopped_early for r in stopped)


def test_windows_grow_with_difficulty_and_ties_go_to_the_higher_entropy() -> None:
    pools = {"lean": ["1", "1", "2"], "split": ["1", "2", "3"]}
    # After 3 pre-samples "split" has d = 2/3 (window ceil(4 × 2/3) = 3) and "lean" d = 1/3 (window 2).
    backend = cycle(pools)
    DifficultyAllocator(backend, total_samples=100, pre=3, window=4, max_samples=9).run(["lean", "split"])
    assert backend.calls[:3] == [(["lean", "split"], 3), (["lean"], 2), (["split"], 3)]
    # Two samples left after the pre-samples: the hardest question takes them (its window cut to 2).
    backend = cycle(pools)
    alloc = DifficultyAllocator(backend, total_samples=8, pre=3, window=4).run(["lean", "split"])
    assert backend.calls == [(["lean", "split"], 3), (["split"], 2)]
    assert [r.n_samples for r in alloc.results] == [3, 5] and alloc.reasons == ["budget", "budget"]
    # Same difficulty (d = 1/2 after 4 samples): the answers with more entropy count as harder.
    backend = cycle({"two": ["1", "1", "2", "2"], "three": ["1", "1", "2", "3"]})
    alloc = DifficultyAllocator(backend, total_samples=9, pre=4, window=2).run(["two", "three"])
    assert backend.calls == [(["two", "three"], 4), (["three"], 1)]
    assert [r.n_samples for r in alloc.results] == [4, 5]


def test_deterministic_given_the_seed() -> None:
    qs, dists = mixed(6)

    def key(a: Allocation) -> Any:
        return [(r.answers, r.answer, why) for r, why in zip(a.results, a.reasons, strict=True)], a.spent, a.rounds

    first = key(run(qs, dists, total_samples=150, seed=7)[0])
    assert key(run(qs, dists, total_samples=150, seed=7)[0]) == first
    assert key(run(qs, dists, total_samples=150, seed=8)[0]) != first
    # Sampling per window is seeded by question, not by batch company: a subset draws the same pre-samples.
    alone = run(qs[-1:], dists, total_samples=3, seed=7)[0].results[0]
    assert alone.answers == first[0][-1][0][:3]


def test_summary() -> None:
    qs, dists = mixed(4)
    alloc, _, _ = run(qs, dists, total_samples=60, pre=3, max_samples=10)
    s = alloc.summary()
    assert s["n"] == 12 and s["spent"] == alloc.spent <= s["total_samples"] == 60
    assert s["budget_fraction"] == pytest.approx(alloc.spent / 60) and s["rounds"] == alloc.rounds
    assert set(s["reasons"]) == set(REASONS) and sum(s["reasons"].values()) == 12
    assert s["mean_samples"] == pytest.approx(alloc.spent / 12)


def test_weighted_vote_and_plain_string_questions() -> None:
    def fn(prompt: str, *, n: int, temperature: float, max_tokens: int, seed: int) -> list[Completion]:
        return [Completion(text=f"Answer: {a}", n_tokens=1, logprobs=(np.log(p),))
                for a, p in [("1", 0.2), ("2", 0.9), ("1", 0.2)][:n]]

    alloc = DifficultyAllocator(CallableBackend(fn), total_samples=3, vote="weighted").run(["q"])
    assert alloc.results[0].id == "0" and alloc.results[0].answer == "2"


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"total_samples": 11}, r"The 'total_samples' parameter of DifficultyAllocator must be >= pre × questions = "
                            r"3 × 4 = 12\. Got 11 instead\."),
    ({"total_samples": 0}, r"'total_samples' parameter of DifficultyAllocator must be an int >= 1\. Got 0"),
    ({"total_samples": 50, "pre": 4, "max_samples": 3}, r"'max_samples' parameter .* >= 4\. Got 3"),
    ({"total_samples": 50, "window": 0}, r"'window' parameter"),
    ({"total_samples": 50, "lam": 1.5}, r"'lam' parameter .* open interval"),
    ({"total_samples": 50, "vote": "plurality"}, r"'vote' parameter .* \['majority', 'weighted'\]"),
])
def test_bad_parameters_raise_clear_errors(kwargs: dict[str, Any], match: str) -> None:
    qs, dists = mixed(1)
    qs.append(Question(id="x", prompt="easy question 0"))
    with pytest.raises(StopwiseError, match=match):
        DifficultyAllocator(CallableBackend(Dist(dists)), **kwargs).run(qs)


def test_empty_questions_and_backends_without_generate() -> None:
    with pytest.raises(StopwiseError, match="'questions' parameter of DifficultyAllocator.run"):
        DifficultyAllocator(CallableBackend(Dist({})), total_samples=5).run([])
    with pytest.raises(StopwiseError, match="'questions' parameter of DifficultyAllocator.arun"):
        DifficultyAllocator(CallableBackend(Dist({})), total_samples=5).arun_sync([])
    with pytest.raises(StopwiseError, match="neither a batched 'generate' nor an asynchronous 'agenerate'"):
        DifficultyAllocator(object(), total_samples=5)

    class AsyncOnly:
        async def agenerate(self, prompt: str, **kwargs: Any) -> list[Completion]:
            return [Completion(text="Answer: 1", n_tokens=1)] * kwargs["n"]

    class SyncOnly:
        def generate(self, prompts: Sequence[str], **kwargs: Any) -> list[list[Completion]]:
            return [[Completion(text="Answer: 1", n_tokens=1)] * kwargs["n"] for _ in prompts]

    with pytest.raises(StopwiseError, match="AsyncOnly has no batched 'generate'; use arun"):
        DifficultyAllocator(AsyncOnly(), total_samples=5).run(["q"])
    assert DifficultyAllocator(AsyncOnly(), total_samples=5).arun_sync(["q"]).reasons == ["unanimous"]
    with pytest.raises(StopwiseError, match="SyncOnly has no asynchronous 'agenerate'; use run"):
        DifficultyAllocator(SyncOnly(), total_samples=5).arun_sync(["q"])
    with pytest.raises(StopwiseError, match="'concurrency' parameter of DifficultyAllocator.arun must be an int >= 1"):
        DifficultyAllocator(AsyncOnly(), total_samples=5).arun_sync(["q"], concurrency=0)


# -- asynchronous: one request per question and round, all in flight together ----------------------


class Gauge:
    """An async sampling callable over :class:`Dist` that logs the requests in flight at once."""

    def __init__(self, dists: dict[str, dict[str | None, float]], *, fail: str | None = None) -> None:
        self.model = Dist(dists)
        self.fail = fail
        self.in_flight = 0
        self.peak = 0
        self.requests: list[tuple[str, int]] = []
        self.cancelled = 0

    async def __call__(self, prompt: str, *, n: int, temperature: float, max_tokens: int, seed: int) -> list[Completion]:
        self.requests.append((prompt, n))
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            if prompt == self.fail:
                raise StopwiseError("endpoint down")
            # The later in a round, the sooner done: answers arrive out of question order.
            await asyncio.sleep(0.002 * (50 - len(self.requests) % 50))
            return self.model(prompt, n=n, temperature=temperature, max_tokens=max_tokens, seed=seed)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.in_flight -= 1


@pytest.mark.parametrize("total", [90, 200, 480])
def test_arun_allocates_as_run_does(total: int) -> None:
    qs, dists = mixed(10)
    sync, model, _ = run(qs, dists, total_samples=total, pre=3, max_samples=16, seed=2)
    gauge = Gauge(dists)
    alloc = DifficultyAllocator(CallableBackend(gauge), total_samples=total, pre=3, max_samples=16,
                                seed=2).arun_sync(qs, concurrency=8)
    assert [r.answers for r in alloc.results] == [r.answers for r in sync.results]
    assert [r.answer for r in alloc.results] == [r.answer for r in sync.results]
    assert (alloc.reasons, alloc.spent, alloc.rounds) == (sync.reasons, sync.spent, sync.rounds)
    # Pre-sampling is one request per question; then one per open question and round.
    assert gauge.requests[: len(qs)] == [(q.prompt, 3) for q in qs]
    drawn = Counter[str]()
    for prompt, n in gauge.requests:
        drawn[prompt] += n
    assert [drawn[q.prompt] for q in qs] == [r.n_samples for r in alloc.results]
    assert 1 < gauge.peak <= 8 and gauge.in_flight == 0
    assert sum(n for _, n in gauge.requests) == alloc.spent


def test_arun_keeps_at_most_concurrency_requests_in_flight() -> None:
    qs, dists = mixed(4)
    for limit in (1, 3):
        gauge = Gauge(dists)
        DifficultyAllocator(CallableBackend(gauge), total_samples=100).arun_sync(qs, concurrency=limit)
        assert gauge.peak == limit


def test_arun_failure_cancels_the_rest_of_its_round() -> None:
    qs, dists = mixed(4)
    gauge = Gauge(dists, fail=qs[0].prompt)
    with pytest.raises(StopwiseError, match="endpoint down"):
        DifficultyAllocator(CallableBackend(gauge), total_samples=100).arun_sync(qs, concurrency=12)
    # The first request fails at once: the round's other requests, still running, are cancelled
    # rather than left to finish.
    assert gauge.in_flight == 0 and gauge.cancelled == len(qs) - 1
    assert len(gauge.requests) == len(qs)  # no later round was started


def test_arun_over_http() -> None:
    from stopwise.sampling import HTTPBackend
    from test_sampling import Stub

    with Stub([]) as stub:
        backend = HTTPBackend(stub.url, retries=0, max_n=4)
        alloc = DifficultyAllocator(backend, total_samples=14, pre=3, max_samples=6, window=2,
                                    seed=4).arun_sync(["a", "b", "c"], concurrency=3)
    # The stub answers 0, 1, 2, ... to every request: every question stays split until the budget ends.
    assert [b["n"] for b in stub.bodies[:3]] == [3, 3, 3]
    assert alloc.spent == 14 == sum(b["n"] for b in stub.bodies) and alloc.reasons == ["budget"] * 3
    assert sorted(r.n_samples for r in alloc.results) == [4, 5, 5]
    seeds = {b["seed"] for b in stub.bodies}
    assert len(seeds) == len(stub.bodies)  # each window has its own seed


def test_cli_run_with_total_samples(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import stopwise.sampling.cli as sampling_cli
    from stopwise.cli import main

    qs, dists = mixed(3)
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps({"id": q.id, "prompt": q.prompt}) + "\n" for q in qs))
    monkeypatch.setattr(sampling_cli, "_backend", lambda args: CallableBackend(Dist(dists)))
    assert main(["sample", "run", str(path), "--total-samples", "40", "--max-samples", "8", "--rule", "dsc"]) == 0
    out, err = capsys.readouterr()
    lines = [json.loads(x) for x in out.strip().splitlines()]
    summary = json.loads(err.strip().splitlines()[-1])["summary"]
    assert [x["id"] for x in lines] == [q.id for q in qs]
    assert sum(x["samples"] for x in lines) == summary["spent"] <= 40 and summary["total_samples"] == 40
    assert all(x["samples"] == 3 and x["answer"] == "7" for x in lines[:3])
    assert main(["sample", "run", str(path), "--total-samples", "20"]) == 2
    assert "'total_samples' parameter of DifficultyAllocator must be >= pre × questions = 3 × 9 = 27" in capsys.readouterr().err
    assert main(["sample", "run", str(path), "--total-samples", "40", "--rule", "asc"]) == 2
    assert "allows only --rule dsc. Got --rule asc" in capsys.readouterr().err
