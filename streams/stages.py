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

from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from detectors.engine import DetectionEngine
from detectors.identity import IdentityResolver
from detectors.join import Joiner, index_copies, join_partition_key
from detectors.policy import Policy
from detectors.windows import FOREVER
from schemas.alerts import Alert
from schemas.decoders import DecodeResult, Failure
from schemas.decoders.audit import decode_audit
from schemas.decoders.native import decode_native
from schemas.decoders.otlp import decode_otlp
from schemas.events import Event

Decoder = Callable[..., DecodeResult]


@dataclass(slots=True)
class RawRecord:
    topic: str
    partition: int
    offset: int
    value: bytes
    key: bytes | None = None


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


def decoder_for_topics(otlp: str, native: str, audit: str) -> dict[str, Decoder]:
    return {otlp: decode_otlp, native: decode_native, audit: decode_audit}


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
    def __init__(self, decoders: dict[str, Decoder], default: Decoder | None = None) -> None:
        self.decoders = decoders
        self.default = default

    def process(self, records: Iterable[RawRecord]) -> Routed:
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
            result = decoder(rec.value, origin=rec.topic)
            for ev in result.events:
                ev.topic, ev.partition, ev.offset = rec.topic, rec.partition, rec.offset
            route(result.events, out)
            out.dead.extend(_dead(f, rec) for f in result.failures)
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
        self.resolver = IdentityResolver(policy.allowed_lateness_s)
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


class DetectStage:
    """Keyed by agent: every detector over the attributed events."""

    def __init__(self, policy: Policy) -> None:
        self.engine = DetectionEngine(policy)

    def process(self, events: list[Event], *, wall: float | None = None) -> list[Alert]:
        return self.engine.process(events, wall=wall)

    def tick(self, wall_now: float) -> list[Alert]:
        return self.engine.tick(wall_now)

    def finish(self) -> list[Alert]:
        return self.engine.finish()
