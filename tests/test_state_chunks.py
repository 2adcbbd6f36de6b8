"""State snapshots of any size, in chunks: a restore only ever uses a whole snapshot.

A snapshot larger than a chunk is written as chunks under a generation of its
own, then a manifest at the partition's key, then tombstones for the chunks it
replaces (streams/state.py). The unit tests fold an in-memory log of what
``PartitionedState.due`` wrote, cut short at random points and compacted in
every way Kafka may compact it; the broker tests write to a real compacted
topic and restore through ``PartitionedState.ensure``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from collections.abc import Iterable
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

import streams.state as state_mod
from streams.kafka import ensure_topics
from streams.state import (CHUNK_HEADER, CHUNKS_HEADER, GENERATION_HEADER, OFFSET_HEADER, STATE_CHUNK_BYTES,
                           STATE_MAX_MESSAGE_BYTES, STATE_TOPIC_CONFIG, PartitionedState, SnapshotAssembler,
                           StateRead, StateRecord, snapshot_records)

KEY = "detect/in/0"
Log = list[tuple[str, bytes | None, dict[str, bytes]]]


class Blob:
    """A stage state that is nothing but its snapshot's bytes."""

    def __init__(self, data: bytes = b"") -> None:
        self.data = data

    def snapshot(self) -> bytes:
        return self.data

    @classmethod
    def restore(cls, data: bytes) -> Blob:
        return cls(bytes(data))


def partitioned(chunk_bytes: int, bootstrap: str = "-", state_topic: str = "-") -> PartitionedState:
    return PartitionedState("detect", "in", make=Blob, restore=Blob.restore, replay=None, bootstrap=bootstrap,
                            state_topic=state_topic, snapshot_s=0.0, chunk_bytes=chunk_bytes)


def write(ps: PartitionedState, data: bytes, offset: int) -> list[StateRecord]:
    """The messages a checkpoint sends for partition 0 holding ``data`` at input ``offset``."""
    ps.states[0] = Blob(data)
    ps.advanced(0, offset)
    return ps.due(force=True)


def as_log(records: list[StateRecord]) -> Log:
    return [(r.key.decode(), r.value, dict(r.headers)) for r in records]


def fold(log: Log, keys: Iterable[str] = (KEY,)) -> StateRead:
    assembler = SnapshotAssembler(keys)
    for key, value, headers in log:
        assembler.add(key, value, headers)
    return assembler.result()


def compacted(log: Log, upto: int, drop_tombstones: bool) -> Log:
    """``log`` as Kafka's cleaner may leave it after cleaning its first ``upto`` messages:
    there, only the latest message of each key is kept (and a tombstone, once its
    retention passed, not even that); the messages after ``upto`` are untouched."""
    last = {key: i for i, (key, _, _) in enumerate(log[:upto])}
    return [rec for i, rec in enumerate(log)
            if i >= upto or (last[rec[0]] == i and not (drop_tombstones and rec[1] is None))]


def commit_at(records: Log) -> int:
    """Where a write's snapshot becomes the one a restore uses: its manifest or its one message."""
    return next(i for i, (k, v, _) in enumerate(records) if k == KEY and v is not None)


def seen(read: StateRead) -> tuple[int, bytes] | None:
    snap = read.snapshots.get(KEY)
    return None if snap is None else (snap.offset, snap.data)


def restarted(monkeypatch: pytest.MonkeyPatch, log: Log, chunk_bytes: int) -> PartitionedState:
    """A new owner of partition 0, restored from ``log`` (the state topic as it stands)."""
    async def read(bootstrap: str, topic: str, keys: set[str], **kw: Any) -> StateRead:
        return fold(list(log), keys)

    monkeypatch.setattr(state_mod, "read_snapshots", read)
    ps = partitioned(chunk_bytes)
    asyncio.run(ps.ensure({0}))
    return ps


# -- the records written ----------------------------------------------------------------


def test_a_snapshot_up_to_a_chunk_is_one_message_as_before_chunking():
    records, chunks = snapshot_records(KEY, 42, b"x" * 100, chunk_bytes=100)
    assert chunks == []
    assert records == [StateRecord(KEY.encode(), b"x" * 100, {OFFSET_HEADER: b"42"})]


