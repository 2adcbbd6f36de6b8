"""The faust worker: moves batches between Kafka topics and the stages.

Three keyed hops, each an explicit topic (no hidden repartitions):

    otlp_spans, agentwatch.events.in, agentwatch.audit.in
        --ingest-->  agentwatch.internal.by_trace (key: trace id)   + agentwatch.dlq
        --correlate-->  agentwatch.internal.by_agent (key: agent id)
        --detect-->  agentwatch.alerts / .alerts.shadow + ClickHouse

Faust's cost is per Kafka message, so every hop carries a JSON array of events
per key per batch, and every agent consumes with ``take_events`` (a batch of
messages per iteration). A batch's outputs (downstream messages, ClickHouse
rows) are made durable before the loop asks for the next batch; faust acks the
batch's messages only then, so offsets are committed after what depends on
them (at least once, nothing lost).

The worker is the only process that opens the embedded ClickHouse store; other
commands read it through the loopback-only ``/query`` endpoint served here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any, Callable, TypeVar

import faust
from faust.types import EventT
from faust.web import View

from detectors.policy import Policy, PolicyWatcher
from schemas.alerts import Alert, Mode
from schemas.errors import StoreError
from schemas.events import Event, events_from_json, events_to_json
from sinks.clickhouse import AlertSink, ClickHouseStore, DlqRecord, DlqSink, EventSink, KillSwitchSink, open_store
from streams.control_plane import ControlPlane, control_settings
from streams.kafka import partition_for
from streams.metrics import Metrics
from streams.outputs import build_router
from streams.query_api import QueryApi, health
from streams.settings import Settings
from streams.stages import (CorrelateStage, DeadLetter, DetectStage, IngestStage, RawRecord, Routed,
                            decoder_for_topics, header_pairs)

log = logging.getLogger("agentwatch.worker")
R = TypeVar("R")


def _now() -> float:
    return time.time()


class Pipeline:
    """One worker: the faust app, its stages, its store and its metrics."""

    def __init__(self, settings: Settings, policy: Policy, bootstrap: str, partitions: dict[str, int],
                 policy_watcher: PolicyWatcher | None = None) -> None:
        self.settings = settings
        self.policy_watcher = policy_watcher
        # actual partition counts of the internal topics: events are packed per partition
        self.partitions = partitions
        self.policy = policy
        self.metrics = Metrics.create()
        s = settings
        self.app = faust.App(
            s.app_id,
            broker=f"kafka://{bootstrap}",
            store="memory://",
            autodiscover=False,
            topic_partitions=s.partitions,
            topic_allow_declare=True,
            consumer_auto_offset_reset="earliest",
            producer_acks=-1,
            web_enabled=True,
            web_bind=s.web_host,
            web_host=s.web_host,
            web_port=s.web_port,
            datadir=str(s.home_dir / "faust"),
            stream_buffer_maxsize=max(4096, s.batch_max_messages * 4),
        )
        raw = dict(value_type=bytes, key_type=bytes, value_serializer="raw", key_serializer="raw")
        self.inputs = self.app.topic(s.topic_otlp, s.topic_events_in, s.topic_audit_in, **raw)
        self.by_trace = self.app.topic(s.topic_by_trace, **raw)
        self.by_agent = self.app.topic(s.topic_by_agent, **raw)
        self.dlq = self.app.topic(s.topic_dlq, **raw)
        self.alerts = self.app.topic(s.topic_alerts, **raw)
        self.shadow_alerts = self.app.topic(s.topic_shadow_alerts, **raw)
        self.control_topic = self.app.topic(s.topic_control, **raw)
        self.acks_topic = self.app.topic(s.topic_acks, **raw)
        self.control = ControlPlane.from_settings(control_settings(s), s.home_dir)
        self.router = build_router(s, self.metrics.registry)
        self.query_api = QueryApi(s)  # analyst SQL: authenticated, read-only, off the loop and the writer

        self.ingest = IngestStage(decoder_for_topics(s.topic_otlp, s.topic_events_in, s.topic_audit_in, pg=s.pg_log),
                                  header_identity=s.header_identity)
        self.correlate = CorrelateStage(policy)
        self.detect = DetectStage(policy)

        # chDB is an in-process engine: one thread owns every call into it
        self._db = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clickhouse")
        self.store: ClickHouseStore | None = None
        self.event_sink: EventSink | None = None
        self.alert_sink: AlertSink | None = None
        self.dlq_sink: DlqSink | None = None
        self.killswitch_sink: KillSwitchSink | None = None
        self._positions: dict[tuple[str, int], int] = {}
        self.crashed: BaseException | None = None

        self._register()

    # -- lifecycle -------------------------------------------------------------------------

    def open_store(self) -> None:
        """Open ClickHouse and apply the DDL before consuming anything."""

        def _open() -> ClickHouseStore:
            store = open_store(self.settings.dsn)
            store.apply_schema()
            return store

        self.store = self._db.submit(_open).result()
        self.event_sink = EventSink(self.store)
        self.alert_sink = AlertSink(self.store)
        self.dlq_sink = DlqSink(self.store)
        self.killswitch_sink = KillSwitchSink(self.store)

    def close(self) -> None:
        self.query_api.close()
        if self.store is not None:
            self._db.submit(self.store.close).result()
        self._db.shutdown(wait=True)

    async def _in_db(self, fn: Callable[..., R], *args: Any) -> R:
        return await asyncio.get_running_loop().run_in_executor(self._db, fn, *args)

    # -- wiring ----------------------------------------------------------------------------

    def _register(self) -> None:
        s = self.settings
        app = self.app
        app.agent(self.inputs, name="ingest")(self._fail_fast(self._ingest_agent))
        app.agent(self.by_trace, name="correlate")(self._fail_fast(self._correlate_agent))
        app.agent(self.by_agent, name="detect")(self._fail_fast(self._detect_agent))
        app.agent(self.dlq, name="dlq_store")(self._fail_fast(self._dlq_agent))
        app.agent(self.control_topic, name="control")(self._fail_fast(self._control_agent))
        app.agent(self.acks_topic, name="acks")(self._fail_fast(self._acks_agent))
        app.timer(interval=s.tick_s)(self._guarded_tick)
        if self.router is not None:
            app.task(self._start_outputs)
        app.timer(interval=5.0)(self._measure_lag)
        app.page("/metrics")(_view(get=self._metrics_view))
        app.page("/query")(_view(post=self._query_view))
        app.page("/healthz")(_view(get=self._health_view))

    def _fail_fast(self, stage: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """A stage that raises stops the whole worker (exit status 1).

        Left to itself faust logs the crash and keeps the process alive with
        that stage dead: nothing would be processed and nothing would say so.
        Stopping instead lets a supervisor restart the worker, which resumes
        from the last committed offsets, so nothing is lost.
        """

        async def guarded(stream: Any) -> None:
            try:
                await stage(stream)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.critical("stage crashed; stopping the worker", extra={"stage": stage.__name__,
                                                                          "error": repr(exc)}, exc_info=True)
                self.crashed = exc
                asyncio.get_running_loop().call_soon(self._stop_worker)
                raise

        guarded.__name__ = stage.__name__
        return guarded

    async def _guarded_tick(self) -> None:
        # faust passes the app to a timer that takes an argument, so the tick gets its
        # own zero-argument guard: a failed tick (alerts not delivered) stops the worker too
        async def tick(_: Any) -> None:
            await self._tick()

        tick.__name__ = "_tick"
        await self._fail_fast(tick)(None)

    def _stop_worker(self) -> None:
        os.kill(os.getpid(), signal.SIGTERM)

    def _batches(self, stream: Any) -> Any:
        return stream.take_events(self.settings.batch_max_messages, within=self.settings.batch_within_s)

    def _track(self, events: list[EventT]) -> None:
        for e in events:
            m = e.message
            self._positions[(m.topic, m.partition)] = m.offset

    async def _ingest_agent(self, stream: Any) -> None:
        async for batch in self._batches(stream):
            started = time.perf_counter()
            self._track(batch)
            records = [RawRecord(e.message.topic, e.message.partition, e.message.offset, e.value or b"",
                                 e.message.key, header_pairs(e.message.headers), e.message.timestamp)
                       for e in batch]
            for topic, n in Counter(r.topic for r in records).items():
                self.metrics.messages_in.labels(topic).inc(n)
            await self._emit_ingested(self.ingest.process(records))
            self.metrics.stage_batch_seconds.labels("ingest").observe(time.perf_counter() - started)

    async def _emit_ingested(self, routed: Routed) -> None:
        """Send what the ingest stage decoded on (by trace, by agent, dead letters) and count it."""
        kinds = Counter((ev.source, ev.kind.value) for evs in (*routed.by_trace.values(),
                                                               *routed.by_agent.values()) for ev in evs)
        for (source, kind), n in kinds.items():
            self.metrics.events_in.labels(source, kind).inc(n)
        sends = self._send_keyed(self.by_trace, routed.by_trace)
        sends += self._send_keyed(self.by_agent, routed.by_agent)
        sends += [self._send_dead(d) for d in routed.dead]
        for topic, n in routed.skipped.items():
            self.metrics.records_skipped.labels(topic).inc(n)
        await self._all_delivered(sends)

    async def _correlate_agent(self, stream: Any) -> None:
        async for batch in self._batches(stream):
            started = time.perf_counter()
            self._track(batch)
            events = self._unpack(batch)
            late_before = self.correlate.late_events
            attributed = self.correlate.process(events, wall=_now())
            self.metrics.late_events.labels("correlate").inc(self.correlate.late_events - late_before)
            await self._forward_to_agents(attributed)
            # audit records matched through a secondary key (CloudTrail requestID ...) go
            # round once more keyed by their trace, before this batch is acked
            await self._all_delivered(self._send_keyed(self.by_trace, self.correlate.take_rekeyed()))
            self.metrics.identity_pending.set(self.correlate.resolver.pending_count)
            self.metrics.stage_batch_seconds.labels("correlate").observe(time.perf_counter() - started)

    async def _detect_agent(self, stream: Any) -> None:
        assert self.event_sink is not None
        async for batch in self._batches(stream):
            started = time.perf_counter()
            self._track(batch)
            events = self._unpack(batch)
            engine = self.detect.engine
            dup_before, late_before = engine.duplicates_skipped, engine.watermark.late_events
            alerts = self.detect.process(events, wall=_now())
            self.metrics.events_detected.inc(len(events))
            self.metrics.duplicate_events.inc(engine.duplicates_skipped - dup_before)
            self.metrics.late_events.labels("detect").inc(engine.watermark.late_events - late_before)
            self.event_sink.extend(events)
            await self._publish_alerts(alerts)  # also flushes the sinks
            self.metrics.stage_batch_seconds.labels("detect").observe(time.perf_counter() - started)

    async def _dlq_agent(self, stream: Any) -> None:
        assert self.dlq_sink is not None
        async for batch in self._batches(stream):
            now = datetime.now(timezone.utc)
            for e in batch:
                h = {k: (v.decode(errors="replace") if isinstance(v, bytes) else str(v))
                     for k, v in (e.message.headers or [])}
                self.dlq_sink.add(
                    DlqRecord(
                        topic=h.get("agentwatch.dlq.topic", ""),
                        partition=int(h.get("agentwatch.dlq.partition", "-1")),
                        offset=int(h.get("agentwatch.dlq.offset", "-1")),
                        source=h.get("agentwatch.dlq.source", ""),
                        reason=h.get("agentwatch.dlq.reason", ""),
                        raw=e.value or b"",
                        received_at=now,
                    )
                )
            await self._flush(self.dlq_sink, "dlq")

    async def _control_agent(self, stream: Any) -> None:
        """Every command on the control topic (ours and people's): verified, recorded,
        tracked for acknowledgement, and shown to the detectors as events."""
        assert self.killswitch_sink is not None
        async for batch in self._batches(stream):
            events: list[Event] = []
            for e in batch:
                cmd, evs = self.control.on_control_record(e.value or b"", _now())
                if cmd is not None:
                    self.killswitch_sink.add(cmd)
                events.extend(evs)
            await self._flush(self.killswitch_sink, "killswitches")
            await self._forward_to_agents(events, broadcast_unknown=True)

    async def _acks_agent(self, stream: Any) -> None:
        async for batch in self._batches(stream):
            for e in batch:
                ack = ControlPlane.parse_ack(e.value or b"")
                if ack is not None:
                    self.control.on_ack(ack)

    def _check_policy(self) -> None:
        """Hot reload: a changed policy file takes effect; a bad one keeps the last good policy."""
        w = self.policy_watcher
        if w is None:
            return
        error_before = w.last_error
        if w.check():
            self.detect.engine.reload(w.current)
            self.metrics.policy_reloads.labels("ok").inc()
            log.warning("policy reloaded", extra={"version": w.current.version, "hash": w.current.content_hash})
        elif w.last_error is not None and w.last_error is not error_before:
            self.metrics.policy_reloads.labels("rejected").inc()
            log.error("policy reload rejected; keeping the last good policy",
                      extra={"error": str(w.last_error), "version": w.current.version})

    async def _start_outputs(self) -> None:
        assert self.router is not None
        await self.router.start()

    async def _tick(self) -> None:
        """Event time goes on while traffic is quiet: close windows, fire timers."""
        now = _now()
        self._check_policy()
        resolved, self.detect.engine.resolved = self.detect.engine.resolved, []
        if self.router is not None:
            for alert_id in resolved:
                # a resolution waits on the output (retries); it must not hold up the tick
                asyncio.get_running_loop().create_task(self.router.resolve(alert_id))
        await self._emit_ingested(self.ingest.tick(now))  # PostgreSQL records whose rest never came
        await self._forward_to_agents(self.correlate.tick(now))
        rekeyed = self.correlate.take_rekeyed()
        if rekeyed:
            await self._all_delivered(self._send_keyed(self.by_trace, rekeyed))
        alerts = self.detect.tick(now) + self.control.tick(now)
        if alerts:
            await self._publish_alerts(alerts)
        self.metrics.open_alerts.set(len(self.detect.engine.open_alerts))

    async def _measure_lag(self) -> None:
        consumer = self.app.consumer
        try:
            assignment = consumer.assignment()
        except Exception:  # not assigned yet (rebalancing)
            return
        for tp in assignment:
            try:
                high = consumer.highwater(tp)
            except Exception:
                continue
            if high is None:
                continue
            done = self._positions.get((tp.topic, tp.partition), -1) + 1
            self.metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(max(0, high - done))

    # -- helpers ---------------------------------------------------------------------------

    def _unpack(self, batch: list[EventT]) -> list[Event]:
        events: list[Event] = []
        for e in batch:
            try:
                events.extend(events_from_json(e.value))
            except Exception as exc:  # our own topic: only a bug or a foreign producer gets here
                log.error("undecodable internal message", extra={"topic": e.message.topic,
                                                                  "offset": e.message.offset,
                                                                  "error": str(exc)})
        return events

    async def _forward_to_agents(self, events: Iterable[Event], *, broadcast_unknown: bool = False) -> None:
        """Events to the detect stage keyed by agent. With ``broadcast_unknown``, events
        that name no single agent (tenant- or fleet-wide halts) go to every partition."""
        groups: dict[str, list[Event]] = {}
        broadcast: list[Event] = []
        for ev in events:
            if broadcast_unknown and not ev.agent_id:
                broadcast.append(ev)
            else:
                groups.setdefault(ev.agent_id or "unknown", []).append(ev)
        sends = self._send_keyed(self.by_agent, groups)
        if broadcast:
            n = self.partitions.get(self.by_agent.get_topic_name(), self.settings.partitions)
            sends += [self._send(self.by_agent, None, events_to_json(broadcast), partition=p) for p in range(n)]
        await self._all_delivered(sends)

    def _send_keyed(self, topic: Any, groups: dict[str, list[Event]]) -> list[Any]:
        """One message per destination partition, not per key.

        Every key's events land on the partition Kafka's default partitioner
        would pick for that key, so co-partitioning holds, while a batch with
        thousands of traces still costs only a few Kafka messages downstream
        (faust's cost is per message).
        """
        name = topic.get_topic_name()
        n = self.partitions.get(name, self.settings.partitions)
        packed: dict[int, list[Event]] = {}
        for key, evs in groups.items():
            packed.setdefault(partition_for(key, n), []).extend(evs)
        size = self.settings.max_events_per_message  # stay under the broker's message size limit
        return [
            self._send(topic, None, events_to_json(evs[i : i + size]), partition=p)
            for p, evs in packed.items()
            for i in range(0, len(evs), size)
        ]

    async def _publish_alerts(self, alerts: list[Alert]) -> None:
        assert self.alert_sink is not None and self.event_sink is not None
        sends = []
        for a in alerts:
            self.metrics.alerts.labels(a.detector, a.severity.value, a.mode.value).inc()
            topic = self.shadow_alerts if a.mode is Mode.SHADOW else self.alerts
            sends.append(self._send(topic, a.alert_id, a.to_json()))
            log.warning("alert", extra={"alert_id": a.alert_id, "detector": a.detector,
                                        "agent_id": a.agent_id, "severity": a.severity.value,
                                        "count": a.count})
        if self.router is not None:
            for a in alerts:
                self.router.submit(a)  # queued per output; never waits (shadow alerts are withheld)
        for cmd in self.control.on_alerts(alerts, _now()):
            sends.append(self._send(self.control_topic, cmd.target.key, cmd.to_json()))
            log.warning("kill switch issued", extra={"command_id": cmd.command_id, "target": cmd.target.key,
                                                     "alert_id": cmd.alert_id})
        self.alert_sink.extend(alerts)
        await self._flush(self.event_sink, "events")
        await self._flush(self.alert_sink, "alerts")
        await self._all_delivered(sends)

    async def _flush(self, sink: Any, table: str) -> None:
        if not sink.pending:
            return
        rows = sink.pending
        started = time.perf_counter()
        delay = 0.5
        while True:
            try:
                await self._in_db(sink.flush)
                break
            except StoreError as exc:
                # do not move on (and so do not commit) until the rows are durable
                self.metrics.sink_failures.labels(table).inc()
                log.error("clickhouse write failed; retrying", extra={"table": table, "error": str(exc)})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30)
        self.metrics.sink_batch_rows.labels(table).observe(rows)
        self.metrics.sink_write_seconds.labels(table).observe(time.perf_counter() - started)

    async def _send(self, topic: Any, key: str | None, value: bytes, headers: dict[str, bytes] | None = None,
                    partition: int | None = None) -> Any:
        return await topic.send(key=key.encode() if key is not None else None, value=value, headers=headers,
                                partition=partition)

    async def _send_dead(self, d: DeadLetter) -> Any:
        self.metrics.decode_failures.labels(d.topic).inc()
        return await self._send(self.dlq, d.topic, d.raw, d.headers())

    @staticmethod
    async def _all_delivered(sends: list[Any]) -> None:
        """Wait until the broker acknowledged every message this batch produced."""
        futures = await asyncio.gather(*sends)
        await asyncio.gather(*futures)

    # -- web -------------------------------------------------------------------------------

    async def _metrics_view(self, view: Any, request: Any) -> Any:
        return view.bytes(self.metrics.exposition(), content_type="text/plain; version=0.0.4")

    async def _health_view(self, view: Any, request: Any) -> Any:
        return view.json(health(self.settings))

    async def _query_view(self, view: Any, request: Any) -> Any:
        """Analyst SQL for `agentwatch query` (see streams/query_api.py)."""
        answer = await self.query_api.handle(request)
        return view.json(answer.body, status=answer.status)


def _view(**handlers: Callable[[Any, Any], Any]) -> type[View]:
    """A faust View whose methods call the pipeline's bound handlers."""

    def method(handler: Callable[[Any, Any], Any]) -> Callable[..., Any]:
        async def call(self: View, request: Any, **kwargs: Any) -> Any:
            return await handler(self, request)

        return call

    return type("PipelineView", (View,), {name: method(h) for name, h in handlers.items()})
