"""ReplayBackend: recorded completions served in recorded order (offline evaluation), no model."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import numpy as np
import pytest

import stopwise
from stopwise import StopwiseError
from stopwise.sampling import (
    AdaptiveSampler,
    CallableBackend,
    Completion,
    DifficultyAllocator,
    Question,
    ReplayBackend,
    read_checkpoint,
    record,
    sampling_rule,
    trace_from_records,
)


def pools(n: int = 20, k: int = 16) -> tuple[list[Question], dict[str, list[str | None]]]:
    rng = np.random.default_rng(3)
    qs, out = [], {}
    for i in range(n):
        p = rng.dirichlet(np.ones(3) * (0.3 if i % 2 else 3.0))
        q = Question(id=f"q{i}", prompt=f"question {i}", label="0")
        qs.append(q)
        out[q.prompt] = [None if rng.random() < 0.05 else str(int(rng.choice(3, p=p))) for _ in range(k)]
    return qs, out


def model(answers: dict[str, list[str | None]]) -> CallableBackend:
    """Answers in order per prompt, whatever the seed or batching; tokens and confidence vary."""
    seen: dict[str, int] = {}

    def fn(prompt: str, *, n: int, temperature: float, max_tokens: int, seed: int) -> list[Completion]:
        out = []
        for _ in range(n):
            j = seen.get(prompt, 0)
            seen[prompt] = j + 1
            ans = answers[prompt][j]
            text = "No idea." if ans is None else f"Hm.\nAnswer: {ans}"
            out.append(Completion(text=text, n_tokens=5 + j, logprobs=(math.log(0.5 + j / 40),)))
        return out

    return CallableBackend(fn)


@pytest.fixture
def recording(tmp_path: Path) -> tuple[list[Question], Path]:
    qs, answers = pools()
    path = tmp_path / "ck.jsonl"
    record(qs, model(answers), path, n=16, model="fake", progress=False, batch_questions=7)
    return qs, path


def test_serves_recorded_samples_in_order_with_their_tokens_and_confidence(recording: tuple[list[Question], Path]) -> None:
    qs, path = recording
    _, rows = read_checkpoint(path)
    backend = ReplayBackend.from_checkpoint(path)
    p0, p1 = qs[0].prompt, qs[1].prompt
    first = backend.generate([p0, p1], n=3, seeds=[1, 2])
    second = backend.generate([p0], n=5, temperature=1.3, seeds=[99])[0]
    got = first[0] + second
    for k, c in enumerate(got):
        s = rows[0]["samples"][k]
        assert (c.text, c.n_tokens, c.finish_reason) == (s["text"], s["n_tokens"], s["finish_reason"])
        assert c.confidence == pytest.approx(s["confidence"], abs=1e-12)
        assert c.meta == {"id": "q0", "index": k, "answer": s["answer"]}
    assert [c.text for c in first[1]] == [s["text"] for s in rows[1]["samples"][:3]]
    assert backend.served[p0] == 8 and backend.remaining(p0) == 8 and backend.remaining(p1) == 13
    # A prompt listed twice in one call gets its next 2n samples in turn.
    a, b = backend.generate([p1, p1], n=2)
    assert [c.meta["index"] for c in a + b] == [3, 4, 5, 6]
    backend.reset()
    assert backend.generate([p0], n=1)[0][0].meta["index"] == 0
    assert asyncio.run(backend.agenerate(p0, n=2))[1].meta["index"] == 2


def test_asking_beyond_the_recording_or_for_an_unknown_prompt_is_an_error() -> None:
    backend = ReplayBackend({"a": ["Answer: 1", "Answer: 2", "Answer: 3"], "b": ["Answer: 4", "Answer: 5"]})
    backend.generate(["a"], n=2)
    with pytest.raises(StopwiseError, match="completions 3..4 of the prompt 'a', which has 3 recorded"):
        backend.generate(["b", "a"], n=2)
    with pytest.raises(StopwiseError, match="completions 3..3 of the prompt 'b', which has 2 recorded"):
        backend.generate(["b", "b", "b"], n=1)
    assert backend.served == {"a": 2, "b": 0}  # a refused call moves no cursor
    with pytest.raises(StopwiseError, match="no recording for the prompt 'c'"):
        backend.generate(["c"], n=1)
    with pytest.raises(StopwiseError, match="'n' parameter"):
        backend.generate(["a"], n=0)
    assert [c[0].text for c in backend.generate(["a", "b"], n=1)] == ["Answer: 3", "Answer: 4"]
    with pytest.raises(StopwiseError, match="which has 3 recorded"):
        asyncio.run(backend.agenerate("a"))


def test_bad_records_are_refused(tmp_path: Path) -> None:
    with pytest.raises(StopwiseError, match="share the prompt"):
        ReplayBackend.from_records([{"id": 1, "prompt": "p", "samples": []}, {"id": 2, "prompt": "p", "samples": []}])
    with pytest.raises(StopwiseError, match="no 'prompt' string"):
        ReplayBackend.from_records([{"id": 1, "samples": []}])
    with pytest.raises(StopwiseError, match="holds no recorded questions"):
        ReplayBackend.from_checkpoint(tmp_path / "missing.jsonl")
    with pytest.raises(StopwiseError, match="must map each prompt"):
        ReplayBackend(["p"])  # type: ignore[arg-type]


@pytest.mark.parametrize(("name", "step"), [("settled", 1), ("esc", 5), ("asc", 2), ("dsc", 1)])
def test_sampler_over_a_replay_matches_offline_halts(recording: tuple[list[Question], Path], name: str, step: int) -> None:
    qs, path = recording
    header, rows = read_checkpoint(path)
    trace = trace_from_records(rows, header=header)
    rule = sampling_rule(name, max_samples=16)
    offline = rule.halts(trace)
    backend = ReplayBackend.from_records(rows)
    results = AdaptiveSampler(backend, rule, max_samples=16, step=step).run(qs)
    assert [r.n_samples - 1 for r in results] == offline.tolist()
    np.testing.assert_array_equal(stopwise.hash_answers([r.answer for r in results]), trace.predictions_at(offline))
    assert all(backend.served[q.prompt] == r.n_generated for q, r in zip(qs, results, strict=True))


@pytest.mark.parametrize("total", [60, 150, 320])
def test_allocator_over_a_replay_votes_as_the_trace_after_the_samples_it_drew(
        recording: tuple[list[Question], Path], total: int) -> None:
    qs, path = recording
    header, rows = read_checkpoint(path)
    trace = trace_from_records(rows, header=header)
    backend = ReplayBackend.from_records(rows)
    alloc = DifficultyAllocator(backend, total_samples=total, pre=3, max_samples=16).run(qs)
    used = np.asarray([r.n_samples for r in alloc.results])
    assert alloc.spent == used.sum() == sum(backend.served.values()) <= total
    assert [backend.served[q.prompt] for q in qs] == used.tolist()
    np.testing.assert_array_equal(stopwise.hash_answers([r.answer for r in alloc.results]),
                                  trace.predictions_at(used - 1))
    assert [r.n_tokens for r in alloc.results] == trace.cost_at(used - 1).astype(int).tolist()
