"""escalation_bypass: a high-risk action that went ahead without a human's yes.

An absence pattern. A high-risk action (a successful tool call whose name
matches ``high_risk.tools``, or an allowed audit event matching a
``high_risk.audit`` rule) needs a granted ``approval`` event of the same agent
that covers it (same ``tool_call_id``, same trace, or a ``covers_resource``
glob matching what it touched) and precedes it by at most
``high_risk.approval_ttl_s`` (and is not past its own ``expires_at``).

Approvals may arrive a little out of order, so the decision is not taken when
the action is seen: a timer at the action's event time fires once the
watermark passes it, i.e. after the allowed lateness (in the live worker idle
time moves the watermark with the wall clock; in replay end of input does).
At that point the latest covering decision at or before the action decides:

- granted, in time          -> fine
- denied                    -> executed after its approval was denied (critical)
- pending                   -> executed while its approval was still pending
- none (or only expired)    -> executed without approval
"""

from __future__ import annotations

from typing import Any

from detectors import state as st
from detectors.base import Detector, Finding
from detectors.policy import Policy, first_match, glob_match
from detectors.resources import attributed, audit_final, succeeded, touched
from detectors.windows import SlidingWindow, TimerQueue
from schemas.events import Event, EventKind

AgentKey = tuple[str, str]


class EscalationBypass(Detector):
    name = "escalation_bypass"
    version = "1.0.0"

    def __init__(self, policy: Policy) -> None:
        self.config = policy.detectors.escalation_bypass
        self.high_risk = policy.high_risk
        self.ttl = policy.high_risk.approval_ttl_s
        # approvals (any decision) of each agent: a TTL back to cover an action, a second
        # TTL to tell "approval expired" from "never approved", plus the allowed lateness
        self._approvals: SlidingWindow[AgentKey, Event] = SlidingWindow(2 * self.ttl + policy.allowed_lateness_s)
        self._timers = TimerQueue()

    def _high_risk(self, ev: Event) -> str:
        """The rule that makes an event a high-risk action ("" when it is not one)."""
        if not attributed(ev) or not succeeded(ev):
            return ""
        if ev.kind is EventKind.TOOL_CALL and ev.tool_name:
            return first_match([ev.tool_name], self.high_risk.tools)[1]
        if ev.kind is EventKind.AUDIT and audit_final(ev):
            for rule in self.high_risk.audit:
                if glob_match(ev.action, rule.action) and glob_match(ev.resource, rule.resource):
                    return f"{rule.action} {rule.resource}"
        return ""

    def observe(self, event: Event) -> list[Finding]:
        if event.kind is EventKind.APPROVAL:
            self._approvals.add((event.tenant, event.agent_id), event.ts_seconds, event)
            return []
        rule = self._high_risk(event)
        if rule:
            # one decision per action: a tool call and the audit record of the same call share a key
            action_key = (event.tenant, event.agent_id, event.tool_call_id or event.event_id)
            if not self._timers.armed(action_key):
                self._timers.arm(action_key, event.ts_seconds, (event, rule))
        return []

    def on_watermark(self, watermark: float) -> list[Finding]:
        out: list[Finding] = []
        for timer in self._timers.due(watermark):
            action, rule = timer.payload  # type: ignore[misc]
            f = self._decide(action, rule)
            if f is not None:
                out.append(f)
        self._approvals.expire(watermark)
        return out

    @staticmethod
    def _covers(approval: Event, action: Event) -> bool:
        if approval.covers_tool_call_id and approval.covers_tool_call_id == action.tool_call_id:
            return True
        if approval.covers_trace_id and approval.covers_trace_id == action.trace_id:
            return True
        if approval.covers_resource:
            return bool(first_match(touched(action), [approval.covers_resource])[0])
        return False

    def _decide(self, action: Event, rule: str) -> Finding | None:
        ts = action.ts_seconds
        covering = [
            a for a in self._approvals.items((action.tenant, action.agent_id))
            if a.ts_seconds <= ts and self._covers(a, action)
        ]
        latest = max(covering, key=lambda a: a.ts_seconds, default=None)
        what = action.tool_name or f"{action.action} {action.resource}".strip()
        if latest is None:
            pattern, severity = "no_approval", self.config.severity
            summary = f"agent {action.agent_id} ran high-risk {what} without an approval"
        elif latest.decision == "granted":
            expired = latest.expires_at is not None and latest.expires_at.timestamp() < ts
            if ts - latest.ts_seconds <= self.ttl and not expired:
                return None
            pattern, severity = "approval_expired", self.config.severity
            summary = f"agent {action.agent_id} ran high-risk {what} after its approval expired"
        elif latest.decision == "denied":
            pattern, severity = "after_denial", self.config.denied_severity
            summary = f"agent {action.agent_id} ran high-risk {what} although {latest.approver or 'the approver'} denied it"
        else:
            pattern, severity = "while_pending", self.config.severity
            summary = f"agent {action.agent_id} ran high-risk {what} while its approval was still pending"
        return Finding(
            detector=self.name,
            agent_id=action.agent_id,
            tenant=action.tenant,
            subject=f"{pattern}:{what}",
            episode_start=ts,
            ts=ts,
            severity=severity,
            summary=summary,
            evidence=[action] + ([latest] if latest is not None else []),
            quiet_after_s=300.0,
            labels={"pattern": pattern, "rule": rule, "action": what},
        )

    def to_state(self, enc: st.Encoder) -> dict[str, Any]:
        return {"approvals": self._approvals.to_state(enc.event),
                "timers": self._timers.to_state(lambda p: [enc.event(p[0]), p[1]])}

    def load_state(self, data: dict[str, Any], dec: st.Decoder) -> None:
        self._approvals.load_state(data.get("approvals", []), dec.event)
        self._timers.load_state(data.get("timers", []), lambda p: (dec.event(st.seq(p)[0]), st.text(p[1])))
