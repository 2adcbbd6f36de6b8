"""What a detector is: a deterministic function of the events it is fed.

A detector sees canonical events (already attributed to an agent) in roughly
event-time order and returns ``Finding``s. It never builds alerts itself: the
engine turns findings into alerts, merges repeats of the same condition into
one alert, and stamps mode and versions.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar

from detectors import state as st
from schemas.alerts import Severity
from schemas.events import Event, EventKind, stable_id


@dataclass(slots=True)
class Finding:
    detector: str
    agent_id: str
    tenant: str
    # what the condition is about within one agent (a tool and its arguments,
    # a resource ...): part of the alert's identity
    subject: str
    # event time the condition episode began: the "window" in the alert id
    episode_start: float
    # event time of this observation
    ts: float
    severity: Severity
    summary: str
    evidence: list[Event] = field(default_factory=list)
    # how long after ``ts`` with no repeat the episode is over
    quiet_after_s: float = 60.0
    labels: dict[str, str] = field(default_factory=dict)
    # the final figures of an observation already reported (a minute judged while still
    # open, now closed): the engine updates the alert's summary, labels and evidence
    # without counting a repeat
    revision: bool = False
    # False: worth a look but never a kill switch, whatever the detector's mode (reading
    # oversight configuration); the engine caps such an alert's mode at "alert"
    may_enforce: bool = True
    # ids naming the one action this is about, as the join assigned them (trace/span, tool
    # call id, AWS request id; detectors.resources.action_keys): findings of one detector and
    # agent sharing any of them are that action seen by several sources and become one alert
    action_keys: tuple[str, ...] = ()

    @classmethod
    def of_event(
        cls,
        detector: str,
        event: Event,
        subject: str,
        severity: Severity,
        summary: str,
        labels: dict[str, str],
        *,
        evidence: list[Event] | None = None,
        quiet_after_s: float = 300.0,
    ) -> "Finding":
        """A condition revealed by one event: its agent, its time, and it as evidence."""
        ts = event.ts_seconds
        return cls(detector=detector, agent_id=event.agent_id, tenant=event.tenant, subject=subject,
                   episode_start=ts, ts=ts, severity=severity, summary=summary,
                   evidence=evidence or [event], quiet_after_s=quiet_after_s, labels=labels)

    def to_state(self, enc: st.Encoder) -> list[Any]:
        return [self.detector, self.agent_id, self.tenant, self.subject, self.episode_start, self.ts,
                self.severity.value, self.summary, [enc.event(e) for e in self.evidence], self.quiet_after_s,
                self.labels, self.revision, self.may_enforce, list(self.action_keys)]

    @classmethod
    def from_state(cls, data: Any, dec: st.Decoder) -> "Finding":
        (detector, agent, tenant, subject, start, ts, severity, summary, evidence, quiet,
         labels, revision, may_enforce, action_keys) = st.seq(data)
        return cls(detector=st.text(detector), agent_id=st.text(agent), tenant=st.text(tenant),
                   subject=st.text(subject), episode_start=st.num(start), ts=st.num(ts),
                   severity=Severity(severity), summary=st.text(summary),
                   evidence=[dec.event(r) for r in st.seq(evidence)], quiet_after_s=st.num(quiet),
                   labels={st.text(k): st.text(v) for k, v in st.mapping(labels).items()},
                   revision=st.boolean(revision), may_enforce=st.boolean(may_enforce),
                   action_keys=tuple(st.texts(action_keys)))


class SignalKind(StrEnum):
    """What a signal for the tenant-keyed cross-agent stage is about (detectors/cross_agent.py)."""

    TAMPERING = "tampering"
    TOKENS = "tokens"


@dataclass(slots=True)
class Signal:
    """What a per-agent detect partition tells the tenant-keyed stage."""

    signal_id: str
    kind: SignalKind
    tenant: str
    agent_id: str
    ts: float  # event time, seconds
    tokens: int = 0
    # TAMPERING: the finding, its evidence included
    finding: Finding | None = None
    # TOKENS: where the LLM call is, for a budget alert's evidence
    event_id: str = ""
    trace_id: str = ""
    topic: str = ""
    partition: int = -1
    offset: int = -1


def tampering_signal(f: Finding) -> Signal:
    sid = stable_id("tampering", f.detector, f.tenant, f.agent_id, f.subject, f.ts,
                    *(e.event_id for e in f.evidence))
    return Signal(sid, SignalKind.TAMPERING, f.tenant, f.agent_id, f.ts, finding=f)


def token_signal(ev: Event, ts: float, tokens: int) -> Signal:
    return Signal("tokens:" + ev.event_id, SignalKind.TOKENS, ev.tenant, ev.agent_id, ts, tokens,
                  event_id=ev.event_id, trace_id=ev.trace_id, topic=ev.topic, partition=ev.partition,
                  offset=ev.offset)


# what a detector returns for an event that revealed nothing: one shared list, so the common
# case allocates nothing. Never appended to (a detector with findings builds its own list).
NO_FINDINGS: list[Finding] = []

# a detector's handler for one kind of event, returning what the event revealed. It is given
# the event, its field values (its ``__dict__``: reading those is a dict lookup, where an
# Event's attribute read goes through pydantic's __getattr__ hook; writes still go through the
# model) and its time (``ts_seconds``), all of which the engine has read already.
Handler = Callable[[Event, dict[str, Any], float], list[Finding]]


class Detector(ABC):
    name: ClassVar[str]
    version: ClassVar[str]
    #: where a detector puts what the tenant-keyed cross-agent stage needs (set by the engine)
    signals: list[Signal] | None = None

    @abstractmethod
    def observe(self, event: Event) -> list[Finding]:
        """Feed one event; return what it revealed."""

    def handlers(self) -> dict[EventKind, Handler] | None:
        """Per event kind, what ``observe`` does with an event of that kind, for the engine to
        call directly; a kind left out is one this detector ignores under its policy
        (``observe`` returns nothing for it and changes nothing). The engine asks once per
        policy and calls only the detectors a kind concerns. None (the default): ``observe``,
        for every kind."""
        return None

    def on_watermark(self, watermark: float) -> list[Finding]:
        """Event time has passed ``watermark``: fire due timers, expire state."""
        return []

    def to_state(self, enc: st.Encoder) -> dict[str, Any]:
        """Windows, streaks and timers as JSON-ready values (detectors/state.py); events
        go through ``enc``. Stateless detectors keep the default."""
        return {}

    def load_state(self, data: dict[str, Any], dec: st.Decoder) -> None:
        """Take over what ``to_state`` wrote, into a detector fresh from its policy."""
