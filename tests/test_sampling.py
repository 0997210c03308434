"""stopwise.sampling without a model: extraction, votes, rules, sampler, recording, HTTP client, server app."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import stopwise
from stopwise import NO_ANSWER, BetaPosterior, Certificate, StopwiseError, Trace, WindowAgreement
from stopwise.sampling import (
    AdaptiveSampler,
    CallableBackend,
    ChoiceExtractor,
    Completion,
    ConfidenceStop,
    DifficultyAdaptive,
    DirichletPosterior,
    EndpointError,
    FirstFinish,
    GenerationCancelled,
    HTTPBackend,
    MarkerExtractor,
    NumberExtractor,
    OnSamples,
    Question,
    StringExtractor,
    VoteSettled,
    certify,
    read_checkpoint,
    record,
    sampling_rule,
    token_score,
    trace_from_records,
)
from stopwise.sampling.extract import safe_extract
from stopwise.sampling.rules import PRESETS
from stopwise.sampling.vote import dense_codes, running_votes, vote

# -- extraction -------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("1419 + 2 = 1421.\n\nThe answer is 1421.", "1421"),
    ("Answer: 1,234 apples", "1234"),
    ("Answer: $12.50", "12.5"),
    ("so x = -3/6", "-0.5"),
    ("so x = -4/6", "-2/3"),
    ("Final answer: 0.25 kg", "0.25"),
    ("We get \\boxed{7} in the end, not 8", "7"),
    ("Answer: \u22125", "-5"),
    ("Answer: 2/3", "2/3"),
    ("Answer: 4.000", "4"),
    ("The result is 3 then 5", "5"),
    ("87 - 64 = ", "64"),
    ("x is -7", "-7"),
    ("no digits here", None),
    ("", None),
    ("Answer: 1/0", None),
])
def test_number_extraction(text: str, expected: str | None) -> None:
    assert NumberExtractor()(text) == expected


@given(st.integers(min_value=-10**9, max_value=10**9))
def test_number_extraction_round_trips_integers_with_separators(n: int) -> None:
    assert NumberExtractor()(f"Answer: {n:,} units") == str(n)


@settings(max_examples=200)
@given(st.text())
def test_extractors_never_crash(text: str) -> None:
    for ex in (NumberExtractor(), ChoiceExtractor(), StringExtractor(), MarkerExtractor()):
        out = safe_extract(ex, text)
        assert out is None or (isinstance(out, str) and out == out.strip() and out)


def test_other_extractors_and_failures() -> None:
    assert ChoiceExtractor()("Answer: (B) because A is wrong") == "B"
    assert ChoiceExtractor()("I think C is right") == "C"
    assert ChoiceExtractor(choices="ABCD")("the answer is E") is None
    assert StringExtractor()("Final answer: Paris.\nmore") == "paris"
    assert MarkerExtractor()("no marker at all") is None
    assert MarkerExtractor(inner=NumberExtractor())("blah. Answer: 12") == "12"

    def boom(text: str) -> str:
        raise RuntimeError("bad extractor")

    assert safe_extract(boom, "x") is None
    assert safe_extract(NumberExtractor(), None) is None
    with pytest.raises(StopwiseError, match="letters"):
        ChoiceExtractor(choices="1,2")


def test_token_score() -> None:
    lps = [np.log(0.5), np.log(1.0), np.log(0.25)]
    assert token_score(lps, "mean") == pytest.approx((0.5 + 1 + 0.25) / 3)
    assert token_score(lps, "geometric") == pytest.approx((0.5 * 0.25) ** (1 / 3))
    assert token_score(lps, "min") == pytest.approx(0.25)
    assert token_score([], "mean") == 0.0
    with pytest.raises(StopwiseError, match="score"):
        token_score(lps, "median")


# -- votes ---------------------------------------------------------------------------------------


def test_running_votes_ties_go_to_the_earliest_answer() -> None:
    codes, names = dense_codes(["7", None, "8", "8", "7", "9"])
    assert names == ["7", "8", "9"] and codes.tolist() == [0, NO_ANSWER, 1, 1, 0, 2]
    assert running_votes(codes[None, :])[0].tolist() == [0, 0, 0, 1, 0, 0]
    assert running_votes(np.array([[NO_ANSWER, NO_ANSWER, 0]]))[0].tolist() == [NO_ANSWER, NO_ANSWER, 0]
    assert vote(["1", "2", "2"]) == "2"
    assert vote(["1", "2", "2"], weights=[0.9, 0.2, 0.3]) == "1"
    assert vote([None, None]) is None


# -- rules ---------------------------------------------------------------------------------------


def random_trace(n: int = 60, k: int = 12, seed: int = 0, n_answers: int = 4, p_none: float = 0.1) -> Trace:
    """A sampling trace from random answer strings, built through the recorder's converter."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        probs = rng.dirichlet(np.ones(n_answers) * 0.7)
        samples = []
        for _ in range(k):
            ans = None if rng.random() < p_none else str(int(rng.choice(n_answers, p=probs)))
            samples.append({"text": f"Answer: {ans}", "answer": ans, "n_tokens": int(rng.integers(5, 50)),
                            "confidence": float(rng.random())})
        rows.append({"id": str(i), "label": "0", "samples": samples})
    return trace_from_records(rows)


