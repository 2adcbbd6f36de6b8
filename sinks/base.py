"""Batching sinks: buffer records in memory, write them once per checkpoint.

Modelled on Quix Streams' ``sinks/base`` (``BatchingSink``): ``add`` is called
per record and only appends to a list, ``flush`` is called once per checkpoint
and hands the whole batch to ``write``. Per-record writes to ClickHouse would
cost a round trip (and a part on disk) each; one insert per checkpoint is what
makes the store keep up with the stream.

The delivery contract (DESIGN.md "Processing guarantees"): the caller commits
Kafka offsets only after ``flush`` returns. So ``flush`` either makes the whole
batch durable or raises :class:`~schemas.errors.StoreError` and keeps every
record for the next attempt; nothing is dropped on the error path. A batch that
failed is retried first and unchanged, so a deduplication token derived from
it matches the failed attempt and a write that did land server-side before the
error is not stored twice.

Only transient failures (:class:`~schemas.errors.StoreUnavailable`) keep a
batch for retry. A batch the store rejects for its content
(:class:`~schemas.errors.StoreRejected`: a negative number into a UInt64, rows
spanning more partitions than one insert block may) is split in halves until
the rows that cannot be written are alone; the rest is written and those rows
are handed to the caller (:meth:`take_rejected`) for the DLQ, so one bad row
never stalls the stream behind it.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from schemas.errors import StoreError, StoreRejected

T = TypeVar("T")


class SinkBackpressure(StoreError):
    """The destination is overloaded (too many parts, quota, timeout): slow down.

    Raised by ``write``; ``flush`` keeps the batch and re-raises it, so the
    caller pauses for ``retry_after`` seconds instead of committing. It is a
    StoreError so code that only knows "the store failed, do not commit" needs
    no extra except clause.
    """

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class SinkStats:
    """Counters for metrics and ``agentwatch status``."""

    rows_written: int
    batches_written: int
    failed_flushes: int
    pending: int
    last_flush_seconds: float


class BatchingSink(ABC, Generic[T]):
    """Collect records with :meth:`add`, make them durable with :meth:`flush`.

    Subclasses implement :meth:`write`, which must be all-or-nothing from the
    caller's point of view: return only when the batch is durable, raise
    otherwise. ``add`` may be called from the event loop while ``flush`` runs
    in an executor thread, so the buffer swap is guarded by a lock and flushes
    are serialised (batches are written in the order they were added).
    """

    #: names the destination in errors and metrics (a table, a URL)
    name: str = "sink"

    def __init__(self, *, max_batch: int = 50_000) -> None:
        self.max_batch = max_batch
        self._pending: list[T] = []
        # a batch whose write failed: retried first, unchanged (see module doc)
        self._retry: list[T] = []
        self._buffer_lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._rows_written = 0
        self._batches_written = 0
        self._failed_flushes = 0
        self._last_flush_seconds = 0.0
        self._rejected: list[tuple[T, str]] = []

    @abstractmethod
    def write(self, batch: Sequence[T]) -> None:
        """Make ``batch`` durable, or raise (StoreError / SinkBackpressure)."""

    def add(self, record: T) -> None:
        """Buffer one record; cheap, never touches the destination."""
        with self._buffer_lock:
            self._pending.append(record)

    def extend(self, records: Iterable[T]) -> None:
        with self._buffer_lock:
            self._pending.extend(records)

    @property
    def pending(self) -> int:
        with self._buffer_lock:
            return len(self._pending) + len(self._retry)

    @property
    def should_flush(self) -> bool:
        """The buffer reached ``max_batch``: checkpoint early to bound memory."""
        return self.pending >= self.max_batch

    def flush(self) -> int:
        """Write everything added before this call; return the rows written.

        A batch left by a failed flush is written first and unchanged, then
        the records added since, as a second batch. Raises StoreError (or its
        subclass SinkBackpressure) when a write failed; the unwritten records
        stay buffered and the next flush retries them.
        """
        with self._flush_lock:
            written = 0
            if self._retry:
                written += self._write_retry()
            with self._buffer_lock:
                self._retry, self._pending = self._pending, []
            if self._retry:
                written += self._write_retry()
            return written

    def _write_retry(self) -> int:
        """Write the batch held in ``_retry``; it stays there if the write fails."""
        rejected_before = len(self._rejected)
        try:
            written = self._write_batch(self._retry)
        except BaseException:
            # the whole batch is retried, so rows rejected on this attempt will be again
            del self._rejected[rejected_before:]
            raise
        with self._buffer_lock:
            self._retry = []
        return written

    def take_rejected(self) -> list[tuple[T, str]]:
        """Rows the store refused for their content, with the reason; for the DLQ."""
        rejected, self._rejected = self._rejected, []
        return rejected

    def _write_batch(self, batch: list[T]) -> int:
        try:
            return self._write_once(batch)
        except StoreRejected as exc:
            if len(batch) == 1:
                self._rejected.append((batch[0], str(exc)))
                return 0
        # bisect: both halves are written (or bisected further) before this returns,
        # and a transient failure in either raises with the whole batch kept for retry;
        # halves that did land are deduplicated on the retry by their insert tokens
        mid = len(batch) // 2
        return self._write_batch(batch[:mid]) + self._write_batch(batch[mid:])

    def _write_once(self, batch: list[T]) -> int:
        started = time.perf_counter()
        try:
            self.write(batch)
        except StoreError:
            self._failed_flushes += 1
            raise
        except Exception as exc:
            # a driver exception that escaped the subclass: still a store
            # failure to the caller (do not commit), with the cause chained
            self._failed_flushes += 1
            raise StoreError(f"{self.name}: writing {len(batch)} rows failed: {exc}") from exc
        # BaseException (cancellation, KeyboardInterrupt) propagates as is: the
        # batch is still in _retry, so nothing is lost either way
        self._last_flush_seconds = time.perf_counter() - started
        self._rows_written += len(batch)
        self._batches_written += 1
        return len(batch)

    def stats(self) -> SinkStats:
        return SinkStats(
            rows_written=self._rows_written,
            batches_written=self._batches_written,
            failed_flushes=self._failed_flushes,
            pending=self.pending,
            last_flush_seconds=self._last_flush_seconds,
        )
