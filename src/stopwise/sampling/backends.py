"""Sampling backends without torch: a plain Python callable, any OpenAI-compatible endpoint, and a
replay of recorded samples.

Every backend offers ``generate(prompts, *, n, temperature, max_tokens, seeds) -> list[list[Completion]]``
(the local HF backend in :mod:`stopwise.sampling.local` too) and ``agenerate(prompt, ...)`` for
one prompt, awaitable and cancellable, used by the asynchronous sampler.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from stopwise.core.errors import StopwiseError, check_choice, check_int
from stopwise.sampling.types import Completion

RETRY_STATUS = (408, 409, 425, 429, 500, 502, 503, 504)


class EndpointError(StopwiseError):
    """The endpoint is down, too slow, refused the request, or answered something malformed."""


def _as_completion(item: Any) -> Completion:
    if isinstance(item, Completion):
        return item
    if item is None:
        return Completion(text="", n_tokens=0, finish_reason="error")
    text = str(item)
    return Completion(text=text, n_tokens=len(text.split()))


class CallableBackend:
    """Wrap ``fn(prompt, *, n, temperature, max_tokens, seed)`` returning n strings/Completions
    (or one string when n == 1). Coroutine functions are awaited in :meth:`agenerate`."""

    name = "callable"

    def __init__(self, fn: Callable[..., Any]) -> None:
        if not callable(fn):
            raise StopwiseError(f"The 'fn' parameter of CallableBackend must be callable. Got {fn!r} instead.")
        self.fn = fn

    def _normalise(self, out: Any, n: int) -> list[Completion]:
        items = [out] if isinstance(out, (str, Completion)) or out is None else list(out)
        if len(items) != n:
            raise StopwiseError(f"The sampling callable returned {len(items)} completions for n = {n}; it must return n.")
        return [_as_completion(x) for x in items]

    def generate(self, prompts: Sequence[str], *, n: int = 1, temperature: float = 0.7, max_tokens: int = 96,
                 seeds: Sequence[int] | int = 0) -> list[list[Completion]]:
        seed_list = [seeds] * len(prompts) if isinstance(seeds, int) else list(seeds)
        out = []
        for p, s in zip(prompts, seed_list, strict=True):
            res = self.fn(p, n=n, temperature=temperature, max_tokens=max_tokens, seed=s)
            if inspect.isawaitable(res):
                raise StopwiseError("This sampling callable is a coroutine function: use the asynchronous sampler (arun).")
            out.append(self._normalise(res, n))
        return out

    async def agenerate(self, prompt: str, *, n: int = 1, temperature: float = 0.7, max_tokens: int = 96,
                        seed: int = 0) -> list[Completion]:
        res = self.fn(prompt, n=n, temperature=temperature, max_tokens=max_tokens, seed=seed)
        if inspect.isawaitable(res):
            res = await res
        return self._normalise(res, n)


class ReplayBackend:
    """Serve recorded completions in their recorded order: offline evaluation of a sampler or an
    allocator on a recording (e.g. a :func:`~stopwise.sampling.record.record` checkpoint), no model.

    Each prompt has a cursor: a request for ``n`` completions of a prompt gets the next ``n`` of its
    recording (the first request samples 0..n-1, the next one continues where it stopped), whatever
    the seed, temperature or max_tokens asked. Asking a prompt for more completions than it has
    recorded, or for a prompt with no recording, raises :class:`~stopwise.StopwiseError`; a batched
    call is checked whole before any cursor moves. ``served`` counts what each prompt has handed
    out; :meth:`reset` rewinds every cursor.

    Args:
        samples: recorded completions per prompt, in order (:class:`~stopwise.sampling.types.Completion`
            or plain strings).
    """

    name = "replay"

    def __init__(self, samples: Mapping[str, Sequence[Completion | str]]) -> None:
        if not isinstance(samples, Mapping):
            raise StopwiseError("The 'samples' parameter of ReplayBackend must map each prompt to its recorded "
                                f"completions. Got {type(samples).__name__} instead.")
        self.samples: dict[str, list[Completion]] = {str(p): [_as_completion(c) for c in comps]
                                                     for p, comps in samples.items()}
        self.served: dict[str, int] = dict.fromkeys(self.samples, 0)

    @classmethod
    def from_records(cls, rows: Sequence[Mapping[str, Any]]) -> ReplayBackend:
        """From checkpoint question records (``prompt`` and ``samples`` with ``text``, ``n_tokens``,
        ``confidence``, ``finish_reason``, ``answer``).

        A completion keeps its recorded text, token count and finish reason; its ``confidence`` is
        the recorded one (carried as one log-probability, log(confidence)); ``meta`` holds the
        record's ``id``, the sample's ``index`` and its recorded ``answer`` (a sampler re-extracts
        answers from the text with its own extractor). Two records with one prompt are refused:
        requests name prompts only, so they could not be told apart.
        """
        samples: dict[str, list[Completion]] = {}
        for row in rows:
            prompt, recorded = row.get("prompt"), row.get("samples")
            if not isinstance(prompt, str) or not isinstance(recorded, list):
                raise StopwiseError(f"Record {row.get('id')!r} has no 'prompt' string and 'samples' list.")
            if prompt in samples:
                raise StopwiseError(f"Two records share the prompt {prompt[:80]!r} (record {row.get('id')!r}); "
                                    "ReplayBackend tells questions apart by prompt.")
            samples[prompt] = [_recorded_completion(s, row.get("id"), k) for k, s in enumerate(recorded)]
        return cls(samples)

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> ReplayBackend:
        """From a :func:`~stopwise.sampling.record.record` checkpoint file (see :meth:`from_records`)."""
        from stopwise.sampling.record import read_checkpoint

        _, rows = read_checkpoint(path)
        if not rows:
            raise StopwiseError(f"'{path}' holds no recorded questions.")
        return cls.from_records(rows)

    def remaining(self, prompt: str) -> int:
        """Recorded completions of ``prompt`` not served yet."""
        return len(self._recording(prompt)) - self.served[prompt]

    def reset(self) -> None:
        """Rewind every prompt to its first recorded completion."""
        self.served = dict.fromkeys(self.samples, 0)

    def _recording(self, prompt: str) -> list[Completion]:
        try:
            return self.samples[prompt]
        except KeyError:
            raise StopwiseError(f"ReplayBackend has no recording for the prompt {prompt[:80]!r}.") from None

    def _take(self, prompts: Sequence[str], n: int) -> list[list[Completion]]:
        n = check_int(n, "n", "ReplayBackend.generate", minimum=1)
        asked: dict[str, int] = {}
        for p in prompts:  # check the whole call first: a refused call moves no cursor
            asked[p] = asked.get(p, 0) + n
            have = len(self._recording(p))
            if self.served[p] + asked[p] > have:
                raise StopwiseError(f"ReplayBackend was asked for completions {self.served[p] + asked[p] - n + 1}.."
                                    f"{self.served[p] + asked[p]} of the prompt {p[:80]!r}, which has {have} recorded.")
        out = []
        for p in prompts:
            start = self.served[p]
            self.served[p] = start + n
            out.append(self.samples[p][start : start + n])
        return out

    def generate(self, prompts: Sequence[str], *, n: int = 1, temperature: float = 0.7, max_tokens: int = 96,
                 seeds: Sequence[int] | int = 0) -> list[list[Completion]]:
        """The next ``n`` recorded completions of each prompt (a prompt listed twice gets 2n in turn)."""
        return self._take(list(prompts), n)

    async def agenerate(self, prompt: str, *, n: int = 1, temperature: float = 0.7, max_tokens: int = 96,
                        seed: int = 0) -> list[Completion]:
        """The next ``n`` recorded completions of ``prompt``."""
        return self._take([prompt], n)[0]


def _recorded_completion(sample: Any, qid: Any, index: int) -> Completion:
    if isinstance(sample, str):
        return _as_completion(sample)
    if not isinstance(sample, Mapping):
        raise StopwiseError(f"Record {qid!r} sample {index} is not an object or a string. Got {sample!r}.")
    text = sample.get("text")
    text = text if isinstance(text, str) else ""
    conf = sample.get("confidence")
    logprobs = None
    if isinstance(conf, (int, float)) and not isinstance(conf, bool) and 0.0 <= conf <= 1.0:
        logprobs = (math.log(conf) if conf > 0 else -math.inf,)
    n_tokens = sample.get("n_tokens")
    return Completion(text=text, n_tokens=int(n_tokens) if isinstance(n_tokens, (int, float)) else len(text.split()),
                      logprobs=logprobs, finish_reason=sample.get("finish_reason"),
                      meta={"id": qid, "index": index, "answer": sample.get("answer")})


class HTTPBackend:
    """An OpenAI-compatible endpoint (vLLM, llama.cpp server, TGI, ``stopwise serve``, ...).

    Args:
        base_url: e.g. ``http://127.0.0.1:8000/v1``.
        model: the model name the server expects.
        api: ``"chat"`` (``/chat/completions``) or ``"completions"`` (raw prompts).
        timeout: seconds per request (connect, read, write).
        retries: extra attempts on connection errors, timeouts, 429 and 5xx, with exponential
            backoff (``backoff`` * 2^attempt seconds, jittered).
        max_n: the largest ``n`` one request may ask for; larger requests are split.
        logprobs: ask for token log-probabilities (confidences and DEER scores need them).
    """

    name = "http"

    def __init__(self, base_url: str, *, model: str = "default", api: str = "chat", timeout: float = 60.0,
                 retries: int = 3, backoff: float = 0.5, max_n: int = 16, logprobs: bool = True,
                 api_key: str | None = None, system: str | None = None, extra: dict[str, Any] | None = None) -> None:
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise StopwiseError(f"The 'base_url' parameter of HTTPBackend must be an http(s) URL. Got {base_url!r} instead.")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api = check_choice(api, "api", "HTTPBackend", ("chat", "completions"))
        if not timeout > 0:
            raise StopwiseError(f"The 'timeout' parameter of HTTPBackend must be > 0 seconds. Got {timeout!r} instead.")
        self.timeout = float(timeout)
        self.retries = max(0, int(retries))
        self.backoff = float(backoff)
        self.max_n = max(1, int(max_n))
        self.logprobs = bool(logprobs)
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.system = system
        self.extra = dict(extra or {})
        self.requests_sent = 0

    # -- request building and parsing ----------------------------------------------------------
    @property
    def url(self) -> str:
        return f"{self.base_url}/{'chat/completions' if self.api == 'chat' else 'completions'}"

    def payload(self, prompt: str, *, n: int, temperature: float, max_tokens: int, seed: int | None,
                raw: bool = False, stop: Sequence[str] = ()) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "n": n, "temperature": temperature, "max_tokens": max_tokens}
        if seed is not None:
            body["seed"] = int(seed) % (2**31)
        if stop:
            body["stop"] = list(stop)
        if self.api == "chat" and not raw:
            messages = ([{"role": "system", "content": self.system}] if self.system else []) + [
                {"role": "user", "content": prompt}]
            body["messages"] = messages
            if self.logprobs:
                body["logprobs"] = True
        else:
            body["prompt"] = prompt
            if self.logprobs:
                body["logprobs"] = 1
        body.update(self.extra)
        return body

    def parse(self, data: Any, n: int) -> list[Completion]:
        """Completions from a response body; a choice without text is an empty completion."""
        if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
            raise EndpointError(f"Malformed response from {self.url}: expected a JSON object with a 'choices' list. "
                                f"Got {str(data)[:200]!r}.")
        choices = sorted(data["choices"], key=lambda c: c.get("index", 0) if isinstance(c, dict) else 0)
        out = [_parse_choice(c) for c in choices]
        if len(out) != n:
            raise EndpointError(f"Malformed response from {self.url}: asked for n = {n} choices, got {len(out)}.")
        return out

    def _chunks(self, n: int) -> list[int]:
        return [min(self.max_n, n - i) for i in range(0, n, self.max_n)]

    # -- synchronous ---------------------------------------------------------------------------
    def generate(self, prompts: Sequence[str], *, n: int = 1, temperature: float = 0.7, max_tokens: int = 96,
                 seeds: Sequence[int] | int = 0, raw: bool = False, stop: Sequence[str] = ()) -> list[list[Completion]]:
        import httpx

        seed_list = [seeds + i for i in range(len(prompts))] if isinstance(seeds, int) else list(seeds)
        out = []
        with httpx.Client(timeout=self.timeout, headers=self.headers) as client:
            for prompt, seed in zip(prompts, seed_list, strict=True):
                comps: list[Completion] = []
                for j, m in enumerate(self._chunks(n)):
                    body = self.payload(prompt, n=m, temperature=temperature, max_tokens=max_tokens,
                                        seed=seed + j, raw=raw, stop=stop)
                    comps += self.parse(self._post_sync(client, body), m)
                out.append(comps)
        return out

    def _post_sync(self, client: Any, body: dict[str, Any]) -> Any:
        import httpx

        for attempt in range(self.retries + 1):
            self.requests_sent += 1
            wait = 0.0
            try:
                resp = client.post(self.url, json=body)
            except (httpx.TransportError, httpx.TimeoutException) as exc:
                if attempt == self.retries:
                    raise self._down(exc) from None
            else:
                if not (resp.status_code in RETRY_STATUS and attempt < self.retries):
                    return self._decode(resp)
                wait = self._retry_after(resp)
            time.sleep(self._delay(attempt, wait))
        raise AssertionError("unreachable")

    # -- asynchronous --------------------------------------------------------------------------
    async def agenerate(self, prompt: str, *, n: int = 1, temperature: float = 0.7, max_tokens: int = 96,
                        seed: int = 0, raw: bool = False, stop: Sequence[str] = (), client: Any = None) -> list[Completion]:
        """One request per ``max_n`` chunk; cancelling the task aborts the HTTP request."""
        import httpx

        own = client is None
        client = client or httpx.AsyncClient(timeout=self.timeout, headers=self.headers)
        try:
            comps: list[Completion] = []
            for j, m in enumerate(self._chunks(n)):
                body = self.payload(prompt, n=m, temperature=temperature, max_tokens=max_tokens,
                                    seed=seed + j, raw=raw, stop=stop)
                comps += self.parse(await self._post_async(client, body), m)
            return comps
        finally:
            if own:
                await client.aclose()

    async def _post_async(self, client: Any, body: dict[str, Any]) -> Any:
        import httpx

        for attempt in range(self.retries + 1):
            self.requests_sent += 1
            wait = 0.0
            try:
                resp = await client.post(self.url, json=body)
            except (httpx.TransportError, httpx.TimeoutException) as exc:
                if attempt == self.retries:
                    raise self._down(exc) from None
            else:
                if not (resp.status_code in RETRY_STATUS and attempt < self.retries):
                    return self._decode(resp)
                wait = self._retry_after(resp)
            await asyncio.sleep(self._delay(attempt, wait))
        raise AssertionError("unreachable")

    def client(self) -> Any:
        import httpx

        return httpx.AsyncClient(timeout=self.timeout, headers=self.headers)

    # -- errors ------------------------------------------------------------------------------------
    def _delay(self, attempt: int, retry_after: float = 0.0) -> float:
        """Jittered exponential backoff, at least the server's Retry-After (capped at 60 s)."""
        return max(float(self.backoff * (2**attempt) * (0.5 + random.random() / 2)), min(retry_after, 60.0))

    @staticmethod
    def _retry_after(resp: Any) -> float:
        try:
            return max(0.0, float(resp.headers.get("retry-after", 0)))
        except (TypeError, ValueError):
            return 0.0

    def _down(self, exc: Exception) -> EndpointError:
        what = "timed out" if "Timeout" in type(exc).__name__ else "is unreachable"
        return EndpointError(f"The endpoint {self.url} {what} after {self.retries + 1} attempts "
                             f"(timeout {self.timeout:g} s): {type(exc).__name__}: {exc}")

    def _decode(self, resp: Any) -> Any:
        if resp.status_code >= 400:
            detail = resp.text[:300]
            hint = ""
            if resp.status_code in (400, 422) and any(t in detail for t in ('"n"', "'n'", " n ", "n=")):
                hint = f" (is n above the server's limit? lower HTTPBackend(max_n=...), now {self.max_n})"
            raise EndpointError(f"The endpoint {self.url} answered HTTP {resp.status_code}{hint}: {detail}")
        try:
            return resp.json()
        except ValueError:
            raise EndpointError(f"Malformed response from {self.url}: not JSON: {resp.text[:200]!r}") from None


def _parse_choice(choice: Any) -> Completion:
    if not isinstance(choice, dict):
        return Completion(text="", n_tokens=0, finish_reason="malformed")
    message = choice.get("message")
    text = message.get("content") if isinstance(message, dict) else choice.get("text")
    if not isinstance(text, str):
        text = ""
    logprobs = _parse_logprobs(choice.get("logprobs"))
    n_tokens = len(logprobs) if logprobs is not None else len(text.split())
    return Completion(text=text, n_tokens=n_tokens, logprobs=logprobs, finish_reason=choice.get("finish_reason"))


def _parse_logprobs(lp: Any) -> tuple[float, ...] | None:
    if not isinstance(lp, dict):
        return None
    try:
        if isinstance(lp.get("content"), list):  # chat format
            return tuple(float(t["logprob"]) for t in lp["content"])
        if isinstance(lp.get("token_logprobs"), list):  # completions format
            return tuple(float(x) for x in lp["token_logprobs"] if x is not None)
    except (KeyError, TypeError, ValueError):
        return None
    return None
