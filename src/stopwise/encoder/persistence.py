"""Where saved exit heads and base models are found: file names, the heads config, bundled names."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from stopwise.core.errors import StopwiseError
from stopwise.core.jsonfile import read_tagged_json

CONFIG_NAME = "stopwise_heads.json"
WEIGHTS_NAME = "heads.safetensors"
CERTIFICATE_NAME = "certificate.json"
FORMAT = "stopwise.encoder.heads"
#: Keys a heads config may hold; others are warned about (written by a newer stopwise?).
CONFIG_KEYS = frozenset({
    "format", "stopwise_version", "base_model", "base_name", "model_type", "n_layers", "hidden_size",
    "pooling", "head", "mlp_hidden", "exit_input", "n_classes", "class_names", "max_length", "heads_sha", "training",
})


def resolve_base(base: Any) -> tuple[str, str]:
    """(loadable path or hub id, short name) for a bundled name, a directory or a hub id."""
    from stopwise.hf import bundled

    if isinstance(base, (str, Path)) and str(base) in bundled.BUNDLED:
        return str(bundled.model_path(str(base))), str(base)
    if isinstance(base, (str, Path)):
        return str(base), Path(str(base)).name or str(base)
    raise StopwiseError(f"The 'base' parameter must be a bundled name {sorted(bundled.BUNDLED)}, a model directory or a model id. Got {base!r} instead.")


def read_config(path: Path) -> dict[str, Any]:
    cfg_path = path / CONFIG_NAME
    if not cfg_path.is_file() or not (path / WEIGHTS_NAME).is_file():
        raise StopwiseError(f"'{path}' does not hold stopwise exit heads ({CONFIG_NAME} and {WEIGHTS_NAME}).")
    cfg = read_tagged_json(cfg_path, fmt=FORMAT, what="a stopwise heads config")
    unknown = sorted(set(cfg) - CONFIG_KEYS)
    if unknown:
        warnings.warn(f"Ignoring unknown keys {unknown} in '{cfg_path}' (written by a newer stopwise?).", UserWarning, stacklevel=3)
    if "class_names" not in cfg:
        raise StopwiseError(f"'{cfg_path}' lacks 'class_names'.")
    return cfg