def online_halts(rule: Any, trace: Trace) -> np.ndarray:
    stopper = rule.stopper(trace.n)
    halts = np.full(trace.n, -1)
    for k in range(trace.n_stages):
        rows = stopper.active.copy()
        stop = stopper.step(trace.stage(k, rows), last=k == trace.n_stages - 1)
        halts[rows[stop]] = k
    return halts


@pytest.mark.parametrize("name", PRESETS)
def test_presets_decide_online_as_offline(name: str) -> None:
    trace = random_trace(seed=3)
    rule = sampling_rule(name, max_samples=trace.n_stages)
    np.testing.assert_array_equal(online_halts(rule, trace), rule.halts(trace))


def test_dirichlet_with_two_answers_is_the_beta_rule() -> None:
    trace = random_trace(seed=1)
    beta = OnSamples(rule=BetaPosterior())
    np.testing.assert_allclose(DirichletPosterior(top=2).z(trace), beta.z(trace), atol=2e-3)
    # More competitors can only lower the probability that the leader is the best answer.
    assert (DirichletPosterior(top=5).z(trace) <= DirichletPosterior(top=2).z(trace) + 2e-3).all()


def test_rules_read_each_sample_not_the_running_vote() -> None:
    trace = random_trace(seed=2)
    esc = OnSamples(rule=WindowAgreement(window=3), lam=1.0)
    halts = esc.halts(trace)
    codes = trace.signals["sample"].astype(int)
    for i, h in enumerate(halts):
        if h < trace.n_stages - 1:  # stopped early: the last window is unanimous on a real answer
            window = codes[i, h - 2 : h + 1]
            assert (window == window[0]).all() and window[0] != NO_ANSWER


@pytest.mark.parametrize("model", ["urn", "pessimistic"])
def test_vote_settled_at_lambda_one_never_changes_the_final_vote(model: str) -> None:
    for seed in range(5):
        trace = random_trace(seed=seed, n=80, k=10)
        halts = VoteSettled(budget=trace.n_stages, model=model, lam=1.0).halts(trace)
        assert (trace.predictions_at(halts) == trace.reference).all()
        assert (halts < trace.n_stages - 1).any()  # and it does stop early sometimes


def test_urn_keep_probability() -> None:
    from stopwise.sampling.rules import urn_keep_probability

    assert urn_keep_probability((5, 1), 0, 3, 1.0, 1000) == 1.0  # lead 4 > 3 samples left: decided
    assert urn_keep_probability((2, 2), 0, 0, 1.0, 1000) == 1.0  # no samples left: the vote is final
    assert urn_keep_probability((), 3, 4, 1.0, 1000) == 0.0
    close = urn_keep_probability((3, 2), 0, 6, 1.0, 2000)
    wide = urn_keep_probability((6, 1), 0, 6, 1.0, 2000)
    assert 0.3 < close < wide < 1.0
    # Deterministic: the same counts give the same statistic (online equals offline).
    urn_keep_probability.cache_clear()
    assert urn_keep_probability((3, 2), 0, 6, 1.0, 2000) == close
    # Tied counts: the earlier answer leads, so it keeps the vote more often than the later one would.
    assert urn_keep_probability((2, 2), 0, 4, 1.0, 2000) > 0.5


def test_first_finish_dsc_and_confidence_stop() -> None:
    trace = random_trace(seed=4)
    codes = trace.signals["sample"].astype(int)
    first_valid = np.argmax(codes != NO_ANSWER, axis=1)
    np.testing.assert_array_equal(FirstFinish(lam=1).halts(trace), first_valid)
    dsc = DifficultyAdaptive(pre=3, max_samples=trace.n_stages, lam=2.0)  # λ above any posterior: budget only
    halts = dsc.halts(trace)
    unanimous = (codes[:, :3] == codes[:, :1]).all(axis=1) & (codes[:, 0] != NO_ANSWER)
    assert (halts[unanimous] == 2).all() and (halts[~unanimous] > 2).all()
    conf = ConfidenceStop(lam=0.9).halts(trace)
    valid_conf = np.where(codes != NO_ANSWER, trace.signals["confidence"], -1)
    for i, h in enumerate(conf):
        hit = np.flatnonzero(valid_conf[i] >= 0.9)
        assert h == (hit[0] if hit.size else trace.n_stages - 1)
    with pytest.raises(StopwiseError, match="confidence"):
        ConfidenceStop(lam=0.5).halts(Trace(predictions=np.zeros((2, 3), dtype=np.int64)))


