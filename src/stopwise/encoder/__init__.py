"""Early exit for Hugging Face encoders (and decoder LLMs used as classifier backbones).

Importing this package does not import torch; the classes load it on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["EarlyExitClassifier", "Encoded", "Prediction", "Backbone"]

_LAZY = {
    "EarlyExitClassifier": "stopwise.encoder.model",
    "Encoded": "stopwise.encoder.model",
    "Prediction": "stopwise.encoder.model",
    "Backbone": "stopwise.encoder.backbone",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'stopwise.encoder' has no attribute {name!r}")
