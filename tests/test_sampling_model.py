"""stopwise.sampling on the bundled SmolLM2-135M-Instruct: local backend, real server over HTTP, DEER."""

from __future__ import annotations

from typing import Any

import pytest

pytestmark = pytest.mark.model

torch = pytest.importorskip("torch")

from stopwise import Never  # noqa: E402
from stopwise.sampling import AdaptiveSampler, EndpointError, HTTPBackend, NumberExtractor, Question  # noqa: E402
from stopwise.sampling.types import prompt_seed  # noqa: E402

QUESTIONS = [Question(id="a", prompt="What is 2 + 3? End with 'Answer: <number>'."),
             Question(id="b", prompt="What is 10 - 4? End with 'Answer: <number>'.")]


@pytest.fixture(scope="module")
def backend() -> Any:
    from stopwise.sampling.local import LocalBackend

    torch.set_num_threads(1)
    return LocalBackend("smollm2", system="You are a careful math tutor.")


def test_local_sampling_is_seeded_and_independent_of_batch_company(backend: Any) -> None:
    both = backend.generate([q.prompt for q in QUESTIONS], n=3, max_tokens=8, seeds=[1, 2])
    alone = backend.generate([QUESTIONS[1].prompt], n=3, max_tokens=8, seeds=[2])
    assert [c.text for c in both[1]] == [c.text for c in alone[0]]
    again = backend.generate([QUESTIONS[0].prompt], n=3, max_tokens=8, seeds=[1])
    assert [c.text for c in again[0]] == [c.text for c in both[0]]
    other = backend.generate([QUESTIONS[0].prompt], n=3, max_tokens=8, seeds=[99])
    assert [c.text for c in other[0]] != [c.text for c in both[0]]
    for c in both[0] + both[1]:
        assert 1 <= c.n_tokens <= 8 and len(c.logprobs) == c.n_tokens and max(c.logprobs) <= 0.0


def test_greedy_session_continues_like_one_greedy_generation(backend: Any) -> None:
    ids = backend.encode_prompt(QUESTIONS[0].prompt)
    whole = backend.generate_ids([ids], n=1, temperature=0.0, max_tokens=10, seeds=[0])[0][0]
    session = backend.session(ids)
    first = session.generate(4)
    trial = session.fork()
    trial.extend(backend.encode(" Answer:"))
    trial.generate(3)  # a discarded trial must not disturb the main session
    rest = session.generate(6)
    assert first.text + rest.text == whole.text
    assert first.logprobs + rest.logprobs == pytest.approx(whole.logprobs, abs=1e-4)


def test_disabled_stopping_gives_the_bare_models_samples(backend: Any) -> None:
    sampler = AdaptiveSampler(backend, Never(), max_samples=3, step=3, max_tokens=10, seed=5)
    results = sampler.run(QUESTIONS)
    extract = NumberExtractor()
    for q, r in zip(QUESTIONS, results, strict=True):
        bare = backend.generate([q.prompt], n=3, temperature=0.7, max_tokens=10, seeds=[prompt_seed(5, f"{q.id}:0")])[0]
        assert r.answers == [extract(c.text) for c in bare] and r.n_samples == 3


