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
from detectors.base import NO_FINDINGS, Detector, Finding, Handler
from detectors.policy import MATCH_CACHE_SIZE, Matcher, Policy, first_match
from detectors.resources import UNATTRIBUTED, action_keys, audit_final, first_touched
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
        self._protected = Matcher(policy.protected_resources)
        self._has_allowlists = bool(policy.allowlists)
        # (agent, tool) -> on the agent's allowlist (True when it has none): bounded
        self._allowed: dict[tuple[str, str], bool] = {}
        self._handlers: dict[EventKind, Handler] = {EventKind.AUDIT: self._audit}  # denials, whatever the policy
        if self._has_allowlists or self._protected:
            self._handlers[EventKind.TOOL_CALL] = self._tool_call
        if self._protected:
            # a DB or HTTP client span under a tool call names what the call really reached
            self._handlers[EventKind.SPAN] = self._protected_only

    def observe(self, event: Event) -> list[Finding]:
        handler = self._handlers.get(event.kind)
        return handler(event, event.__dict__, event.ts_seconds) if handler is not None else []

    def handlers(self) -> dict[EventKind, Handler]:
        return dict(self._handlers)

    def _allows(self, agent: str, tool: str) -> bool:
        known = self._allowed.get((agent, tool))
        if known is None:
            allowed = self.policy.allowlist_for(agent)
            known = allowed is None or bool(first_match([tool], allowed)[0])
            if len(self._allowed) >= MATCH_CACHE_SIZE:
                self._allowed.clear()
            self._allowed[(agent, tool)] = known
        return known

    def _tool_call(self, event: Event, fields: dict[str, Any], ts: float) -> list[Finding]:
        if fields["agent_id"] in UNATTRIBUTED:
            return NO_FINDINGS
        out = NO_FINDINGS
        tool = fields["tool_name"]
        if tool and self._has_allowlists and not self._allows(fields["agent_id"], tool):
            out = [self._finding(
                event, f"tool:{tool}", self.config.severity,
                f"agent {event.agent_id} called {tool}, which is not on its allowlist",
                {"pattern": "allowlist", "tool": tool},
            )]
        if self._protected:
            f = self._protected_finding(event)
            if f is not None:
                out = [*out, f]
        return out

    def _protected_only(self, event: Event, fields: dict[str, Any], ts: float) -> list[Finding]:
        if event.agent_id in UNATTRIBUTED:
            return NO_FINDINGS
        f = self._protected_finding(event)
        return NO_FINDINGS if f is None else [f]

    def _protected_finding(self, event: Event) -> Finding | None:
        value, pattern = first_touched(event.__dict__, self._protected)
        if not pattern:
            return None
        verb = event.action or event.tool_name or event.kind.value
        return self._finding(
            event, f"protected:{pattern}", self.config.severity,
            f"agent {event.agent_id} touched protected resource {value} ({verb}, outcome {event.outcome or 'ok'})",
            {"pattern": "protected", "resource": value, "rule": pattern},
            # the tool span, its client span and the audit record of one request: one alert
            action=action_keys(event),
        )

    def _audit(self, event: Event, fields: dict[str, Any], ts: float) -> list[Finding]:
        if event.agent_id in UNATTRIBUTED or not audit_final(event):
            return NO_FINDINGS
        out = NO_FINDINGS
        if self._protected:
            f = self._protected_finding(event)
            if f is not None:
                out = [f]
        if event.outcome == "deny":
            n = self._denies.add_count((event.tenant, event.agent_id), ts, event)
            burst = n >= self.config.deny_burst
            severity = self.config.burst_severity if burst else self.config.deny_severity
            what = f"{n} denied actions within {self.config.deny_window_s:g}s" if burst else (
                f"denied {event.action} on {event.resource or '?'}")
            evidence = (self._denies.items((event.tenant, event.agent_id))
                        if burst and n == self.config.deny_burst else [event])
            out = [*out, self._finding(
                event, "denied", severity, f"agent {event.agent_id}: {what}",
                {"pattern": "deny_burst" if burst else "deny"},
                evidence=evidence,
                quiet_after_s=self.config.deny_window_s,
            )]
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
