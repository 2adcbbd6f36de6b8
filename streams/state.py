"""Partition-scoped state of the correlate and detect stages, kept in Kafka.

Each stage holds one state object per input partition (its windows, timers,
waiting spans, redelivery memory, watermark). At a checkpoint a stage writes
the state of a partition it changed to a compacted topic (key
``<stage>/<topic>/<partition>``, value the snapshot, header the offset of the
next input message the snapshot does not include), at most every
``state_snapshot_s``; the snapshot is delivered before the batch is acked, so
it is durable whenever the offsets after it are.

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

Snapshots are JSON (``detectors/state.py``): topics are hostile input, so no
pickle; an unreadable snapshot is logged and the partition starts from the
replay of its whole retained input instead.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from schemas.events import Event
from schemas.internal_wire import events_from_wire

log = logging.getLogger("agentwatch.state")

OFFSET_HEADER = "agentwatch.state.offset"

STATE_MAX_MESSAGE_BYTES = 64 << 20
_RECORD_HEADROOM = 64 << 10  # key, headers and batch framing around a snapshot's value
# time between two snapshots of a partition >= this many times what the last one took
SNAPSHOT_COST_RATIO = 20.0

# compaction keeps the latest snapshot per key; small segments so it actually runs
STATE_TOPIC_CONFIG = {
    "cleanup.policy": "compact",
    "segment.ms": "60000",
    "min.cleanable.dirty.ratio": "0.1",
    "max.message.bytes": str(STATE_MAX_MESSAGE_BYTES),
}


def max_snapshot_bytes() -> int:
    """The largest snapshot written; a larger one is skipped (logged) and its partition restored by replay."""
    return STATE_MAX_MESSAGE_BYTES - _RECORD_HEADROOM


def state_key(stage: str, topic: str, partition: int) -> str:
    return f"{stage}/{topic}/{partition}"


@dataclass(frozen=True)
class Snapshot:
    offset: int  # next input offset not reflected in the state
    data: bytes


async def read_snapshots(bootstrap: str, topic: str, keys: set[str], *, timeout_s: float = 60,
                         security: Mapping[str, Any] | None = None) -> dict[str, Snapshot]:
    """The latest snapshot of each of ``keys`` (the whole compacted topic is read)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                max_partition_fetch_bytes=64 << 20, fetch_max_bytes=128 << 20, **(security or {}))
    await consumer.start()
    found: dict[str, Snapshot] = {}
    try:
        # snapshots are written to partition 0 (the topic is created with one)
        tps = [TopicPartition(topic, 0)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        await _drain(consumer, ends, timeout_s, lambda r: _keep(found, keys, r))
    finally:
        await _stop(consumer)
    return found


def _keep(found: dict[str, Snapshot], keys: set[str], record: object) -> None:
    key = record.key.decode(errors="replace") if record.key else ""  # type: ignore[attr-defined]
    if key not in keys:
        return
    if record.value is None:  # type: ignore[attr-defined]  # a tombstone: state dropped
        found.pop(key, None)
        return
    headers = dict(record.headers or ())  # type: ignore[attr-defined]
    try:
        offset = int(headers[OFFSET_HEADER])
    except (KeyError, ValueError):
        log.error("state snapshot without a valid offset header; ignored", extra={"key": key})
        return
    found[key] = Snapshot(offset, record.value)  # type: ignore[attr-defined]


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
                      timeout_s: float = 120, security: Mapping[str, Any] | None = None) -> list[Event]:
    """The events of ``topic``/``partition`` in the offsets [start, end), for a state replay."""
    events: list[Event] = []
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
                    events.extend(events_from_wire(value))
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


