"""Decoder LLMs: exit heads on a frozen causal LM, self-speculative and early-exit decoding.

Importing this package does not import torch; the names below load their modules on first use.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "Backbone": "stopwise.decoder.backbone",
    "ExitHeads": "stopwise.decoder.heads",
    "Engine": "stopwise.decoder.engine",
    "Stats": "stopwise.decoder.engine",
    "Decoder": "stopwise.decoder.api",
    "generate": "stopwise.decoder.api",
    "load": "stopwise.decoder.api",
    "train_heads": "stopwise.decoder.train",
    "calibrate_early_exit": "stopwise.decoder.calibrate",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'stopwise.decoder' has no attribute {name!r}")
