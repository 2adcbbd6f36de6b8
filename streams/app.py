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
batch's messages only then and the worker commits them before the next batch,
so offsets are committed after what depends on them (at least once, nothing
lost) and a crash re-reads only the batches in hand.

A worker has roles (``Roles``). By default one process both detects and
stores: it is the only process that opens the embedded ClickHouse store, and
other commands read it through the loopback-only ``/query`` endpoint served
here. Split (``AGENTWATCH_WORKER_STORE=false`` plus ``agentwatch store``), N
detection workers share the stages in one consumer group and write no store,
and one store process in a consumer group of its own writes everything that is
stored from the topics (events from the agent-keyed topic, alerts, dead
letters, kill-switch commands) and serves ``/query``. The control and acks
topics are read whole by every detection worker (streams/control_feed.py).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import os
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any, Callable, TypeVar

import faust
from aiokafka.errors import KafkaError
from faust.types import EventT
from faust.web import View

from detectors.base import Signal
from detectors.cross_agent import signals_from_bytes, signals_to_bytes
from detectors.policy import Policy

from streams.policy_file import PolicyWatcher
from schemas.alerts import Alert, Mode
from schemas.canary import CanaryVerdict, Verdict
from schemas.errors import StoreError
from schemas.events import Event, EventKind, events_to_json
from schemas.internal_wire import events_from_wire, events_to_wire
from sinks.clickhouse import (
    AlertSink,
    CanaryVerdictSink,
    ClickHouseStore,
    DlqRecord,
    DlqSink,
    EventSink,
    KillSwitchSink,
    Retention,
    VersionMetricsSink,
    open_store,
)
from streams import faults
from schemas.control import KillSwitchCommand, TargetKind
from streams.control_feed import ControlFeed
from streams.control_plane import ControlPlane, control_settings
from streams.kafka import partition_for
from streams.kafka_security import faust_credentials, kafka_options
from streams.metrics import Metrics
from streams.outputs import build_router
from streams.progress import StageProgress
from streams.state import OFFSET_HEADER, STATE_MAX_MESSAGE_BYTES, PartitionedState
from streams.query_api import QueryApi, health
from streams.settings import Settings
from streams.stages import (CorrelateStage, DeadLetter, DetectStage, IngestStage, RawRecord, Routed, TenantStage,
                            decoder_for_topics, header_pairs)

log = logging.getLogger("agentwatch.worker")
# how long after start idle event time may wait for the first fetch and lag measurement
# to say whether input is waiting (it holds, rather than guess, until then)
IDLE_UNKNOWN_HOLD_S = 30.0
R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class Roles:
    """What one process does: detect (ingest, correlate, detect, kill switches, on-call
    outputs) and/or store (ClickHouse writes, ``/query``)."""

    detect: bool = True
    store: bool = True

    @property
    def store_only(self) -> bool:
        return self.store and not self.detect


STORE_GROUP_SUFFIX = "-store"
# stages that write the store: their batches are acked at a checkpoint (``Pipeline._checkpoint``)
# rather than one by one, so one insert and one commit serve every batch since the last
CHECKPOINTED = ("detect", "tenant", "dlq", "store_events", "store_alerts", "store_killswitches", "store_canary")


@dataclass(slots=True)
class _Checkpoint:
    """Messages a checkpointed stage finished whose store rows (and state snapshot) are
    not durable yet: acked and committed at the stage's next checkpoint."""

    stage: str
    lock: asyncio.Lock
    held: list[tuple[Any, EventT]] = field(default_factory=list)  # (stream, event) to ack
    last: float = field(default_factory=time.monotonic)


# A batch is processed in slices of messages, each sent and acked before the next, sized
# from the stage's recent cost per message to take about this long: no stage holds the event
# loop much longer (other stages, timers, on-call outputs, /metrics and the heartbeat run
# between slices). A backlog batch of 500 OTLP messages (50,000 spans) held it about a second.
SLICE_TARGET_S = 0.05


@dataclass(slots=True)
class _SliceSizer:
    """Messages per slice of one stage's batches, from a moving average of seconds per message."""

    per_message: float = 0.0

    def size(self, available: int) -> int:
        if self.per_message <= 0.0:
            return min(available, 10)  # nothing measured yet: a small first slice
        return max(1, min(available, int(SLICE_TARGET_S / self.per_message)))

    def observe(self, messages: int, seconds: float) -> None:
        x = seconds / max(messages, 1)
        self.per_message = x if self.per_message <= 0.0 else 0.7 * self.per_message + 0.3 * x


def _now() -> float:
    return time.time()