class PartitionedState:
    """One stage's state objects by input partition, with their snapshot bookkeeping.

    ``make()`` builds an empty state, ``restore(bytes)`` one from a snapshot, and
    ``replay(state, events)`` feeds it input whose outputs are discarded.
    ``group`` is the consumer group that commits the input: a restored partition
    is caught up to its committed offset (without it, only at its next batch).
    """

    def __init__(self, stage: str, topic: str, *, make: object, restore: object, replay: object,
                 bootstrap: str, state_topic: str, snapshot_s: float,
                 security: Mapping[str, Any] | None = None, group: str | None = None) -> None:
        self.stage, self.topic, self.group = stage, topic, group
        self._make, self._restore, self._replay = make, restore, replay
        self.bootstrap, self.state_topic, self.snapshot_s = bootstrap, state_topic, snapshot_s
        self.security = dict(security or {})
        self.states: dict[int, object] = {}
        self.next_offset: dict[int, int] = {}
        self._snapshot_at: dict[int, float] = {}
        self._every: dict[int, float] = {}  # seconds between a partition's snapshots
        self._dirty: set[int] = set()
        self.last_restore: tuple[int, float] = (0, 0.0)  # bytes, seconds (for metrics and the bench)

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
        for p in missing:
            snap = found.get(self.key(p))
            state = None
            if snap is not None:
                try:
                    state = self._restore(snap.data)  # type: ignore[operator]
                    size += len(snap.data)
                except Exception as exc:  # StateError: corrupt or foreign; rebuilt from the input instead
                    log.error("state snapshot unreadable; replaying the partition's retained input",
                              extra={"key": self.key(p), "error": str(exc)[:300]})
            self.states[p] = state if state is not None else self._make()  # type: ignore[operator]
            self.next_offset[p] = snap.offset if state is not None and snap is not None else 0
            self._snapshot_at[p] = float("-inf")  # its first checkpoint writes a snapshot
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

    async def catch_up(self, partition: int, first_offset: int) -> int:
        """Before input from ``first_offset`` is processed: replay what lies between the
        snapshot and it. Returns the offset below which messages are already reflected."""
        start = self.next_offset.get(partition, 0)
        if first_offset > start:
            events = await read_events(self.bootstrap, self.topic, partition, start, first_offset,
                                       security=self.security)
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

    def due(self, *, force: bool = False, partitions: set[int] | None = None) -> list[tuple[str, int, bytes]]:
        """(key, next offset, snapshot) of dirty partitions whose interval passed (or all, forced)."""
        now = time.monotonic()
        out = []
        for p in sorted(self._dirty):
            if partitions is not None and p not in partitions:
                continue
            if p not in self.states:
                continue
            if force or now - self._snapshot_at.get(p, 0.0) >= self._every.get(p, self.snapshot_s):
                started = time.perf_counter()
                data = self.states[p].snapshot()  # type: ignore[attr-defined]
                if len(data) <= max_snapshot_bytes():
                    out.append((self.key(p), self.next_offset.get(p, 0), data))
                else:
                    # one message per snapshot: a state this large (a join holding its whole
                    # lateness at a high rate) cannot be written. Crashing would repeat on every
                    # restart; without it, a restore replays from the previous snapshot instead
                    log.error("state snapshot larger than the state topic accepts; not written, a restore "
                              "replays the input since the previous one",
                              extra={"key": self.key(p), "bytes": len(data), "limit": STATE_MAX_MESSAGE_BYTES})
                # A snapshot is the whole state: a join holding 15 minutes of spans took long
                # enough that snapshotting it every few seconds starved the stage (latency grew
                # with the state). Spacing snapshots by their own cost keeps them under
                # 1/SNAPSHOT_COST_RATIO of the time; a restore then replays at most that much more.
                self._every[p] = max(self.snapshot_s, SNAPSHOT_COST_RATIO * (time.perf_counter() - started))
                self._snapshot_at[p] = now
                self._dirty.discard(p)
        return out

    def drop(self, partitions: set[int]) -> None:
        for p in partitions:
            self.states.pop(p, None)
            self.next_offset.pop(p, None)
            self._snapshot_at.pop(p, None)
            self._every.pop(p, None)
            self._dirty.discard(p)
