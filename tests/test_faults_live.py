"""Fault injection: workers as real processes on the real broker and chDB.

One deterministic workload (native events in JSON arrays, keyed by agent,
half of them traced so they go through the correlate stage too, with retry
loops that raise alerts and poison records among them) goes through a worker
that is hurt while it works. Each case prints events produced / stored /
duplicates and alerts expected / emitted / extra, and asserts:

* every valid event stored exactly once as a row (duplicates are counted and
  collapse in the ReplacingMergeTree, they are never missing), every poison
  record in the DLQ;
* the alert ids and their final counts are those of an uninterrupted run of
  the same input (``streams.replay``, which the behaviour corpus proves equal
  to the live worker), nothing extra.

Episodes of one chunk are dense in event time and chunks are five minutes
apart, so wall-clock pauses (a restart) can neither close a window early nor
make the next chunk late: the verdict depends only on nothing being lost or
doubled. Chunks are produced seconds apart, so input that a restarted stage
reads again reaches minutes back in event time per second of wall time;
detect recognises a redelivered event only within its dedup window (10
minutes of event time), so re-reading more than the batches in hand at the
crash shows up as a re-counted alert.
"""

from __future__ import annotations

import json
import random
import signal
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import orjson
import pytest

from deploy import broker
from streams.policy_file import load_policy
from schemas.alerts import Alert
from streams.stages import CorrelateStage, DetectStage, IngestStage, RawRecord
from schemas.decoders.native import decode_native
from tests.live import LiveWorker

pytestmark = pytest.mark.kafka

T0 = datetime(2026, 1, 15, 0, 0, tzinfo=timezone.utc)
AGENTS = 8
CHUNKS = 6


@dataclass
class Workload:
    chunks: list[list[tuple[bytes, bytes]]]  # per chunk: (key, value) messages
    valid_events: int
    poison: int


def _nested(depth: int) -> object:
    value: object = "x"
    for _ in range(depth):
        value = {"a": value}
    return value


def workload(seed: int) -> Workload:
    """Chunks of messages; in each chunk every agent acts in a burst of 8 calls
    one second apart, and some agents repeat one call (a retry loop: an alert
    whose count grows with every further repeat)."""
    rng = random.Random(seed)
    chunks: list[list[tuple[bytes, bytes]]] = []
    valid = poison = 0
    for c in range(CHUNKS):
        start = T0 + timedelta(minutes=5 * c)
        msgs: list[tuple[bytes, bytes]] = []
        for a in range(AGENTS):
            agent = f"agent-{a}"
            looping = rng.random() < 0.5
            traced = a % 2 == 0
            events = []
            for i in range(8):
                args = {"q": "same"} if looping else {"q": f"v{i}"}
                ev = {"kind": "tool_call", "agent_id": agent, "ts": (start + timedelta(seconds=i + a)).isoformat(),
                      "tool_name": "search", "arguments": args, "outcome": "ok",
                      "event_id": f"s{seed}-c{c}-a{a}-{i}"}
                if traced:
                    ev["trace_id"] = f"{seed:08x}{c:08x}{a:08x}{0:08x}"
                    ev["span_id"] = f"{c:04x}{a:04x}{i:08x}"
                events.append(ev)
            # two messages per agent per chunk (a client flushing twice)
            msgs.append((agent.encode(), orjson.dumps(events[:4])))
            msgs.append((agent.encode(), orjson.dumps(events[4:])))
            valid += 8
        for p in range(2):  # poison: a timestamp past year 9999, nesting past the encoder's limit
            bad = ({"kind": "tool_call", "agent_id": "poison", "ts": 1e21, "tool_name": "x", "n": f"{c}-{p}"}
                   if p == 0 else
                   {"kind": "tool_call", "agent_id": "poison", "ts": start.isoformat(), "tool_name": "x",
                    "arguments": _nested(300), "n": f"{c}-{p}"})
            msgs.insert(rng.randrange(len(msgs) + 1), (b"poison", json.dumps(bad).encode()))
            poison += 1
        chunks.append(msgs)
    return Workload(chunks, valid, poison)


