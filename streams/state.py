"""Partition-scoped state of the correlate and detect stages, kept in Kafka.

Each stage holds one state object per input partition (its windows, timers,
waiting spans, redelivery memory, watermark). At a checkpoint a stage writes
the state of a partition it changed to a compacted topic (key
``<stage>/<topic>/<partition>``, header ``agentwatch.state.offset`` the offset
of the next input message the snapshot does not include), at most every
``state_snapshot_s``; the snapshot is delivered before the batch is acked, so
it is durable whenever the offsets after it are.

A snapshot of up to ``STATE_CHUNK_BYTES`` is one message at that key (the
format older workers wrote and still read). A larger one is written in chunks
(a join holding its allowed lateness at a high rate: 110 MB for 16,000 agents
with open traces in one partition), in this order on the topic's one partition:

1. the chunks, key ``<stage>/<topic>/<partition>/<generation>/<index>``,
   headers ``agentwatch.state.generation``, ``.chunk`` (index), ``.chunks``
   (count) and ``.offset``; the generation (``<offset>-<12 random hex>``) is
   new for every snapshot, so no two snapshots ever share a chunk key;
2. the manifest, at the partition's own key: a small JSON document naming the
   generation, the chunk count, the total size and its CRC-32, with the
   headers ``.chunks`` (which marks it a manifest), ``.generation``, ``.offset``;
3. tombstones for the chunks of the snapshot this one replaces.

The manifest is the commit: it is written after its chunks, and compaction
keeps the latest value of the partition's key, a manifest or a single-message
snapshot alike. The chunks of a snapshot whose write was cut short have no
manifest and are never read into a state; the previous manifest's chunks are
still all there (other keys, tombstoned only after a newer manifest), so a
restore uses the previous snapshot, whole. A smaller snapshot after a larger
one leaves no higher chunk behind to be mixed in: chunks are read only under
the generation a manifest names, and that generation's count. Chunks no
snapshot uses (a cut-short write, a write cut between its manifest and its
tombstones) are found by the next restore and tombstoned after the next
snapshot.

When a partition is assigned (start, rebalance), its state is restored from the
latest snapshot and the input between the snapshot's offset and the group's
committed offset is replayed through it at once, with its outputs discarded
(they were made durable before that input was committed): the restored state is
the state at the committed offset, so its timers fire with no new traffic. (Left
to the partition's next batch, input committed after the last snapshot stayed
out of the state until new traffic came: an escalation timer armed by it never
fired after a crash.) A snapshot ahead of
the committed offset (the worker died between snapshot and commit) makes the
stage skip the messages the snapshot already includes. Restore time is the
snapshot's size plus at most ``state_snapshot_s`` of input, not an hour of
traffic. On revoke a final snapshot is written and the state dropped, so the
old owner's timers stop and the new owner's continue.

A large state is snapshotted in a forked child (``_Background``): a minute of
traffic at 6,800 spans/s is about 90 MB per stage, whose snapshot held the
event loop for one to two seconds, the tail of detection latency. The child
gets a copy-on-write image between two batches and serialises it while the
stage goes on; its snapshot carries the offset it had at the fork and is
written at a later call, once complete. Written later is still correct: a
snapshot is a starting point for the input after its offset, whenever it
lands, and the offsets committed meanwhile only mean more input to replay if
the worker dies before it does.

Snapshots are JSON (``detectors/state.py``): topics are hostile input, so no
pickle; an unreadable snapshot, an incomplete or inconsistent generation of
chunks is logged and ignored (the previous complete snapshot is used, else the
partition starts from the replay of its whole retained input).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import secrets
import signal
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from schemas.errors import StateError
from schemas.events import Event
from schemas.internal_wire import events_from_wire

log = logging.getLogger("agentwatch.state")

OFFSET_HEADER = "agentwatch.state.offset"
GENERATION_HEADER = "agentwatch.state.generation"
CHUNK_HEADER = "agentwatch.state.chunk"
CHUNKS_HEADER = "agentwatch.state.chunks"
MANIFEST_FORMAT = "agentwatch.state.manifest"

# The state topic's max.message.bytes, and the worker producer's request limit (streams/app.py).
# Older workers wrote a snapshot as one message of up to this size: a topic may still hold them.
STATE_MAX_MESSAGE_BYTES = 64 << 20
_RECORD_HEADROOM = 64 << 10  # key, headers and batch framing around a value
# Snapshots larger than this are chunked. 8 MiB less framing: a chunk is one message and one
# produce request (acks=all) of the checkpoint writing it, so 110 MB is 14 round trips (1 MiB
# chunks: 106; on loopback 1 to 64 MiB chunks wrote and read 110 MB in about the same time,
# docs/benchmarks.md); a chunk fits brokers whose message limit stays near 10 MB; and up to
# this size a snapshot stays one message, the format workers before chunking read.
STATE_CHUNK_BYTES = (8 << 20) - _RECORD_HEADROOM
# time between two snapshots of a partition >= this many times what the last one took
SNAPSHOT_COST_RATIO = 20.0
# A snapshot that took longer than this is taken next time in a forked child (see
# _Background): the stage goes on while the child writes the copy-on-write image of the state.
# A minute of traffic at 6,800 spans/s made 91 MB of correlate and 95 MB of detect state whose
# snapshots held the event loop 1.0 and 2.1 s; a fork of a 1.5 GB process takes about 30 ms.
FORK_ABOVE_S = 0.05
# A child still running this long after its fork (and ten times what the partition's last
# snapshot took) is stopped: a child that hangs (a lock some other thread of the parent held
# at the fork) must not end the partition's snapshots for good.
CHILD_TIMEOUT_S = 120.0

# compaction keeps the latest snapshot per key; small segments so it actually runs
STATE_TOPIC_CONFIG = {
    "cleanup.policy": "compact",
    "segment.ms": "60000",
    "min.cleanable.dirty.ratio": "0.1",
    "max.message.bytes": str(STATE_MAX_MESSAGE_BYTES),
}


def state_key(stage: str, topic: str, partition: int) -> str:
    return f"{stage}/{topic}/{partition}"


def chunk_key(key: str, generation: str, index: int) -> str:
    return f"{key}/{generation}/{index}"


def _split_chunk_key(key: str) -> tuple[str, str, int] | None:
    """(state key, generation, index) of a chunk's key; None for any other key."""
    head, _, index = key.rpartition("/")
    base, _, generation = head.rpartition("/")
    if not (base and generation and index.isascii() and index.isdigit()) or index != str(int(index)):
        return None  # a leading zero too: the key written for an index is exactly str(index)
    return base, generation, int(index)