def test_certificate_round_trip_rebuilds_sampling_rules() -> None:
    trace = random_trace(n=300, k=12, seed=5)
    cert = certify(trace, epsilon=0.1, delta=0.1)
    assert cert.certified and cert.rule["name"] == "vote_settled"
    again = Certificate.from_json(cert.to_json())
    rule = again.make_rule()
    assert isinstance(rule, VoteSettled) and rule.lam == cert.lam
    check = again.check(trace)
    assert check["risk"] == pytest.approx(cert.empirical_risk) and check["risk"] <= 0.1
    asc = Certificate.from_json(certify(trace, "asc", epsilon=0.1).to_json()).make_rule()
    assert isinstance(asc, OnSamples) and isinstance(asc.rule, BetaPosterior)
    with pytest.raises(StopwiseError, match="sample"):
        certify(Trace(predictions=np.zeros((50, 3), dtype=np.int64)))


# -- sampler with a Python callable -----------------------------------------------------------


class FakeModel:
    """Deterministic answers per (prompt, sample number), whatever the batching."""

    def __init__(self, answers: dict[str, list[str | None]]) -> None:
        self.answers = answers
        self.calls: dict[str, int] = {}
        self.started = 0
        self.cancelled = 0

    def _next(self, prompt: str) -> Completion:
        j = self.calls.get(prompt, 0)
        self.calls[prompt] = j + 1
        pool = self.answers[prompt]
        ans = pool[j % len(pool)]
        text = "I cannot tell." if ans is None else f"Let me see.\nAnswer: {ans}"
        return Completion(text=text, n_tokens=10 + j, logprobs=(np.log(0.9),) * 3)

    def __call__(self, prompt: str, *, n: int, temperature: float, max_tokens: int, seed: int) -> list[Completion]:
        return [self._next(prompt) for _ in range(n)]


def fake_questions() -> tuple[list[Question], dict[str, list[str | None]]]:
    rng = np.random.default_rng(0)
    qs, pools = [], {}
    for i in range(30):
        p = rng.dirichlet(np.ones(3) * (0.3 if i % 2 else 3.0))
        pool = [str(int(rng.choice(3, p=p))) for _ in range(16)]
        qs.append(Question(id=f"q{i}", prompt=f"question {i}", label="0"))
        pools[qs[-1].prompt] = pool
    qs.append(Question(id="dead", prompt="unanswerable", label="0"))
    pools["unanswerable"] = [None]
    return qs, pools


@pytest.mark.parametrize(("name", "step"), [("esc", 1), ("esc", 5), ("asc", 1), ("asc", 3), ("dirichlet", 1),
                                           ("dsc", 1), ("settled", 1), ("settled", 4), ("confidence", 1)])
def test_sampler_matches_offline_halts_of_a_recorded_trace(tmp_path: Path, name: str, step: int) -> None:
    qs, pools = fake_questions()
    record(qs, CallableBackend(FakeModel(pools)), tmp_path / "ck.jsonl", n=16, model="fake", progress=False)
    header, rows = read_checkpoint(tmp_path / "ck.jsonl")
    trace = trace_from_records(rows, header=header)
    rule = sampling_rule(name, max_samples=16)
    offline = rule.halts(trace)
    sampler = AdaptiveSampler(CallableBackend(FakeModel(pools)), rule, max_samples=16, step=step)
    results = sampler.run(qs)
    assert [r.n_samples - 1 for r in results] == offline.tolist()
    # The answer returned is the trace's running vote at the halt.
    got = stopwise.hash_answers([r.answer for r in results])
    np.testing.assert_array_equal(got, trace.predictions_at(offline))
    dead = results[-1]
    assert dead.answer is None and dead.no_answer and dead.n_samples == 16 and not dead.stopped_early


