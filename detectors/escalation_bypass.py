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
from detectors.base import NO_FINDINGS, Detector, Finding, Handler
from detectors.policy import MATCH_CACHE_SIZE, Matcher, Policy, first_match, glob_match
from detectors.resources import UNATTRIBUTED, touched
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
        self._tools = Matcher(self.high_risk.tools)
        self._audit_rules = [(r.action, r.resource) for r in self.high_risk.audit]
        # (action, resource) -> the audit rule it matches ("" for none): bounded
        self._audit_known: dict[tuple[str, str], str] = {}
        # only what the policy names can be high-risk: other kinds (and tool calls or audit
        # records when it names none) never reach this detector
        self._handlers: dict[EventKind, Handler] = {EventKind.APPROVAL: self._approval}
        if self._tools:
            self._handlers[EventKind.TOOL_CALL] = self._action
        if self._audit_rules:
            self._handlers[EventKind.AUDIT] = self._action

    def observe(self, event: Event) -> list[Finding]:
        handler = self._handlers.get(event.kind)
        return handler(event, event.__dict__, event.ts_seconds) if handler is not None else []

    def handlers(self) -> dict[EventKind, Handler]:
        return dict(self._handlers)

    def _high_risk(self, fields: dict[str, Any]) -> str:
        """The rule that makes the event whose field values are ``fields`` a high-risk action
        ("" when it is not one)."""
        if fields["agent_id"] in UNATTRIBUTED:
            return ""
        kind = fields["kind"]
        if kind is EventKind.TOOL_CALL:
            # a tool call that did not fail, by a tool the policy names
            tool = fields["tool_name"]
            if fields["outcome"] == "error" or not tool:
                return ""
            return self._tools.pattern_for(tool)
        if kind is EventKind.AUDIT and fields["outcome"] == "allow":  # allowed: final, and it succeeded
            return self._audit_rule(fields["action"], fields["resource"])
        return ""

    def _audit_rule(self, action: str, resource: str) -> str:
        known = self._audit_known.get((action, resource))
        if known is None:
            known = ""
            for rule_action, rule_resource in self._audit_rules:
                if glob_match(action, rule_action) and glob_match(resource, rule_resource):
                    known = f"{rule_action} {rule_resource}"
                    break
            if len(self._audit_known) >= MATCH_CACHE_SIZE:
                self._audit_known.clear()
            self._audit_known[(action, resource)] = known
        return known

    def _approval(self, event: Event, fields: dict[str, Any], ts: float) -> list[Finding]:
        self._approvals.add_count((event.tenant, event.agent_id), ts, event)
        return NO_FINDINGS

    def _action(self, event: Event, fields: dict[str, Any], ts: float) -> list[Finding]:
        rule = self._high_risk(fields)
        if rule:
            # one decision per action: a tool call and the audit record of the same call share a key
            action_key = (event.tenant, event.agent_id, event.tool_call_id or event.event_id)
            if not self._timers.armed(action_key):
                self._timers.arm(action_key, ts, (event, rule))
        return NO_FINDINGS

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
