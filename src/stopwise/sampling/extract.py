"""Answer extraction: turn a sampled completion into a canonical answer string, or None.

Extraction never raises on model output: whatever cannot be parsed is "no answer" (``None``),
which :func:`stopwise.hash_answers` maps to ``stopwise.NO_ANSWER``. Canonical forms make equal
answers hash equally: ``"1,000"``, ``"1000.0"`` and ``"$1000"`` are all ``"1000"``; ``"6/4"``
is ``"3/2"``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Protocol

from stopwise.core.errors import StopwiseError, check_choice

#: Phrases that introduce a final answer, most specific first (searched case-insensitively).
DEFAULT_MARKERS = ("final answer:", "final answer is", "answer:", "answer is", "####", "=")

_NUMBER = re.compile(
    r"""(?<![\w.])                      # not glued to a word or another number
        ([-+\u2212]?)                   # sign, glued to the number ("87 - 64" is no negative 64)
        \$?
        (\d{1,3}(?:,\d{3})+|\d+)?       # integer part, optionally with thousands separators
        (?:\.(\d+))?                    # decimal part
        (?:\s*/\s*([-+]?\d+))?          # fraction denominator
    """,
    re.VERBOSE,
)
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_LETTER = re.compile(r"(?<![A-Za-z])\(?([A-Z])\)?(?![A-Za-z])")


class Extractor(Protocol):
    """Maps a completion to a canonical answer string, or None when there is none."""

    def __call__(self, text: str) -> str | None: ...


def canonical_number(text: str) -> str | None:
    """The canonical form of the first number in ``text`` (None if there is none).

    Integers print as integers, other rationals as reduced fractions ``p/q`` unless they have a
    short exact decimal form, which is printed instead (``0.25``). Division by zero is no answer.
    """
    for match in _NUMBER.finditer(text):
        sign, whole, frac, denom = match.groups()
        if whole is None and frac is None:
            continue
        try:
            value = Fraction(int((whole or "0").replace(",", "")))
            if frac:
                value += Fraction(int(frac), 10 ** len(frac))
            if denom is not None:
                value /= int(denom)
        except (ValueError, ZeroDivisionError):
            return None
        if sign in ("-", "\u2212"):
            value = -value
        return format_fraction(value)
    return None


def format_fraction(value: Fraction) -> str:
    """``Fraction(3, 1)`` -> "3", ``Fraction(1, 4)`` -> "0.25", ``Fraction(2, 7)`` -> "2/7"."""
    if value.denominator == 1:
        return str(value.numerator)
    den = value.denominator
    # Exact short decimals (denominator 2^a 5^b) read better as decimals; others stay fractions.
    while den % 2 == 0:
        den //= 2
    while den % 5 == 0:
        den //= 5
    if den == 1:
        text = f"{float(value):.12f}".rstrip("0").rstrip(".")
        if Fraction(text) == value:
            return text
    return f"{value.numerator}/{value.denominator}"


def _after_marker(text: str, markers: Sequence[str]) -> str | None:
    """The text after the last occurrence of the most specific marker present, if any."""
    lower = text.lower()
    for marker in markers:
        pos = lower.rfind(marker.lower())
        if pos >= 0:
            return text[pos + len(marker) :]
    return None


class NumberExtractor:
    """A number: from ``\\boxed{...}``, else after a final-answer marker, else (optionally) the
    last number in the text. Units, currency signs and thousands separators are dropped."""

    def __init__(self, *, markers: Sequence[str] = DEFAULT_MARKERS, fallback_last: bool = True) -> None:
        self.markers = tuple(markers)
        self.fallback_last = bool(fallback_last)

    def __call__(self, text: str) -> str | None:
        if not isinstance(text, str) or not text.strip():
            return None
        boxed = _BOXED.findall(text)
        if boxed:
            return canonical_number(boxed[-1])
        tail = _after_marker(text, self.markers)
        if tail is not None:
            found = canonical_number(tail.split("\n\n")[0])
            if found is not None:
                return found
        if not self.fallback_last:
            return None
        last = None
        for line in text.splitlines():
            for match in _NUMBER.finditer(line):
                if match.group(2) is not None or match.group(3) is not None:
                    last = match.group(0)
        return None if last is None else canonical_number(last)


class ChoiceExtractor:
    """A multiple-choice letter among ``choices`` (default A-E), preferring one after a marker."""

    def __init__(self, *, choices: str = "ABCDE", markers: Sequence[str] = DEFAULT_MARKERS) -> None:
        if not choices or not choices.isalpha():
            raise StopwiseError(f"The 'choices' parameter of ChoiceExtractor must be letters such as 'ABCD'. Got {choices!r} instead.")
        self.choices = choices.upper()
        self.markers = tuple(markers)

    def __call__(self, text: str) -> str | None:
        if not isinstance(text, str):
            return None
        tail = _after_marker(text, self.markers)
        for part in ([tail] if tail is not None else []) + [text]:
            letters = [m for m in _LETTER.findall(part) if m in self.choices]
            if letters:
                return str(letters[0] if part is tail else letters[-1])
        return None


class StringExtractor:
    """The exact string after a marker (or the whole text), stripped, lower-cased, first line."""

    def __init__(self, *, markers: Sequence[str] = DEFAULT_MARKERS, lower: bool = True) -> None:
        self.markers = tuple(markers)
        self.lower = bool(lower)

    def __call__(self, text: str) -> str | None:
        if not isinstance(text, str):
            return None
        tail = _after_marker(text, self.markers)
        part = text if tail is None else tail
        line = part.strip().split("\n")[0].strip().rstrip(".").strip()
        if not line:
            return None
        return line.lower() if self.lower else line


class MarkerExtractor:
    """Only what follows an explicit final-answer marker, parsed by ``inner`` (no marker: None)."""

    def __init__(self, *, markers: Sequence[str] = ("final answer:", "answer:"), inner: Extractor | None = None) -> None:
        self.markers = tuple(markers)
        self.inner = inner or StringExtractor(markers=())

    def __call__(self, text: str) -> str | None:
        if not isinstance(text, str):
            return None
        tail = _after_marker(text, self.markers)
        return None if tail is None else self.inner(tail)


EXTRACTORS: dict[str, Callable[[], Extractor]] = {
    "number": NumberExtractor,
    "choice": ChoiceExtractor,
    "string": StringExtractor,
    "marker": MarkerExtractor,
}


def make_extractor(kind: str | Extractor) -> Extractor:
    """An extractor by name ("number", "choice", "string", "marker") or a callable as is."""
    if callable(kind) and not isinstance(kind, str):
        return kind
    name = check_choice(kind, "extract", "make_extractor", tuple(EXTRACTORS))
    return EXTRACTORS[name]()


def safe_extract(extractor: Extractor, text: str | None) -> str | None:
    """Run a (possibly user-written) extractor; anything it cannot handle is no answer."""
    if text is None:
        return None
    try:
        answer = extractor(text)
    except Exception:  # noqa: BLE001 - user extractors must not crash a sampling run
        return None
    if answer is None:
        return None
    answer = str(answer).strip()
    return answer or None
