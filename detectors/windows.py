"""Event-time window machinery shared by every detector.

Everything here is driven by event time (seconds since the epoch as floats)
and by a watermark: the point in event time before which no more events are
expected, i.e. the highest event time seen minus the allowed lateness. The
live worker also advances the watermark from the wall clock when traffic
stops, so windows close and absence timers fire with no further events; replay
advances it to infinity at end of input.

No detector keeps its own copy of a window: they compose these pieces.
"""

from __future__ import annotations

import heapq
import math
from bisect import insort
from collections import deque
from dataclasses import dataclass, field
from typing import Generic, Hashable, Iterator, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

FOREVER = math.inf


@dataclass(slots=True)
class Watermark:
    """Highest event time seen, and how late an event may be and still count."""

    allowed_lateness_s: float
    max_event_ts: float = -math.inf
    # an external clock (wall time in the live worker, +inf at end of replay)
    floor: float = -math.inf
    late_events: int = 0
    # processing time at which max_event_ts was reached (live worker only)
    wall_at_max: float | None = None

    @property
    def value(self) -> float:
        return max(self.max_event_ts - self.allowed_lateness_s, self.floor)

    def observe(self, ts: float, wall: float | None = None) -> bool:
        """Record an event time; return False when the event is later than allowed."""
        on_time = ts >= self.value
        if not on_time:
            self.late_events += 1
        if ts >= self.max_event_ts:
            self.max_event_ts = ts
            self.wall_at_max = wall
        return on_time

    def idle_advance(self, wall_now: float) -> None:
        """Let event time run on at the speed of the wall clock since the newest event.

        This is what closes windows and fires absence timers when traffic stops,
        and it works the same for live events and for recorded ones replayed
        through the worker with old timestamps.
        """
        if self.wall_at_max is not None:
            elapsed = max(0.0, wall_now - self.wall_at_max)
            self.advance_to(self.max_event_ts + elapsed - self.allowed_lateness_s)

    def advance_to(self, ts: float) -> None:
        """Move the watermark forward from outside (wall clock, end of input)."""
        if ts > self.floor:
            self.floor = ts


@dataclass(order=True, slots=True)
class _Entry(Generic[V]):
    ts: float
    seq: int
    item: V = field(compare=False)


class SlidingWindow(Generic[K, V]):
    """Per-key items of the last ``size_s`` seconds of event time.

    Items may arrive out of order; they are kept sorted by event time, and the
    window of a key is anchored at the newest item seen for that key, so a late
    item cannot evict newer ones.
    """

    def __init__(self, size_s: float) -> None:
        self.size_s = size_s
        self._items: dict[K, list[_Entry[V]]] = {}
        self._seq = 0

    def add(self, key: K, ts: float, item: V) -> list[V]:
        """Add an item; return the items of that key now in the window (oldest first)."""
        entries = self._items.setdefault(key, [])
        self._seq += 1
        entry = _Entry(ts, self._seq, item)
        if not entries or ts >= entries[-1].ts:
            entries.append(entry)
        else:
            insort(entries, entry)
        horizon = entries[-1].ts - self.size_s
        drop = 0
        while drop < len(entries) and entries[drop].ts <= horizon:
            drop += 1
        if drop:
            del entries[:drop]
        return [e.item for e in entries]

    def items(self, key: K) -> list[V]:
        return [e.item for e in self._items.get(key, ())]

    def clear(self, key: K) -> None:
        self._items.pop(key, None)

    def expire(self, watermark: float) -> int:
        """Forget keys whose newest item fell out of the window before the watermark."""
        dead = [k for k, es in self._items.items() if not es or es[-1].ts <= watermark - self.size_s]
        for k in dead:
            del self._items[k]
        return len(dead)

    def __len__(self) -> int:
        return len(self._items)