def test_sampler_step_batches_and_errors() -> None:
    qs, pools = fake_questions()
    model = FakeModel(pools)
    results = AdaptiveSampler(CallableBackend(model), "esc", max_samples=15, step=5).run(qs)
    assert all(r.n_samples % 5 == 0 and r.n_generated == r.n_samples for r in results)
    assert sum(model.calls.values()) == sum(r.n_generated for r in results)
    never = AdaptiveSampler(CallableBackend(FakeModel(pools)), stopwise.Never(), max_samples=4).run(qs[:3])
    assert [r.n_samples for r in never] == [4, 4, 4]
    with pytest.raises(StopwiseError, match="at least one question"):
        AdaptiveSampler(CallableBackend(model), "asc").run([])
    with pytest.raises(StopwiseError, match="no λ"):
        AdaptiveSampler(CallableBackend(model), VoteSettled())
    with pytest.raises(StopwiseError, match="'vote'"):
        AdaptiveSampler(CallableBackend(model), "asc", vote="plurality")
    with pytest.raises(StopwiseError, match="returned 1 completions"):
        AdaptiveSampler(CallableBackend(lambda p, **k: "Answer: 1"), "asc", step=2).run(["q"])


def test_sampler_uses_a_certificate_and_falls_back_when_uncertified() -> None:
    qs, pools = fake_questions()
    import dataclasses

    cert = dataclasses.replace(certify(random_trace(n=300, k=16, seed=9), epsilon=0.1), certified=False)
    results = AdaptiveSampler(CallableBackend(FakeModel(pools)), cert, max_samples=16).run(qs[:4])
    assert all(r.n_samples == 16 for r in results)


def test_async_sampler_cancels_requests_in_flight() -> None:
    started, cancelled, finished = [], [], []

    async def slow(prompt: str, *, n: int, temperature: float, max_tokens: int, seed: int) -> list[str]:
        started.append(seed)
        # Seeds differ per sample; the delay makes the finishing order differ from launch order.
        delay = 0.02 + (seed % 7) * 0.03
        try:
            await asyncio.sleep(delay)
        except asyncio.CancelledError:
            cancelled.append(seed)
            raise
        finished.append(seed)
        return ["Answer: 42"]

    sampler = AdaptiveSampler(CallableBackend(slow), FirstFinish(lam=1), max_samples=8, step=4)
    results = sampler.arun_sync(["a", "b"])
    assert [r.answer for r in results] == ["42", "42"]
    assert [r.n_samples for r in results] == [1, 1]
    assert len(started) == 8 and len(finished) == 2 and len(cancelled) == 6
    assert [r.cancelled for r in results] == [3, 3]


# -- recording -----------------------------------------------------------------------------------


def test_recording_resumes_after_a_partial_line_and_matches_one_run(tmp_path: Path) -> None:
    qs, pools = fake_questions()
    ck = tmp_path / "ck.jsonl"
    status = record(qs, CallableBackend(FakeModel(pools)), ck, n=8, model="fake", limit=5, progress=False)
    assert status == {"done": 5, "new": 5, "pending": len(qs) - 5}
    with open(ck, "a") as fh:  # a run killed mid-write
        fh.write('{"type": "question", "id": "q5", "samples": [{"text": "Answ')
    header, rows = read_checkpoint(ck)
    assert [r["id"] for r in rows] == [q.id for q in qs[:5]]
    # Resuming with other settings would mix two computations: refused.
    with pytest.raises(StopwiseError, match="other settings"):
        record(qs, CallableBackend(FakeModel(pools)), ck, n=8, model="fake", temperature=1.0, progress=False)
    # The fake model continues its per-prompt counters: resume with a fresh one per question set.
    record(qs, CallableBackend(FakeModel(pools)), ck, n=8, model="fake", progress=False)
    header, rows = read_checkpoint(ck)
    assert sorted(r["id"] for r in rows) == sorted(q.id for q in qs)
    one = tmp_path / "one.jsonl"
    record(qs, CallableBackend(FakeModel(pools)), one, n=8, model="fake", progress=False)
    t1 = trace_from_records(read_checkpoint(ck)[1])
    t2 = trace_from_records(read_checkpoint(one)[1])
    assert t1.fingerprint() == t2.fingerprint()


def test_trace_layout(tmp_path: Path) -> None:
    pools = {"p": ["3", "4", "4", None, "3", "3"]}
    record([Question(id="x", prompt="p", label="3.0")], CallableBackend(FakeModel(pools)), tmp_path / "c.jsonl",
           n=6, model="fake", progress=False)
    trace = stopwise.sampling.convert(tmp_path / "c.jsonl", tmp_path / "c.npz")
    loaded = Trace.load(tmp_path / "c.npz")
    h = dict(zip(["3", "4"], stopwise.hash_answers(["3", "4"]), strict=True))
    assert loaded.predictions[0].tolist() == [h["3"], h["3"], h["4"], h["4"], h["3"], h["3"]]
    assert loaded.reference[0] == h["3"] and loaded.labels[0] == h["3"]  # "3.0" canonicalises to "3"
    assert loaded.cost[0].tolist() == np.cumsum([10, 11, 12, 13, 14, 15]).tolist()
    assert loaded.signals["sample"][0].tolist() == [0, 1, 1, -1, 0, 0]
    assert trace.meta["model"] == "fake" and loaded.meta["n_samples"] == 6


