"""What a detector is: a deterministic function of the events it is fed.

A detector sees canonical events (already attributed to an agent) in roughly
event-time order and returns ``Finding``s. It never builds alerts itself: the
engine turns findings into alerts, merges repeats of the same condition into
one alert, and stamps mode and versions.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

from schemas.alerts import Severity
from schemas.events import Event


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


class Detector(ABC):
    name: ClassVar[str]
    version: ClassVar[str]

    @abstractmethod
    def observe(self, event: Event) -> list[Finding]:
        """Feed one event; return what it revealed."""

    def on_watermark(self, watermark: float) -> list[Finding]:
        """Event time has passed ``watermark``: fire due timers, expire state."""
        return []
