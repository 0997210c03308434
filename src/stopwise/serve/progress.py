"""Requests answered as their rows finish, while the rest of their batch still runs.

Issue #41 asks that a batch of many clients' requests run layer by layer with exits leaving it,
each request answered when *its* rows are done rather than when the batch's slowest row is, and
that rows of a client that left be dropped rather than computed to the end. The model thread
reports through a :class:`BatchProgress`; the event loop settles the requests' futures.
"""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import Sequence
from typing import Any

import numpy as np

from stopwise.core.errors import StopwiseError


def settle(fut: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    """Resolve ``fut`` unless it already is (its client may have cancelled it): event loop only."""
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


class BatchProgress:
    """A running batch, as a progressive ``run_batch`` sees it from the model thread.

    ``requests`` are (future, number of texts) in the batch's order, ``policy`` what each answer is
    paired with. :meth:`answered` takes rows of the batch (indices into its texts) with their
    answers as the model finishes them; a request whose rows are all answered is settled with
    ``(policy, its answers in order)`` on the event loop at once (``call_soon_threadsafe``), not when
    the batch's slowest row is. :attr:`cancelled` holds the rows of requests withdrawn since the batch
    started, for the model to stop computing; the event loop rebinds it to a new array and never
    changes one in place, so the model thread reads either the old rows or the new ones, without
    a lock. :meth:`dropped` counts the rows the model did drop.
    """

    def __init__(self, requests: Sequence[tuple[asyncio.Future[Any], int]], policy: Any,
                 loop: asyncio.AbstractEventLoop) -> None:
        self._futures = [fut for fut, _ in requests]
        self._policy, self._loop = policy, loop
        self._starts = [0]
        for _, n in requests:
            self._starts.append(self._starts[-1] + int(n))
        self._answers: list[list[Any]] = [[None] * int(n) for _, n in requests]
        self._left = [int(n) for _, n in requests]
        self.cancelled: np.ndarray = np.zeros(0, dtype=np.int64)
        self.rows_dropped = 0

    def answered(self, rows: Sequence[int] | np.ndarray, answers: Sequence[Any]) -> None:
        """Rows of the batch and their answers, each row once (model thread)."""
        for row, answer in zip(np.asarray(rows).tolist(), answers, strict=True):
            j = bisect.bisect_right(self._starts, row) - 1
            if not 0 <= j < len(self._futures) or self._left[j] == 0:
                raise StopwiseError(f"Row {row} is not a row of this batch of {self._starts[-1]} texts still "
                                    "waiting for its answer.")
            self._answers[j][row - self._starts[j]] = answer
            self._left[j] -= 1
            if self._left[j] == 0:
                try:
                    self._loop.call_soon_threadsafe(settle, self._futures[j], (self._policy, self._answers[j]), None)
                except RuntimeError:  # the loop closed while the batch ran (shutdown timed out): nobody waits
                    pass

    def dropped(self, n: int) -> None:
        """The model dropped ``n`` cancelled rows before they finished (model thread)."""
        self.rows_dropped += int(n)

    def withdraw(self, index: int) -> None:
        """The request at ``index`` left: its rows join :attr:`cancelled` (event loop)."""
        rows = np.arange(self._starts[index], self._starts[index + 1], dtype=np.int64)
        self.cancelled = np.concatenate([self.cancelled, rows])