def test_a_larger_snapshot_is_chunks_in_order_then_its_manifest():
    data = random.Random(1).randbytes(1050)
    records, chunks = snapshot_records(KEY, 7, data, chunk_bytes=100)
    *parts, manifest = records
    assert len(parts) == 11 and all(len(p.value) <= 100 for p in parts)  # type: ignore[arg-type]
    assert b"".join(p.value for p in parts) == data  # type: ignore[misc]
    generation = manifest.headers[GENERATION_HEADER].decode()
    assert [p.key.decode() for p in parts] == chunks == [f"{KEY}/{generation}/{i}" for i in range(11)]
    assert [(p.headers[CHUNK_HEADER], p.headers[CHUNKS_HEADER], p.headers[GENERATION_HEADER]) for p in parts] == [
        (str(i).encode(), b"11", generation.encode()) for i in range(11)]
    assert manifest.key == KEY.encode() and manifest.headers[OFFSET_HEADER] == b"7"
    doc = orjson.loads(manifest.value)  # type: ignore[arg-type]
    assert (doc["generation"], doc["chunks"], doc["bytes"], doc["offset"]) == (generation, 11, 1050, 7)
    # every snapshot is a generation of its own: no two share a chunk key
    assert snapshot_records(KEY, 7, data, chunk_bytes=100)[1] != chunks


def test_the_default_chunk_fits_the_state_topic_and_the_worker_producer():
    assert STATE_CHUNK_BYTES + (64 << 10) <= 8 << 20 <= STATE_MAX_MESSAGE_BYTES
    with pytest.raises(ValueError):
        partitioned(STATE_MAX_MESSAGE_BYTES)


def test_each_snapshot_tombstones_the_chunks_of_the_one_it_replaces_after_its_own_manifest():
    ps = partitioned(100)
    first = write(ps, b"a" * 250, 1)
    second = write(ps, b"b" * 120, 2)
    old_chunks = [r.key for r in first if r.key != KEY.encode()]
    assert len(old_chunks) == 3
    manifest_at = [r.key for r in second].index(KEY.encode())
    assert [(r.key, r.value) for r in second[manifest_at + 1:]] == [(k, None) for k in old_chunks]
    third = write(ps, b"c" * 10, 3)  # one message again, then the second's two chunks go
    assert [r.key for r in third][0] == KEY.encode()
    assert [(r.value, len(r.headers)) for r in third[1:]] == [(None, 0), (None, 0)]
    assert write(ps, b"d" * 10, 4) == [StateRecord(KEY.encode(), b"d" * 10, {OFFSET_HEADER: b"4"})]


# -- what a restore reads -----------------------------------------------------------------


def test_old_single_message_snapshots_still_restore_and_a_tombstone_drops_state():
    # what workers before chunking wrote: the partition's key, the offset header, the snapshot
    log: Log = [(KEY, b"old state", {OFFSET_HEADER: b"5"}), ("detect/in/1", b"other", {OFFSET_HEADER: b"9"})]
    assert seen(fold(log)) == (5, b"old state")
    big = as_log(snapshot_records(KEY, 8, b"n" * 300, chunk_bytes=100)[0])
    assert seen(fold(log + big)) == (8, b"n" * 300)  # chunked over an old one: the newer wins
    assert seen(fold(log + big + [(KEY, None, {})])) is None


def test_a_torn_write_restores_the_previous_complete_snapshot():
    ps = partitioned(100)
    log = as_log(write(ps, b"1" * 350, 10))
    newer = as_log(write(ps, b"2" * 420, 20))
    for cut in range(len(newer)):
        read = fold(log + newer[:cut])
        if cut <= 5:  # 5 chunks, then the manifest: until it is written the previous one stands
            assert seen(read) == (10, b"1" * 350)
            assert read.garbage.get(KEY, []) == [k for k, _, _ in newer[:cut]]
        else:
            assert seen(read) == (20, b"2" * 420)


def test_a_shrinking_snapshot_never_mixes_in_chunks_of_a_larger_one():
    ps = partitioned(100)
    log: Log = []
    for offset, (size, fill) in enumerate(((950, b"a"), (230, b"b"), (40, b"c"), (510, b"d"), (101, b"e")), 1):
        records = as_log(write(ps, fill * size, offset))
        # cut right after its manifest, the larger one's chunks are all still there: not read
        assert seen(fold(log + records[:commit_at(records) + 1])) == (offset, fill * size)
        log += records
        assert seen(fold(log)) == (offset, fill * size)


def test_a_delivery_retried_whole_restores_its_snapshot_and_leaves_no_garbage():
    """The worker retries a failed delivery as a whole: chunks, manifest and tombstones may
    all be there twice, in that order, or the first attempt cut short anywhere."""
    ps = partitioned(100)
    log = as_log(write(ps, b"1" * 350, 1))
    second = as_log(write(ps, b"2" * 250, 2))
    for cut in range(len(second) + 1):
        read = fold(log + second[:cut] + second)
        assert seen(read) == (2, b"2" * 250) and read.garbage == {}, cut


