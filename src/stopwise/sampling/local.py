"""Local Hugging Face causal LM backend: several seeded samples per prompt in parallel batches.

We run our own decoding loop (the model's forward and its ``DynamicCache``) rather than
``generate()`` because we need (1) one ``torch.Generator`` per prompt so that a prompt's samples
do not depend on which other prompts share its batch (recording is then resumable and
reproducible), (2) the log-probability of every sampled token, and (3) finished rows dropped from
the batch at once, which matters on CPU.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from stopwise.core.errors import StopwiseError
from stopwise.sampling.types import Completion, GenerationCancelled, prompt_seed


class LocalBackend:
    """Samples completions from a local causal LM (default: the bundled SmolLM2-135M-Instruct).

    Args:
        model: a bundled name ("smollm2") or a local directory for ``from_pretrained``.
        chat: wrap prompts in the tokenizer's chat template (instruction-tuned models).
        system: optional system message for the chat template.
        max_batch_rows: at most this many sequences decode together.
        threads: ``torch.set_num_threads`` value (None: leave as is).
    """

    name = "local"

    def __init__(self, model: str | Path = "smollm2", *, chat: bool = True, system: str | None = None,
                 max_batch_rows: int = 32, threads: int | None = None, dtype: Any = None) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from stopwise.hf import bundled

        if threads is not None:
            torch.set_num_threads(int(threads))
        path = bundled.model_path(str(model)) if str(model) in bundled.BUNDLED else Path(str(model)).expanduser()
        if not Path(path).is_dir():
            raise StopwiseError(f"The 'model' parameter of LocalBackend must be a bundled name {sorted(bundled.BUNDLED)} "
                                f"or a local model directory. Got {str(model)!r} instead.")
        self.model_name = str(model)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32).eval()  # type: ignore[no-untyped-call]
        self.chat = bool(chat) and getattr(self.tokenizer, "chat_template", None) is not None
        self.system = system
        self.max_batch_rows = int(max_batch_rows)
        eos = self.model.generation_config.eos_token_id
        eos_ids = eos if isinstance(eos, list) else [eos]
        if self.tokenizer.eos_token_id is not None:
            eos_ids.append(self.tokenizer.eos_token_id)
        self.eos_ids = sorted({int(e) for e in eos_ids if e is not None})
        self.pad_id = int(self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0])

    # -- prompts ------------------------------------------------------------------------------
    def encode_prompt(self, prompt: str) -> list[int]:
        """Token ids of a user prompt, chat-templated when the model has a template."""
        if self.chat:
            return self.encode_messages([{"role": "user", "content": prompt}])
        return list(self.tokenizer(prompt)["input_ids"])

    def encode_messages(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Token ids of a chat conversation ending with the assistant's turn."""
        if not self.chat:
            return self.encode("\n".join(m["content"] for m in messages) + "\n")
        if self.system and messages and messages[0].get("role") != "system":
            messages = [{"role": "system", "content": self.system}, *messages]
        text = self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    # -- sampling -----------------------------------------------------------------------------
    def generate(self, prompts: Sequence[str], *, n: int = 1, temperature: float = 0.7, top_p: float = 1.0,
                 max_tokens: int = 96, seeds: Sequence[int] | int = 0, stop: Sequence[str] = (),
                 cancel: threading.Event | None = None) -> list[list[Completion]]:
        """``n`` completions per prompt; prompt i samples from its own generator seeded ``seeds[i]``.

        Setting ``cancel`` (from another thread) stops decoding before the next token and raises
        :class:`~stopwise.sampling.types.GenerationCancelled`.
        """
        seed_list = [prompt_seed(seeds, i) for i in range(len(prompts))] if isinstance(seeds, int) else list(seeds)
        if len(seed_list) != len(prompts):
            raise StopwiseError(f"LocalBackend.generate needs one seed per prompt. Got {len(seed_list)} seeds for {len(prompts)} prompts.")
        encoded = [self.encode_prompt(p) for p in prompts]
        return self.generate_ids(encoded, n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                                 seeds=seed_list, stop=stop, cancel=cancel)

    def generate_ids(self, encoded: Sequence[Sequence[int]], *, n: int, temperature: float, top_p: float = 1.0,
                     max_tokens: int, seeds: Sequence[int | None], stop: Sequence[str] = (),
                     cancel: threading.Event | None = None) -> list[list[Completion]]:
        """As :meth:`generate` on token ids; a seed of None with temperature 0 decodes greedily."""
        if n < 1 or max_tokens < 1:
            raise StopwiseError(f"LocalBackend needs n >= 1 and max_tokens >= 1. Got n={n}, max_tokens={max_tokens}.")
        per_batch = max(1, self.max_batch_rows // n)
        out: list[list[Completion]] = []
        for start in range(0, len(encoded), per_batch):
            chunk = encoded[start : start + per_batch]
            gens = []
            for s in seeds[start : start + per_batch]:
                g = torch.Generator()
                g.manual_seed(int(s or 0))
                gens.append(g)
            tokens, logps, reasons = self._decode(chunk, gens, n, temperature, top_p, max_tokens, stop, cancel)
            for i in range(len(chunk)):
                out.append([
                    Completion(text=self.decode(tokens[i * n + j]), n_tokens=len(tokens[i * n + j]),
                               logprobs=tuple(logps[i * n + j]), finish_reason=reasons[i * n + j])
                    for j in range(n)
                ])
        return out

    def session(self, ids: Sequence[int]) -> GreedySession:
        """A single-sequence greedy decoder that keeps its KV cache between calls (DEER)."""
        return GreedySession(self, ids)

    @torch.inference_mode()
    def _decode(self, prompts: Sequence[Sequence[int]], gens: list[torch.Generator], n: int, temperature: float,
                top_p: float, max_new: int, stop: Sequence[str],
                cancel: threading.Event | None = None) -> tuple[list[list[int]], list[list[float]], list[str]]:
        def check(step: int) -> None:  # between forward passes: a cancelled request stops within one token
            if cancel is not None and cancel.is_set():
                raise GenerationCancelled(f"The generation was cancelled after {step} of at most {max_new} tokens.")

        check(0)
        p = len(prompts)
        width = max(len(r) for r in prompts)
        ids = torch.full((p, width), self.pad_id, dtype=torch.long)
        attn = torch.zeros((p, width), dtype=torch.long)
        for i, r in enumerate(prompts):  # left padding: every row's next token is at the same column
            ids[i, width - len(r):] = torch.tensor(list(r), dtype=torch.long)
            attn[i, width - len(r):] = 1
        pos = (attn.cumsum(1) - 1).clamp(min=0)
        # Prefill each prompt once, then copy its cache to its n sample rows: on CPU the prompt
        # usually costs more than the short answers sampled from it.
        out = self.model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True)
        cache = out.cache
        if n > 1:
            cache.batch_repeat_interleave(n)
        attn = attn.repeat_interleave(n, dim=0)
        pos = pos.repeat_interleave(n, dim=0)
        logits = out.logits[:, -1, :].float().repeat_interleave(n, dim=0)
        b = p * n
        alive = list(range(b))  # original row index of each live batch row
        tokens: list[list[int]] = [[] for _ in range(b)]
        logps: list[list[float]] = [[] for _ in range(b)]
        reasons = ["length"] * b
        eos = torch.tensor(self.eos_ids)
        next_pos = pos[:, -1]
        for step in range(max_new):
            check(step)
            logp = torch.log_softmax(logits, dim=-1)
            chosen = self._choose(logits, alive, gens, n, temperature, top_p)
            lp = logp.gather(1, chosen[:, None]).squeeze(1)
            done = torch.isin(chosen, eos)
            keep: list[int] = []
            for j, row in enumerate(alive):
                if bool(done[j]):
                    reasons[row] = "stop"
                    continue
                tokens[row].append(int(chosen[j]))
                logps[row].append(float(lp[j]))
                if stop and any(s in self.decode(tokens[row][-8:]) for s in stop):
                    reasons[row] = "stop_string"  # the servers report "stop"; DEER needs to tell EOS apart
                    continue
                keep.append(j)
            if not keep:
                break
            if len(keep) < len(alive):
                # Drop finished rows from the cache and the mask: they cost nothing from now on.
                sel = torch.tensor(keep)
                cache.batch_select_indices(sel)
                attn, next_pos, chosen = attn[sel], next_pos[sel], chosen[sel]
                alive = [alive[j] for j in keep]
            attn = torch.cat([attn, torch.ones((len(alive), 1), dtype=torch.long)], dim=1)
            next_pos = next_pos + 1
            out = self.model(input_ids=chosen[:, None], attention_mask=attn, position_ids=next_pos[:, None],
                             cache=cache, use_cache=True)
            cache = out.cache
            logits = out.logits[:, -1, :].float()
        return tokens, logps, reasons

    @staticmethod
    def _choose(logits: torch.Tensor, alive: list[int], gens: list[torch.Generator], n: int, temperature: float,
                top_p: float) -> torch.Tensor:
        if temperature <= 0:
            return logits.argmax(dim=-1)
        probs = torch.softmax(logits / temperature, dim=-1)
        if top_p < 1.0:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            # Keep the smallest prefix whose mass reaches top_p (always at least one token).
            cut = (sorted_p.cumsum(-1) - sorted_p) >= top_p
            sorted_p = sorted_p.masked_fill(cut, 0.0)
            probs = torch.zeros_like(probs).scatter(1, order, sorted_p)
            probs = probs / probs.sum(-1, keepdim=True)
        chosen = torch.empty(len(alive), dtype=torch.long)
        groups: dict[int, list[int]] = {}
        for j, row in enumerate(alive):
            groups.setdefault(row // n, []).append(j)
        for prompt, js in groups.items():  # each prompt draws from its own generator
            idx = torch.tensor(js)
            chosen[idx] = torch.multinomial(probs[idx], 1, generator=gens[prompt]).squeeze(1)
        return chosen


class GreedySession:
    """Greedy decoding of one sequence that keeps its KV cache: extend, generate, fork.

    DEER thinks in chunks and tries a trial answer at each transition; with a session the
    thinking is never re-read, and a trial runs on a fork (a copy of the cache) that is dropped.
    """

    def __init__(self, backend: LocalBackend, ids: Sequence[int] = ()) -> None:
        self.backend = backend
        self.cache: Any = None
        self.logits: torch.Tensor | None = None
        self.length = 0
        if ids:
            self.extend(ids)

    @torch.inference_mode()
    def extend(self, ids: Sequence[int]) -> None:
        """Read tokens into the cache (no generation)."""
        if not ids:
            return
        x = torch.tensor([list(ids)], dtype=torch.long)
        pos = torch.arange(self.length, self.length + len(ids))[None, :]
        attn = torch.ones((1, self.length + len(ids)), dtype=torch.long)
        out = self.backend.model(input_ids=x, attention_mask=attn, position_ids=pos, cache=self.cache, use_cache=True)
        self.cache = out.cache
        self.logits = out.logits[0, -1, :].float()
        self.length += len(ids)

    def fork(self) -> GreedySession:
        other = GreedySession(self.backend)
        other.cache = copy.deepcopy(self.cache)
        other.logits = self.logits
        other.length = self.length
        return other

    @torch.inference_mode()
    def generate(self, max_tokens: int, stop: Sequence[str] = ()) -> Completion:
        """Greedy tokens until EOS ("stop"), a stop string ("stop_string") or ``max_tokens`` ("length")."""
        if self.logits is None:
            raise StopwiseError("A GreedySession needs a prompt (extend it with token ids) before generating.")
        tokens: list[int] = []
        logps: list[float] = []
        reason = "length"
        for _ in range(max_tokens):
            logp = torch.log_softmax(self.logits, dim=-1)
            tok = int(self.logits.argmax())
            if tok in self.backend.eos_ids:
                reason = "stop"
                break
            tokens.append(tok)
            logps.append(float(logp[tok]))
            self.extend([tok])
            if stop and any(st in self.backend.decode(tokens[-8:]) for st in stop):
                reason = "stop_string"
                break
        return Completion(text=self.backend.decode(tokens), n_tokens=len(tokens), logprobs=tuple(logps),
                          finish_reason=reason)
