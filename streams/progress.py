"""Where each stage is: what it finished, what it holds, how far behind it is.

Positions are recorded when a batch is *done* (its Kafka outputs durable; a
stage that writes the store acks it at its next checkpoint, within
``checkpoint_s``), never when it is taken, so lag counts everything not yet
processed. Lag is
reported two ways, because a message count alone hides a backlog when one
internal message carries hundreds of events:

* in events: messages behind x the stage's average events per message;
* in seconds: the age (Kafka timestamp) of the oldest message the stage took
  and has not finished; with nothing in hand but input waiting, the time since
  the stage last finished a batch.

``/healthz`` uses the same bookkeeping: a stage that holds one batch longer than
``stall_s`` (a store or broker that keeps failing) or finishes nothing for that
long while its input waits is unhealthy.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class StageProgress:
    name: str
    topics: tuple[str, ...]
    # monotonic time the batch in hand was taken, None when idle
    busy_since: float | None = None
    # Kafka timestamp (unix seconds) of the oldest message in hand
    oldest_in_hand: float | None = None
    last_done: float = field(default_factory=time.monotonic)
    positions: dict[tuple[str, int], int] = field(default_factory=dict)
    events_per_message: float = 1.0
    # messages behind, per input partition, as last measured against the high watermarks
    behind: dict[tuple[str, int], int] = field(default_factory=dict)
    # Kafka timestamp (unix seconds) of the last message finished, per input partition
    done_ts: dict[tuple[str, int], float] = field(default_factory=dict)
    # committed offset per input partition where nothing was finished since start
    committed: dict[tuple[str, int], int] = field(default_factory=dict)
    # monotonic time the running checkpoint began (store flush, snapshot, commit), None when none runs
    checkpoint_since: float | None = None

    def begin(self, batch: list[Any]) -> None:
        self.busy_since = time.monotonic()
        stamps = [e.message.timestamp for e in batch if e.message.timestamp]
        self.oldest_in_hand = min(stamps) if stamps else time.time()

    def done(self, batch: list[Any], events: int) -> None:
        for e in batch:
            m = e.message
            self.positions[(m.topic, m.partition)] = m.offset
            if m.timestamp:
                self.done_ts[(m.topic, m.partition)] = m.timestamp
        if batch:
            # a moving average: lag in events follows the current mix of message sizes
            per = max(events, 1) / len(batch)
            self.events_per_message = 0.8 * self.events_per_message + 0.2 * per
        self.busy_since = None
        self.oldest_in_hand = None
        self.last_done = time.monotonic()

    def waiting_since(self, tp: tuple[str, int], high: int | None) -> float | None:
        """A lower bound of the wall time at which input of ``tp`` still waiting was written:
        None when nothing waits, -inf when that is not known yet (not fetched, not measured)."""
        if self.oldest_in_hand is not None:
            return self.oldest_in_hand
        done = self.positions.get(tp)
        next_offset = done + 1 if done is not None else self.committed.get(tp)
        if high is None or next_offset is None:
            return -math.inf
        if high <= next_offset:
            return None
        # what waits was written after what was finished last (offsets follow append order)
        return self.done_ts.get(tp, -math.inf)

    def forget(self, tps: set[tuple[str, int]]) -> None:
        for book in (self.positions, self.done_ts, self.committed, self.behind):
            for tp in tps:
                book.pop(tp, None)  # type: ignore[attr-defined]

    def messages_behind(self) -> int:
        return sum(self.behind.values())

    def lag_seconds(self) -> float:
        if self.oldest_in_hand is not None:
            return max(0.0, time.time() - self.oldest_in_hand)
        if self.messages_behind() > 0:
            return time.monotonic() - self.last_done
        return 0.0

    def stalled(self, stall_s: float) -> str | None:
        """Why this stage is unhealthy, or None."""
        now = time.monotonic()
        if self.busy_since is not None and now - self.busy_since > stall_s:
            return f"{self.name}: one batch in hand for {now - self.busy_since:.0f}s (outputs not durable)"
        if self.checkpoint_since is not None and now - self.checkpoint_since > stall_s:
            return (f"{self.name}: finished batches in hand for {now - self.checkpoint_since:.0f}s, "
                    "their checkpoint failing (store rows or state snapshot not durable)")
        if self.busy_since is None and self.messages_behind() > 0 and now - self.last_done > stall_s:
            return (f"{self.name}: {self.messages_behind()} messages waiting and no batch finished "
                    f"for {now - self.last_done:.0f}s")
        return None