def test_record_bad_input(tmp_path: Path) -> None:
    backend = CallableBackend(lambda p, **k: ["x"] * k["n"])
    with pytest.raises(StopwiseError, match="at least one question"):
        record([], backend, tmp_path / "a.jsonl", n=4, model="m")
    with pytest.raises(StopwiseError, match="unique ids"):
        record([Question("a", "p"), Question("a", "q")], backend, tmp_path / "a.jsonl", n=4, model="m")
    with pytest.raises(StopwiseError, match="zero recorded"):
        trace_from_records([])


# -- HTTP client against a stub server -----------------------------------------------------------


class Stub:
    """A tiny OpenAI-like server whose behaviour the test scripts per request."""

    def __init__(self, script: list[Any]) -> None:
        self.script = list(script)
        self.bodies: list[dict[str, Any]] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.bodies.append(body)
                action = stub.script.pop(0) if stub.script else "ok"
                if isinstance(action, tuple) and action[0] == "sleep":
                    time.sleep(action[1])
                    action = "ok"
                if action == "ok" and "prompt" in body:  # /completions: a scripted chain of thought
                    prompt = body["prompt"]
                    if prompt.endswith("Final answer: "):
                        text, lps = f"{prompt.count('Step.') + 4}\n", [-0.01 * (1 + prompt.count("Step."))] * 2
                    elif prompt.count("Step.") < 3:
                        text, lps = "Step.\n\n", [-0.1] * 3
                    else:
                        text, lps = "", []
                    payload = {"choices": [{"index": 0, "text": text, "finish_reason": "stop",
                                            "logprobs": {"token_logprobs": lps}}]}
                    self._send(200, json.dumps(payload))
                elif action == "ok":
                    n = body.get("n", 1)
                    payload = {"choices": [{"index": i, "message": {"role": "assistant", "content": f"Answer: {i}"},
                                            "logprobs": {"content": [{"token": "a", "logprob": -0.1}] * 3},
                                            "finish_reason": "stop"} for i in range(n)]}
                    self._send(200, json.dumps(payload))
                elif isinstance(action, int):
                    self._send(action, json.dumps({"error": {"message": "'n' must be <= 2", "param": "n"}}))
                else:
                    self._send(200, action)

            def _send(self, code: int, text: str) -> None:
                data = text.encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> Stub:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_http_retries_with_backoff_then_succeeds() -> None:
    with Stub([503, 429, "ok"]) as stub:
        backend = HTTPBackend(stub.url, retries=3, backoff=0.01)
        out = backend.generate(["q"], n=3)
        assert backend.requests_sent == 3 and len(stub.bodies) == 3
        assert [c.text for c in out[0]] == ["Answer: 0", "Answer: 1", "Answer: 2"]
        assert out[0][0].n_tokens == 3 and out[0][0].confidence == pytest.approx(np.exp(-0.1))
        assert stub.bodies[0]["messages"][-1]["content"] == "q" and stub.bodies[0]["logprobs"] is True


def test_http_errors_are_clear() -> None:
    with Stub([503, 503]) as stub:
        with pytest.raises(EndpointError, match="HTTP 503"):
            HTTPBackend(stub.url, retries=1, backoff=0.01).generate(["q"], n=1)
    with Stub([400]) as stub:
        with pytest.raises(EndpointError, match="above the server's limit"):
            HTTPBackend(stub.url, retries=2, backoff=0.01).generate(["q"], n=5)
        assert len(stub.bodies) == 1  # a 400 is not retried
    with Stub(["not json", '{"choices": "nope"}', '{"choices": []}']) as stub:
        backend = HTTPBackend(stub.url, retries=0)
        for match in ("not JSON", "'choices' list", "asked for n = 1"):
            with pytest.raises(EndpointError, match=match):
                backend.generate(["q"], n=1)
    with Stub([("sleep", 1.0)]) as stub:
        with pytest.raises(EndpointError, match="timed out"):
            HTTPBackend(stub.url, timeout=0.2, retries=0).generate(["q"], n=1)
    with Stub([]) as stub:
        url = stub.url
    with pytest.raises(EndpointError, match="unreachable"):
        HTTPBackend(url, retries=1, backoff=0.01, timeout=1.0).generate(["q"], n=1)
    with pytest.raises(StopwiseError, match="base_url"):
        HTTPBackend("127.0.0.1:8000")