@dataclass(frozen=True, slots=True)
class StateRecord:
    """One message for the state topic (its partition 0), ready to send."""

    key: bytes
    value: bytes | None  # None: a tombstone, compaction then forgets the key
    headers: dict[str, bytes]


@dataclass(frozen=True, slots=True)
class Manifest:
    """The commit of a chunked snapshot: which generation of chunks makes it up."""

    generation: str
    offset: int
    chunks: int
    size: int  # bytes of the whole snapshot
    crc32: int

    def dumps(self) -> bytes:
        return orjson.dumps({"format": MANIFEST_FORMAT, "version": 1, "generation": self.generation,
                             "offset": self.offset, "chunks": self.chunks, "bytes": self.size,
                             "crc32": self.crc32})

    @classmethod
    def loads(cls, value: bytes) -> Manifest:
        """Raises StateError when ``value`` is not a manifest this version writes."""
        try:
            doc = orjson.loads(value)
        except orjson.JSONDecodeError as exc:
            raise StateError(f"state manifest: not JSON ({exc})") from None
        if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT or doc.get("version") != 1:
            raise StateError("state manifest: not an agentwatch state manifest of version 1")
        generation = doc.get("generation")
        numbers = [doc.get(k) for k in ("offset", "chunks", "bytes", "crc32")]
        if not isinstance(generation, str) or not generation or "/" in generation:
            raise StateError(f"state manifest: bad generation {generation!r}")
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in numbers) or numbers[1] < 1:
            raise StateError(f"state manifest: bad offset, chunks, bytes or crc32 {numbers!r}")
        return cls(generation, *numbers)