class Streak(Generic[K]):
    """Consecutive occurrences per key, reset by a success (e.g. failures in a row)."""

    def __init__(self) -> None:
        self._count: dict[K, int] = {}
        self._members: dict[K, deque[object]] = {}

    def hit(self, key: K, member: object, keep: int = 64) -> int:
        self._count[key] = self._count.get(key, 0) + 1
        self._members.setdefault(key, deque(maxlen=keep)).append(member)
        return self._count[key]

    def reset(self, key: K) -> None:
        self._count.pop(key, None)
        self._members.pop(key, None)

    def count(self, key: K) -> int:
        return self._count.get(key, 0)

    def members(self, key: K) -> list[object]:
        return list(self._members.get(key, ()))


class TumblingSum(Generic[K]):
    """Per-key sums over fixed, aligned event-time buckets (e.g. tokens per minute).

    ``close(watermark)`` yields every bucket whose end the watermark has passed,
    in time order per key, so a quiet minute is still reported once a later one
    closes it and a detector can treat an empty bucket as a zero.
    """

    def __init__(self, size_s: float) -> None:
        self.size_s = size_s
        self._buckets: dict[K, dict[int, float]] = {}

    def bucket_of(self, ts: float) -> int:
        return int(ts // self.size_s)

    def add(self, key: K, ts: float, amount: float) -> float:
        b = self.bucket_of(ts)
        per_key = self._buckets.setdefault(key, {})
        per_key[b] = per_key.get(b, 0.0) + amount
        return per_key[b]

    def current(self, key: K, ts: float) -> float:
        return self._buckets.get(key, {}).get(self.bucket_of(ts), 0.0)

    def close(self, watermark: float) -> Iterator[tuple[K, int, float]]:
        """Yield (key, bucket, total) for buckets that ended at or before the watermark."""
        for key in list(self._buckets):
            per_key = self._buckets[key]
            for b in sorted(per_key):
                if (b + 1) * self.size_s > watermark:
                    break
                yield key, b, per_key.pop(b)
            if not per_key:
                del self._buckets[key]


@dataclass(slots=True)
class MovingBaseline:
    """Exponentially weighted mean and variance of a per-period quantity."""

    alpha: float = 0.2
    mean: float = 0.0
    var: float = 0.0
    samples: int = 0

    def update(self, x: float) -> None:
        if self.samples == 0:
            self.mean, self.var = x, 0.0
        else:
            diff = x - self.mean
            incr = self.alpha * diff
            self.mean += incr
            self.var = (1 - self.alpha) * (self.var + diff * incr)
        self.samples += 1

    @property
    def std(self) -> float:
        return math.sqrt(max(self.var, 0.0))


@dataclass(order=True, slots=True)
class Timer:
    fire_at: float
    seq: int
    key: Hashable = field(compare=False)
    payload: object = field(compare=False, default=None)


class TimerQueue:
    """Event-time timers: fire when the watermark passes them, even with no new events.

    Re-arming a key replaces its earlier timer (the stale heap entry is skipped
    when it surfaces), which is what absence patterns need: "fire unless X
    arrives first" becomes "cancel(key) when X arrives".
    """

    def __init__(self) -> None:
        self._heap: list[Timer] = []
        self._live: dict[Hashable, Timer] = {}
        self._seq = 0

    def arm(self, key: Hashable, fire_at: float, payload: object = None) -> None:
        self._seq += 1
        t = Timer(fire_at, self._seq, key, payload)
        self._live[key] = t
        heapq.heappush(self._heap, t)

    def cancel(self, key: Hashable) -> None:
        self._live.pop(key, None)

    def armed(self, key: Hashable) -> bool:
        return key in self._live

    def due(self, watermark: float) -> list[Timer]:
        fired: list[Timer] = []
        while self._heap and self._heap[0].fire_at <= watermark:
            t = heapq.heappop(self._heap)
            if self._live.get(t.key) is t:
                del self._live[t.key]
                fired.append(t)
        return fired

    def __len__(self) -> int:
        return len(self._live)