def expected_alerts(w: Workload, topic: str, policy_file: Path | None = None) -> dict[str, int]:
    """alert id -> final count of an uninterrupted run, through the same stages as replay."""
    policy = load_policy(policy_file)
    ingest = IngestStage({topic: decode_native})
    correlate, detect = CorrelateStage(policy), DetectStage(policy)
    latest: dict[str, Alert] = {}
    for n, (_, value) in enumerate(m for chunk in w.chunks for m in chunk):
        routed = ingest.process([RawRecord(topic, 0, n, value)])
        attributed = correlate.process_local([ev for evs in routed.by_trace.values() for ev in evs])
        attributed += [ev for evs in routed.by_agent.values() for ev in evs]
        for a in detect.process(attributed):
            latest[a.alert_id] = a
    for a in detect.process(correlate.finish_local()) + detect.finish():
        latest[a.alert_id] = a
    return {a.alert_id: a.count for a in latest.values() if a.mode.value != "shadow"}


def produce_chunk(w: LiveWorker, chunk: list[tuple[bytes, bytes]]) -> None:
    import asyncio

    from aiokafka import AIOKafkaProducer

    async def go() -> None:
        p = AIOKafkaProducer(bootstrap_servers=w.bootstrap, linger_ms=5)
        await p.start()
        try:
            for key, value in chunk:
                await p.send_and_wait(w.settings.topic_events_in, value, key=key)
        finally:
            await p.stop()

    asyncio.run(go())


def stored(w: LiveWorker) -> tuple[int, int]:
    rows = w.query("SELECT count(), uniqExact(event_id) FROM agentwatch.events").rows
    return int(rows[0][0]), int(rows[0][1])


def verdict(name: str, w: LiveWorker, load: Workload, *, timeout: float = 180, policy: Path | None = None) -> None:
    """Wait until everything is stored and every expected alert has its final count; print and assert."""
    want = expected_alerts(load, w.settings.topic_events_in, policy)
    deadline = time.monotonic() + timeout
    total = distinct = dead = 0
    while time.monotonic() < deadline:
        total, distinct = stored(w)
        dead = int(w.query("SELECT uniqExact(topic, partition, offset) FROM agentwatch.dlq").rows[0][0])
        if distinct >= load.valid_events and dead >= load.poison:
            break
        time.sleep(1)

    def complete(alerts: list[Alert]) -> bool:
        got = {a.alert_id: a.count for a in alerts}
        return all(got.get(k) == n for k, n in want.items())

    alerts = w.wait_alerts(complete, timeout=max(10.0, deadline - time.monotonic()))
    got = {a.alert_id: a.count for a in alerts}
    extra = sorted(set(got) - set(want))
    wrong = {k: (got.get(k), n) for k, n in want.items() if got.get(k) != n}
    for a in alerts:
        if a.alert_id in wrong:
            print("  wrong:", a.alert_id, a.agent_id, a.first_seen, a.last_seen, a.count, "want", want[a.alert_id])
    print(f"\n[{name}] events produced={load.valid_events} stored={distinct} duplicates={total - distinct} "
          f"poison produced={load.poison} dlq={dead} | alerts expected={len(want)} emitted={len(got)} "
          f"extra={len(extra)} wrong_count={len(wrong)}")
    assert distinct == load.valid_events, w.log_tail()
    assert dead == load.poison, w.log_tail()
    assert not extra and not wrong, (extra, wrong, w.log_tail())


def uncommitted(w: LiveWorker) -> dict[str, int]:
    """Messages past the worker group's committed offset, per partition of the stages' inputs."""
    import asyncio

    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient

    s = w.settings

    async def go() -> dict[str, int]:
        admin = AIOKafkaAdminClient(bootstrap_servers=w.bootstrap)
        consumer = AIOKafkaConsumer(bootstrap_servers=w.bootstrap)
        await admin.start()
        await consumer.start()
        try:
            committed = await admin.list_consumer_group_offsets(s.app_id)
            topics = await admin.describe_topics([s.topic_events_in, s.topic_by_trace, s.topic_by_agent, s.topic_dlq])
            tps = [TopicPartition(t["topic"], p["partition"]) for t in topics for p in t["partitions"]]
            assert {tp.topic for tp in tps} == {s.topic_events_in, s.topic_by_trace, s.topic_by_agent, s.topic_dlq}
            ends = await consumer.end_offsets(tps)
            return {f"{tp.topic}/{tp.partition}": end - (committed[tp].offset if tp in committed else 0)
                    for tp, end in ends.items()}
        finally:
            await consumer.stop()
            await admin.close()

    return asyncio.run(go())


