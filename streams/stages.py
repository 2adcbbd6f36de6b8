"""The processing stages, free of faust: batches in, batches out.

The faust app (``streams.app``) only moves batches between Kafka and these
stages; ``agentwatch replay`` and the benchmarks drive the very same objects.

    ingest     raw records -> canonical events, routed by trace or by agent; DLQ
    correlate  keyed by trace: agent identity from ancestor spans
    detect     keyed by agent: the detection engine
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from detectors.engine import DetectionEngine
from detectors.identity import IdentityResolver
from detectors.policy import Policy
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
    """Events with a trace go to the trace-keyed stage (identity, joins); the rest
    straight to their agent."""
    for ev in events:
        out.events += 1
        if ev.trace_id:
            out.by_trace[ev.trace_id].append(ev)
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


def group_by_agent(events: Iterable[Event]) -> dict[str, list[Event]]:
    groups: dict[str, list[Event]] = defaultdict(list)
    for ev in events:
        groups[ev.agent_id or "unknown"].append(ev)
    return groups


class CorrelateStage:
    """Keyed by trace: decides each span's agent (and, later, joins audit events)."""

    def __init__(self, policy: Policy) -> None:
        self.resolver = IdentityResolver(policy.allowed_lateness_s)

    def process(self, events: list[Event], *, wall: float | None = None) -> list[Event]:
        return self.resolver.process(events, wall=wall)

    def tick(self, wall_now: float) -> list[Event]:
        return self.resolver.tick(wall_now)

    def finish(self) -> list[Event]:
        return self.resolver.finish()


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
