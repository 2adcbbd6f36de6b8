"""Event-time window machinery shared by every detector.

Everything here is driven by event time (seconds since the epoch as floats)
and by a watermark: the point in event time before which no more events are
expected, i.e. the highest event time seen minus the allowed lateness. The
live worker also advances the watermark from the wall clock when traffic
stops, so windows close and absence timers fire with no further events; replay
advances it to infinity at end of input.

No detector keeps its own copy of a window: they compose these pieces.

Memory stays bounded by event time, not by traffic: every structure forgets a
key through a deadline kept in a heap (``ExpiryQueue``, ``TimerQueue``), so
closing windows costs the keys that are due, never a scan of every key.

Each structure writes its content to JSON-ready values (``to_state``) and reads
it back (``load_state``) for the detector state snapshots (detectors/state.py).
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from bisect import bisect_right, insort
from collections.abc import Callable, KeysView, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, Hashable, Protocol, TypeVar

from detectors import state as st

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

    def observe(self, ts: float, wall: float | None = None, extra_s: float = 0.0) -> bool:
        """Record an event time; return False when the event is later than allowed
        (plus ``extra_s`` for a source that delivers late by design)."""
        on_time = ts >= self.value - extra_s
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

    def to_state(self) -> dict[str, Any]:
        return {"max": st.enc_num(self.max_event_ts), "floor": st.enc_num(self.floor), "late": self.late_events,
                "wall_at_max": st.enc_opt_num(self.wall_at_max)}

    def load_state(self, d: dict[str, Any]) -> None:
        # the allowed lateness is policy, not state: it stays what the restoring owner set
        self.max_event_ts = st.num(d["max"])
        self.floor = st.num(d["floor"])
        self.late_events = st.integer(d["late"])
        self.wall_at_max = st.opt_num(d["wall_at_max"])


class _Deadlines(Generic[K]):
    """Keys with a deadline in event time; ``due(watermark)`` returns those it passed.

    Built for deadlines that move later as traffic comes (the newest item of a
    window plus its size): moving a deadline later costs one dict write, and the
    queue entry left at the old deadline re-queues the key when it surfaces. So a
    busy key costs about one queue operation per window length, not one per
    event, and expiring costs only the keys that are due. Subclasses are the queue.
    """

    __slots__ = ("_deadline",)

    def __init__(self) -> None:
        self._deadline: dict[K, float] = {}

    def touch(self, key: K, deadline: float) -> None:
        cur = self._deadline.get(key)
        if cur is not None and deadline >= cur:
            if deadline > cur:
                self._deadline[key] = deadline
            return
        self._deadline[key] = deadline
        self._queue(key, deadline)

    def _queue(self, key: K, deadline: float) -> None:
        raise NotImplementedError

    def _settle(self, key: K, watermark: float, out: list[K]) -> None:
        """A queue entry of ``key`` surfaced: due, re-queued at its later deadline, or stale."""
        cur = self._deadline.get(key)
        if cur is None:
            return  # discarded, or expired through an earlier entry
        if cur <= watermark:
            del self._deadline[key]
            out.append(key)
        else:
            self._queue(key, cur)

    def discard(self, key: K) -> None:
        self._deadline.pop(key, None)

    def deadline(self, key: K) -> float | None:
        return self._deadline.get(key)

    def __len__(self) -> int:
        return len(self._deadline)


class ExpiryQueue(_Deadlines[K]):
    """Deadlines (see _Deadlines) whose ``due`` returns keys in deadline order, ties in the
    order they were queued.

    The queue is a heap of distinct deadlines (floats: they compare in C, cheaper than
    tuples) and, per deadline, its keys in queueing order.
    """

    __slots__ = ("_heap", "_at")

    def __init__(self) -> None:
        super().__init__()
        self._heap: list[float] = []
        self._at: dict[float, list[K]] = {}

    def _queue(self, key: K, deadline: float) -> None:
        keys = self._at.get(deadline)
        if keys is None:
            self._at[deadline] = [key]
            heapq.heappush(self._heap, deadline)
        else:
            keys.append(key)

    def due(self, watermark: float) -> list[K]:
        out: list[K] = []
        heap, at = self._heap, self._at
        while heap and heap[0] <= watermark:
            # a key re-queued meanwhile goes to a later deadline, never to this one
            for key in at.pop(heapq.heappop(heap)):
                self._settle(key, watermark, out)
        return out

    def clear(self) -> None:
        self._deadline.clear()
        self._heap.clear()
        self._at.clear()


class Scheduled(Protocol):
    """What DeadlineQueue.schedule keeps a deadline on: the item's own slot, so a key's
    current deadline is one attribute read, not a dict lookup."""

    due_at: float | None


class DeadlineQueue(Generic[K]):
    """Keys queued at deadlines in event time, for an owner that knows each key's current
    deadline: ``pop_due(watermark)`` takes out every entry queued at or before the watermark
    and returns their keys (a key may come more than once, or be gone: the owner checks).

    Deadlines mostly come in order (the newest item of a window plus its size), so an entry
    goes to the back of a FIFO, O(1), when its deadline is not earlier than the last one
    queued there; the few that are (late events) go to a heap. No comparisons of entries in
    the common case, where a heap costs a dozen per key. Keys come out in no particular order.
    """

    __slots__ = ("_fifo", "_heap", "_seq")

    def __init__(self) -> None:
        self._fifo: deque[tuple[float, K]] = deque()
        self._heap: list[tuple[float, int, K]] = []
        self._seq = 0

    def push(self, key: K, deadline: float) -> None:
        fifo = self._fifo
        if not fifo or deadline >= fifo[-1][0]:
            fifo.append((deadline, key))
        else:
            self._seq += 1
            heapq.heappush(self._heap, (deadline, self._seq, key))

    def pop_due(self, watermark: float) -> list[K]:
        out: list[K] = []
        fifo, heap = self._fifo, self._heap
        while fifo and fifo[0][0] <= watermark:
            out.append(fifo.popleft()[1])
        while heap and heap[0][0] <= watermark:
            out.append(heapq.heappop(heap)[2])
        return out

    def schedule(self, key: K, item: Scheduled, deadline: float) -> None:
        """Set ``item``'s (``key``'s) deadline, for owners that keep it in ``item.due_at``: a
        first deadline, or one earlier than it had, is queued; a later one is found when the
        entry queued earlier surfaces in ``pop_due_items`` (as ExpirySet.touch)."""
        if item.due_at is None or deadline < item.due_at:
            self.push(key, deadline)
        item.due_at = deadline

    def pop_due_items(self, watermark: float, items: Mapping[K, Scheduled]) -> list[K]:
        """The keys of ``items`` whose current deadline (``due_at``) the watermark passed, each
        once, their ``due_at`` cleared (no longer queued). Entries of forgotten keys, or of
        deadlines that moved later since, are dropped or queued again at the new deadline."""
        due: list[K] = []
        for key in self.pop_due(watermark):
            item = items.get(key)
            if item is None or item.due_at is None:
                continue  # forgotten, or due through an earlier entry
            if item.due_at <= watermark:
                item.due_at = None
                due.append(key)
            else:  # its deadline moved later since this entry was queued
                self.push(key, item.due_at)
        return due

    def clear(self) -> None:
        self._fifo.clear()
        self._heap.clear()

    def __len__(self) -> int:
        """Entries queued, stale ones included (what the queue holds in memory)."""
        return len(self._fifo) + len(self._heap)


class ExpirySet(_Deadlines[K]):
    """Deadlines (see _Deadlines) for callers that only forget what is due: ``due(watermark)``
    returns the keys whose deadline the watermark passed (each once), in no particular order,
    from a DeadlineQueue."""

    __slots__ = ("_entries",)

    def __init__(self) -> None:
        super().__init__()
        self._entries: DeadlineQueue[K] = DeadlineQueue()

    def _queue(self, key: K, deadline: float) -> None:
        self._entries.push(key, deadline)

    def due(self, watermark: float) -> list[K]:
        out: list[K] = []
        # every entry popped was queued at or before the watermark; one re-queued by _settle
        # goes to its later deadline, past the watermark
        for key in self._entries.pop_due(watermark):
            self._settle(key, watermark, out)
        return out

    def queued(self) -> int:
        """Queue entries, stale ones included (what the queue holds in memory)."""
        return len(self._entries)

    def clear(self) -> None:
        self._deadline.clear()
        self._entries.clear()


# a window's item: (event time, arrival sequence, item). A tuple, not an object: one is built
# per event, and tuples compare in C (the unique sequence breaks ties, so items never compare)
_Entry = tuple[float, int, V]


def _entry_ts(e: tuple[float, int, object]) -> float:
    return e[0]


class SlidingWindow(Generic[K, V]):
    """Per-key items of the last ``size_s`` seconds of event time.

    Items may arrive out of order; they are kept sorted by event time, and the
    window of a key is anchored at the newest item seen for that key, so a late
    item cannot evict newer ones. A key is forgotten once the watermark has
    passed its newest item by the window size (``expire``): its deadline is always
    its newest item's time plus the size, so it is queued once, when it appears, and
    a queue entry that surfaces before that deadline is queued again at it.
    """

    __slots__ = ("size_s", "_items", "_expiry", "_seq")

    def __init__(self, size_s: float) -> None:
        self.size_s = size_s
        self._items: dict[K, list[_Entry[V]]] = {}
        self._expiry: DeadlineQueue[K] = DeadlineQueue()
        self._seq = 0

    def add(self, key: K, ts: float, item: V) -> list[V]:
        """Add an item; return the items of that key now in the window (oldest first)."""
        self.add_count(key, ts, item)
        return [e[2] for e in self._items[key]]

    def add_count(self, key: K, ts: float, item: V) -> int:
        """``add`` returning only how many items the key's window now holds: the detectors
        need the items themselves only when the count crosses their threshold."""
        self._seq += 1
        entry = (ts, self._seq, item)
        entries = self._items.setdefault(key, [])
        if not entries:  # a new key: queued at its deadline
            entries.append(entry)
            self._expiry.push(key, ts + self.size_s)
        elif ts >= entries[-1][0]:
            entries.append(entry)  # the key's deadline moves with its newest item
        else:
            insort(entries, entry)
        horizon = entries[-1][0] - self.size_s
        if entries[0][0] <= horizon:
            drop = 1
            while drop < len(entries) and entries[drop][0] <= horizon:
                drop += 1
            del entries[:drop]
        return len(entries)

    def items(self, key: K) -> list[V]:
        return [e[2] for e in self._items.get(key, ())]

    def clear(self, key: K) -> None:
        self._items.pop(key, None)  # its queue entries find it gone

    def drop_through(self, key: K, ts: float) -> None:
        """Forget the items of ``key`` at or before ``ts`` (e.g. failures before a success)."""
        entries = self._items.get(key)
        if entries:
            n = bisect_right(entries, ts, key=_entry_ts)
            if n == len(entries):
                self.clear(key)
            elif n:
                del entries[:n]

    def expire(self, watermark: float) -> int:
        """Forget keys whose newest item fell out of the window before the watermark."""
        items, size = self._items, self.size_s
        dead = 0
        for key in self._expiry.pop_due(watermark):
            entries = items.get(key)
            if entries is None:
                continue  # cleared, or expired through an earlier entry
            deadline = entries[-1][0] + size
            if deadline <= watermark:
                del items[key]
                dead += 1
            else:
                self._expiry.push(key, deadline)
        return dead

    def __len__(self) -> int:
        return len(self._items)

    def keys(self) -> KeysView[K]:
        """The keys holding items: a live view (it follows adds and expiry), cheap to test often."""
        return self._items.keys()

    def to_state(self, item: Callable[[V], Any]) -> list[Any]:
        return [[k, [[e[0], item(e[2])] for e in es]] for k, es in self._items.items()]

    def load_state(self, data: Any, item: Callable[[Any], V]) -> None:
        self._items.clear()
        self._expiry.clear()
        for k, es in st.seq(data):
            key = st.key(k)
            entries = []
            for ts, v in st.seq(es):
                self._seq += 1
                entries.append((st.num(ts), self._seq, item(v)))
            if entries:
                self._items[key] = entries
                self._expiry.push(key, entries[-1][0] + self.size_s)


class TumblingSum(Generic[K]):
    """Per-key sums over fixed, aligned event-time buckets (e.g. tokens per minute).

    ``close(watermark)`` returns every bucket whose end the watermark has passed,
    in time order per key, so a detector sees each key's buckets in order. Only
    keys with a bucket due are visited: each key is queued at the end of its
    earliest open bucket.
    """

    def __init__(self, size_s: float) -> None:
        self.size_s = size_s
        self._buckets: dict[K, dict[int, float]] = {}
        self._next: dict[K, int] = {}  # key -> earliest open bucket (its queue entry)
        self._heap: list[tuple[int, int, K]] = []
        self._seq = 0

    def bucket_of(self, ts: float) -> int:
        return int(ts // self.size_s)

    def _queue(self, key: K, b: int) -> None:
        cur = self._next.get(key)
        if cur is None or b < cur:
            self._next[key] = b
            self._seq += 1
            heapq.heappush(self._heap, (b, self._seq, key))

    def add(self, key: K, ts: float, amount: float) -> float:
        b = int(ts // self.size_s)
        per_key = self._buckets.get(key)
        if per_key is None:
            per_key = self._buckets[key] = {}
        total = per_key.get(b)
        if total is None:
            total = amount
            self._queue(key, b)
        else:
            total += amount
        per_key[b] = total
        return total

    def current(self, key: K, ts: float) -> float:
        return self._buckets.get(key, {}).get(self.bucket_of(ts), 0.0)

    def close(self, watermark: float) -> list[tuple[K, int, float]]:
        """(key, bucket, total) of the buckets that ended at or before the watermark."""
        out: list[tuple[K, int, float]] = []
        heap, size = self._heap, self.size_s
        while heap and (heap[0][0] + 1) * size <= watermark:
            b, _, key = heapq.heappop(heap)
            if self._next.get(key) != b:
                continue  # superseded by an earlier bucket's entry
            del self._next[key]
            per_key = self._buckets[key]
            for bucket in sorted(per_key):
                if (bucket + 1) * size > watermark:
                    self._queue(key, bucket)
                    break
                out.append((key, bucket, per_key.pop(bucket)))
            if not per_key:
                del self._buckets[key]
        return out

    def __len__(self) -> int:
        return len(self._buckets)

    def to_state(self) -> list[Any]:
        return [[k, [[b, v] for b, v in per.items()]] for k, per in self._buckets.items()]

    def load_state(self, data: Any) -> None:
        self._buckets.clear()
        self._next.clear()
        self._heap.clear()
        for k, per in st.seq(data):
            key = st.key(k)
            buckets = {st.integer(b): st.num(v) for b, v in st.seq(per)}
            if buckets:
                self._buckets[key] = buckets
                self._queue(key, min(buckets))


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

    def to_state(self) -> list[Any]:
        return [self.mean, self.var, self.samples]

    def load_state(self, data: Any) -> None:
        mean, var, samples = st.seq(data)
        self.mean, self.var, self.samples = st.num(mean), st.num(var), st.integer(samples)


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

    __slots__ = ("_heap", "_live", "_seq")

    def __init__(self) -> None:
        # (fire_at, seq, timer): the heap orders tuples in C, not Timers through their __lt__
        self._heap: list[tuple[float, int, Timer]] = []
        self._live: dict[Hashable, Timer] = {}
        self._seq = 0

    def arm(self, key: Hashable, fire_at: float, payload: object = None) -> None:
        self._seq += 1
        t = Timer(fire_at, self._seq, key, payload)
        self._live[key] = t
        heapq.heappush(self._heap, (fire_at, self._seq, t))

    def cancel(self, key: Hashable) -> None:
        self._live.pop(key, None)

    def armed(self, key: Hashable) -> bool:
        return key in self._live

    def due(self, watermark: float) -> list[Timer]:
        fired: list[Timer] = []
        heap = self._heap
        if not heap or heap[0][0] > watermark:
            return fired
        live = self._live
        while heap and heap[0][0] <= watermark:
            t = heapq.heappop(heap)[2]
            if live.get(t.key) is t:
                del live[t.key]
                fired.append(t)
        return fired

    def __len__(self) -> int:
        return len(self._live)

    def to_state(self, payload: Callable[[Any], Any] | None = None) -> list[Any]:
        """Live timers in firing order (ties keep their arming order)."""
        return [[t.key, st.enc_num(t.fire_at), payload(t.payload) if payload else None]
                for t in sorted(self._live.values(), key=_timer_order)]

    def load_state(self, data: Any, payload: Callable[[Any], Any] | None = None) -> None:
        self._heap.clear()
        self._live.clear()
        for k, fire_at, p in st.seq(data):
            self.arm(st.key(k), st.num(fire_at), payload(p) if payload else None)


def _timer_order(t: Timer) -> tuple[float, int]:
    return t.fire_at, t.seq