def test_http_splits_n_above_max_n_and_parses_completions_format() -> None:
    with Stub([]) as stub:
        out = HTTPBackend(stub.url, max_n=4).generate(["q"], n=10)
        assert len(out[0]) == 10 and [b["n"] for b in stub.bodies] == [4, 4, 2]
    backend = HTTPBackend("http://127.0.0.1:1/v1", api="completions")
    comps = backend.parse({"choices": [{"index": 1, "text": "b", "logprobs": {"token_logprobs": [-1.0, None]}},
                                       {"index": 0, "text": "a", "logprobs": None}, "junk"]}, 3)
    assert sorted(c.text for c in comps) == ["", "a", "b"]
    assert [c.logprobs for c in comps if c.text == "b"] == [(-1.0,)]


def test_async_sampler_over_http_stub() -> None:
    with Stub([]) as stub:
        sampler = AdaptiveSampler(HTTPBackend(stub.url, retries=0), "asc", max_samples=8, step=2)
        results = sampler.arun_sync(["a", "b", "c"], concurrency=4)
        # Sample j always answers "0" (n = 1 per request): ASC stops once the posterior is >= 0.95.
        assert all(r.answer == "0" for r in results)
        assert all(r.n_samples < 8 for r in results)
        assert len(stub.bodies) <= 3 * 8


def test_async_sampler_failed_requests_raise_or_count_as_no_answer() -> None:
    with Stub([500] * 3) as stub:
        sampler = AdaptiveSampler(HTTPBackend(stub.url, retries=0), "asc", max_samples=6, step=1)
        with pytest.raises(EndpointError, match="HTTP 500"):
            sampler.arun_sync(["a"])
    with Stub([500] * 3) as stub:
        sampler = AdaptiveSampler(HTTPBackend(stub.url, retries=0), "asc", max_samples=6, step=1, on_error="no_answer")
        (result,) = sampler.arun_sync(["a"])
        assert result.answers[:3] == [None, None, None] and result.answer == "0"


def test_deer_over_an_endpoint_and_its_trace() -> None:
    from stopwise.sampling.deer import DEER, deer_trace, result_from_json, result_to_json

    with Stub([]) as stub:
        with pytest.raises(StopwiseError, match="completions"):
            DEER(HTTPBackend(stub.url))
        deer = DEER(HTTPBackend(stub.url, api="completions"), lam=0.975, template="Q: {question}\nA: ")
        full = deer.run("What is 2 + 2?", full=True)
        # Three transitions with trials 4, 5, 6 (confidence exp(-0.02), exp(-0.03), exp(-0.04)), then the end.
        assert [s.answer for s in full.steps] == ["5", "6", "7", "7"] and not full.stopped_early
        early = deer.run("What is 2 + 2?")
        assert early.stopped_early and early.answer == "5" and early.think_tokens == 3 < full.think_tokens == 9
        assert stub.bodies[0]["prompt"].startswith("Q: What is 2 + 2?") and stub.bodies[0]["logprobs"] == 1
    again = result_from_json(json.loads(json.dumps(result_to_json(full, label="7"))))
    trace = deer_trace([full, again], labels=["7", "5"])
    assert trace.n_stages == 4 and trace.reference.tolist() == stopwise.hash_answers(["7", "7"]).tolist()
    assert trace.cost[0].tolist() == [3 + 2, 6 + 4, 9 + 6, 9 + 8]
    halts = stopwise.Signal(signal="deer_mean", lam=0.975).halts(trace)
    assert halts.tolist() == [0, 0]


# -- the server app with a fake model (no torch) -----------------------------------------------------


class FakeLocal:
    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def encode_messages(self, messages: list[dict[str, str]]) -> list[int]:
        return self.encode(messages[-1]["content"])

    def generate_ids(self, encoded: Any, *, n: int, temperature: float, max_tokens: int, seeds: Any,
                     stop: Any = (), cancel: threading.Event | None = None) -> list[list[Completion]]:
        digest = hashlib.sha256(bytes(encoded[0][:50])).hexdigest()
        return [[Completion(text=f"{digest[:4]} Answer: {j}\n\nmore", n_tokens=5, logprobs=(-0.5,) * 5,
                            finish_reason="stop_string" if stop else "stop") for j in range(n)]]