def test_the_real_server_refuses_a_prompt_beyond_the_context_and_a_10_mb_body(backend: Any) -> None:
    import socket

    import httpx

    from stopwise.sampling.server import ServerThread, create_app

    app = create_app(backend, model_name="smollm2", max_tokens=16)
    with ServerThread(app) as server:
        words = " ".join(["word"] * 20_000)  # ~100 KB, ~20,000 tokens: beyond SmolLM2's 8192
        r = httpx.post(f"{server.url}/chat/completions", timeout=60,
                       json={"messages": [{"role": "user", "content": words}], "max_tokens": 1})
        assert r.status_code == 400 and "context length is 8192" in r.json()["error"]["message"]
        assert app.state.requests == 0 and app.state.refused == 1  # no generation started
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:  # a 10 MB body, declared
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b'Content-Length: %d\r\n\r\n{"max_tokens": 1, "prompt": "xxxx' % (10 << 20))
            reply = b""
            while part := s.recv(65536):
                reply += part
        assert reply.startswith(b"HTTP/1.1 413") and b"at most 1048576 bytes" in reply
        r = httpx.post(f"{server.url}/completions", json={"prompt": "Say hi", "max_tokens": 2}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2  # still serving


def test_sampler_over_the_real_server(backend: Any) -> None:
    from stopwise.sampling import DifficultyAllocator
    from stopwise.sampling.server import ServerThread, create_app

    app = create_app(backend, model_name="smollm2", max_n=4, max_tokens=16)
    with ServerThread(app) as server:
        assert server.host == "127.0.0.1"
        http = HTTPBackend(server.url, model="smollm2", max_n=4, timeout=120, retries=0,
                           system="You are a careful math tutor.")
        sampler = AdaptiveSampler(http, "asc", max_samples=4, step=2, max_tokens=12)
        results = sampler.arun_sync(QUESTIONS, concurrency=2)
        for r in results:
            assert 1 <= r.n_samples <= 4 and len(r.answers) == r.n_samples
            assert r.answer is None or r.answer in r.answers
        assert app.state.requests <= 8  # bounded: at most max_samples requests per question
        # DSC's allocation over the endpoint: a round's windows requested together.
        before = app.state.requests
        alloc = DifficultyAllocator(http, total_samples=6, pre=2, max_samples=4, window=2,
                                    max_tokens=8).arun_sync(QUESTIONS, concurrency=2)
        assert alloc.spent == sum(r.n_samples for r in alloc.results) <= 6
        assert all(len(r.answers) == r.n_samples >= 2 for r in alloc.results)
        assert 2 <= app.state.requests - before <= 4  # pre-samples, then at most one window each
        with pytest.raises(EndpointError, match="HTTP 400"):
            HTTPBackend(server.url, max_n=8, retries=0).generate(["hi"], n=6, max_tokens=4)
        # DEER through /v1/completions with logprobs.
        from stopwise.sampling.deer import DEER

        comp = HTTPBackend(server.url, api="completions", max_n=4, timeout=120, retries=0)
        deer = DEER(comp, transitions=(" ",), max_think_tokens=12, trial_tokens=3, lam=0.0)
        early = deer.run("What is 2 + 3?")
        full = deer.run("What is 2 + 3?", full=True)
        assert early.stopped_early and len(early.steps) == 1
        assert early.think_tokens < full.think_tokens and not full.stopped_early
        assert all(0.0 <= s.scores["mean"] <= 1.0 for s in full.steps)


def test_deer_local_exits_at_the_first_confident_trial(backend: Any) -> None:
    from stopwise.sampling.deer import DEER, deer_trace

    deer = DEER(backend, transitions=(" ",), max_think_tokens=10, trial_tokens=3)
    full = deer.run(QUESTIONS[0].prompt, full=True)
    assert len(full.steps) >= 2 and not full.stopped_early
    lam = sorted(s.scores["mean"] for s in full.steps[:-1])[-1]
    first = next(i for i, s in enumerate(full.steps) if s.scores["mean"] >= lam)
    early = deer.run(QUESTIONS[0].prompt, lam=lam)
    # Greedy thinking ignores discarded trials: the online run stops where the full trace says.
    assert early.stopped_early and len(early.steps) == first + 1
    assert early.answer == full.steps[first].answer and early.think_tokens == full.steps[first].think_tokens
    trace = deer_trace([full], labels=["5"])
    assert trace.n_stages == len(full.steps) and trace.signals["deer_mean"][0, -1] == 1.0


def test_local_generation_stops_between_tokens_when_cancelled() -> None:
    """The ``cancel`` event ``stopwise serve`` sets when a client disconnects (a tiny random model, no download)."""
    import threading

    transformers = pytest.importorskip("transformers")
    from stopwise.sampling import GenerationCancelled
    from stopwise.sampling.local import LocalBackend

    class Chars:
        def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
            return "".join(chr(65 + i % 26) for i in ids)

    class StopAfter(threading.Event):
        """Reads as set from its (k+1)-th check on: the first check is before the prompt's forward pass."""

        def __init__(self, k: int) -> None:
            super().__init__()
            self.k, self.checks = k, 0

        def is_set(self) -> bool:
            self.checks += 1
            return self.checks > self.k

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=0)
    backend = LocalBackend.__new__(LocalBackend)  # skip loading: a tiny random Llama and a character "tokenizer"
    backend.model, backend.tokenizer = transformers.LlamaForCausalLM(cfg).eval(), Chars()
    backend.eos_ids, backend.pad_id, backend.max_batch_rows = [10_000], 0, 32  # no EOS: every row runs to max_tokens
    kwargs: dict[str, Any] = {"n": 2, "temperature": 1.0, "max_tokens": 12, "seeds": [3]}
    bare = backend.generate_ids([[5, 6, 7]], **kwargs)[0]
    assert [c.n_tokens for c in bare] == [12, 12]
    unset = backend.generate_ids([[5, 6, 7]], **kwargs, cancel=threading.Event())[0]
    assert [c.text for c in unset] == [c.text for c in bare]  # an event never set changes nothing
    stop = StopAfter(4)
    with pytest.raises(GenerationCancelled, match="after 3 of at most 12 tokens"):
        backend.generate_ids([[5, 6, 7]], **kwargs, cancel=stop)
    assert stop.checks == 5
    early = threading.Event()
    early.set()
    with pytest.raises(GenerationCancelled, match="after 0 of"):
        backend.generate_ids([[5, 6, 7]], **kwargs, cancel=early)