def snapshot_records(key: str, offset: int, data: bytes, *,
                     chunk_bytes: int = STATE_CHUNK_BYTES) -> tuple[list[StateRecord], list[str]]:
    """The messages writing ``data`` as the snapshot of ``key`` at input ``offset``, in the order
    they must be sent, and the keys of the chunks it lives in (to tombstone once it is replaced)."""
    off = str(offset).encode()
    if len(data) <= chunk_bytes:
        return [StateRecord(key.encode(), data, {OFFSET_HEADER: off})], []
    generation = f"{offset}-{secrets.token_hex(6)}"
    count = -(-len(data) // chunk_bytes)
    common = {OFFSET_HEADER: off, GENERATION_HEADER: generation.encode(), CHUNKS_HEADER: str(count).encode()}
    keys = [chunk_key(key, generation, i) for i in range(count)]
    records = [StateRecord(k.encode(), data[i * chunk_bytes:(i + 1) * chunk_bytes],
                           {**common, CHUNK_HEADER: str(i).encode()}) for i, k in enumerate(keys)]
    manifest = Manifest(generation, offset, count, len(data), zlib.crc32(data))
    records.append(StateRecord(key.encode(), manifest.dumps(), common))
    return records, keys


def tombstones(keys: Iterable[str]) -> list[StateRecord]:
    return [StateRecord(k.encode(), None, {}) for k in keys]


@dataclass(frozen=True)
class Snapshot:
    offset: int  # next input offset not reflected in the state
    data: bytes
    chunk_keys: tuple[str, ...] = ()  # the chunks it was assembled from (none: one message)


@dataclass(frozen=True)
class StateRead:
    """What the state topic holds for the keys asked for."""

    snapshots: dict[str, Snapshot]  # the latest complete snapshot of each key that has one
    garbage: dict[str, list[str]]  # chunk keys no snapshot uses: tombstone them after the next write


@dataclass
class _Committed:
    offset: int
    parts: list[bytes]
    chunk_keys: tuple[str, ...]


@dataclass
class _KeyState:
    committed: _Committed | None = None
    pending: dict[str, dict[int, bytes]] = field(default_factory=dict)  # generation -> chunks, no manifest yet
    stale: set[str] = field(default_factory=set)  # chunks of replaced snapshots, not tombstoned yet

    def replace(self, new: _Committed | None) -> None:
        if self.committed is not None:
            self.stale.update(self.committed.chunk_keys)
        self.committed = new


class SnapshotAssembler:
    """Folds the state topic, read in order from its beginning, into the latest complete
    snapshot of each key asked for. Any subsequence compaction leaves (the latest message
    per key, tombstones or not) folds to the same snapshots."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = {k: _KeyState() for k in keys}

    def add(self, key: str, value: bytes | None, headers: Mapping[str, bytes]) -> None:
        st = self._keys.get(key)
        if st is not None:
            if value is None:  # a tombstone: state dropped
                st.replace(None)
            elif CHUNKS_HEADER in headers:
                self._manifest(key, st, value)
            else:
                self._single(key, st, value, headers)
            return
        parsed = _split_chunk_key(key)
        if parsed is not None and parsed[0] in self._keys:
            self._chunk(key, self._keys[parsed[0]], *parsed[1:], value, headers)

    def _single(self, key: str, st: _KeyState, value: bytes, headers: Mapping[str, bytes]) -> None:
        try:
            offset = int(headers[OFFSET_HEADER])
        except (KeyError, ValueError):
            log.error("state snapshot without a valid offset header; ignored", extra={"key": key})
            return
        st.replace(_Committed(offset, [value], ()))

    def _chunk(self, key: str, st: _KeyState, generation: str, index: int, value: bytes | None,
               headers: Mapping[str, bytes]) -> None:
        chunks = st.pending.get(generation, {})
        chunks.pop(index, None)
        if value is None:  # the snapshot it belonged to was replaced
            st.stale.discard(key)
        elif headers.get(GENERATION_HEADER) != generation.encode() or headers.get(CHUNK_HEADER) != str(index).encode():
            # its headers contradict its key: that generation stays incomplete, the chunk is garbage
            log.error("state chunk whose headers do not match its key; its snapshot is ignored", extra={"key": key})
            st.stale.add(key)
        else:
            st.pending.setdefault(generation, chunks)[index] = value
        if not chunks:
            st.pending.pop(generation, None)

    def _manifest(self, key: str, st: _KeyState, value: bytes) -> None:
        try:
            m = Manifest.loads(value)
            chunks = st.pending.get(m.generation, {})
            parts = _complete(m, chunks)
        except StateError as exc:
            # keep the previous snapshot: its chunks are tombstoned only after a newer manifest
            log.error("state snapshot manifest unusable; the previous snapshot is kept",
                      extra={"key": key, "error": str(exc)[:300]})
            return
        del st.pending[m.generation]
        st.replace(_Committed(m.offset, parts, tuple(chunk_key(key, m.generation, i) for i in range(m.chunks))))

    def result(self) -> StateRead:
        """The snapshots, each joined into one bytes object (once: a chunk is not copied again)."""
        snapshots: dict[str, Snapshot] = {}
        garbage: dict[str, list[str]] = {}
        for key, st in self._keys.items():
            live: set[str] = set()
            if st.committed is not None:
                c, st.committed = st.committed, None
                data = c.parts[0] if len(c.parts) == 1 else b"".join(c.parts)
                c.parts.clear()  # the chunks go as soon as they are joined
                snapshots[key] = Snapshot(c.offset, data, c.chunk_keys)
                live = set(c.chunk_keys)
            orphans = {chunk_key(key, g, i) for g, chunks in st.pending.items() for i in chunks}
            waste = sorted((st.stale | orphans) - live)
            if waste:
                garbage[key] = waste
        return StateRead(snapshots, garbage)


def _complete(m: Manifest, chunks: Mapping[int, bytes]) -> list[bytes]:
    """The chunks of ``m`` in order; StateError unless exactly they are there, whole."""
    # indices are distinct and >= 0: n of them, none above n - 1, are exactly 0 .. n - 1 (and a
    # hostile count of a billion costs nothing)
    if len(chunks) != m.chunks or max(chunks, default=-1) != m.chunks - 1:
        raise StateError(f"generation {m.generation}: {len(chunks)} chunks up to index "
                         f"{max(chunks, default=None)}, the manifest says {m.chunks}")
    parts = [chunks[i] for i in range(m.chunks)]
    size = sum(map(len, parts))
    crc = 0
    for part in parts:
        crc = zlib.crc32(part, crc)
    if size != m.size or crc != m.crc32:
        raise StateError(f"generation {m.generation}: {size} bytes, crc32 {crc}; the manifest says "
                         f"{m.size} bytes, crc32 {m.crc32}")
    return parts


async def read_snapshots(bootstrap: str, topic: str, keys: set[str], *, timeout_s: float = 60,
                         security: Mapping[str, Any] | None = None) -> StateRead:
    """The latest complete snapshot of each of ``keys`` (the whole compacted topic is read)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                max_partition_fetch_bytes=64 << 20, fetch_max_bytes=128 << 20, **(security or {}))
    await consumer.start()
    assembler = SnapshotAssembler(keys)

    def take(record: Any) -> None:
        key = record.key.decode(errors="replace") if record.key else ""
        assembler.add(key, record.value, dict(record.headers or ()))

    try:
        # snapshots are written to partition 0 (the topic is created with one)
        tps = [TopicPartition(topic, 0)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        await _drain(consumer, ends, timeout_s, take)
    finally:
        await _stop(consumer)
    return assembler.result()


@contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic collector paused while a state is rebuilt.

    A rebuild allocates millions of objects that all live on (decoded JSON, events,
    windows); the collector runs every 700 net allocations by default (the worker's:
    50,000) and walks the young ones each time, for nothing. Rebuilding 9,000 agents took
    4.55 s at the default thresholds, 2.55 s at the worker's, 2.13 s paused
    (docs/benchmarks.md). What a rebuild drops is still freed by reference counting; a
    cycle among it waits for the first collection after the rebuild.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


async def read_committed(bootstrap: str, group: str, topic: str, partitions: set[int], *,
                         security: Mapping[str, Any] | None = None) -> dict[int, int]:
    """The consumer group's committed offset of each of ``partitions`` (absent: never committed)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **(security or {}))
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(
            group, partitions=[TopicPartition(topic, p) for p in sorted(partitions)])
    finally:
        await admin.close()
    return {tp.partition: meta.offset for tp, meta in offsets.items() if meta is not None and meta.offset >= 0}


async def read_events(bootstrap: str, topic: str, partition: int, start: int, end: int, *,
                      timeout_s: float = 120, security: Mapping[str, Any] | None = None,
                      decode: Callable[[bytes], list[Any]] = events_from_wire) -> list[Any]:
    """The events of ``topic``/``partition`` in the offsets [start, end), for a state replay
    (``decode``: what one message holds; the tenant stage's input is signals, not events)."""
    events: list[Any] = []
    if end <= start:
        return events
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                max_partition_fetch_bytes=16 << 20, **(security or {}))
    await consumer.start()
    tp = TopicPartition(topic, partition)
    try:
        consumer.assign([tp])
        consumer.seek(tp, start)

        def take(record: object) -> None:
            value = record.value  # type: ignore[attr-defined]
            if value:
                try:
                    events.extend(decode(value))
                except Exception as exc:  # went to the DLQ when it was first read
                    log.warning("undecodable internal message skipped in a state replay",
                                extra={"topic": topic, "offset": record.offset, "error": str(exc)[:200]})  # type: ignore[attr-defined]

        await _drain(consumer, {tp: end}, timeout_s, take)
    finally:
        await _stop(consumer)
    return events


async def _drain(consumer: AIOKafkaConsumer, ends: dict[TopicPartition, int], timeout_s: float,
                 take: object) -> None:
    """Read every assigned partition up to its end offset (exclusive)."""
    remaining = {tp for tp, end in ends.items() if end > 0}
    for tp in list(remaining):
        if await consumer.position(tp) >= ends[tp]:
            remaining.discard(tp)
    deadline = time.monotonic() + timeout_s
    while remaining:
        if time.monotonic() > deadline:
            raise TimeoutError(f"state read did not reach the end offsets in {timeout_s:.0f}s")
        batches = await consumer.getmany(*remaining, timeout_ms=500)
        for tp, records in batches.items():
            for r in records:
                if r.offset >= ends[tp]:
                    remaining.discard(tp)
                    break
                take(r)  # type: ignore[operator]
            if records and records[-1].offset >= ends[tp] - 1:
                remaining.discard(tp)
        for tp in list(remaining):
            # compaction leaves gaps: the position can pass the last offset we were waiting for
            if await consumer.position(tp) >= ends[tp]:
                remaining.discard(tp)


async def _stop(consumer: AIOKafkaConsumer) -> None:
    try:
        await consumer.stop()
    except asyncio.CancelledError:
        # aiokafka's group-less coordinator cancels its own reset task on close and the
        # await re-raises it; only a cancellation of this task is ours to propagate
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise


class _Background:
    """A snapshot of one partition's state taken in a forked child process.

    ``os.fork`` gives the child a copy-on-write image of the worker at a point between
    batches, where the state is consistent; the child serialises it, writes the bytes to a
    pipe and exits, while the parent's stage goes on. A thread of the parent reads the pipe
    (``os.read`` releases the GIL) and reaps the child. The child runs only the state's own
    ``snapshot()`` (pure Python and orjson): none of the parent's other threads exist in it,
    and it touches no socket, lock or library they were using; it ends with ``os._exit``,
    so no handler, buffer or destructor of the parent runs twice. A snapshot is usable only
    when the child exited with status 0 after writing it whole.
    """

    def __init__(self, partition: int, offset: int, state: object) -> None:
        self.partition, self.offset = partition, offset
        self.data: bytes | None = None
        self.seconds = 0.0  # the child's own time for the snapshot
        self.error = ""
        self.started = started = time.perf_counter()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: nothing here may return into the parent's code
            code = 1
            try:
                os.close(r)
                signal.set_wakeup_fd(-1)  # the parent's loop owns that fd: signals here are ours
                for sig in (signal.SIGTERM, signal.SIGINT):
                    signal.signal(sig, signal.SIG_DFL)
                gc.disable()  # a short-lived process: collecting would only walk the image
                data = state.snapshot()  # type: ignore[attr-defined]
                with os.fdopen(w, "wb") as pipe:
                    pipe.write(len(data).to_bytes(8, "big"))
                    pipe.write(data)
                code = 0
            finally:
                os._exit(code)
        os.close(w)
        self.pid, self.fork_seconds = pid, time.perf_counter() - started
        self._thread = threading.Thread(target=self._collect, args=(r, started), daemon=True,
                                        name=f"snapshot-{partition}")
        self._thread.start()

    def _collect(self, r: int, started: float) -> None:
        chunks: list[bytes] = []
        try:
            while chunk := os.read(r, 1 << 20):
                chunks.append(chunk)
        finally:
            os.close(r)
        _, status = os.waitpid(self.pid, 0)
        self.seconds = time.perf_counter() - started
        raw = b"".join(chunks)
        code = os.waitstatus_to_exitcode(status)
        if code == 0 and len(raw) >= 8 and int.from_bytes(raw[:8], "big") == len(raw) - 8:
            self.data = raw[8:]
        else:
            self.error = f"snapshot child exited with {code}, {len(raw)} bytes written"

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def cancel(self) -> None:
        """Stop the child if it still runs (its image is of a state being dropped or replaced)."""
        if not self.done:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._thread.join(timeout=5.0)


class PartitionedState:
    """One stage's state objects by input partition, with their snapshot bookkeeping.

    ``make()`` builds an empty state, ``restore(bytes)`` one from a snapshot, and
    ``replay(state, events)`` feeds it input whose outputs are discarded.
    ``group`` is the consumer group that commits the input: a restored partition
    is caught up to its committed offset (without it, only at its next batch).
    """

    def __init__(self, stage: str, topic: str, *, make: object, restore: object, replay: object,
                 bootstrap: str, state_topic: str, snapshot_s: float,
                 security: Mapping[str, Any] | None = None, group: str | None = None,
                 chunk_bytes: int = STATE_CHUNK_BYTES,
                 decode: Callable[[bytes], list[Any]] = events_from_wire,
                 fork_above_s: float | None = FORK_ABOVE_S) -> None:
        if not 0 < chunk_bytes <= STATE_MAX_MESSAGE_BYTES - _RECORD_HEADROOM:
            raise ValueError(f"chunk_bytes {chunk_bytes} is not within what the state topic accepts")
        self.stage, self.topic, self.group = stage, topic, group
        self.chunk_bytes = chunk_bytes
        self._make, self._restore, self._replay = make, restore, replay
        self._decode = decode  # one input message -> what ``replay`` takes
        self.bootstrap, self.state_topic, self.snapshot_s = bootstrap, state_topic, snapshot_s
        self.security = dict(security or {})
        self.states: dict[int, object] = {}
        self.next_offset: dict[int, int] = {}
        self._snapshot_at: dict[int, float] = {}
        self._every: dict[int, float] = {}  # seconds between a partition's snapshots
        self._dirty: set[int] = set()
        # chunk keys to tombstone after the partition's next snapshot: those of the snapshot
        # it replaces, and any a restore found unused (a write cut short)
        self._superseded: dict[int, list[str]] = {}
        self.last_restore: tuple[int, float] = (0, 0.0)  # bytes, seconds (for metrics and the bench)
        # snapshots slower than this are taken in a forked child (None: never; no fork on Windows)
        self.fork_above_s = fork_above_s if hasattr(os, "fork") else None
        self._cost: dict[int, float] = {}  # seconds the partition's last snapshot took
        self._background: _Background | None = None  # at most one child per stage at a time
        # snapshots written since the caller last looked (for metrics): (seconds it took,
        # seconds the stage was held for it, bytes, taken in a child)
        self.taken: list[tuple[float, float, int, bool]] = []

    def key(self, partition: int) -> str:
        return state_key(self.stage, self.topic, partition)

    async def ensure(self, partitions: set[int]) -> list[int]:
        """Restore every partition of ``partitions`` not held yet; return those restored."""
        missing = sorted(p for p in partitions if p not in self.states)
        if not missing:
            return []
        started = time.perf_counter()
        found = await read_snapshots(self.bootstrap, self.state_topic, {self.key(p) for p in missing},
                                     security=self.security)
        size = 0
        with collector_paused():
            for p in missing:
                snap = found.snapshots.get(self.key(p))
                state = self._rebuild(p, snap)
                if state is not None and snap is not None:
                    size += len(snap.data)
                self.states[p] = state if state is not None else self._make()  # type: ignore[operator]
                self.next_offset[p] = snap.offset if state is not None and snap is not None else 0
                self._snapshot_at[p] = float("-inf")  # its first checkpoint writes a snapshot
                self._superseded[p] = [*(snap.chunk_keys if snap is not None else ()),
                                       *found.garbage.get(self.key(p), ())]
        if self.group is not None:
            # the state at the committed offset: the input committed after the snapshot, at once
            try:
                committed = await read_committed(self.bootstrap, self.group, self.topic, set(missing),
                                                 security=self.security)
            except Exception as exc:  # KafkaError, timeout: the partition's next batch catches up instead
                log.error("reading the committed offsets failed; restored partitions catch up at their next batch",
                          extra={"stage": self.stage, "error": repr(exc)[:300]})
                committed = {}
            for p in missing:
                if p in committed:
                    await self.catch_up(p, committed[p])
        self.last_restore = (size, time.perf_counter() - started)
        log.info("partition state restored", extra={"stage": self.stage, "partitions": missing, "bytes": size,
                                                    "seconds": round(self.last_restore[1], 3)})
        return missing

    def _rebuild(self, partition: int, snap: Snapshot | None) -> object | None:
        """The state of ``snap``; None without a snapshot or when it is unreadable."""
        if snap is None:
            return None
        try:
            return self._restore(snap.data)  # type: ignore[operator]
        except Exception as exc:  # StateError: corrupt or foreign; rebuilt from the input instead
            log.error("state snapshot unreadable; replaying the partition's retained input",
                      extra={"key": self.key(partition), "error": str(exc)[:300]})
            return None

    async def catch_up(self, partition: int, first_offset: int) -> int:
        """Before input from ``first_offset`` is processed: replay what lies between the
        snapshot and it. Returns the offset below which messages are already reflected."""
        start = self.next_offset.get(partition, 0)
        if first_offset > start:
            events = await read_events(self.bootstrap, self.topic, partition, start, first_offset,
                                       security=self.security, decode=self._decode)
            if events:
                self._replay(self.states[partition], events)  # type: ignore[operator]
                log.info("partition state caught up", extra={"stage": self.stage, "partition": partition,
                                                            "from": start, "to": first_offset, "events": len(events)})
            self.next_offset[partition] = first_offset
            self._dirty.add(partition)
        return self.next_offset[partition]

    def advanced(self, partition: int, next_offset: int) -> None:
        self.next_offset[partition] = max(self.next_offset.get(partition, 0), next_offset)
        self._dirty.add(partition)

    def touched(self) -> None:
        """Timers fired: every held partition may have changed."""
        self._dirty.update(self.states)

    def due(self, *, force: bool = False, partitions: set[int] | None = None) -> list[StateRecord]:
        """The messages writing the snapshots of dirty partitions whose interval passed (or all,
        forced), in the order they must be sent to the state topic's partition 0. A snapshot
        that was slow last time is started in a forked child instead (_Background) and its
        messages come from a later call, once the child is done; a forced snapshot is always
        taken here, and a child's older image of the same partition is dropped."""
        now = time.monotonic()
        out = self._finished()
        bg = self._background
        if force and bg is not None and (partitions is None or bg.partition in partitions):
            bg.cancel()  # the final snapshot is the newest state, taken now
            self._background = None
            self._dirty.add(bg.partition)
        for p in sorted(self._dirty):
            if partitions is not None and p not in partitions:
                continue
            if p not in self.states:
                continue
            if force or now - self._snapshot_at.get(p, 0.0) >= self._every.get(p, self.snapshot_s):
                if not force and self.fork_above_s is not None and self._cost.get(p, 0.0) > self.fork_above_s:
                    if self._background is None:  # one child at a time: the others stay dirty
                        self._fork(p, now)
                    continue
                started = time.perf_counter()
                data = self.states[p].snapshot()  # type: ignore[attr-defined]
                seconds = time.perf_counter() - started
                self.taken.append((seconds, seconds, len(data), False))
                out += self._records(p, self.next_offset.get(p, 0), data, seconds)
                self._snapshot_at[p] = now
                self._dirty.discard(p)
        return out

    def _records(self, p: int, offset: int, data: bytes, seconds: float) -> list[StateRecord]:
        records, chunks = snapshot_records(self.key(p), offset, data, chunk_bytes=self.chunk_bytes)
        # the replaced snapshot's chunks go after the new one is whole (its manifest)
        out = records + tombstones(self._superseded.get(p, ()))
        self._superseded[p] = chunks
        # A snapshot is the whole state: a join holding 15 minutes of spans took long enough
        # that snapshotting it every few seconds starved the stage (latency grew with the
        # state). Spacing snapshots by their own cost keeps them under 1/SNAPSHOT_COST_RATIO
        # of the time (a child's too: it shares the machine); a restore then replays at most
        # that much more.
        self._every[p] = max(self.snapshot_s, SNAPSHOT_COST_RATIO * seconds)
        self._cost[p] = seconds
        return out

    def _fork(self, p: int, now: float) -> None:
        try:
            bg = _Background(p, self.next_offset.get(p, 0), self.states[p])
        except OSError as exc:  # no memory or processes left for a child: the next call tries again
            log.error("state snapshot child could not start", extra={"key": self.key(p), "error": repr(exc)[:300]})
            return
        self._background = bg
        self._snapshot_at[p] = now
        self._dirty.discard(p)  # changes after the fork make it dirty again

    def _finished(self) -> list[StateRecord]:
        """The messages of a child's snapshot, once it is done."""
        bg = self._background
        if bg is None:
            return []
        if not bg.done:
            limit = max(CHILD_TIMEOUT_S, 10 * self._cost.get(bg.partition, 0.0))
            if time.perf_counter() - bg.started < limit:
                return []
            bg.cancel()
            bg.error = f"snapshot child stopped after {limit:.0f}s"
        self._background = None
        p = bg.partition
        if p not in self.states:  # dropped meanwhile (revoked): its new owner snapshots it
            return []
        if bg.data is None:
            log.error("state snapshot in a child failed; taken again at a later checkpoint",
                      extra={"key": self.key(p), "error": bg.error})
            self._dirty.add(p)
            self._cost[p] = 0.0  # the next one in the stage itself, which reports what fails
            return []
        self.taken.append((bg.seconds, bg.fork_seconds, len(bg.data), True))
        return self._records(p, bg.offset, bg.data, bg.seconds)

    def close(self) -> None:
        """The worker is stopping: a snapshot child still running is stopped and no other
        starts (a snapshot still due is taken in the stage)."""
        self.fork_above_s = None
        if self._background is not None:
            self._background.cancel()
            self._background = None

    def drop(self, partitions: set[int]) -> None:
        bg = self._background
        if bg is not None and bg.partition in partitions:
            bg.cancel()
            self._background = None
        for p in partitions:
            self.states.pop(p, None)
            self.next_offset.pop(p, None)
            self._snapshot_at.pop(p, None)
            self._every.pop(p, None)
            self._cost.pop(p, None)
            # the last snapshot's chunks are live: the next owner tombstones them after its own
            self._superseded.pop(p, None)
            self._dirty.discard(p)