def test_server_app_speaks_openai_and_enforces_limits() -> None:
    from fastapi.testclient import TestClient

    from stopwise.sampling.server import create_app

    client = TestClient(create_app(FakeLocal(), model_name="fake", max_n=4, max_tokens=32))
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "n": 3,
                                                  "logprobs": True, "max_tokens": 8})
    assert r.status_code == 200
    body = r.json()
    assert len(body["choices"]) == 3 and body["usage"]["completion_tokens"] == 15
    assert len(body["choices"][0]["logprobs"]["content"]) == 5
    r = client.post("/v1/completions", json={"prompt": "x", "n": 1, "logprobs": 1, "stop": ["\n\n"], "max_tokens": 8})
    choice = r.json()["choices"][0]
    assert choice["text"].endswith("Answer: 0") and choice["finish_reason"] == "stop"
    assert choice["logprobs"]["token_logprobs"] == [-0.5] * 5
    for bad, param in (({"n": 5}, "n"), ({"max_tokens": 99}, "max_tokens"), ({"temperature": -1}, "temperature")):
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], **bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == param
    assert client.post("/v1/completions", json={"n": 1}).status_code == 400
    assert client.post("/v1/chat/completions", content=b"{oops").status_code == 400
    assert client.get("/v1/models").json()["data"][0]["id"] == "fake"


class SlowLocal(FakeLocal):
    """Decodes one token per ``step_s`` seconds and checks its cancel event between tokens, as LocalBackend."""

    def __init__(self, step_s: float = 0.01) -> None:
        self.step_s = step_s
        self.arrived = 0  # requests the server has read (it encodes each one before queueing it for the model)
        self.calls: list[dict[str, Any]] = []  # one per generation: steps run, cancelled, done

    def encode_messages(self, messages: list[dict[str, str]]) -> list[int]:
        self.arrived += 1
        return super().encode_messages(messages)

    def generate_ids(self, encoded: Any, *, n: int, temperature: float, max_tokens: int, seeds: Any,
                     stop: Any = (), cancel: threading.Event | None = None) -> list[list[Completion]]:
        call: dict[str, Any] = {"max_tokens": max_tokens, "steps": 0, "cancelled": False, "done": threading.Event()}
        self.calls.append(call)
        try:
            for _ in range(max_tokens):
                if cancel is not None and cancel.is_set():
                    call["cancelled"] = True
                    raise GenerationCancelled(f"Cancelled after {call['steps']} tokens.")
                time.sleep(self.step_s)
                call["steps"] += 1
        finally:
            call["done"].set()
        return [[Completion(text="Answer: 7", n_tokens=max_tokens, finish_reason="length") for _ in range(n)]]


