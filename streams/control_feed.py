"""Every worker reads the whole control and acks topics, outside the consumer group.

Consumed in the group, the two topics are split across workers by partition:
the worker that issued a halt (or that holds its target's detect partition)
may never see the ack, which lands on a partition another worker reads, and
escalates a command that was obeyed (a false ``killswitch_unacknowledged``).
The control plane's state is small (the commands in force and their acks), and
the topics themselves are its durable record, so each worker rebuilds it by
reading both topics from ``killswitch_ttl_s`` ago (older commands have
expired) and then follows them. Which worker escalates a command is decided by
ownership of its target's detect partition (``ControlPlane.tick(owns=...)``),
so the answer follows the agent through restarts and rebalances.

Nothing is committed: a restarted worker reads the same window again, in time
proportional to the commands and acks of one TTL, not to the event traffic.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from streams.control_plane import ControlPlane

log = logging.getLogger("agentwatch.control")


class ControlFeed:
    """Feeds ``plane`` with every command and ack; ``caught_up`` is set once the window
    that existed at start has been read (before that, escalating or issuing could act
    on a partial picture)."""

    def __init__(self, plane: ControlPlane, bootstrap: str, control_topic: str, acks_topic: str, *,
                 window_s: float, security: Mapping[str, Any] | None = None,
                 on_forged: Callable[[str], None] | None = None) -> None:
        self.plane = plane
        self.bootstrap = bootstrap
        self.topics = (control_topic, acks_topic)
        self.window_s = window_s
        self.security = dict(security or {})
        self.on_forged = on_forged
        self.caught_up = asyncio.Event()
        self.records = 0

    async def run(self) -> None:
        """Follow both topics until cancelled; a broker error restarts the read (the window
        is read again: tracking and acks are idempotent)."""
        delay = 0.5
        while True:
            try:
                await self._follow()
            except asyncio.CancelledError:
                raise
            except (KafkaError, OSError, asyncio.TimeoutError) as exc:
                log.error("reading the control and acks topics failed; retrying",
                          extra={"error": repr(exc)[:300], "retry_in_s": delay})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10)

    async def _follow(self) -> None:
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False,
                                    group_id=None, **self.security)
        await consumer.start()
        try:
            tps = [TopicPartition(t, p) for t in self.topics
                   for p in sorted(consumer.partitions_for_topic(t) or await self._partitions(consumer, t))]
            consumer.assign(tps)
            since_ms = int((time.time() - self.window_s) * 1000)
            starts = await consumer.offsets_for_times({tp: since_ms for tp in tps})
            ends = await consumer.end_offsets(tps)
            for tp in tps:
                found = starts.get(tp)
                consumer.seek(tp, found.offset if found is not None else ends[tp])
            pending = {tp for tp in tps if await consumer.position(tp) < ends[tp]}
            if not pending:
                self.caught_up.set()
            while True:
                batches = await consumer.getmany(timeout_ms=500, max_records=1000)
                now = time.time()
                for tp, records in batches.items():
                    for r in records:
                        self._apply(tp.topic, r.value or b"", now)
                if pending:
                    pending = {tp for tp in pending if await consumer.position(tp) < ends[tp]}
                    if not pending:
                        log.info("control plane caught up", extra={"records": self.records})
                        self.caught_up.set()
        finally:
            await consumer.stop()

    async def _partitions(self, consumer: AIOKafkaConsumer, topic: str) -> set[int]:
        # metadata of a topic this consumer has not asked about yet
        for _ in range(50):
            await consumer._client.force_metadata_update()  # noqa: SLF001 - aiokafka has no public refresh
            parts = consumer.partitions_for_topic(topic)
            if parts:
                return set(parts)
            await asyncio.sleep(0.2)
        raise KafkaError(f"no partitions for {topic}")

    def _apply(self, topic: str, value: bytes, now: float) -> None:
        self.records += 1
        if topic == self.topics[0]:
            self.plane.on_control_record(value, now)
            return
        ack = ControlPlane.parse_ack(value)
        forged = self.plane.on_ack(ack) if ack is not None else None
        if forged is not None and self.on_forged is not None:
            self.on_forged(forged)