class Pipeline:
    """One worker: the faust app, its stages, its store and its metrics."""

    def __init__(self, settings: Settings, policy: Policy, bootstrap: str, partitions: dict[str, int],
                 policy_watcher: PolicyWatcher | None = None, roles: Roles = Roles()) -> None:
        self.settings = settings
        self.roles = roles
        self.policy_watcher = policy_watcher
        # actual partition counts of the internal topics: events are packed per partition
        self.partitions = partitions
        self.policy = policy
        self.metrics = Metrics.create()
        s = settings
        self.app = faust.App(
            # the store process has a consumer group of its own: it reads every partition of
            # what it stores, whatever the detection workers of the main group do
            s.app_id + STORE_GROUP_SUFFIX if roles.store_only else s.app_id,
            broker=f"kafka://{bootstrap}",
            broker_credentials=faust_credentials(s),
            store="memory://",
            autodiscover=False,
            topic_partitions=s.partitions,
            # topics faust declares itself (its assignor's leader topic) replicate like ours
            topic_replication_factor=s.kafka_replication_factor,
            topic_allow_declare=True,
            consumer_auto_offset_reset="earliest",
            producer_acks=-1,
            # a state snapshot (a join holding its allowed lateness of spans) outgrows faust's 1 MB
            # default; the state topic accepts up to its max.message.bytes (streams/state.py)
            producer_max_request_size=STATE_MAX_MESSAGE_BYTES,
            web_enabled=True,
            web_bind=s.web_host,
            web_host=s.web_host,
            web_port=s.web_port,
            datadir=str(s.home_dir / "faust"),
            stream_buffer_maxsize=max(4096, s.batch_max_messages * 4),
            # a worker that died is noticed in ~10 s (faust's default is 60 s): its partitions,
            # and their state, move to the survivors that much sooner
            broker_session_timeout=10.0,
            broker_heartbeat_interval=2.0,
            # offsets are committed at each checkpoint (_commit); faust's periodic commit is only
            # the backstop for messages acked between batches (held PostgreSQL lines). The fault
            # point periodic_commit turns it off: a worker killed before that timer ever fires
            broker_commit_interval=3600.0 if faults.active("periodic_commit") else 2.8,
        )
        raw = dict(value_type=bytes, key_type=bytes, value_serializer="raw", key_serializer="raw")
        self.inputs = self.app.topic(s.topic_otlp, s.topic_events_in, s.topic_audit_in, **raw)
        self.by_trace = self.app.topic(s.topic_by_trace, **raw)
        self.by_agent = self.app.topic(s.topic_by_agent, **raw)
        self.by_tenant = self.app.topic(s.topic_by_tenant, **raw)
        self.dlq = self.app.topic(s.topic_dlq, **raw)
        self.alerts = self.app.topic(s.topic_alerts, **raw)
        self.shadow_alerts = self.app.topic(s.topic_shadow_alerts, **raw)
        self.control_topic = self.app.topic(s.topic_control, **raw)
        self.canary_topic = self.app.topic(s.topic_canary, **raw)
        self.acks_topic = self.app.topic(s.topic_acks, **raw)
        self.control = ControlPlane.from_settings(control_settings(s), s.home_dir)
        self.control_feed = ControlFeed(self.control, bootstrap, s.topic_control, s.topic_acks,
                                        window_s=s.killswitch_ttl_s, security=kafka_options(s),
                                        on_forged=lambda reason: self.metrics.forged_acks.labels(reason).inc())
        self.router = build_router(s, self.metrics.registry) if roles.detect else None
        # analyst SQL: authenticated, read-only, off the loop and the writer; served by the store's holder
        self.query_api = QueryApi(s) if roles.store else None

        self.ingest = IngestStage(decoder_for_topics(s.topic_otlp, s.topic_events_in, s.topic_audit_in, pg=s.pg_log),
                                  header_identity=s.header_identity, redactor=policy.redaction.redactor())
        # partition-scoped state (streams/state.py): one stage object per input partition
        state = dict(bootstrap=bootstrap, state_topic=s.topic_state, snapshot_s=s.state_snapshot_s,
                     security=kafka_options(s), group=s.app_id)
        self.correlates = PartitionedState(
            "correlate", s.topic_by_trace, make=lambda: CorrelateStage(self.policy),
            restore=lambda data: CorrelateStage.restore(self.policy, data), replay=_replay_correlate, **state)
        self.detects = PartitionedState(
            "detect", s.topic_by_agent, make=lambda: DetectStage(self.policy, local=False),
            restore=lambda data: DetectStage.restore(self.policy, data, local=False), replay=_replay_detect,
            **state)
        # cross-agent detections, fed by the detect partitions' signals (detectors/cross_agent.py)
        self.tenants = PartitionedState(
            "tenant", s.topic_by_tenant, make=lambda: TenantStage(self.policy),
            restore=lambda data: TenantStage.restore(self.policy, data), replay=_replay_tenant,
            decode=signals_from_bytes, **state)
        self.state_topic = self.app.topic(s.topic_state, **raw)
        self._correlate_lock = asyncio.Lock()
        self._pending_counted = 0.0  # when agentwatch_identity_pending_events was last counted
        self._correlate_policy: Policy | None = None  # a reloaded policy not yet in the correlate stages
        # ingest messages a PostgreSQL record still being assembled needs (see _ack_ingested), and
        # the lock under which records are decoded, delivered and their messages released
        self._held: list[tuple[Any, EventT]] = []
        self._ingest_lock = asyncio.Lock()
        self._broker_seen_at = _now()

        # chDB is an in-process engine: one thread owns every call into it
        self._db = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clickhouse")
        self.store: ClickHouseStore | None = None
        self.event_sink: EventSink | None = None
        self.alert_sink: AlertSink | None = None
        self.dlq_sink: DlqSink | None = None
        self.killswitch_sink: KillSwitchSink | None = None
        # canary metric windows and verdicts (detectors/canary.py); without the store (split
        # deployment) verdicts are still published on the canary topic
        self.version_metrics_sink: VersionMetricsSink | None = None
        self.canary_sink: CanaryVerdictSink | None = None
        stages = [("ingest", (s.topic_otlp, s.topic_events_in, s.topic_audit_in)),
                  ("correlate", (s.topic_by_trace,)),
                  ("detect", (s.topic_by_agent,)),
                  ("tenant", (s.topic_by_tenant,)),
                  ("control", (s.topic_control,))] if roles.detect else []
        if roles.store:
            stages.append(("dlq", (s.topic_dlq,)))
        if roles.store_only:
            stages += [("store_events", (s.topic_by_agent,)),
                       ("store_alerts", (s.topic_alerts, s.topic_shadow_alerts)),
                       ("store_killswitches", (s.topic_control,)),
                       ("store_canary", (s.topic_canary,))]
        self.progress = {name: StageProgress(name, topics) for name, topics in stages}
        # the stages whose input holds idle event time (see _idle_clock_cap)
        self._progress_by_topic = {t: p for p in self.progress.values()
                                   if p.name in ("ingest", "correlate", "detect", "tenant") for t in p.topics}
        self._started_mono = time.monotonic()
        # events in the batch a stage holds, for lag in events (set by each stage)
        self._batch_events = 0
        # one alert's updates are made and enqueued under this lock (detect batches
        # and ticks both update alerts), so the topic receives them in order
        self._alert_order = asyncio.Lock()
        # detect and tenant batches and ticks all change engines and the alert sink: one lock for them
        self._checkpoints = {name: _Checkpoint(name, self._alert_order if name in ("detect", "tenant")
                                               else asyncio.Lock())
                             for name in self.progress if name in CHECKPOINTED}
        # the partition-scoped state a checkpointed stage snapshots at its checkpoints
        self._state_of = {"detect": self.detects, "tenant": self.tenants}
        self.crashed: BaseException | None = None
        # called once the worker is ready (see when_ready)
        self._on_ready: list[Callable[[], None]] | None = []

        self._register()

    # -- lifecycle -------------------------------------------------------------------------

    def open_store(self) -> None:
        """Open ClickHouse and apply the DDL before consuming anything."""

        def _open() -> ClickHouseStore:
            store = open_store(self.settings.dsn)
            store.apply_schema()
            s = self.settings
            store.apply_retention(Retention(s.retention_events_days, s.retention_alerts_days, s.retention_dlq_days))
            store.warm_up()
            return store

        self.store = self._db.submit(_open).result()
        self.event_sink = EventSink(self.store)
        self.alert_sink = AlertSink(self.store)
        self.dlq_sink = DlqSink(self.store)
        self.killswitch_sink = KillSwitchSink(self.store)
        self.version_metrics_sink = VersionMetricsSink(self.store)
        self.canary_sink = CanaryVerdictSink(self.store)

    def when_ready(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` once the worker processes input at full speed: its first partition
        assignment taken and that state restored, and the producer holding the metadata of
        every topic it writes. A fresh worker that said it was ready before then (its web
        endpoint answered) kept its first input waiting seconds for the consumer group,
        state restore and first sends, and its first alert came ~4.5 s after the event."""
        if self._on_ready is None:
            fn()
        else:
            self._on_ready.append(fn)

    async def _became_ready(self) -> None:
        if self._on_ready is None:
            return
        started = time.perf_counter()
        try:
            producer = self.app.producer._ensure_producer()  # faust's aiokafka producer, started by now
            for topic in (self.by_trace, self.by_agent, self.dlq, self.alerts, self.shadow_alerts,
                          self.control_topic, self.state_topic):
                await producer.partitions_for(topic.get_topic_name())  # waits for the topic's metadata
        except Exception as exc:  # the first send fetches it instead
            log.error("warming the producer failed", extra={"error": repr(exc)[:300]})
        callbacks, self._on_ready = self._on_ready, None
        for fn in callbacks:
            fn()
        log.info("worker ready", extra={"warm_up_s": round(time.perf_counter() - started, 3)})

    def close(self) -> None:
        if self.query_api is not None:
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
        if self.roles.detect:
            app.agent(self.inputs, name="ingest")(self._fail_fast(self._ingest_agent))
            app.agent(self.by_trace, name="correlate")(self._fail_fast(self._correlate_agent))
            app.agent(self.by_agent, name="detect")(self._fail_fast(self._detect_agent))
            app.agent(self.by_tenant, name="tenant")(self._fail_fast(self._tenant_agent))
            app.agent(self.control_topic, name="control")(self._fail_fast(self._control_agent))
            # acks are not consumed in the group: every detection worker reads them all
            app.task(self._fail_fast(self._control_feed))
            app.timer(interval=s.tick_s)(self._guarded_tick)
            app.on_partitions_assigned.connect(self._on_assigned)
            app.on_partitions_revoked.connect(self._on_revoked)
        if self.router is not None:
            app.task(self._start_outputs)
        if self.roles.store:
            app.agent(self.dlq, name="dlq_store")(self._fail_fast(self._dlq_agent))
        if self.roles.store_only:
            app.on_partitions_assigned.connect(self._store_assigned)
            app.agent(self.by_agent, name="store_events")(self._fail_fast(self._store_events_agent))
            app.agent(self.app.topic(s.topic_alerts, s.topic_shadow_alerts, value_type=bytes, key_type=bytes,
                                     value_serializer="raw", key_serializer="raw"),
                      name="store_alerts")(self._fail_fast(self._store_alerts_agent))
            app.agent(self.control_topic, name="store_killswitches")(self._fail_fast(self._store_commands_agent))
            app.agent(self.canary_topic, name="store_canary")(self._fail_fast(self._store_canary_agent))
        if self._checkpoints:
            # stages with no new input still make what they hold durable (and detect state, whose
            # timers fired, snapshotted) within about checkpoint_s
            app.timer(interval=s.checkpoint_s / 2)(self._guarded_checkpoints)
        app.timer(interval=5.0)(self._measure_lag)
        if s.gc_full_s > 0:
            app.timer(interval=s.gc_full_s)(self._collect_cycles)
        app.on_before_shutdown.connect(self._on_before_shutdown)
        app.page("/metrics")(_view(get=self._metrics_view))
        if self.query_api is not None:
            app.page("/query")(_view(post=self._query_view))
            app.on_before_shutdown.connect(self.query_api.on_shutdown)
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

    async def _guarded_checkpoints(self) -> None:
        async def checkpoints(_: Any) -> None:
            await self._checkpoint_all(due_only=True)

        checkpoints.__name__ = "_checkpoints"
        await self._fail_fast(checkpoints)(None)

    async def _on_before_shutdown(self, app: Any, **kwargs: Any) -> None:
        # what the checkpointed stages finished is made durable and committed, so the next
        # worker does not do it again (the worker's watchdog bounds this, as any shutdown step)
        for states in (self.correlates, self.detects, self.tenants):
            states.close()  # no snapshot child outlives the worker, nor starts now
        try:
            await self._checkpoint_all(due_only=False)
        except Exception as exc:  # the next worker re-reads from the last commit: nothing lost
            log.error("final checkpoint failed", extra={"error": repr(exc)[:300]})
        await self._drain_outputs()

    def _stop_worker(self) -> None:
        os.kill(os.getpid(), signal.SIGTERM)

    # -- checkpointed batches ----------------------------------------------------------------

    async def _batches(self, stage: str, stream: Any) -> AsyncIterator[list[EventT]]:
        """Batches of one stage, each acked only once everything it produced is durable.

        ``noack_take`` hands out events unacked (faust's ``take_events`` acks in a
        ``finally``, so a batch that raised would be committed). The body sends
        every Kafka output of the batch (internal topics, alerts, commands) and
        waits for the broker's acknowledgement. A stage that writes no store is
        then acked and committed at once (``_commit``). A stage that writes the
        store (``CHECKPOINTED``) keeps the batch's messages until its next
        checkpoint (``_checkpoint``): store rows flushed, then the state snapshot,
        then acks and the commit, at most every ``checkpoint_s``, so one insert
        and one commit serve many batches and alerts never wait for the store.
        Either way the committed offset never passes an input whose outputs
        could be lost, and a crash re-reads only what came after the last
        checkpoint. A body that raises leaves the batch unacked and the stage
        crashes the worker (``_fail_fast``): the restarted worker takes it again.
        """
        progress = self.progress[stage]
        cp = self._checkpoints.get(stage)
        sizer = _SliceSizer()
        async for taken in stream.noack_take(self.settings.batch_max_messages,
                                             within=self.settings.batch_within_s):
            at = 0
            while at < len(taken):  # slices (SLICE_TARGET_S), each a batch of its own from here on
                batch = taken[at:at + sizer.size(len(taken) - at)]
                at += len(batch)
                started = time.perf_counter()
                progress.begin(batch)
                self._batch_events = 0
                yield batch
                sizer.observe(len(batch), time.perf_counter() - started)  # the stage's own work
                if cp is not None:
                    cp.held += [(stream, e) for e in batch]
                elif stage == "ingest":
                    await self._ack_ingested(stream, batch)
                else:
                    for e in batch:
                        await stream.ack(e)
                if cp is None:
                    await self._commit(batch)
                progress.done(batch, self._batch_events)
                if cp is not None and self._checkpoint_due(cp):
                    async with cp.lock:
                        await self._checkpoint(stage)
                self.metrics.stage_batch_seconds.labels(stage).observe(time.perf_counter() - started)

    def _sinks_of(self, stage: str) -> list[tuple[Any, str]]:
        """The store sinks a checkpointed stage flushes at its checkpoints."""
        sinks = {
            "detect": [(self.event_sink, "events"), (self.alert_sink, "alerts"),
                       (self.version_metrics_sink, "version_metrics"), (self.canary_sink, "canary_verdicts")],
            "tenant": [(self.alert_sink, "alerts")],
            "dlq": [(self.dlq_sink, "dlq")],
            "store_events": [(self.event_sink, "events")],
            "store_alerts": [(self.alert_sink, "alerts")],
            "store_killswitches": [(self.killswitch_sink, "killswitches")],
            "store_canary": [(self.canary_sink, "canary_verdicts")],
        }[stage]
        return [(sink, table) for sink, table in sinks if sink is not None]

    def _checkpoint_due(self, cp: "_Checkpoint") -> bool:
        sinks = self._sinks_of(cp.stage)
        if not cp.held and not any(sink.pending for sink, _ in sinks):
            return False
        return (time.monotonic() - cp.last >= self.settings.checkpoint_s
                or any(sink.should_flush for sink, _ in sinks))

    async def _checkpoint(self, stage: str, *, final: set[int] | None = None) -> None:
        """Make a checkpointed stage's work durable, in Quix Streams' order: store rows
        flushed, then the state snapshot (detect; it says which input it reflects, so it
        may only be written once that input's outputs are durable), then the held
        messages acked and committed. Called under the stage's lock. A store that keeps
        failing keeps this running (retries with backoff), and ``/healthz`` says so.
        ``final``: partitions being revoked, snapshotted whatever their interval."""
        cp = self._checkpoints[stage]
        progress = self.progress[stage]
        progress.checkpoint_since = time.monotonic()
        try:
            for sink, table in self._sinks_of(stage):
                await self._flush(sink, table)
            states = self._state_of.get(stage)
            if states is not None:
                await self._deliver(self._snapshots(states, force=True, partitions=final) if final
                                    else self._snapshots(states))
            held, cp.held = cp.held, []
            for stream, e in held:
                await stream.ack(e)
            if held:
                await self._commit([e for _, e in held])
        finally:
            progress.checkpoint_since = None
        cp.last = time.monotonic()

    async def _checkpoint_all(self, *, due_only: bool) -> None:
        for stage, cp in self._checkpoints.items():
            if stage in self.progress and (not due_only or self._checkpoint_due(cp)):
                async with cp.lock:
                    await self._checkpoint(stage)

    async def _commit(self, batch: list[EventT]) -> None:
        """The checkpoint's last step: commit what the batch acked before taking the next one.

        Left to faust's periodic commit (every 2.8 s), a worker killed sooner after its start
        committed nothing, and the next one re-read everything since the last commit of one that
        had lived long enough: after a few short-lived restarts in a row the stages upstream of
        detect re-sent minutes of input. Detect recognises a redelivered event for its dedup window
        of event time behind its watermark, not however far back a re-read reaches, and older
        copies were counted again (tests/test_faults_live.py: a retry loop's alert at 12 where an
        uninterrupted run says 4). Committed here, a crash re-reads at most the batches in hand."""
        consumer = self.app.consumer
        tps = {e.message.tp for e in batch}
        # faust runs one commit at a time and a call meanwhile only waits for it; the one
        # running may have taken the acked offsets before this batch's acks
        while await consumer.maybe_wait_for_commit_to_finish():
            pass
        await consumer.commit(tps)

    def _isolated(self, stage: str, fn: Callable[[list[Any]], list[R]], items: list[Any],
                  dead: list[DeadLetter], describe: Callable[[Any], DeadLetter]) -> list[R]:
        """``fn(items)``; if it raises, ``fn`` on each item alone, and the items that
        still raise go to ``dead`` with the reason: one poison record must not stop
        its neighbours (nor, by crashing the worker at every restart, everything)."""
        try:
            faults.hit(stage)
            return fn(items)
        except Exception as exc:
            log.error("stage raised on a batch; retrying its records one by one",
                      extra={"stage": stage, "records": len(items), "error": repr(exc)[:500]})
        out: list[R] = []
        for item in items:
            try:
                out.extend(fn([item]))
            except Exception as exc:
                d = describe(item)
                d.reason = f"{stage} stage raised {type(exc).__name__}: {exc}"[:1000]
                dead.append(d)
        return out

    async def _ingest_agent(self, stream: Any) -> None:
        async for batch in self._batches("ingest", stream):
            records = [RawRecord(e.message.topic, e.message.partition, e.message.offset, e.value or b"",
                                 e.message.key, header_pairs(e.message.headers), e.message.timestamp)
                       for e in batch]
            for topic, n in Counter(r.topic for r in records).items():
                self.metrics.messages_in.labels(topic).inc(n)
            dead: list[DeadLetter] = []
            # decoded and delivered under the lock: the tick must not release messages of a record
            # this batch completed before its events are delivered
            async with self._ingest_lock:
                parts = self._isolated("ingest", lambda rs: [self.ingest.process(rs)], records, dead,
                                       lambda r: DeadLetter(r.value, "", "", r.topic, r.partition, r.offset))
                routed = parts[0] if len(parts) == 1 else _merge_routed(parts)
                routed.dead.extend(dead)
                self._batch_events = routed.events
                await self._emit_ingested(routed)

    async def _ack_ingested(self, stream: Any, batch: list[EventT]) -> None:
        """Ack an ingest batch whose outputs are delivered, except what a record still
        being assembled needs.

        A PostgreSQL record shipped in pieces (an ERROR awaiting its STATEMENT, a
        statement's next lines) is assembled in memory. Every message of its
        partition from the one it started in stays unacked until it is decoded and
        delivered, so the committed offset never passes it: a restart reads those
        messages again and assembles the record whole (records delivered meanwhile
        come again with the same event ids). All of them, not only the first: faust
        commits past a gap of one message."""
        async with self._ingest_lock:
            self._held += [(stream, e) for e in batch]
            await self._release_held()

    async def _release_held(self) -> None:
        """Ack the held ingest messages no open record needs any more (under _ingest_lock,
        after what decoded those records is delivered).

        The others are held, not in progress: faust's stop and its rebalances wait until
        every message it handed out is acked, and a held one may wait for a line behind
        them. Faust has no public way to say so: they leave its set of unacked messages
        (a stop or a rebalance then commits up to the first of them, and the worker that
        reads the partition next reads them again)."""
        first = self.ingest.open_offsets()
        unacked = getattr(self.app.consumer, "_unacked_messages", None)
        keep: list[tuple[Any, EventT]] = []
        for stream, e in self._held:
            m = e.message
            if (m.topic, m.partition) in first and m.offset >= first[(m.topic, m.partition)]:
                keep.append((stream, e))
                if unacked is not None:
                    unacked.discard(m)
            else:
                await stream.ack(e)
        self._held = keep

    async def _emit_ingested(self, routed: Routed) -> None:
        """Send what the ingest stage decoded on (by trace, by agent, dead letters) and count it."""
        kinds = Counter((ev.source, ev.kind.value) for evs in (*routed.by_trace.values(),
                                                               *routed.by_agent.values()) for ev in evs)
        for (source, kind), n in kinds.items():
            self.metrics.events_in.labels(source, kind).inc(n)
        outs = self._pack(self.by_trace, routed.by_trace, routed.dead)
        outs += self._forward([ev for evs in routed.by_agent.values() for ev in evs], routed.dead)
        outs += [self._dead_out(d, "decode") for d in routed.dead]
        for topic, n in routed.skipped.items():
            self.metrics.records_skipped.labels(topic).inc(n)
        await self._deliver(outs)

    async def _by_partition(self, states: PartitionedState, batch: list[EventT], dead: list[DeadLetter],
                            unpack: Callable[[list[EventT], list[DeadLetter]], list[R]] | None = None,
                            ) -> dict[int, list[R]]:
        """The batch's events (or, with ``unpack``, what it reads) per input partition, each
        partition's state restored and caught up first; messages a restored snapshot already
        includes are left out."""
        parts: dict[int, list[EventT]] = {}
        for e in batch:
            parts.setdefault(e.message.partition, []).append(e)
        restored = await states.ensure(set(parts))
        if restored and states is not self.correlates:
            self._announce_open(states, restored)
        read = unpack or self._unpack
        out: dict[int, list[R]] = {}
        for p, msgs in parts.items():
            done_below = await states.catch_up(p, msgs[0].message.offset)
            out[p] = read([e for e in msgs if e.message.offset >= done_below], dead)  # type: ignore[arg-type]
            states.advanced(p, msgs[-1].message.offset + 1)
        return out

    def _snapshots(self, states: PartitionedState, **kw: Any) -> list[Out]:
        # in due()'s order: a chunked snapshot's chunks, its manifest, then tombstones (streams/state.py)
        outs = [Out(self.state_topic, r.key, r.value, r.headers, partition=0)  # type: ignore[arg-type]
                for r in states.due(**kw)]
        for seconds, held, size, _ in states.taken:
            self.metrics.snapshot_seconds.labels(states.stage).observe(seconds)
            self.metrics.snapshot_held_seconds.labels(states.stage).observe(held)
            self.metrics.snapshot_bytes.labels(states.stage).set(size)
        states.taken.clear()
        return outs

    async def _correlate_agent(self, stream: Any) -> None:
        async for batch in self._batches("correlate", stream):
            async with self._correlate_lock:
                dead: list[DeadLetter] = []
                outs: list[Out] = []
                for p, events in (await self._by_partition(self.correlates, batch, dead)).items():
                    stage: CorrelateStage = self.correlates.states[p]  # type: ignore[assignment]
                    self._batch_events += len(events)
                    late_before = stage.late_events
                    attributed = self._isolated("correlate", lambda evs: stage.process(evs, wall=_now()),
                                                events, dead, _event_dead_letter)
                    self.metrics.late_events.labels("correlate").inc(stage.late_events - late_before)
                    outs += self._forward(attributed, dead)
                    # audit records matched through a secondary key (CloudTrail requestID ...) go
                    # round once more keyed by their trace, before this batch is acked
                    outs += self._pack(self.by_trace, stage.take_rekeyed(), dead)
                outs += [self._dead_out(d, "correlate") for d in dead]
                await self._deliver(outs + self._snapshots(self.correlates))
                now = time.monotonic()
                if now - self._pending_counted >= 1.0:  # a walk over every open trace: once a second
                    self._pending_counted = now
                    self.metrics.identity_pending.set(sum(st.resolver.pending_count  # type: ignore[attr-defined]
                                                          for st in self.correlates.states.values()))

    async def _detect_agent(self, stream: Any) -> None:
        async for batch in self._batches("detect", stream):
            async with self._alert_order:
                dead: list[DeadLetter] = []
                alerts: list[Alert] = []
                for p, events in (await self._by_partition(self.detects, batch, dead)).items():
                    engine = self.detects.states[p].engine  # type: ignore[attr-defined]
                    self._batch_events += len(events)
                    dup_before, late_before = engine.duplicates_skipped, engine.watermark.late_events
                    alerts += self._isolated("detect", lambda evs: engine.process(evs, wall=_now()),
                                             events, dead, _event_dead_letter)
                    self.metrics.events_detected.inc(len(events))
                    self.metrics.duplicate_events.inc(engine.duplicates_skipped - dup_before)
                    self.metrics.late_events.labels("detect").inc(engine.watermark.late_events - late_before)
                    if self.event_sink is not None:  # split: the store process stores them
                        self.event_sink.extend(events)
                await self._publish_alerts(alerts, [self._dead_out(d, "detect") for d in dead])

    async def _tenant_agent(self, stream: Any) -> None:
        """Cross-agent detections: the detect partitions' signals, keyed by tenant."""
        async for batch in self._batches("tenant", stream):
            async with self._alert_order:
                dead: list[DeadLetter] = []
                alerts: list[Alert] = []
                for p, signals in (await self._by_partition(self.tenants, batch, dead, self._unpack_signals)).items():
                    engine = self.tenants.states[p].engine  # type: ignore[attr-defined]
                    self._batch_events += len(signals)
                    alerts += self._isolated("tenant", lambda sigs: engine.process(sigs, wall=_now()),
                                             signals, dead, _signal_dead_letter)
                await self._publish_alerts(alerts, [self._dead_out(d, "tenant") for d in dead])

    def _unpack_signals(self, batch: list[EventT], dead: list[DeadLetter]) -> list[Signal]:
        signals: list[Signal] = []
        for e in batch:
            try:
                signals.extend(signals_from_bytes(e.value or b""))
            except Exception as exc:  # our own topic: only a bug or a foreign producer gets here
                m = e.message
                dead.append(DeadLetter(e.value or b"", f"undecodable signals message: {exc}"[:1000], "internal",
                                       m.topic, m.partition, m.offset))
        return signals

    def _signal_outs(self) -> list[Out]:
        """What the detect partitions' engines signalled, to the tenant-keyed stage: one
        message per tenant partition. Sent with the batch (or tick) that made them, so they
        are durable before its input is committed."""
        by_partition: dict[int, list[Signal]] = {}
        n = self.partitions.get(self.by_tenant.get_topic_name(), self.settings.partitions)
        for st in self.detects.states.values():
            for sig in st.take_signals():  # type: ignore[attr-defined]
                by_partition.setdefault(partition_for(sig.tenant, n), []).append(sig)
        return [Out(self.by_tenant, None, signals_to_bytes(sigs), partition=p) for p, sigs in by_partition.items()]

    def _engines(self) -> list[Any]:
        """Every detection engine this worker holds: per-agent ones, then cross-agent ones."""
        return [st.engine for states in (self.detects, self.tenants)  # type: ignore[attr-defined]
                for st in states.states.values()]

    def _announce_open(self, states: PartitionedState, partitions: list[int]) -> None:
        """Alerts still open in restored state: on-call outputs keep no state of ours, so
        announce them again (a restart, a moved partition), or they could never resolve."""
        if self.router is None:
            return
        for p in partitions:
            for alert in states.states[p].engine.open_alerts:  # type: ignore[attr-defined]
                self.router.submit(alert.model_copy(deep=True))

    async def _on_assigned(self, app: Any, assigned: Any = None, **kwargs: Any) -> None:
        """Restore assigned partitions' state right away (not at their next message),
        so their timers fire after a restart or a rebalance with no new traffic."""
        asyncio.get_running_loop().create_task(self._restore_assigned(set(assigned or ())))

    async def _restore_assigned(self, assigned: set[Any]) -> None:
        try:
            async with self._correlate_lock:
                await self.correlates.ensure({tp.partition for tp in assigned if tp.topic == self.correlates.topic})
            async with self._alert_order:
                for states in (self.detects, self.tenants):
                    restored = await states.ensure({tp.partition for tp in assigned if tp.topic == states.topic})
                    self._announce_open(states, restored)
        except Exception as exc:  # the next batch of the partition restores it instead
            log.error("restoring assigned partitions failed", extra={"error": repr(exc)[:300]})
        await self._became_ready()

    async def _on_revoked(self, app: Any, revoked: Any = None, **kwargs: Any) -> None:
        """A final snapshot of every revoked partition, then its state is dropped: the
        new owner restores it, and this worker's timers for it stop."""
        revoked = set(revoked or ())
        gone = {(tp.topic, tp.partition) for tp in revoked}
        for progress in self.progress.values():
            # positions of a partition another worker now moves on are stale here: kept,
            # they would say its input waits (and hold idle event time) if it came back
            progress.forget(gone)
        async with self._ingest_lock:  # records being assembled there: their new owner reads them again
            self.ingest.forget(gone)
            self._held = [(s, e) for s, e in self._held if (e.message.topic, e.message.partition) not in gone]
        parts = {tp.partition for tp in revoked if tp.topic == self.correlates.topic}
        if parts:
            async with self._correlate_lock:
                await self._deliver(self._snapshots(self.correlates, force=True, partitions=parts))
                self.correlates.drop(parts)
        for stage, states in self._state_of.items():
            parts = {tp.partition for tp in revoked if tp.topic == states.topic}
            if parts and stage in self._checkpoints:
                # the revoked partitions' rows and alerts durable before their final snapshot
                async with self._alert_order:
                    await self._checkpoint(stage, final=parts)
                    states.drop(parts)

    async def _dlq_agent(self, stream: Any) -> None:
        assert self.dlq_sink is not None
        async for batch in self._batches("dlq", stream):
            now = datetime.now(timezone.utc)
            for e in batch:
                h = {k: (v.decode(errors="replace") if isinstance(v, bytes) else str(v))
                     for k, v in (e.message.headers or [])}
                self.dlq_sink.add(
                    DlqRecord(
                        topic=h.get("agentwatch.dlq.topic", ""),
                        partition=_int(h.get("agentwatch.dlq.partition"), -1),
                        offset=_int(h.get("agentwatch.dlq.offset"), -1),
                        source=h.get("agentwatch.dlq.source", ""),
                        reason=h.get("agentwatch.dlq.reason", ""),
                        raw=e.value or b"",
                        received_at=now,
                    )
                )
            self._batch_events = len(batch)

    async def _control_agent(self, stream: Any) -> None:
        """Every command on the control topic (ours and people's), once per group: verified,
        recorded (when this process stores), and shown to the detectors as events. Tracking
        for acknowledgement is the control feed's, in every worker (streams/control_feed.py)."""
        async for batch in self._batches("control", stream):
            events: list[Event] = []
            for e in batch:
                cmd, evs = self.control.on_control_record(e.value or b"", _now())
                if cmd is not None and self.killswitch_sink is not None:
                    self.killswitch_sink.add(cmd)
                events.extend(evs)
            self._batch_events = len(batch)
            if self.killswitch_sink is not None:
                await self._flush(self.killswitch_sink, "killswitches")
            dead: list[DeadLetter] = []
            # every detect partition learns of every halt: an agent shielding a halted peer is
            # judged on its own partition, which is the peer's only by chance
            outs = self._forward(events, dead, broadcast=True)
            await self._deliver(outs + [self._dead_out(d, "control") for d in dead])

    async def _control_feed(self, _: Any) -> None:
        await self.control_feed.run()

    def _owns_command(self, cmd: KillSwitchCommand) -> bool:
        """Whether this worker speaks for ``cmd``: it holds the detect partition of the
        command's target agent (a tenant or fleet target: partition 0's holder)."""
        target = cmd.target
        n = self.partitions.get(self.by_agent.get_topic_name(), self.settings.agent_partitions)
        p = partition_for(target.value, n) if target.kind is TargetKind.AGENT else 0
        return p in self.detects.states

    # -- the store process (split deployment): what is stored, from the topics -------------------

    async def _store_assigned(self, app: Any, assigned: Any = None, **kwargs: Any) -> None:
        asyncio.get_running_loop().create_task(self._became_ready())  # no state to restore here

    async def _store_events_agent(self, stream: Any) -> None:
        """Events from the agent-keyed topic, the same the detect stage stores when it owns
        the store (the control stage forwards command events there too)."""
        assert self.event_sink is not None
        async for batch in self._batches("store_events", stream):
            events: list[Event] = []
            for e in batch:
                try:
                    events.extend(events_from_wire(e.value))
                except Exception:  # the detect stage dead-letters it; once is enough
                    log.error("undecodable internal message not stored",
                              extra={"partition": e.message.partition, "offset": e.message.offset})
            self._batch_events = len(events)
            self.event_sink.extend(events)

    async def _store_alerts_agent(self, stream: Any) -> None:
        await self._store_models("store_alerts", stream, self.alert_sink, "alerts", Alert)

    async def _store_canary_agent(self, stream: Any) -> None:
        await self._store_models("store_canary", stream, self.canary_sink, "canary_verdicts", CanaryVerdict)

    async def _store_models(self, stage: str, stream: Any, sink: Any, table: str, model: Any) -> None:
        """Records of one JSON model from a topic into its table; one that is not that model
        goes to the DLQ with the reason (anyone can write to an output topic)."""
        assert sink is not None
        async for batch in self._batches(stage, stream):
            rows: list[Any] = []
            for e in batch:
                try:
                    rows.append(model.model_validate_json(e.value or b""))
                except ValueError as exc:
                    m = e.message
                    await self._deliver([self._dead_out(DeadLetter(
                        e.value or b"", f"not a {model.__name__}: {exc}"[:1000], table, m.topic, m.partition,
                        m.offset), "store")])
            self._batch_events = len(rows)
            sink.extend(rows)

    async def _store_commands_agent(self, stream: Any) -> None:
        assert self.killswitch_sink is not None
        async for batch in self._batches("store_killswitches", stream):
            for e in batch:
                cmd, _ = self.control.on_control_record(e.value or b"", _now(), track=False)
                if cmd is not None:
                    self.killswitch_sink.add(cmd)
            self._batch_events = len(batch)

    def _check_policy(self) -> None:
        """Hot reload: a changed policy file takes effect; a bad one keeps the last good policy."""
        w = self.policy_watcher
        if w is None:
            return
        error_before = w.last_error
        if w.check():
            self.policy = w.current
            for engine in self._engines():
                engine.reload(w.current)
            self._correlate_policy = w.current  # under the correlate lock, in the tick
            self.ingest.redactor = w.current.redaction.redactor()  # new redaction patterns apply at once
            self.metrics.policy_reloads.labels("ok").inc()
            log.warning("policy reloaded", extra={"version": w.current.version, "hash": w.current.content_hash})
        elif w.last_error is not None and w.last_error is not error_before:
            self.metrics.policy_reloads.labels("rejected").inc()
            log.error("policy reload rejected; keeping the last good policy",
                      extra={"error": str(w.last_error), "version": w.current.version})

    async def _start_outputs(self) -> None:
        assert self.router is not None
        await self.router.start()
        for states in (self.detects, self.tenants):
            self._announce_open(states, list(states.states))

    async def _drain_outputs(self) -> None:
        """At shutdown: what the on-call outputs still queue is delivered, within a bound."""
        if self.router is not None:
            undelivered = await self.router.close(drain_timeout_s=min(10.0, self.settings.shutdown_timeout_s / 2))
            if any(undelivered.values()):
                log.error("alerts not delivered to on-call outputs at shutdown",
                          extra={o: [a.alert_id for a in alerts] for o, alerts in undelivered.items() if alerts})

    async def _collect_cycles(self) -> None:
        """The full collection the worker's GC settings leave out (streams/worker.py: _tune_gc),
        at a known time and logged: what it finds says whether cycles pile up between runs."""
        started = time.perf_counter()
        found = gc.collect()
        log.info("full garbage collection", extra={"seconds": round(time.perf_counter() - started, 3),
                                                   "unreachable": found})

    async def _tick(self) -> None:
        """Event time goes on while traffic is quiet: close windows, fire timers."""
        # ... but only while the broker answers: input that cannot be fetched is waiting,
        # not absent, and advancing event time through an outage would close windows
        # and fire absence timers before the events that belong in them arrive
        # (deliveries, snapshots included, every state_snapshot_s, prove the broker alive)
        wall = min(_now(), self._broker_seen_at + max(5.0, 3 * self.settings.state_snapshot_s))
        # ... and not past input known to be waiting: after a restart (or in a backlog) the
        # events written while this worker was down must be judged at the event time they
        # would have met had it been up, not after the downtime has run the clock on
        now = min(wall, self._idle_clock_cap())
        self._check_policy()
        async with self._ingest_lock:  # PostgreSQL records whose rest never came, then their messages
            await self._emit_ingested(self.ingest.tick(now))
            await self._release_held()
        async with self._correlate_lock:
            if self._correlate_policy is not None:
                # join windows and lateness, identity rules: what comes next is judged by them
                policy, self._correlate_policy = self._correlate_policy, None
                for p, held in list(self.correlates.states.items()):
                    self.correlates.states[p] = held.reloaded(policy)  # type: ignore[attr-defined]
            dead: list[DeadLetter] = []
            outs: list[Out] = []
            for stage in list(self.correlates.states.values()):
                outs += self._forward(stage.tick(now), dead)  # type: ignore[attr-defined]
                outs += self._pack(self.by_trace, stage.take_rekeyed(), dead)  # type: ignore[attr-defined]
            self.correlates.touched()
            await self._deliver(outs + [self._dead_out(d, "correlate") for d in dead]
                                + self._snapshots(self.correlates))
        async with self._alert_order:
            alerts = []
            for engine in self._engines():
                alerts += engine.tick(now)
                resolved, engine.resolved = engine.resolved, []
                if self.router is not None:
                    for alert_id in resolved:
                        # a resolution waits on the output (retries); it must not hold up the tick
                        asyncio.get_running_loop().create_task(self.router.resolve(alert_id))
            self.detects.touched()
            self.tenants.touched()
            if self.control_feed.caught_up.is_set():  # escalate on the whole picture only
                # command deadlines are wall-clock deadlines
                alerts += self.control.tick(wall, owns=self._owns_command)
            await self._publish_alerts(alerts, [])
        self.metrics.open_alerts.set(sum(len(e.open_alerts) for e in self._engines()))

    def _idle_clock_cap(self) -> float:
        """Wall time up to which idle event time may run: the earliest write time of input
        any stage of this worker has not finished (-inf while that is unknown, for at most
        ``IDLE_UNKNOWN_HOLD_S`` after start)."""
        consumer = self.app.consumer
        try:
            assignment = consumer.assignment()
        except Exception:  # rebalancing: nothing known
            return -math.inf
        unknown_ok = time.monotonic() - self._started_mono > IDLE_UNKNOWN_HOLD_S
        cap = math.inf
        for tp in assignment:
            progress = self._progress_by_topic.get(tp.topic)
            if progress is None:
                continue
            try:
                high = consumer.highwater(tp)
            except Exception:
                high = None
            since = progress.waiting_since((tp.topic, tp.partition), high)
            if since is not None and not (since == -math.inf and unknown_ok):
                cap = min(cap, since)
        return cap

    async def _measure_lag(self) -> None:
        consumer = self.app.consumer
        try:
            assignment = consumer.assignment()
        except Exception:  # not assigned yet (rebalancing)
            return
        for progress in self.progress.values():
            progress.behind.clear()
        by_topic = {t: p for p in self.progress.values() for t in p.topics}
        events_behind: Counter[str] = Counter()
        for tp in assignment:
            progress = by_topic.get(tp.topic)
            try:
                high = consumer.highwater(tp)
            except Exception:
                continue
            if high is None or progress is None:
                continue
            done = progress.positions.get((tp.topic, tp.partition), -1) + 1
            if done == 0:
                # nothing finished here since this worker started: the committed offset
                # is where it stands (a restarted worker is not behind by all history), as
                # faust read it at the assignment (its consumer has no committed(): asked for
                # it, this said 0, and the idle clock of a restarted worker with nothing
                # waiting held for IDLE_UNKNOWN_HOLD_S)
                done = consumer._committed_offset.get(tp) or 0
                # never committed: the group starts at the log's start (earliest), which
                # for the bookkeeping of what waits is as good as offset 0
                progress.committed[(tp.topic, tp.partition)] = done
            behind = max(0, high - done)
            progress.behind[(tp.topic, tp.partition)] = behind
            events_behind[tp.topic] += round(behind * progress.events_per_message)
            self.metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(behind)
        for topic, n in events_behind.items():
            self.metrics.consumer_lag_events.labels(topic).set(n)
        for progress in self.progress.values():
            self.metrics.stage_lag_seconds.labels(progress.name).set(round(progress.lag_seconds(), 3))

    # -- helpers ---------------------------------------------------------------------------

    def _unpack(self, batch: list[EventT], dead: list[DeadLetter]) -> list[Event]:
        events: list[Event] = []
        for e in batch:
            m = e.message
            try:
                events.extend(events_from_wire(e.value))
            except Exception as exc:  # our own topic: only a bug or a foreign producer gets here
                dead.append(DeadLetter(e.value or b"", f"undecodable internal message: {exc}"[:1000], "internal",
                                       m.topic, m.partition, m.offset))
        return events

    def _forward(self, events: Iterable[Event], dead: list[DeadLetter], *,
                 broadcast: bool = False) -> list[Out]:
        """Events to the detect stage keyed by agent; with ``broadcast``, to every partition.
        Kill-switch commands always go to every partition, whoever sent them (the control
        topic, or a native event): the halted agent's partition and every possible shielder's."""
        if broadcast:
            events = list(events)
            if not events:
                return []
            n = self.partitions.get(self.by_agent.get_topic_name(), self.settings.agent_partitions)
            value = events_to_wire(_serialisable(events, dead), self.settings.internal_format_version)
            return [Out(self.by_agent, None, value, partition=p) for p in range(n)]
        # each partition's events in the order they came (correlate releases them in event-time
        # order, near enough), not grouped agent by agent: grouped, a batch spanning minutes of a
        # backlog reached detect as one agent's whole span after another's, and detect's watermark
        # (one per partition) counted most of the later agents' events as late
        n = self.partitions.get(self.by_agent.get_topic_name(), self.settings.agent_partitions)
        packed: dict[int, list[Event]] = {}
        where: dict[str, int] = {}
        commands: list[Event] = []
        command = EventKind.CONTROL_COMMAND
        for ev in events:
            if ev.kind is command:
                commands.append(ev)
                continue
            agent = ev.agent_id or "unknown"
            p = where.get(agent)
            if p is None:
                p = where[agent] = partition_for(agent, n)
            packed.setdefault(p, []).append(ev)
        return self._messages(self.by_agent, packed, dead) + self._forward(commands, dead, broadcast=True)

    def _pack(self, topic: Any, groups: dict[str, list[Event]], dead: list[DeadLetter]) -> list[Out]:
        """One message per destination partition, not per key.

        Every key's events land on the partition Kafka's default partitioner
        would pick for that key, so co-partitioning holds, while a batch with
        thousands of traces still costs only a few Kafka messages downstream
        (faust's cost is per message). An event that cannot be serialised goes
        to ``dead`` instead of failing its whole message.
        """
        name = topic.get_topic_name()
        n = self.partitions.get(name, self.settings.partitions)
        packed: dict[int, list[Event]] = {}
        for key, evs in groups.items():
            packed.setdefault(partition_for(key, n), []).extend(evs)
        return self._messages(topic, packed, dead)

    def _messages(self, topic: Any, packed: dict[int, list[Event]], dead: list[DeadLetter]) -> list[Out]:
        """Each partition's events as messages of at most ``max_events_per_message``."""
        size = self.settings.max_events_per_message  # stay under the broker's message size limit
        outs: list[Out] = []
        for p, evs in packed.items():
            for i in range(0, len(evs), size):
                chunk = evs[i : i + size]
                try:
                    value = events_to_wire(chunk, self.settings.internal_format_version)
                except Exception:
                    value = events_to_wire(_serialisable(chunk, dead), self.settings.internal_format_version)
                outs.append(Out(topic, None, value, partition=p))
        return outs

    async def _publish_alerts(self, alerts: list[Alert], extra: list[Out]) -> None:
        """The alerts and commands, in the order they were made; their store rows at the
        stage's next checkpoint (on-call never waits for the store).

        Called under ``_alert_order``: updates of one alert reach the topic in the
        order the engine produced them (Kafka keeps the order of one producer's
        sends to one partition, and ``_deliver`` enqueues sequentially)."""
        outs = list(extra)
        for a in alerts:
            self.metrics.alerts.labels(a.detector, a.severity.value, a.mode.value).inc()
            topic = self.shadow_alerts if a.mode is Mode.SHADOW else self.alerts
            outs.append(Out(topic, a.alert_id.encode(), a.to_json()))
            log.warning("alert", extra={"alert_id": a.alert_id, "detector": a.detector,
                                        "agent_id": a.agent_id, "severity": a.severity.value,
                                        "count": a.count})
        if any(a.mode is Mode.ENFORCE for a in alerts):
            # the commands already issued (by any worker, before any restart) are known first
            await self.control_feed.caught_up.wait()
        for cmd in self.control.on_alerts(alerts, _now()):
            outs.append(Out(self.control_topic, cmd.target.key.encode(), cmd.to_json()))
            log.warning("kill switch issued", extra={"command_id": cmd.command_id, "target": cmd.target.key,
                                                     "alert_id": cmd.alert_id})
        outs += self._canary_outputs()
        outs += self._signal_outs()
        if self.alert_sink is not None:  # split: the store process stores them
            self.alert_sink.extend(alerts)
        await self._deliver(outs)
        if self.router is not None:
            for a in alerts:
                self.router.submit(a)  # queued per output; never waits (shadow alerts are withheld)

    def _canary_outputs(self) -> list[Out]:
        """Metric windows and canary verdicts the engines reached (detectors/canary.py): stored,
        and the verdicts published, with the batch that produced them."""
        outs: list[Out] = []
        for engine in self._engines():
            windows, verdicts = engine.take_canary()
            if self.version_metrics_sink is not None and self.canary_sink is not None:
                self.version_metrics_sink.extend(windows)
                self.canary_sink.extend(verdicts)
            for v in verdicts:
                outs.append(Out(self.canary_topic, v.agent_id.encode(), v.to_json()))
                level = logging.WARNING if v.verdict is Verdict.FAIL else logging.INFO
                log.log(level, "canary verdict", extra={
                    "agent_id": v.agent_id, "candidate": v.candidate_version, "verdict": v.verdict.value,
                    "reason": v.reason[:300]})
        return outs

    async def _flush(self, sink: Any, table: str) -> None:
        """Make a sink's rows durable before the batch is acked.

        Transient failures (store down, overloaded, injected) are retried with
        backoff for as long as it takes: the batch is not acked meanwhile, and
        ``/healthz`` reports the stall. Rows the store rejects for their content
        are isolated by the sink and sent to the DLQ with the store's reason."""
        if not sink.pending:
            return
        rows = sink.pending
        started = time.perf_counter()
        delay = 0.2
        while True:
            try:
                faults.hit("store")
                await self._in_db(sink.flush)
                break
            except StoreError as exc:
                self.metrics.sink_failures.labels(table).inc()
                log.error("clickhouse write failed; retrying", extra={"table": table, "error": str(exc)[:500],
                                                                      "retry_in_s": delay})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10)
        rejected = sink.take_rejected()
        if rejected:
            if table == "dlq":
                # nowhere further to send them: say so loudly, with the reason
                for row, reason in rejected:
                    log.error("DLQ row rejected by the store", extra={"reason": reason[:500], "row": repr(row)[:500]})
            else:
                await self._deliver([self._dead_out(_row_dead_letter(row, reason, table), "store")
                                     for row, reason in rejected])
        self.metrics.sink_batch_rows.labels(table).observe(rows)
        self.metrics.sink_write_seconds.labels(table).observe(time.perf_counter() - started)

    def _dead_out(self, d: DeadLetter, where: str) -> Out:
        self.metrics.dead_letters.labels(where).inc()
        if where == "decode":
            self.metrics.decode_failures.labels(d.topic).inc()
        return Out(self.dlq, d.topic.encode(), d.raw, d.headers())

    async def _deliver(self, outs: list[Out]) -> None:
        """Every message of a batch acknowledged by the broker (acks=all), in order.

        Messages are handed to the producer one after the other, so two updates
        of one alert (same key, same partition) keep their order; then all
        acknowledgements are awaited together. A failed delivery is retried as a
        whole with backoff (duplicates downstream are harmless: event ids,
        deterministic alert ids, idempotent inserts), never skipped."""
        if not outs:
            return
        delay = 0.2
        while True:
            try:
                faults.hit("producer")
                futures = [await o.topic.send(key=o.key, value=o.value, headers=o.headers, partition=o.partition)
                           for o in outs]
                await asyncio.gather(*futures)
                self._broker_seen_at = _now()
                return
            except (KafkaError, OSError, asyncio.TimeoutError, faults.InjectedFault) as exc:
                self.metrics.output_retries.inc()
                log.error("delivering outputs to Kafka failed; retrying",
                          extra={"messages": len(outs), "error": repr(exc)[:500], "retry_in_s": delay})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10)

    # -- web -------------------------------------------------------------------------------

    async def _metrics_view(self, view: Any, request: Any) -> Any:
        return view.bytes(self.metrics.exposition(), content_type="text/plain; version=0.0.4")

    async def _health_view(self, view: Any, request: Any) -> Any:
        problems = [p for p in (s.stalled(self.settings.stall_s) for s in self.progress.values()) if p]
        body = {**health(self.settings), "ok": not problems, "problems": problems}
        return view.json(body, status=503 if problems else 200)

    async def _query_view(self, view: Any, request: Any) -> Any:
        """Analyst SQL for `agentwatch query` (see streams/query_api.py)."""
        assert self.query_api is not None
        answer = await self.query_api.handle(request)
        return view.json(answer.body, status=answer.status)


def _replay_correlate(stage: CorrelateStage, events: list[Event]) -> None:
    """Input already processed before a restart, through restored state: outputs discarded.

    Replayed as of now, as a restored snapshot's clock resumes (stages._resume_clock): a
    watermark whose newest event came without a processing time never runs idle, and a
    restore that replayed the last input before a quiet spell fired no timer until new traffic."""
    stage.process(events, wall=_now())
    stage.take_rekeyed()  # they went round the trace-keyed topic then and are in the replay too


def _replay_detect(stage: DetectStage, events: list[Event]) -> None:
    stage.process(events, wall=_now())
    stage.engine.resolved.clear()
    # their signals went to the tenant-keyed topic then, and are in its replay too
    stage.take_signals()


def _replay_tenant(stage: TenantStage, signals: list[Signal]) -> None:
    stage.process(signals, wall=_now())
    stage.engine.resolved.clear()


@dataclass(slots=True)
class Out:
    """One message a batch produces; delivered (and acknowledged) before the batch is acked."""

    topic: Any
    key: bytes | None
    value: bytes
    headers: dict[str, bytes] | None = None
    partition: int | None = None


def _merge_routed(parts: list[Routed]) -> Routed:
    out = Routed()
    for r in parts:
        for k, evs in r.by_trace.items():
            out.by_trace[k].extend(evs)
        for k, evs in r.by_agent.items():
            out.by_agent[k].extend(evs)
        out.dead.extend(r.dead)
        out.events += r.events
        for topic, n in r.skipped.items():
            out.skipped[topic] += n
    return out


def _event_bytes(ev: Event) -> bytes:
    """An event as JSON for the DLQ; its repr when even that fails (the reason it is there)."""
    try:
        return events_to_json([ev])
    except Exception:
        return repr(ev).encode(errors="replace")[:100_000]


def _event_dead_letter(ev: Event) -> DeadLetter:
    return DeadLetter(_event_bytes(ev), "", ev.source, ev.topic or "", _int(ev.partition, -1), _int(ev.offset, -1))


def _signal_dead_letter(sig: Signal) -> DeadLetter:
    try:
        raw = signals_to_bytes([sig])
    except Exception:
        raw = repr(sig).encode(errors="replace")[:100_000]
    return DeadLetter(raw, "", "signal", sig.topic, sig.partition, sig.offset)


def _row_dead_letter(row: Any, reason: str, table: str) -> DeadLetter:
    if isinstance(row, Event):
        d = _event_dead_letter(row)
    else:
        raw = row.to_json() if hasattr(row, "to_json") else repr(row).encode(errors="replace")
        d = DeadLetter(raw, "", "", "", -1, -1)
    d.reason = f"store rejected the row for {table}: {reason}"[:1000]
    return d


def _serialisable(events: list[Event], dead: list[DeadLetter]) -> list[Event]:
    """The events that serialise alone; the others to ``dead`` with the encoder's reason."""
    ok: list[Event] = []
    for ev in events:
        try:
            events_to_wire([ev])
        except Exception as exc:
            d = _event_dead_letter(ev)
            d.reason = f"event cannot be serialised: {type(exc).__name__}: {exc}"[:1000]
            dead.append(d)
        else:
            ok.append(ev)
    return ok


def _int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _view(**handlers: Callable[[Any, Any], Any]) -> type[View]:
    """A faust View whose methods call the pipeline's bound handlers."""

    def method(handler: Callable[[Any, Any], Any]) -> Callable[..., Any]:
        async def call(self: View, request: Any, **kwargs: Any) -> Any:
            return await handler(self, request)

        return call

    return type("PipelineView", (View,), {name: method(h) for name, h in handlers.items()})