def test_chunks_of_another_partition_with_a_longer_number_are_not_mixed_in():
    other = as_log(snapshot_records("detect/in/10", 3, b"z" * 300, chunk_bytes=100)[0])
    mine = as_log(snapshot_records(KEY, 4, b"y" * 300, chunk_bytes=100)[0])
    read = fold(other + mine)
    assert seen(read) == (4, b"y" * 300) and read.garbage == {}


@pytest.mark.parametrize("spoil", ["chunk missing", "extra chunk", "chunk bytes changed", "headers contradict key",
                                   "manifest not json", "manifest count", "hostile count", "manifest crc"])
def test_an_inconsistent_generation_is_ignored_and_the_previous_snapshot_kept(spoil, caplog):
    previous = as_log(snapshot_records(KEY, 1, b"p" * 250, chunk_bytes=100)[0])
    newer = as_log(snapshot_records(KEY, 2, b"q" * 250, chunk_bytes=100)[0])
    *chunks, (mkey, mvalue, mheaders) = newer
    doc = orjson.loads(mvalue)  # type: ignore[arg-type]
    k0, v0, h0 = chunks[0]
    if spoil == "chunk missing":
        chunks = chunks[1:]
    elif spoil == "extra chunk":
        chunks.append((k0.rsplit("/", 1)[0] + "/3", v0, {**h0, CHUNK_HEADER: b"3"}))
    elif spoil == "chunk bytes changed":
        chunks[0] = (k0, b"Q" + v0[1:], h0)  # type: ignore[index]
    elif spoil == "headers contradict key":
        chunks[0] = (k0, v0, {**h0, CHUNK_HEADER: b"1"})
    elif spoil == "manifest not json":
        mvalue = b"{not json"
    elif spoil == "manifest count":
        mvalue = orjson.dumps({**doc, "chunks": 2})
    elif spoil == "hostile count":
        mvalue = orjson.dumps({**doc, "chunks": 10**15})
    elif spoil == "manifest crc":
        mvalue = orjson.dumps({**doc, "crc32": doc["crc32"] ^ 1})
    with caplog.at_level(logging.ERROR, "agentwatch.state"):
        read = fold(previous + chunks + [(mkey, mvalue, mheaders)])
    assert seen(read) == (1, b"p" * 250)
    assert "previous snapshot" in caplog.text or "do not match its key" in caplog.text
    # the spoilt generation's chunks are garbage, to be tombstoned after the next write
    assert set(read.garbage[KEY]) == {k for k, _, _ in chunks}


