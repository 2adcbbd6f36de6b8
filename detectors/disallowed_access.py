"""disallowed_access: an agent reaching for what it may not.

Three shapes:
- a tool call outside the agent's allowlist (only for agents the policy gives
  an allowlist; an agent named by none is unconstrained);
- a tool call (or a client span under it) or audit event touching a protected resource pattern (the audit
  resource; for tool calls the tool name and the span attributes that name a
  target such as ``db.statement`` or ``http.url``);
- denied audit outcomes: one is low severity; ``deny_burst`` of them within
  ``deny_window_s`` is high. Both land in one alert per agent (subject
  ``denied``), whose severity rises when the burst arrives.
"""

from __future__ import annotations

from typing import Any

from detectors import state as st
from detectors.base import Detector, Finding
from detectors.policy import Policy, first_match
from detectors.resources import action_keys, attributed, audit_final, touched
from detectors.windows import SlidingWindow
from schemas.alerts import Severity
from schemas.events import Event, EventKind


class DisallowedAccess(Detector):
    name = "disallowed_access"
    version = "1.0.0"

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.config = policy.detectors.disallowed_access
        self._denies: SlidingWindow[tuple[str, str], Event] = SlidingWindow(self.config.deny_window_s)

    def observe(self, event: Event) -> list[Finding]:
        # SPAN: a DB or HTTP client span under a tool call names what the call really reached
        if event.kind not in (EventKind.TOOL_CALL, EventKind.AUDIT, EventKind.SPAN) or not attributed(event):
            return []
        if event.kind is EventKind.AUDIT and not audit_final(event):
            return []
        out: list[Finding] = []
        if event.kind is EventKind.TOOL_CALL and event.tool_name:
            allowed = self.policy.allowlist_for(event.agent_id)
            if allowed is not None and not first_match([event.tool_name], allowed)[0]:
                out.append(self._finding(
                    event, f"tool:{event.tool_name}", self.config.severity,
                    f"agent {event.agent_id} called {event.tool_name}, which is not on its allowlist",
                    {"pattern": "allowlist", "tool": event.tool_name},
                ))
        value, pattern = first_match(touched(event), self.policy.protected_resources)
        if pattern:
            verb = event.action or event.tool_name or event.kind.value
            out.append(self._finding(
                event, f"protected:{pattern}", self.config.severity,
                f"agent {event.agent_id} touched protected resource {value} ({verb}, outcome {event.outcome or 'ok'})",
                {"pattern": "protected", "resource": value, "rule": pattern},
                # the tool span, its client span and the audit record of one request: one alert
                action=action_keys(event),
            ))
        if event.kind is EventKind.AUDIT and event.outcome == "deny":
            recent = self._denies.add((event.tenant, event.agent_id), event.ts_seconds, event)
            burst = len(recent) >= self.config.deny_burst
            severity = self.config.burst_severity if burst else self.config.deny_severity
            what = f"{len(recent)} denied actions within {self.config.deny_window_s:g}s" if burst else (
                f"denied {event.action} on {event.resource or '?'}")
            out.append(self._finding(
                event, "denied", severity, f"agent {event.agent_id}: {what}",
                {"pattern": "deny_burst" if burst else "deny"},
                evidence=recent if burst and len(recent) == self.config.deny_burst else [event],
                quiet_after_s=self.config.deny_window_s,
            ))
        return out

    def _finding(self, event: Event, subject: str, severity: Severity, summary: str, labels: dict[str, str], *,
                 evidence: list[Event] | None = None, quiet_after_s: float = 300.0,
                 action: tuple[str, ...] = ()) -> Finding:
        f = Finding.of_event(self.name, event, subject, severity, summary, labels, evidence=evidence,
                             quiet_after_s=quiet_after_s)
        f.action_keys = action
        return f

    def on_watermark(self, watermark: float) -> list[Finding]:
        self._denies.expire(watermark)
        return []

    def to_state(self, enc: st.Encoder) -> dict[str, Any]:
        return {"denies": self._denies.to_state(enc.event)}

    def load_state(self, data: dict[str, Any], dec: st.Decoder) -> None:
        self._denies.load_state(data.get("denies", []), dec.event)
