"""Join-derived detectors: what the span/audit join (detectors/join.py) could not explain.

The join decides, per event, after its window and allowed lateness, and writes
the verdict on the event (``attributes["join"]``); these detectors only turn
verdicts into findings in the agent-keyed stage. Keeping the waiting in the
join means the timers live where both streams meet (the trace), while the
alerts are raised, grouped and moded with every other detector's.

* ``unattributed_side_effect``: an audit record of an agent principal that
  changed something (outcome allow, action not read-only) and that no span
  explains.
* ``unconfirmed_action``: an auditable tool call that reported success and left
  no audit record.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Any

from detectors.base import NO_FINDINGS, Detector, Finding, Handler
from detectors.join import AGENT_PRINCIPAL, JOIN, UNATTRIBUTED, UNCONFIRMED
from detectors.policy import UnattributedSideEffectConfig, UnconfirmedActionConfig
from schemas.alerts import Severity
from schemas.events import Event, EventKind

# a repeat within this much event time is the same incident (one alert, count grows)
_QUIET_S = 600.0


def _finding(detector: str, event: Event, subject: str, severity: Severity, summary: str,
             labels: dict[str, str]) -> list[Finding]:
    return [Finding.of_event(detector, event, subject, severity, summary, labels, quiet_after_s=_QUIET_S)]


class UnattributedSideEffect(Detector):
    name = "unattributed_side_effect"
    version = "1.0.0"

    def __init__(self, config: UnattributedSideEffectConfig) -> None:
        self.config = config

    def handlers(self) -> dict[EventKind, Handler]:
        return {EventKind.AUDIT: self._audit}

    def _audit(self, event: Event, fields: dict[str, Any], ts: float) -> list[Finding]:
        return self.observe(event)

    def observe(self, event: Event) -> list[Finding]:
        if (
            event.kind is not EventKind.AUDIT
            or event.attributes.get(JOIN) != UNATTRIBUTED
            or event.attributes.get(AGENT_PRINCIPAL) != "true"
            or event.outcome != "allow"  # denied or failed: nothing happened
            or any(fnmatchcase(event.action, p) for p in self.config.read_only_actions)
        ):
            return []
        summary = (
            f"{event.principal} did {event.action} {event.resource} ({event.source}) "
            "and no span of any agent explains it"
        )
        labels = {"principal": event.principal, "source": event.source}
        return _finding(self.name, event, event.principal, self.config.severity, summary, labels)


class UnconfirmedAction(Detector):
    name = "unconfirmed_action"
    version = "1.0.0"

    def __init__(self, config: UnconfirmedActionConfig) -> None:
        self.config = config

    def handlers(self) -> dict[EventKind, Handler]:
        return {EventKind.TOOL_CALL: self._tool_call}

    def _tool_call(self, event: Event, fields: dict[str, Any], ts: float) -> list[Finding]:
        if fields["attributes"].get(JOIN) != UNCONFIRMED:
            return NO_FINDINGS
        return self.observe(event)

    def observe(self, event: Event) -> list[Finding]:
        if event.kind is not EventKind.TOOL_CALL or event.attributes.get(JOIN) != UNCONFIRMED:
            return []
        summary = (
            f"{event.agent_id} reported {event.tool_name} succeeded "
            f"(tool call {event.tool_call_id or event.span_id}) but no audit record shows it happened"
        )
        return _finding(self.name, event, event.tool_name, self.config.severity, summary, {"tool": event.tool_name})
