"""The bench's state figures: bytes of detector state per active agent, and
the time a stage takes to get its state back (read the snapshot from the
compacted state topic, chunks and all, then rebuild the stage from it) against
the state's size. Restore is proportional to the state, not to the traffic
that built it."""

from __future__ import annotations

import asyncio
import gc
import random
import time
import tracemalloc
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml
from aiokafka import AIOKafkaProducer

from detectors.engine import DetectionEngine
from detectors.policy import parse_policy
from schemas.decoders.otlp import decode_otlp
from schemas.events import Event
from streams.kafka import ensure_topics
from streams.stages import CorrelateStage, DetectStage
from streams.state import (STATE_MAX_MESSAGE_BYTES, STATE_TOPIC_CONFIG, collector_paused, read_snapshots,
                           snapshot_records, state_key)
from streams.bench.workload import NS, POLICY, TraceWriter, llm, tool

RESTORE_AGENTS = (1_000, 3_000, 9_000, 16_000, 30_000)


def fleet_events(agents: int, t0_ns: int) -> list[Event]:
    """One trace (6 tool calls, 3 LLM calls) of each of ``agents`` agents, decoded."""
    rng = random.Random(3)
    events: list[Event] = []
    for a in range(agents):
        w = TraceWriter(rng)
        w.trace(f"mem-agent-{a:05d}", t0_ns + a * 1_000_000,
                [tool("search_docs", f'{{"q": {a}, "c": {c}}}') for c in range(6)] + [llm(20)] * 3)
        events += decode_otlp(w.take().value).events
    return events


def state_per_agent(agents: int = 2000) -> tuple[float, float]:
    """Bytes the detectors allocate per active agent (tracemalloc), while its windows are open and after
    they close. The events are decoded before tracing starts, so the events the windows hold are not in
    the figure, only the state that refers to them."""
    engine = DetectionEngine(parse_policy(yaml.safe_load(POLICY)))
    t0 = (time.time_ns() // (60 * NS)) * 60 * NS - 3600 * NS
    events = fleet_events(agents, t0)
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        engine.process(events)
        gc.collect()
        open_windows = tracemalloc.get_traced_memory()[0] - base
        engine.advance(t0 / NS + 7200)
        gc.collect()
        closed = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    return open_windows / agents, closed / agents


@dataclass(frozen=True)
class RestoreRow:
    agents: int
    events: int
    correlate_bytes: int
    detect_bytes: int
    read_s: float  # both snapshots read back from the compacted topic on the broker (chunks joined)
    rebuild_s: float  # both stages rebuilt from them, as a worker's restore does
    messages: int  # messages the two snapshots were written as (chunks and manifests)


async def restore_times(bootstrap: str, security: Mapping[str, Any] | None = None,
                        sizes: tuple[int, ...] = RESTORE_AGENTS) -> list[RestoreRow]:
    """For each fleet size: the correlate and detect stages fed one trace per agent (windows,
    join entries and timers open, as in a worker mid-traffic), snapshotted as a worker does, the
    snapshots written to a fresh state topic, then read back and the stages rebuilt, timed."""
    policy = parse_policy(yaml.safe_load(POLICY))
    topic = f"bench.{uuid.uuid4().hex[:8]}.state"
    await ensure_topics(bootstrap, [topic], 1, security=security, topic_configs={topic: dict(STATE_TOPIC_CONFIG)})
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, max_request_size=STATE_MAX_MESSAGE_BYTES,
                                **(security or {}))
    await producer.start()
    rows: list[RestoreRow] = []
    try:
        for agents in sizes:
            t0 = (time.time_ns() // (60 * NS)) * 60 * NS - 120 * NS
            events = fleet_events(agents, t0)
            correlate, detect = CorrelateStage(policy), DetectStage(policy)
            detect.process(correlate.process(events))
            snaps = {state_key("correlate", "bench", agents): correlate.snapshot(),
                     state_key("detect", "bench", agents): detect.snapshot()}
            ck, dk = snaps
            del correlate, detect
            records = [r for key, data in snaps.items() for r in snapshot_records(key, len(events), data)[0]]
            # sent one after the other and acknowledged together, as the worker's delivery does
            await asyncio.gather(*[await producer.send(topic, r.value, key=r.key, partition=0,
                                                       headers=list(r.headers.items())) for r in records])
            del records
            gc.collect()
            t = time.perf_counter()
            found = (await read_snapshots(bootstrap, topic, set(snaps), security=security)).snapshots
            read_s = time.perf_counter() - t
            t = time.perf_counter()
            with collector_paused():
                # held until timed: a worker keeps what it restores, freeing it is not part of a restore
                restored = CorrelateStage.restore(policy, found[ck].data), DetectStage.restore(policy, found[dk].data)
            rebuild_s = time.perf_counter() - t
            del restored
            rows.append(RestoreRow(agents, len(events), len(snaps[ck]), len(snaps[dk]), read_s, rebuild_s,
                                   len(found[ck].chunk_keys) + len(found[dk].chunk_keys) + 2))
            del found, snaps, events
    finally:
        await producer.stop()
    return rows