def wait_events(w: LiveWorker, n: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while stored(w)[1] < n:
        assert time.monotonic() < deadline, w.log_tail()
        time.sleep(0.3)


# A policy whose allowed lateness is shorter than one of the outages below: a restarted
# worker that let the downtime run its idle clock on would judge the re-read backlog late
# and count alerts differently from an uninterrupted run (it did, before idle event time
# was held at input known to be waiting). Within a partition, events of one chunk go back
# at most 7 s (agents interleave), so 10 s of lateness changes nothing else.
LATENESS_S = 10.0


def short_lateness_policy(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(f"version: faults-1\nallowed_lateness_s: {LATENESS_S}\n")
    return path


def test_sigkill_at_three_random_points_with_poison_records(kafka_bootstrap, tmp_path):
    rng = random.Random(7)
    load = workload(seed=1)
    policy = short_lateness_policy(tmp_path)
    # faust's periodic commit off, as for incarnations killed before its timer fires: what a
    # restart re-reads is what the batches' checkpoints left uncommitted
    w = LiveWorker(kafka_bootstrap, tmp_path, policy=policy, env={"AGENTWATCH_FAULTS": "periodic_commit"}).start()
    try:
        kill_after = sorted(rng.sample(range(1, CHUNKS), 3))
        for c, chunk in enumerate(load.chunks):
            produce_chunk(w, chunk)
            if c in kill_after:
                # somewhere inside the processing of this chunk
                time.sleep(rng.uniform(0.0, 1.5))
                assert w.proc is not None
                w.proc.send_signal(signal.SIGKILL)
                w.proc.wait()
                if c == kill_after[0]:
                    time.sleep(LATENESS_S + 2)  # one outage longer than the allowed lateness
                w.start()
            # the next chunk once this one is in: a backlog of several chunks would reach
            # the detectors interleaved across input partitions, minutes apart in event
            # time (see the report: one watermark per partition's engine, not per agent)
            wait_events(w, (c + 1) * 8 * AGENTS, timeout=180)
        verdict("sigkill x3", w, load, policy=policy)
        # with faust's periodic commit off, only each batch's checkpoint commits: everything
        # done is committed (a worker leaving commits to a timer re-read minutes of input after
        # short-lived restarts, beyond detect's redelivery memory, and re-counted alerts)
        deadline = time.monotonic() + 30
        while any((left := uncommitted(w)).values()) and time.monotonic() < deadline:
            time.sleep(0.5)
        print(f"[sigkill x3] uncommitted after the last batch: {left}")
        assert not any(left.values()), left
    finally:
        w.stop()


def test_injected_failure_in_each_stage_producer_and_store(kafka_bootstrap, tmp_path):
    rng = random.Random(11)
    # each chunk is produced once the previous one is stored, so every stage takes at
    # least one batch per chunk and the n-th batch of each is somewhere in the stream
    points = {p: rng.randint(1, CHUNKS - 1) for p in ("ingest", "correlate", "detect", "producer", "store")}
    faults = ",".join(f"{p}@{n}" for p, n in points.items())
    load = workload(seed=2)
    with LiveWorker(kafka_bootstrap, tmp_path, env={"AGENTWATCH_FAULTS": faults}) as w:
        for c, chunk in enumerate(load.chunks):
            produce_chunk(w, chunk)
            wait_events(w, (c + 1) * 8 * AGENTS)
        verdict(f"faults {faults}", w, load)
        log = w.log_path.read_text()
        for p in points:
            assert f"injected fault at {p}" in log, p


def test_broker_restart_mid_stream(tmp_path):
    state = tmp_path / "kafka"
    info = broker.up(state)
    try:
        load = workload(seed=3)
        with LiveWorker(info.bootstrap, tmp_path) as w:
            produce_chunk(w, load.chunks[0])
            wait_events(w, 8 * AGENTS)
            produce_chunk(w, load.chunks[1])  # mid-stream: in flight while the broker goes
            broker.down(state)
            again = broker.up(state)
            assert again.bootstrap == info.bootstrap  # same port: workers and agents reconnect
            # one chunk at a time after that, as in the SIGKILL case: a backlog of several
            # chunks, minutes apart in event time, would reach a detect partition interleaved
            # across input partitions beyond the allowed lateness (one watermark per partition)
            for c, chunk in enumerate(load.chunks[2:], start=2):
                produce_chunk(w, chunk)
                wait_events(w, (c + 1) * 8 * AGENTS, timeout=180)
            verdict("broker restart", w, load)
            assert w.proc is not None and w.proc.poll() is None
    finally:
        broker.down(state)
