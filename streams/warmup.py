"""Rebuilding detector state from the log when a worker starts.

The correlate and detect stages keep their windows, timers and pending spans
in memory. Their inputs are agentwatch's own internal topics, so a starting
worker re-reads the recent past of those topics (``AGENTWATCH_STATE_REBUILD_S``)
up to the offsets its consumer group committed, feeds it through the same
stages and throws their outputs away: those were published before the
restart. Consumption then resumes at the committed offsets with the state the
stages had, so a pattern that spans a restart (four calls before it, the fifth
after) is still caught, alert ids stay the same, and spans that were waiting
for their agent span when the worker stopped are held again instead of lost.
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
from aiokafka.errors import KafkaError

from schemas.errors import BrokerError
from schemas.events import Event, events_from_json
from streams.stages import CorrelateStage, DetectStage

log = logging.getLogger("agentwatch.warmup")


@dataclass
class WarmupReport:
    messages: int = 0
    events: int = 0
    seconds: float = 0.0


async def _committed(bootstrap: str, group: str, *, timeout_s: float = 60,
                     security: Mapping[str, Any] | None = None) -> dict[TopicPartition, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **(security or {}))
    await admin.start()
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                offsets = await admin.list_consumer_group_offsets(group)
                break
            except KafkaError as exc:
                # a fresh broker has no group coordinator until __consumer_offsets exists
                if not exc.retriable or time.monotonic() > deadline:
                    raise BrokerError(f"cannot read the committed offsets of group {group!r}: {exc}") from None
                await asyncio.sleep(0.5)
    finally:
        await admin.close()
    return {tp: meta.offset for tp, meta in offsets.items() if meta is not None and meta.offset >= 0}


async def _read(bootstrap: str, topic: str, committed: dict[TopicPartition, int], since_ms: int,
                report: WarmupReport, security: Mapping[str, Any] | None = None) -> list[Event]:
    """Events of ``topic`` from ``since_ms`` up to (not including) the committed offsets."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                max_partition_fetch_bytes=16 << 20, **(security or {}))
    await consumer.start()
    events: list[Event] = []
    try:
        ends = {TopicPartition(tp.topic, tp.partition): off for tp, off in committed.items()
                if tp.topic == topic and off > 0}
        if not ends:
            return events
        consumer.assign(list(ends))
        starts = await consumer.offsets_for_times({tp: since_ms for tp in ends})
        remaining = set()
        for tp, end in ends.items():
            found = starts.get(tp)
            start = found.offset if found is not None else end
            if start < end:
                consumer.seek(tp, start)
                remaining.add(tp)
        while remaining:
            batches = await consumer.getmany(*remaining, timeout_ms=1000)
            if not batches:
                break
            for tp, records in batches.items():
                for r in records:
                    if r.offset >= ends[tp]:
                        remaining.discard(tp)
                        break
                    report.messages += 1
                    if r.value:
                        events.extend(events_from_json(r.value))
                if records and records[-1].offset >= ends[tp] - 1:
                    remaining.discard(tp)
    finally:
        await _stop(consumer)
    return events


async def _stop(consumer: AIOKafkaConsumer) -> None:
    try:
        await consumer.stop()
    except asyncio.CancelledError:
        # aiokafka's group-less coordinator cancels its own reset task on close and the
        # await re-raises it; only a cancellation of this task is ours to propagate
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise


async def rebuild_state(
    *,
    bootstrap: str,
    group: str,
    by_trace_topic: str,
    by_agent_topic: str,
    correlate: CorrelateStage,
    detect: DetectStage,
    horizon_s: float,
    security: Mapping[str, Any] | None = None,
) -> WarmupReport:
    report = WarmupReport()
    if horizon_s <= 0:
        return report
    started = time.perf_counter()
    committed = await _committed(bootstrap, group, security=security)
    if not committed:
        return report  # a new consumer group: nothing was processed before
    since_ms = int((time.time() - horizon_s) * 1000)
    traced = await _read(bootstrap, by_trace_topic, committed, since_ms, report, security)
    correlate.process(traced)
    correlate.take_rekeyed()  # already sent round before the restart
    attributed = await _read(bootstrap, by_agent_topic, committed, since_ms, report, security)
    detect.process(attributed)  # the alerts it re-derives were published before the restart
    detect.engine.resolved.clear()
    report.events = len(traced) + len(attributed)
    report.seconds = time.perf_counter() - started
    log.warning("detector state rebuilt from the log", extra={
        "messages": report.messages, "events": report.events, "seconds": round(report.seconds, 2),
        "horizon_s": horizon_s})
    return report
