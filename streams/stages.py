"""The processing stages, free of faust: batches in, batches out.

The faust app (``streams.app``) only moves batches between Kafka and these
stages; ``agentwatch replay`` and the benchmarks drive the very same objects.

    ingest     raw records -> canonical events, routed by join key or by agent; DLQ
    correlate  keyed by trace (or join bucket): agent identity from ancestor
               spans, and the span/audit join (detectors/join.py)
    detect     keyed by agent: the detection engine

Co-partitioning for the join: spans and audit records with a trace id are keyed
by the trace; an audit record without one (CloudTrail) by a bucket of its best
secondary key (``aws.request_id``, ``gen_ai.tool.call.id``), and each span
carrying such a key also sends an index copy keyed by the same bucket. An audit
record matched in a bucket is re-keyed to its trace (``CorrelateStage.take_rekeyed``)
and goes round the trace-keyed topic once more, so identity and tool-call
confirmation are decided in one place.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from datetime import datetime, timezone

import orjson

from detectors.base import Signal
from detectors.engine import CrossAgentEngine, DetectionEngine
from detectors.identity import IdentityResolver
from detectors.join import Joiner, index_copies, join_partition_key
from detectors.policy import Policy
from detectors.windows import FOREVER
from schemas.alerts import Alert
from schemas.decoders import DecodeResult, Failure
from schemas.decoders.audit import AuditDecoder, PgLogConfig
from schemas.decoders.native import decode_native
from schemas.decoders.otlp import decode_otlp
from schemas.errors import StateError
from schemas.events import Event, IdentitySource
from schemas.redact import DEFAULT as DEFAULT_REDACTOR
from schemas.redact import Redactor

Decoder = Callable[..., DecodeResult]


@dataclass(slots=True)
class RawRecord:
    topic: str
    partition: int
    offset: int
    value: bytes
    key: bytes | None = None
    headers: tuple[tuple[str, bytes], ...] = ()
    timestamp: float | None = None  # the Kafka record's timestamp, seconds since the epoch

    @property
    def received_at(self) -> datetime | None:
        return None if self.timestamp is None else datetime.fromtimestamp(self.timestamp, tz=timezone.utc)


def header_pairs(headers: object) -> tuple[tuple[str, bytes], ...]:
    """Kafka headers as (name, value) pairs, from a list of pairs or a mapping (faust gives either)."""
    items = headers.items() if isinstance(headers, Mapping) else (headers or ())
    return tuple((k.decode() if isinstance(k, bytes) else str(k), v if isinstance(v, bytes) else str(v).encode())
                 for k, v in items)  # type: ignore[union-attr]


@dataclass(slots=True)
class DeadLetter:
    """An input that could not be decoded: its original bytes and why."""

    raw: bytes
    reason: str
    source: str
    topic: str
    partition: int
    offset: int

    def headers(self) -> dict[str, bytes]:
        return {
            "agentwatch.dlq.reason": self.reason.encode(),
            "agentwatch.dlq.source": self.source.encode(),
            "agentwatch.dlq.topic": self.topic.encode(),
            "agentwatch.dlq.partition": str(self.partition).encode(),
            "agentwatch.dlq.offset": str(self.offset).encode(),
        }


@dataclass(slots=True)
class Routed:
    by_trace: dict[str, list[Event]] = field(default_factory=lambda: defaultdict(list))
    by_agent: dict[str, list[Event]] = field(default_factory=lambda: defaultdict(list))
    dead: list[DeadLetter] = field(default_factory=list)
    events: int = 0
    skipped: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # topic -> records skipped


def decoder_for_topics(otlp: str, native: str, audit: str, *, pg: PgLogConfig | None = None) -> dict[str, Decoder]:
    return {otlp: decode_otlp, native: decode_native, audit: AuditDecoder(pg)}


# header identity targets besides attribute names
HEADER_TENANT = "tenant"
HEADER_AGENT_ID = "agent_id"


def apply_header_identity(events: Iterable[Event], headers: Iterable[tuple[str, bytes]],
                          mapping: Mapping[str, str]) -> None:
    """Identity a Kafka producer put in headers (the Collector's kafka exporter with
    ``include_metadata_keys``), used only where the event itself carries none:
    ``mapping`` is header name (lower case) -> "tenant", "agent_id" or an attribute name."""
    values = {mapping[k.lower()]: v.decode("utf-8", errors="replace")
              for k, v in headers if k.lower() in mapping and v}
    if not values:
        return
    tenant, agent = values.pop(HEADER_TENANT, ""), values.pop(HEADER_AGENT_ID, "")
    for ev in events:
        if tenant and ev.tenant == "default":
            ev.tenant = tenant
        if agent and not ev.agent_id:
            ev.agent_id, ev.identity = agent, IdentitySource.ATTRIBUTE
        for name, value in values.items():
            ev.attributes.setdefault(name, value)


def route(events: Iterable[Event], out: Routed) -> None:
    """Events with a trace, and every audit record, go to the trace-keyed stage
    under their join key (identity, joins), plus an index copy per secondary key
    a span carries; the rest straight to their agent."""
    for ev in events:
        out.events += 1
        key = join_partition_key(ev)
        if key is not None:
            out.by_trace[key].append(ev)
            for index_key, copy in index_copies(ev):
                out.by_trace[index_key].append(copy)
        else:
            if not ev.agent_id:
                ev.agent_id = ev.fallback_agent_id or "unknown"
            out.by_agent[ev.agent_id].append(ev)


class IngestStage:
    """Raw records -> routed events. A decoder with ``feed``/``flush`` (the audit
    decoder's stitching of PostgreSQL logs shipped in pieces) sees each message with
    its stream (topic, partition, key) and may decode a record a later message or
    ``tick`` completes; its events keep the offset and the headers (identity) of the
    message they started in. ``open_offsets`` names the messages such records still
    need: the worker leaves them uncommitted, so a restart reads them again."""

    def __init__(self, decoders: dict[str, Decoder], default: Decoder | None = None, *,
                 header_identity: Mapping[str, str] | None = None, redactor: Redactor = DEFAULT_REDACTOR) -> None:
        self.decoders = decoders
        self.default = default
        # secrets leave every event here, once, before anything stores or forwards it
        self.redactor = redactor
        self.header_identity = {k.lower(): v for k, v in (header_identity or {}).items()}

    def tick(self, wall_now: float | None = None) -> Routed:
        """Decode records whose remaining pieces did not arrive in time."""
        out = Routed()
        wall = time.time() if wall_now is None else wall_now
        for decoder in self._stitching("flush"):
            for (topic, partition, key), part in decoder.flush(wall):
                self._emit(part.result, RawRecord(topic, partition, part.offset, b"", key, part.headers), out)
        return out

    def open_offsets(self) -> dict[tuple[str, int], int]:
        """(topic, partition) -> offset of the first message a record still being
        assembled needs (none of its partition's messages from there on may be committed)."""
        out: dict[tuple[str, int], int] = {}
        for decoder in self._stitching("open_offsets"):
            for (topic, partition, _key), offset in decoder.open_offsets().items():
                out[(topic, partition)] = min(offset, out.get((topic, partition), offset))
        return out

    def forget(self, partitions: set[tuple[str, int]]) -> None:
        """Drop what is being assembled from ``partitions`` (revoked: their new owner reads it again)."""
        for decoder in self._stitching("forget"):
            decoder.forget(lambda stream: stream[:2] in partitions)

    def _stitching(self, method: str) -> list[Any]:
        return list({id(d): d for d in (*self.decoders.values(), self.default) if hasattr(d, method)}.values())

    def _emit(self, result: DecodeResult, rec: RawRecord, out: Routed) -> None:
        where = {"topic": rec.topic, "partition": rec.partition, "offset": rec.offset}
        for ev in result.events:
            # straight into the fields (these are plain values): pydantic's __setattr__ costs
            # about a microsecond a call, three per event
            ev.__dict__.update(where)
            ev.__pydantic_fields_set__.update(where)
        self.redactor.events(result.events)
        if self.header_identity and rec.headers:
            apply_header_identity(result.events, rec.headers, self.header_identity)
        route(result.events, out)
        out.dead.extend(_dead(f, rec) for f in result.failures)
        if result.skipped:
            out.skipped[rec.topic] += result.skipped

    def process(self, records: Iterable[RawRecord], *, wall: float | None = None) -> Routed:
        out = Routed()
        for rec in records:
            decoder = self.decoders.get(rec.topic, self.default)
            if decoder is None:
                out.dead.append(DeadLetter(rec.value, f"no decoder for topic {rec.topic}", "", rec.topic,
                                           rec.partition, rec.offset))
                continue
            if not rec.value:
                out.dead.append(DeadLetter(rec.value, "empty message", "", rec.topic, rec.partition, rec.offset))
                continue
            try:
                feed = getattr(decoder, "feed", None)
                if feed is None:
                    self._emit(decoder(rec.value, origin=rec.topic), rec, out)
                    continue
                for part in feed(rec.value, stream=(rec.topic, rec.partition, rec.key), offset=rec.offset,
                                 origin=rec.topic, received_at=rec.received_at,
                                 wall=time.time() if wall is None else wall, headers=rec.headers):
                    at = rec if part.offset == rec.offset else RawRecord(rec.topic, rec.partition, part.offset, b"",
                                                                          rec.key, part.headers)
                    self._emit(part.result, at, out)
            except Exception as exc:
                # a decoder bug or a value no check anticipated (a timestamp past year 9999,
                # nesting deeper than the JSON encoder allows): this record is poison,
                # its neighbours are not
                out.dead.append(DeadLetter(rec.value, f"decoder raised {type(exc).__name__}: {exc}"[:1000],
                                           "", rec.topic, rec.partition, rec.offset))
        return out


def _dead(f: Failure, rec: RawRecord) -> DeadLetter:
    return DeadLetter(f.raw, f.reason, f.source, rec.topic, rec.partition, rec.offset)


class CorrelateStage:
    """Keyed by trace (or join bucket): decides each span's agent and joins audit
    records with the spans that caused them.

    ``process``/``tick``/``finish`` return events for the agent-keyed stage. Audit
    records matched through a secondary key must go round once more keyed by
    their trace: the worker sends ``take_rekeyed()`` to the trace-keyed topic;
    in one process (replay, tests) ``process_local``/``finish_local`` feed them
    straight back.
    """

    def __init__(self, policy: Policy) -> None:
        self.resolver = IdentityResolver(policy.allowed_lateness_s, rules=policy.identity_rules,
                                         version_attribute=policy.canary.version_attribute)
        self.joiner = Joiner(policy)

    def process(self, events: list[Event], *, wall: float | None = None) -> list[Event]:
        onward = self.joiner.accept(events, wall=wall)
        self.joiner.resolved(self.resolver.process(onward, wall=wall))
        self.joiner.fire()
        return self.joiner.drain()

    def tick(self, wall_now: float) -> list[Event]:
        self.joiner.resolved(self.resolver.tick(wall_now))
        self.joiner.watermark.idle_advance(wall_now)
        self.joiner.fire()
        return self.joiner.drain()

    def finish(self) -> list[Event]:
        # spans first, so matched audit records get their agent before the join closes
        self.joiner.resolved(self.resolver.finish())
        self.joiner.watermark.advance_to(FOREVER)
        self.joiner.fire()
        return self.joiner.drain()

    def take_rekeyed(self) -> dict[str, list[Event]]:
        """Audit records to send to the trace-keyed topic, keyed by trace id."""
        return self.joiner.take_rekeyed()

    @property
    def late_events(self) -> int:
        return self.resolver.watermark.late_events + self.joiner.stats.late

    def process_local(self, events: list[Event], *, wall: float | None = None) -> list[Event]:
        """``process`` with the re-keyed records fed straight back (one process owns every key)."""
        out = self.process(events, wall=wall)
        while rekeyed := self.take_rekeyed():
            out += self.process([ev for evs in rekeyed.values() for ev in evs], wall=wall)
        return out

    def finish_local(self) -> list[Event]:
        out = self.finish()
        while rekeyed := self.take_rekeyed():
            out += self.process([ev for evs in rekeyed.values() for ev in evs])
        return out

    def reloaded(self, policy: Policy) -> "CorrelateStage":
        """This stage's state under a new policy (a hot reload): the join's window and
        lateness, the audit sources' delays and the identity rules apply to what comes next;
        the spans and records held, and their timers, stay. Through a snapshot, so a reload
        carries exactly what a restart would."""
        walls = (self.resolver.watermark.wall_at_max, self.joiner.watermark.wall_at_max)
        stage = CorrelateStage.restore(policy, self.snapshot())
        # not a restart: the idle clock keeps running from the last event, not from now
        stage.resolver.watermark.wall_at_max, stage.joiner.watermark.wall_at_max = walls
        return stage

    def snapshot(self) -> bytes:
        """Identity and join state (timers included) as JSON bytes for ``restore``."""
        return orjson.dumps({"identity": self.resolver.snapshot().decode(),
                             "join": self.joiner.snapshot().decode()})

    @classmethod
    def restore(cls, policy: Policy, data: bytes) -> "CorrelateStage":
        """Raises StateError when ``data`` is not a correlate snapshot."""
        try:
            parts = orjson.loads(data)
            identity, join = parts["identity"].encode(), parts["join"].encode()
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise StateError(f"not a correlate stage snapshot: {exc}") from None
        stage = cls(policy)
        # the policy's identity rules and version attribute, as a fresh stage has them
        stage.resolver = IdentityResolver.restore(policy.allowed_lateness_s, identity, rules=policy.identity_rules,
                                                  version_attribute=policy.canary.version_attribute)
        stage.joiner = Joiner.restore(policy, join)
        _resume_clock(stage.resolver.watermark, stage.joiner.watermark)
        return stage


class DetectStage:
    """Keyed by agent: every detector over the attributed events.

    ``local``: the cross-agent detections run inside (replay, tests: one process sees every
    agent); the worker passes False, sends ``take_signals()`` to the tenant-keyed topic and
    runs them in ``TenantStage``."""

    def __init__(self, policy: Policy, *, local: bool = True) -> None:
        self.engine = DetectionEngine(policy, local_cross_agent=local)

    def process(self, events: list[Event], *, wall: float | None = None) -> list[Alert]:
        return self.engine.process(events, wall=wall)

    def tick(self, wall_now: float) -> list[Alert]:
        return self.engine.tick(wall_now)

    def finish(self) -> list[Alert]:
        return self.engine.finish()

    def take_signals(self) -> list[Signal]:
        return self.engine.take_signals()

    def snapshot(self) -> bytes:
        return self.engine.snapshot()

    @classmethod
    def restore(cls, policy: Policy, data: bytes, *, local: bool = True) -> "DetectStage":
        """Raises StateError when ``data`` is not an engine snapshot."""
        stage = cls(policy, local=local)
        stage.engine = DetectionEngine.restore(policy, data, local_cross_agent=local)
        _resume_clock(stage.engine.watermark)
        return stage


class TenantStage:
    """Keyed by tenant: the detections that need several agents at once (coordinated
    incidents, tenant budgets), fed by the detect stage's signals, not by events."""

    def __init__(self, policy: Policy) -> None:
        self.engine = CrossAgentEngine(policy)

    def process(self, signals: list[Signal], *, wall: float | None = None) -> list[Alert]:
        return self.engine.process(signals, wall=wall)

    def tick(self, wall_now: float) -> list[Alert]:
        return self.engine.tick(wall_now)

    def snapshot(self) -> bytes:
        return self.engine.snapshot()

    @classmethod
    def restore(cls, policy: Policy, data: bytes) -> "TenantStage":
        """Raises StateError when ``data`` is not a cross-agent engine snapshot."""
        stage = cls(policy)
        stage.engine = CrossAgentEngine.restore(policy, data)
        _resume_clock(stage.engine.watermark)
        return stage


def _resume_clock(*watermarks: Any) -> None:
    """Idle event time runs from now, not from the last event the previous owner saw:
    while no worker held the state (a crash, a rebalance) its input was waiting, not
    idle, and counting that time would close windows and fire timers early."""
    now = time.time()
    for wm in watermarks:
        if wm.wall_at_max is not None:
            wm.wall_at_max = now
