"""Public API: load a causal LM (and its exit heads) and generate in one of three modes.

>>> dec = Decoder.from_pretrained("smollm2", heads="~/.cache/stopwise/heads/smollm2")   # doctest: +SKIP
>>> out = dec.generate([{"role": "user", "content": "Hi!"}], mode="speculative", max_new_tokens=32)  # doctest: +SKIP
>>> out.text, out.stats["acceptance_rate"]                                                 # doctest: +SKIP
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stopwise.core.errors import StopwiseError, check_choice
from stopwise.decoder.backbone import Backbone
from stopwise.decoder.engine import Engine
from stopwise.decoder.heads import ExitHeads

MODES = ("full", "speculative", "early_exit")
Prompt = str | list[dict[str, str]]


@dataclass
class Generation:
    """Output of :meth:`Decoder.generate` for one prompt (``texts``/``token_ids`` per row for batches)."""

    texts: list[str]
    token_ids: list[list[int]]
    stats: dict[str, Any]

    @property
    def text(self) -> str:
        return self.texts[0]


class Decoder:
    """A frozen causal LM, its tokenizer, and optional exit heads."""

    def __init__(self, model: Any, tokenizer: Any, *, heads: ExitHeads | str | Path | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.backbone = Backbone(model)
        if heads is not None and not isinstance(heads, ExitHeads):
            heads = ExitHeads.load(Path(heads).expanduser(), self.backbone)
        self.heads = heads
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids()[0] if self.eos_ids() else 0
        self.engine = Engine(self.backbone, heads, pad_token_id=int(pad))

    @classmethod
    def from_pretrained(cls, name_or_path: str = "smollm2", *, heads: ExitHeads | str | Path | None = None,
                        dtype: torch.dtype = torch.float32) -> Decoder:
        """Load a local model directory (or the bundled name "smollm2"); never downloads."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from stopwise.hf import bundled

        path = bundled.model_path(name_or_path) if name_or_path in bundled.BUNDLED else name_or_path
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        except OSError as exc:
            raise StopwiseError(f"Cannot load model {name_or_path!r} offline: {exc}") from None
        return cls(model, tokenizer, heads=heads)

    def eos_ids(self) -> list[int]:
        ids = self.model.generation_config.eos_token_id if self.model.generation_config is not None else None
        if ids is None:
            ids = self.tokenizer.eos_token_id
        return [] if ids is None else [int(i) for i in (ids if isinstance(ids, list) else [ids])]

    # -- prompts ------------------------------------------------------------------------------
    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a text (continued as is) or chat messages (the model's chat template)."""
        if isinstance(prompt, str):
            if not prompt.strip():
                raise StopwiseError("The 'prompt' parameter of generate must be a non-empty string or chat messages. Got an empty prompt.")
            ids = self.tokenizer(prompt)["input_ids"]
        elif isinstance(prompt, list) and prompt and all(isinstance(m, dict) and "content" in m for m in prompt):
            out = self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
            ids = out["input_ids"] if not isinstance(out, list) else out
        else:
            raise StopwiseError(
                "The 'prompt' parameter of generate must be a non-empty string or a non-empty list of chat "
                f"messages ({{'role': ..., 'content': ...}}). Got {prompt!r} instead."
            )
        if not ids:
            raise StopwiseError(f"The prompt {prompt!r} tokenises to no tokens.")
        return [int(i) for i in ids]

    # -- generation ---------------------------------------------------------------------------
    def generate(self, prompt: Prompt | list[Prompt], *, mode: str = "full", max_new_tokens: int = 128,
                 temperature: float = 0.0, seed: int = 0, on_token: Callable[[int, str], None] | None = None,
                 **options: Any) -> Generation:
        """Generate from one prompt (or a batch: a list of prompts) in ``mode``.

        Args:
            mode: "full" (every layer; identical to ``model.generate`` greedy), "speculative"
                (self-speculative, lossless; without heads, drafts from the context only) or "early_exit" (CALM, lossy, certified when the heads
                carry a certificate).
            temperature: 0 for greedy; > 0 samples (with a ``torch.Generator`` seeded by ``seed``).
            on_token: called with (row, decoded text of the token) as tokens are committed.
            options: mode options: speculative ``exit_layer``, ``max_draft``, ``draft_stop``,
                ``adaptive_layer``, ``reduced``, ``lookup`` (drafts copied from the context where it
                repeats: longest n-gram matched, default 3, 0 off), ``lookup_draft``, ``block_costs``;
                early exit ``rule`` (default: the certified one),
                ``exit_layers``, ``schedule``, ``lams`` (one λ of ``rule`` per prompt of a batch; None:
                never exit; ``stats["row_layers_per_token"]`` gives each row's cost).
        Returns:
            a :class:`Generation` with texts, token ids and statistics (acceptance rate, layers per
            token, tokens/s).
        """
        mode = check_choice(mode, "mode", "generate", MODES)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
            raise StopwiseError(f"The 'max_new_tokens' parameter of generate must be an int > 0. Got {max_new_tokens!r} instead.")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
            raise StopwiseError(f"The 'temperature' parameter of generate must be a float >= 0. Got {temperature!r} instead.")
        batch = isinstance(prompt, list) and bool(prompt) and all(isinstance(p, (str, list)) for p in prompt) \
            and not all(isinstance(p, dict) for p in prompt)
        items: list[Any] = list(prompt) if batch else [prompt]
        prompts = [self.encode(p) for p in items]
        generator = torch.Generator(device=self.backbone.lm_head.weight.device).manual_seed(int(seed)) if temperature > 0 else None
        callback = None
        if on_token is not None:
            def callback(row: int, tok: int) -> None:
                on_token(row, self.tokenizer.decode([tok]))
        common = {"max_new_tokens": max_new_tokens, "temperature": float(temperature), "generator": generator,
                  "eos": set(self.eos_ids()), "on_token": callback}
        stats = self._run(mode, prompts, common, options)
        outputs = stats.extra_outputs
        texts = [self.tokenizer.decode(o, skip_special_tokens=True) for o in outputs]
        return Generation(texts=texts, token_ids=outputs, stats=stats.to_dict())

    def _run(self, mode: str, prompts: list[list[int]], common: dict[str, Any], options: dict[str, Any]) -> Any:
        if mode == "full":
            _no_options(mode, options)
            return self.engine.full(prompts, **common)
        if mode == "speculative":
            return self.engine.speculative(prompts, **common, **options)
        if "rule" not in options and "schedule" not in options:
            options = {**options, "rule": self.certified_rule()}
        return self.engine.early_exit(prompts, **common, **options)

    def certified_rule(self) -> Any:
        """The early-exit rule the heads' certificate vouches for."""
        heads = self.heads
        cert = None if heads is None else heads.certificate
        info = {} if heads is None else heads.training_info.get("early_exit", {})
        if cert is None or not info:
            raise StopwiseError(
                "mode='early_exit' needs a rule: pass rule=stopwise.MaxProb(lam=...) or calibrate the heads "
                "(`stopwise decoder calibrate`) so that a certified rule is saved with them."
            )
        from stopwise.core.rules import Never, rule_from_config
        from stopwise.decoder.calibrate import certified_lam

        lam = certified_lam(cert, info["grid"])
        return Never() if lam is None else rule_from_config({**info["rule"], "lam": lam})

    def stream(self, prompt: Prompt, **kwargs: Any) -> Iterator[str]:
        """Yield the text of each token as it is committed; the final statistics go to ``self.last``."""
        q: queue.Queue[Any] = queue.Queue()
        done = object()

        def work() -> None:
            try:
                self.last = self.generate(prompt, on_token=lambda row, text: q.put(text), **kwargs)
            except BaseException as exc:  # re-raised in the consumer
                q.put(exc)
            finally:
                q.put(done)

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
        thread.join()


def _no_options(mode: str, options: dict[str, Any]) -> None:
    if options:
        raise StopwiseError(f"mode={mode!r} takes no options. Got {sorted(options)}.")


_CACHE: dict[tuple[str, str], Decoder] = {}


def load(model: str = "smollm2", *, heads: str | Path | None = None) -> Decoder:
    """A cached :class:`Decoder` for a model name/path and heads directory."""
    key = (str(model), str(heads))
    if key not in _CACHE:
        _CACHE[key] = Decoder.from_pretrained(model, heads=heads)
    return _CACHE[key]


def generate(prompt: Prompt | list[Prompt], *, model: str = "smollm2", heads: str | Path | None = None,
             **kwargs: Any) -> Generation:
    """One-call generation: ``stopwise.decoder.generate("Hello", mode="speculative", heads=...)``."""
    return load(model, heads=heads).generate(prompt, **kwargs)
