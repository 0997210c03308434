"""Traces: what every stage of a computation predicted, how sure it was, and what it cost.

A trace holds n inputs by K stages (layers, tokens, samples, epochs, stream prefixes).
Stages are a prefix per input: input i has ``lengths[i]`` stages, the rest are masked.
Costs are cumulative: ``cost[i, k]`` is what it costs to have run stages 0..k.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stopwise._version import __version__
from stopwise.core.errors import StopwiseError, TraceFormatError
from stopwise.core.stage import NO_ANSWER, BoolArray, FloatArray, IntArray, StageBatch, hash_answers

SCHEMA_VERSION = 1
FORMAT_NAME = "stopwise.trace"

__all__ = [
    "FORMAT_NAME", "NO_ANSWER", "SCHEMA_VERSION", "BoolArray", "FloatArray", "IntArray", "StageBatch", "Trace",
    "hash_answers",
]
def _as_2d(name: str, value: Any, shape: tuple[int, int], dtype: Any) -> np.ndarray:
    arr = np.asarray(value, dtype=dtype)
    if arr.shape != shape:
        raise StopwiseError(
            f"The '{name}' array of Trace must have shape {shape} (n inputs, K stages). "
            f"Got shape {arr.shape} instead."
        )
    return arr


@dataclass(frozen=True, eq=False)
class Trace:
    """Per-input, per-stage predictions with confidence signals and costs.

    Args:
        predictions: (n, K) int class ids or hashed answers per stage.
        reference: (n,) the full-compute prediction; defaults to each input's last stage.
        mask: (n, K) bool, True where a stage exists; each row must be a non-empty prefix.
        cost: (K,) shared or (n, K) per-input cumulative cost; defaults to 1, 2, ..., K.
        probs: optional (n, K, C) class probabilities per stage.
        signals: optional named (n, K) float confidence signals (e.g. "saturation").
        labels: optional (n,) ground-truth labels.
        stage_names: optional K names ("layer_1", ...).
        meta: free-form JSON-serialisable metadata (source model, task, ...).
    """

    predictions: IntArray
    reference: IntArray | None = None
    mask: BoolArray | None = None
    cost: FloatArray | None = None
    probs: FloatArray | None = None
    signals: Mapping[str, FloatArray] = field(default_factory=dict)
    labels: IntArray | None = None
    stage_names: tuple[str, ...] | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        preds = np.asarray(self.predictions)
        if preds.ndim != 2 or preds.shape[1] == 0:
            raise StopwiseError(
                "The 'predictions' array of Trace must be 2-D (n inputs, K >= 1 stages). "
                f"Got shape {preds.shape} instead."
            )
        if not np.issubdtype(preds.dtype, np.integer):
            raise StopwiseError(
                "The 'predictions' array of Trace must hold integer class ids or hashed answers "
                f"(see stopwise.hash_answers). Got dtype {preds.dtype} instead."
            )
        n, k = preds.shape
        set_ = object.__setattr__
        set_(self, "predictions", preds.astype(np.int64, copy=False))
        mask = np.ones((n, k), bool) if self.mask is None else _as_2d("mask", self.mask, (n, k), bool)
        lengths = mask.sum(axis=1)
        prefix = np.arange(k)[None, :] < lengths[:, None]
        if n and (not np.array_equal(mask, prefix) or lengths.min() < 1):
            bad = int(np.flatnonzero((mask != prefix).any(axis=1) | (lengths < 1))[0])
            raise StopwiseError(
                "The 'mask' array of Trace must mark a non-empty prefix of stages per input "
                f"(stages exist from 0 up to that input's last). Row {bad} is {mask[bad].astype(int).tolist()}."
            )
        set_(self, "mask", mask)
        set_(self, "_lengths", lengths.astype(np.int64))
        set_(self, "cost", self._check_cost(n, k))
        ref = self.predictions[np.arange(n), lengths - 1] if self.reference is None else self.reference
        set_(self, "reference", self._check_vector("reference", ref, n))
        if self.labels is not None:
            set_(self, "labels", self._check_vector("labels", self.labels, n))
        set_(self, "probs", self._check_probs(n, k))
        sig = {str(name): _as_2d(f"signals[{name!r}]", v, (n, k), np.float64) for name, v in self.signals.items()}
        for name, v in sig.items():
            if not np.isfinite(v[mask]).all():
                raise StopwiseError(f"Signal {name!r} of Trace holds NaN or inf on existing stages.")
        set_(self, "signals", sig)
        if self.stage_names is not None:
            names = tuple(str(s) for s in self.stage_names)
            if len(names) != k:
                raise StopwiseError(f"Trace has {k} stages but 'stage_names' has {len(names)} entries.")
            set_(self, "stage_names", names)
        set_(self, "meta", dict(self.meta))

    # -- validation helpers -------------------------------------------------------------
    def _check_vector(self, name: str, value: Any, n: int) -> IntArray:
        arr = np.asarray(value)
        if arr.shape != (n,) or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise StopwiseError(
                f"The '{name}' array of Trace must be {n} integers (one per input). "
                f"Got shape {arr.shape} and dtype {arr.dtype} instead."
            )
        return arr.astype(np.int64, copy=False)

    def _check_cost(self, n: int, k: int) -> FloatArray:
        if self.cost is None:
            return np.arange(1, k + 1, dtype=np.float64)
        cost = np.asarray(self.cost, dtype=np.float64)
        if cost.shape not in ((k,), (n, k)):
            raise StopwiseError(
                f"The 'cost' array of Trace must have shape ({k},) (shared) or ({n}, {k}) "
                f"(per input), cumulative over stages. Got shape {cost.shape} instead."
            )
        if not np.isfinite(cost).all() or (cost < 0).any():
            raise StopwiseError("The 'cost' array of Trace must be finite and non-negative.")
        if (np.diff(cost, axis=-1) < 0).any():
            raise StopwiseError("The 'cost' array of Trace must be cumulative (non-decreasing over stages).")
        return cost

    def _check_probs(self, n: int, k: int) -> FloatArray | None:
        if self.probs is None:
            return None
        probs = np.asarray(self.probs)
        if probs.ndim != 3 or probs.shape[:2] != (n, k) or probs.shape[2] < 2:
            raise StopwiseError(
                f"The 'probs' array of Trace must have shape ({n}, {k}, C) with C >= 2 classes. "
                f"Got shape {probs.shape} instead."
            )
        if not np.issubdtype(probs.dtype, np.floating):
            probs = probs.astype(np.float32)
        live = probs[self.mask]
        if not np.isfinite(live).all():
            assert self.mask is not None
            i, s = np.argwhere(~np.isfinite(probs).all(axis=2) & self.mask)[0]
            raise StopwiseError(f"The 'probs' array of Trace holds NaN or inf at input {i}, stage {s}.")
        sums = live.sum(axis=1, dtype=np.float64)
        if live.size and ((live < 0).any() or np.abs(sums - 1.0).max() > 1e-3):
            raise StopwiseError(
                "The 'probs' array of Trace must hold probability vectors (non-negative, summing to 1 "
                f"over the last axis). Sums range from {sums.min():.4g} to {sums.max():.4g}."
            )
        return probs

    # -- shape and views -----------------------------------------------------------------
    @property
    def n(self) -> int:
        return int(self.predictions.shape[0])

    @property
    def n_stages(self) -> int:
        return int(self.predictions.shape[1])

    def __len__(self) -> int:
        return self.n

    @property
    def lengths(self) -> IntArray:
        """Number of existing stages per input (computed once: traces are immutable)."""
        lengths: IntArray = self.__dict__["_lengths"]
        return lengths

    @property
    def cost_matrix(self) -> FloatArray:
        """(n, K) cumulative cost, a broadcast view when cost is shared."""
        assert self.cost is not None
        out: FloatArray = np.broadcast_to(self.cost, (self.n, self.n_stages))
        return out

    @property
    def full_cost(self) -> FloatArray:
        """Cost of running every existing stage of each input."""
        out: FloatArray = self.cost_matrix[np.arange(self.n), self.lengths - 1]
        return out

    def cost_at(self, halt: IntArray) -> FloatArray:
        out: FloatArray = self.cost_matrix[np.arange(self.n), halt]
        return out

    def predictions_at(self, halt: IntArray) -> IntArray:
        out: IntArray = self.predictions[np.arange(self.n), halt]
        return out

    def stage(self, k: int, rows: IntArray | None = None) -> StageBatch:
        """The column for stage k (for the rows given), as an online stopper would see it."""
        sel: Any = slice(None) if rows is None else rows
        return StageBatch(
            index=k,
            predictions=self.predictions[sel, k],
            probs=None if self.probs is None else self.probs[sel, k].astype(np.float64),
            signals={name: v[sel, k] for name, v in self.signals.items()},
            cost=self.cost_matrix[sel, k],
        )

    @property
    def full(self) -> bool:
        """True when every input has all K stages (no masked stages)."""
        if "_full" not in self.__dict__:
            object.__setattr__(self, "_full", bool(self.lengths.min(initial=self.n_stages) == self.n_stages))
        return bool(self.__dict__["_full"])

    # -- selection -----------------------------------------------------------------------
    def __getitem__(self, index: Any) -> Trace:
        rows = np.arange(self.n)[index]
        if rows.ndim == 0:
            rows = rows[None]
        assert self.cost is not None and self.reference is not None
        return Trace(
            predictions=self.predictions[rows],
            reference=self.reference[rows],
            mask=None if self.mask is None else self.mask[rows],
            cost=self.cost if self.cost.ndim == 1 else self.cost[rows],
            probs=None if self.probs is None else self.probs[rows],
            signals={k: v[rows] for k, v in self.signals.items()},
            labels=None if self.labels is None else self.labels[rows],
            stage_names=self.stage_names,
            meta=self.meta,
        )

    def split(self, first: float | int, *, seed: int) -> tuple[Trace, Trace]:
        """Random split into (first, rest); ``first`` is a fraction in (0, 1) or a count."""
        head, rest = self.split_rows(first, seed=seed)
        return self[head], self[rest]

    def split_rows(self, first: float | int, *, seed: int) -> tuple[IntArray, IntArray]:
        """The sorted row indices of :meth:`split`'s two parts (to split data kept beside the trace)."""
        if isinstance(first, float) and 0.0 < first < 1.0:
            count = int(round(first * self.n))
        elif isinstance(first, int) and not isinstance(first, bool) and 0 < first < self.n:
            count = first
        else:
            raise StopwiseError(
                f"The 'first' parameter of Trace.split must be a fraction in (0, 1) or a count in "
                f"[1, {self.n - 1}]. Got {first!r} instead."
            )
        perm = np.random.default_rng(seed).permutation(self.n)
        return np.sort(perm[:count]), np.sort(perm[count:])

    @staticmethod
    def concat(traces: Sequence[Trace]) -> Trace:
        """Stack traces with the same stages (row-wise)."""
        if not traces:
            raise StopwiseError("Trace.concat needs at least one trace. Got an empty sequence.")
        first = traces[0]
        for t in traces[1:]:
            if t.n_stages != first.n_stages or set(t.signals) != set(first.signals):
                raise StopwiseError(
                    "Trace.concat needs traces with the same number of stages and signals. Got "
                    f"{first.n_stages} stages {sorted(first.signals)} and {t.n_stages} stages {sorted(t.signals)}."
                )
            if (t.probs is None) != (first.probs is None) or (t.labels is None) != (first.labels is None):
                raise StopwiseError("Trace.concat needs all traces to have probs and labels, or none to.")
        shared = all(t.cost is not None and t.cost.ndim == 1 for t in traces) and all(
            np.array_equal(t.cost, first.cost) for t in traces  # type: ignore[arg-type]
        )

        def cat(arrays: Iterable[Any]) -> Any:
            return np.concatenate(list(arrays), axis=0)

        return Trace(
            predictions=cat(t.predictions for t in traces),
            reference=cat(t.reference for t in traces),
            mask=cat(t.mask for t in traces),
            cost=first.cost if shared else cat(t.cost_matrix for t in traces),
            probs=None if first.probs is None else cat(t.probs for t in traces),
            signals={k: cat(t.signals[k] for t in traces) for k in first.signals},
            labels=None if first.labels is None else cat(t.labels for t in traces),
            stage_names=first.stage_names,
            meta=first.meta,
        )

    # -- identity and persistence --------------------------------------------------------
    def fingerprint(self) -> str:
        """A sha256 of the arrays that calibration reads; equal traces give equal fingerprints."""
        h = hashlib.sha256()
        for name, arr in self._arrays().items():
            h.update(name.encode())
            h.update(str(arr.shape).encode())
            h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()[:16]

    def _arrays(self) -> dict[str, np.ndarray]:
        arrays: dict[str, np.ndarray] = {
            "predictions": self.predictions,
            "reference": self.reference,  # type: ignore[dict-item]
            "mask": self.mask,  # type: ignore[dict-item]
            "cost": self.cost,  # type: ignore[dict-item]
        }
        if self.probs is not None:
            arrays["probs"] = self.probs
        if self.labels is not None:
            arrays["labels"] = self.labels
        for name in sorted(self.signals):
            arrays[f"signal::{name}"] = self.signals[name]
        return arrays

    def save(self, path: str | Path) -> Path:
        """Write a compressed ``.npz`` holding the arrays and a JSON header."""
        path = Path(path)
        header = {
            "format": FORMAT_NAME,
            "schema_version": SCHEMA_VERSION,
            "stopwise_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "stage_names": list(self.stage_names) if self.stage_names else None,
            "meta": self.meta,
        }
        blob = np.frombuffer(json.dumps(header, sort_keys=True).encode(), dtype=np.uint8)
        with open(path, "wb") as fh:
            np.savez_compressed(fh, __header__=blob, **self._arrays())  # type: ignore[arg-type]
        return path

    @classmethod
    def load(cls, path: str | Path) -> Trace:
        """Read a trace written by :meth:`save`, checking that it is one and its schema version."""
        path = Path(path)
        if not path.is_file():
            raise TraceFormatError(f"Trace file '{path}' does not exist.")
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as exc:
            raise TraceFormatError(
                f"'{path}' is not a readable stopwise trace (.npz written by Trace.save); it may be "
                f"truncated or another kind of file: {exc}"
            ) from None
        if "__header__" not in arrays:
            raise TraceFormatError(f"'{path}' is an .npz file but not a stopwise trace (no header).")
        try:
            header = json.loads(arrays.pop("__header__").tobytes().decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TraceFormatError(f"'{path}' has a corrupt trace header: {exc}") from None
        if header.get("format") != FORMAT_NAME:
            raise TraceFormatError(f"'{path}' is not a stopwise trace (format {header.get('format')!r}).")
        version = header.get("schema_version")
        if version != SCHEMA_VERSION:
            raise TraceFormatError(
                f"'{path}' has trace schema version {version!r}; this stopwise {__version__} reads "
                f"schema version {SCHEMA_VERSION}. Re-record the trace or use a matching stopwise."
            )
        meta = dict(header.get("meta") or {})
        meta.setdefault("created", header.get("created"))
        try:
            return cls(
                predictions=arrays["predictions"],
                reference=arrays["reference"],
                mask=arrays["mask"],
                cost=arrays["cost"],
                probs=arrays.get("probs"),
                labels=arrays.get("labels"),
                signals={k.split("::", 1)[1]: v for k, v in arrays.items() if k.startswith("signal::")},
                stage_names=tuple(header["stage_names"]) if header.get("stage_names") else None,
                meta=meta,
            )
        except KeyError as exc:
            raise TraceFormatError(f"'{path}' lacks the trace array {exc}.") from None

    def __repr__(self) -> str:
        extras = [name for name in ("probs", "labels") if getattr(self, name) is not None]
        extras += [f"signal:{s}" for s in self.signals]
        return f"Trace(n={self.n}, stages={self.n_stages}, with={extras}, meta={dict(self.meta)})"