def test_random_writes_torn_and_compacted_restore_the_last_complete_snapshot(monkeypatch):
    """Writes of random sizes (one message, a few chunks, many), some cut short at a random
    message (a crash: the next owner restores from the topic and carries on); after each,
    every way compaction can have cleaned the topic restores the last complete snapshot,
    and in the end nothing but the live snapshot is left once compaction has run."""
    rnd = random.Random(11)
    chunk = 64
    log: Log = []
    ps = partitioned(chunk)
    expected: tuple[int, bytes] | None = None
    torn = {"before its commit": 0, "after it": 0}
    for step in range(1, 60):
        data = rnd.randbytes(rnd.choice([10, 64, 65, 130, 300, 640]))
        records = as_log(write(ps, data, step))
        commit = commit_at(records)
        cut = rnd.randrange(len(records)) if rnd.random() < 0.3 else len(records)
        log += records[:cut]
        if cut > commit:
            expected = (step, data)
        for upto in {0, len(log) // 2, len(log) - 1, len(log)}:
            for drop in (False, True):
                assert seen(fold(compacted(log, upto, drop))) == expected, (step, upto, drop)
        if cut < len(records):
            torn["after it" if cut > commit else "before its commit"] += 1
            ps = restarted(monkeypatch, log, chunk)
            assert (ps.next_offset[0], ps.states[0].data) == (expected or (0, b""))  # type: ignore[attr-defined]
    assert min(torn.values()) >= 3, torn  # the seed exercises both
    ps = restarted(monkeypatch, log, chunk)
    last = rnd.randbytes(300)
    log += as_log(write(ps, last, 100))
    clean = compacted(log, len(log), drop_tombstones=True)
    assert seen(fold(clean)) == (100, last)
    assert sorted(k for k, _, _ in clean) == sorted([KEY] + ps._superseded[0])
    assert fold(log).garbage == {}


# -- on a real broker -----------------------------------------------------------------------


async def _state_topic(bootstrap: str) -> str:
    topic = f"test.{uuid.uuid4().hex[:8]}.state"
    await ensure_topics(bootstrap, [topic], 1, topic_configs={topic: dict(STATE_TOPIC_CONFIG)})
    return topic


async def _send(bootstrap: str, topic: str, records: list[StateRecord]) -> None:
    """As the worker delivers a checkpoint: handed to the producer in order, acknowledged together."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, max_request_size=STATE_MAX_MESSAGE_BYTES, acks="all")
    await producer.start()
    try:
        futures = [await producer.send(topic, r.value, key=r.key, partition=0, headers=list(r.headers.items()))
                   for r in records]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def _messages(bootstrap: str, topic: str) -> list[tuple[str, bytes | None]]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    tp = TopicPartition(topic, 0)
    out: list[tuple[str, bytes | None]] = []
    try:
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        end = (await consumer.end_offsets([tp]))[tp]
        while await consumer.position(tp) < end:
            for records in (await consumer.getmany(tp, timeout_ms=1000)).values():
                out += [(r.key.decode(), r.value) for r in records]
    finally:
        await consumer.stop()
    return out


async def _restore(bootstrap: str, topic: str, chunk_bytes: int) -> PartitionedState:
    ps = partitioned(chunk_bytes, bootstrap, topic)
    assert await ps.ensure({0}) == [0]
    return ps


@pytest.mark.kafka
async def test_chunked_snapshots_round_trip_a_compacted_topic_torn_and_shrinking(kafka_bootstrap):
    topic = await _state_topic(kafka_bootstrap)
    chunk = 64 << 10
    rnd = random.Random(5)
    first, second = rnd.randbytes(5 * chunk + 17), rnd.randbytes(4 * chunk - 1)
    ps = partitioned(chunk, kafka_bootstrap, topic)
    written = write(ps, first, 100)
    await _send(kafka_bootstrap, topic, written)
    owner = await _restore(kafka_bootstrap, topic, chunk)
    assert (owner.next_offset[0], owner.states[0].data) == (100, first)  # type: ignore[attr-defined]
    assert owner.last_restore[0] == len(first)

    # the next snapshot's write is cut short after two of its four chunks: the first stands
    torn = write(ps, second, 200)
    assert len(torn) == 4 + 1 + 6  # chunks, manifest, tombstones of the first's six chunks
    await _send(kafka_bootstrap, topic, torn[:2])
    owner = await _restore(kafka_bootstrap, topic, chunk)
    assert (owner.next_offset[0], owner.states[0].data) == (100, first)  # type: ignore[attr-defined]

    # the new owner's next snapshot is smaller (one message): it replaces the first, and
    # the first's chunks and the torn write's go; nothing of either is read again
    await _send(kafka_bootstrap, topic, write(owner, b"small", 300))
    tombstoned = [k for k, v in await _messages(kafka_bootstrap, topic) if v is None]
    assert sorted(tombstoned) == sorted(r.key.decode() for r in written[:6] + torn[:2])
    again = await _restore(kafka_bootstrap, topic, chunk)
    assert (again.next_offset[0], again.states[0].data) == (300, b"small")  # type: ignore[attr-defined]
    assert again._superseded[0] == []


@pytest.mark.kafka
async def test_an_old_single_message_snapshot_restores_then_is_replaced_by_chunks(kafka_bootstrap):
    topic = await _state_topic(kafka_bootstrap)
    old = orjson.dumps({"state": "as a worker before chunking wrote it"})
    # exactly what the previous PartitionedState.due + Pipeline._snapshots sent
    await _send(kafka_bootstrap, topic, [StateRecord(KEY.encode(), old, {OFFSET_HEADER: b"77"})])
    owner = await _restore(kafka_bootstrap, topic, 16)
    assert (owner.next_offset[0], owner.states[0].data) == (77, old)  # type: ignore[attr-defined]
    grown = old * 3
    await _send(kafka_bootstrap, topic, write(owner, grown, 78))
    again = await _restore(kafka_bootstrap, topic, 16)
    assert (again.next_offset[0], again.states[0].data) == (78, grown)  # type: ignore[attr-defined]


@pytest.mark.kafka
async def test_a_state_over_64_mib_is_written_and_restored_with_the_default_chunks(kafka_bootstrap):
    """The single-message limit is gone: 70 MiB, over the topic's max.message.bytes, in
    nine chunks of the default size, read back whole."""
    topic = await _state_topic(kafka_bootstrap)
    data = random.Random(9).randbytes(70 << 20)
    ps = PartitionedState("detect", "in", make=Blob, restore=Blob.restore, replay=None, bootstrap=kafka_bootstrap,
                          state_topic=topic, snapshot_s=0.0)
    records = write(ps, data, 1)
    assert len(data) > STATE_MAX_MESSAGE_BYTES and len(records) == 9 + 1
    await _send(kafka_bootstrap, topic, records)
    del records
    owner = await _restore(kafka_bootstrap, topic, STATE_CHUNK_BYTES)
    assert owner.states[0].data == data  # type: ignore[attr-defined]