def until(predicate: Any, timeout: float = 10.0) -> bool:
    """Poll ``predicate`` until it holds (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


async def auntil(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


def chat_body(max_tokens: int) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens}


def test_server_stops_generating_when_the_client_disconnects() -> None:
    import httpx

    from stopwise.sampling.server import ServerThread, create_app

    backend = SlowLocal(step_s=0.01)  # 2000 tokens would take 20 s
    app = create_app(backend, model_name="fake", max_tokens=2000)
    with ServerThread(app) as server:
        url = f"{server.url}/chat/completions"

        async def abandon() -> None:
            async with httpx.AsyncClient(timeout=30) as client:
                request = asyncio.ensure_future(client.post(url, json=chat_body(2000)))
                await auntil(lambda: bool(backend.calls) and backend.calls[0]["steps"] >= 3)
                request.cancel()  # as AdaptiveSampler.arun does once its rule stops
                with pytest.raises(asyncio.CancelledError):
                    await request

        asyncio.run(abandon())
        first = backend.calls[0]
        assert first["done"].wait(10) and first["cancelled"]
        assert first["steps"] < 500  # stopped within a fraction of its 2000 tokens
        assert until(lambda: app.state.cancelled == 1)
        r = httpx.post(url, json=chat_body(3), timeout=30)  # the model is free again
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        assert len(backend.calls) == 2 and not backend.calls[1]["cancelled"] and backend.calls[1]["steps"] == 3
        health = httpx.get(f"http://{server.host}:{server.port}/health", timeout=30).json()
        assert health["requests"] == 2 and health["cancelled"] == 1


def test_server_abandoned_requests_do_not_block_the_queue() -> None:
    import httpx

    from stopwise.sampling.server import ServerThread, create_app

    backend = SlowLocal(step_s=0.01)
    app = create_app(backend, model_name="fake", max_tokens=2000)
    with ServerThread(app) as server:
        url = f"{server.url}/chat/completions"

        async def scenario() -> httpx.Response:
            async with httpx.AsyncClient(timeout=30) as a, httpx.AsyncClient(timeout=30) as b, \
                    httpx.AsyncClient(timeout=30) as c:
                running = asyncio.ensure_future(a.post(url, json=chat_body(2000)))
                await auntil(lambda: bool(backend.calls))  # it holds the model
                queued = asyncio.ensure_future(b.post(url, json=chat_body(2000)))
                await auntil(lambda: backend.arrived == 2)
                waiting = asyncio.ensure_future(c.post(url, json=chat_body(3)))
                await auntil(lambda: backend.arrived == 3)
                queued.cancel()  # abandoned while waiting for the model: it gives up its place
                await auntil(lambda: app.state.cancelled == 1)
                assert len(backend.calls) == 1 and not waiting.done()
                running.cancel()  # abandoned mid-generation: the model is freed for the waiting request
                response = await asyncio.wait_for(waiting, timeout=30)
                await asyncio.gather(running, queued, return_exceptions=True)
                return response

        r = asyncio.run(scenario())
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "Answer: 7"
        assert [c["max_tokens"] for c in backend.calls] == [2000, 3]  # the queued request never ran
        assert backend.calls[0]["cancelled"] and backend.calls[0]["steps"] < 500
        assert until(lambda: app.state.cancelled == 2) and app.state.requests == 2


def test_adaptive_sampler_cancellations_stop_the_servers_work() -> None:
    from stopwise.sampling.server import ServerThread, create_app

    backend = SlowLocal(step_s=0.01)
    app = create_app(backend, model_name="fake", max_n=4, max_tokens=200)
    with ServerThread(app) as server:
        sampler = AdaptiveSampler(HTTPBackend(server.url, model="fake", retries=0, timeout=60), FirstFinish(lam=1),
                                  max_samples=4, step=4, max_tokens=100)
        (result,) = sampler.arun_sync(["q"])
        assert result.answer == "7" and result.n_samples == 1 and result.cancelled == 3
        # The three requests cancelled by the sampler are dropped from the queue or stopped mid-generation.
        assert until(lambda: app.state.cancelled == 3)
        assert until(lambda: all(c["done"].is_set() for c in backend.calls))
        finished = [c for c in backend.calls if not c["cancelled"]]
        assert len(finished) == 1 and finished[0]["steps"] == 100
        assert all(c["steps"] < 100 for c in backend.calls if c["cancelled"])


def test_serve_refuses_non_loopback_hosts() -> None:
    from stopwise.sampling.server import check_host

    with pytest.raises(StopwiseError, match="loopback"):
        check_host("0.0.0.0")
    from stopwise.cli import main

    assert main(["serve", "--host", "0.0.0.0", "--port", "1"]) == 2  # refused before loading any model


def test_cli_module_does_not_import_torch() -> None:
    import subprocess

    code = ("import sys, stopwise.sampling, stopwise.sampling.cli, stopwise.cli; stopwise.cli.build_parser(); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, env={**__import__("os").environ,
                                                                   "PYTHONPATH": str(Path(stopwise.__file__).parents[1])})


def test_cli_sample_calibrate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from stopwise.cli import main

    path = random_trace(n=300, k=12, seed=11).save(tmp_path / "t.npz")
    out = tmp_path / "cert.json"
    assert main(["sample", "calibrate", str(path), "--epsilon", "0.1", "-o", str(out), "--json"]) == 0
    cert = Certificate.load(out)
    assert cert.certified and cert.rule["name"] == "vote_settled"
    assert main(["sample", "calibrate", str(tmp_path / "missing.npz"), "--epsilon", "0.1"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_record_and_run_against_an_endpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from stopwise.cli import main

    questions = tmp_path / "q.jsonl"
    questions.write_text("\n".join(json.dumps({"id": f"q{i}", "prompt": f"question {i}", "label": str(i % 2)})
                                   for i in range(4)) + "\n")
    ck = tmp_path / "ck.jsonl"
    with Stub([]) as stub:
        args = ["sample", "record", str(questions), "--endpoint", stub.url, "-n", "3", "-o", str(ck), "--no-progress"]
        assert main([*args, "--limit", "2"]) == 0
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["pending"] == 2
        assert main(args) == 0
        status = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert status["done"] == 4 and status["new"] == 2 and status["n"] == 4
        trace = Trace.load(ck.with_suffix(".npz"))
        assert trace.n == 4 and trace.n_stages == 3 and trace.labels is not None
        assert main(["sample", "run", str(questions), "--endpoint", stub.url, "--rule", "first_finish",
                     "--max-samples", "4"]) == 0
        lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
        assert [x["samples"] for x in lines] == [1, 1, 1, 1] and all(x["answer"] == "0" for x in lines)
    assert main(["sample", "run", str(tmp_path / "none.jsonl"), "--endpoint", "http://127.0.0.1:1/v1"]) == 2
    assert "does not exist" in capsys.readouterr().err
