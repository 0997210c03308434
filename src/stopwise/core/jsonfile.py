"""Reading the small JSON files stopwise writes beside weights (heads configs, exit gates)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from stopwise.core.errors import StopwiseError

__all__ = ["read_tagged_json"]


def read_tagged_json(path: Path, *, fmt: str, what: str) -> dict[str, Any]:
    """The JSON object in ``path`` whose ``"format"`` field is ``fmt``; any other file raises a
    :class:`StopwiseError` naming the path (``what`` says what it should have been)."""
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StopwiseError(f"'{path}' is not valid JSON: {exc}") from None
    if not isinstance(body, dict) or body.get("format") != fmt:
        got = body.get("format") if isinstance(body, dict) else None
        raise StopwiseError(f"'{path}' is not {what} (format {got!r}, expected {fmt!r}).")
    return body
