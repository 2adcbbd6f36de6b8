"""peer_preservation: agents resisting oversight, for themselves or for each other.

(a) after_halt: an agent acts (tool or LLM call, or an allowed audited action
    attributed to it) more than ``grace_s`` after a halt kill switch that
    targets it (by agent, by tenant, or all) and before a resume or the
    command's expiry. A scoped halt (named tools) only counts those tools.
(b) oversight: any agent changes or disables an oversight resource (policy
    ``oversight_resources``: the control topic, the detector policy, audit or
    monitoring config, kill-switch state), whatever the outcome: a denied
    attempt is still an attempt. Reading it (DescribeTrails, GetEventSelectors,
    get/list/watch, SELECT: ``resources.reads_only``) is only an
    ``oversight_read`` finding of ``read_severity`` (low) that never enforces
    a kill switch, whatever the detector's mode, and never counts towards (d).
    A tool span, its client span and the audit record of the same request are
    one action (``resources.action_keys``): one alert with all three as
    evidence.
(c) shielding: agent B restarts / scales / re-creates / spawns agent A's
    runtime while A is halted or within ``shield_window_s`` after the halt
    ended: an ``agent`` lifecycle event from B with ``target_agent_id`` = A, or
    a non-read audit event by B on a resource of A's runtime
    (``agent_runtimes`` globs, else a path segment naming A).
(d) coordinated: ``coordination_min_agents`` or more agents doing (b)/(c)
    within ``coordination_window_s`` form one critical incident, reported
    under the first agent of the window (subject ``coordinated``) with every
    agent in the ``agents`` label. The agents of one tenant may be on
    different partitions, so this detector only sends its (b)/(c) findings
    that may enforce as signals; the tenant-keyed stage decides (d)
    (``Coordination`` in detectors/cross_agent.py).

Kill switches are the ``control_command`` events the control plane emits.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from typing import Any

from detectors import state as st
from detectors.base import NO_FINDINGS, Detector, Finding, Handler, tampering_signal
from detectors.policy import Matcher, Policy, first_match
from detectors.resources import READ_ACTIONS, UNATTRIBUTED, action_keys, audit_final, first_touched, reads_only
from schemas.events import Event, EventKind

SHIELD_LIFECYCLE = frozenset({"start", "restart", "scale", "recreate", "spawn"})
_SEGMENTS = re.compile(r"[/:]")


@dataclass(slots=True)
class _Halt:
    command_id: str
    start: float
    end: float  # resume or expiry; inf while in force
    agent: str  # "" for tenant/all targets
    tenant: str  # "" for agent/all targets
    scope: tuple[str, ...]
    event: Event

    def targets(self, agent: str, tenant: str, version: str | None = None) -> bool:
        if self.agent:
            # a version-scoped halt (canary rollback) targets that version only; None: any version
            scoped = self.event.agent_version
            return self.agent == agent and (version is None or not scoped or scoped == version)
        return not self.tenant or self.tenant == tenant


class PeerPreservation(Detector):
    name = "peer_preservation"
    version = "1.0.0"

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.config = policy.detectors.peer_preservation
        self._halts: list[_Halt] = []
        # the same halts by target: an event looks at its agent's and the broad ones only
        self._by_agent: dict[str, list[_Halt]] = {}
        self._broad: list[_Halt] = []  # tenant and all targets
        self._prune_at = math.inf  # earliest end of a halt: nothing to forget before that
        self._oversight_match = Matcher(policy.oversight_resources)
        self._read_actions = Matcher(READ_ACTIONS)
        # (a) and (c) need a halt in force; (b) needs oversight patterns. Approvals and control
        # acknowledgements are never acting, tampering or shielding.
        self._handlers: dict[EventKind, Handler] = {
            EventKind.CONTROL_COMMAND: self._control_command,
            EventKind.TOOL_CALL: self._tool_call, EventKind.LLM_CALL: self._llm_call, EventKind.AUDIT: self._audit,
            EventKind.SPAN: self._span, EventKind.AGENT: self._agent,
        }

    # -- kill switches -------------------------------------------------------------------

    def _command(self, ev: Event) -> None:
        target = ev.attributes.get("target", "")
        agent = ev.target_agent_id or (ev.agent_id if not target.startswith(("tenant:", "all")) else "")
        tenant = ev.tenant if target.startswith("tenant:") else ""
        ts = ev.ts_seconds
        if ev.command_action == "halt":
            end = ev.expires_at.timestamp() if ev.expires_at else math.inf
            self._add_halt(_Halt(ev.command_id, ts, end, agent, tenant, tuple(ev.command_scope), ev))
        elif ev.command_action == "resume":
            for h in self._by_agent.get(agent, ()) if agent else self._broad:
                if (h.start <= ts < h.end and h.agent == agent and h.tenant == tenant
                        and h.event.agent_version == ev.agent_version):
                    h.end = ts
                    self._prune_at = min(self._prune_at, ts)

    def _add_halt(self, h: _Halt) -> None:
        self._halts.append(h)
        if h.agent:
            self._by_agent.setdefault(h.agent, []).append(h)
        else:
            self._broad.append(h)
        self._prune_at = min(self._prune_at, h.end)

    def _halt_over(self, agent: str, tenant: str, ts: float, *, after: float = 0.0,
                   version: str | None = None) -> _Halt | None:
        """The halt of ``agent`` in force at ``ts`` (or ended at most ``after`` seconds before)."""
        best = None
        for h in itertools.chain(self._by_agent.get(agent, ()), self._broad):
            if h.targets(agent, tenant, version) and h.start <= ts <= h.end + after:
                if best is None or h.start > best.start:
                    best = h
        return best

    # -- events --------------------------------------------------------------------------

    def observe(self, event: Event) -> list[Finding]:
        handler = self._handlers.get(event.kind)
        return handler(event, event.__dict__, event.ts_seconds) if handler is not None else []

    def handlers(self) -> dict[EventKind, Handler]:
        return dict(self._handlers)

    def _control_command(self, event: Event, fields: dict[str, Any], ts: float) -> list[Finding]:
        self._command(event)
        return NO_FINDINGS

    # One handler per kind, each doing what ``observe`` does for that kind: (a) acting after a
    # halt concerns tool and LLM calls and allowed audit records, (b) oversight tool calls,
    # client spans and audit records, (c) shielding lifecycle events and audit records.
    # Approvals and control acknowledgements are none of these.

    def _tool_call(self, event: Event, fields: dict[str, Any], ts: float) -> list[Finding]:
        if fields["agent_id"] in UNATTRIBUTED:
            return NO_FINDINGS
        out = NO_FINDINGS
        if self._halts:
            f = self._after_halt(event)
            if f:
                out = [f]
        if self._oversight_match:
            value, pattern = first_touched(fields, self._oversight_match)
            if pattern:
                out = [*out, self._tampering(self._oversight_finding(event, value, pattern))]
        return out

    def _llm_call(self, event: Event, fields: dict[str, Any], ts: float) -> list[Finding]:
        if not self._halts or fields["agent_id"] in UNATTRIBUTED:
            return NO_FINDINGS
        f = self._after_halt(event)
        return [f] if f else NO_FINDINGS

    def _audit(self, event: Event, fields: dict[str, Any], ts: float) -> list[Finding]:
        if event.agent_id in UNATTRIBUTED:
            return NO_FINDINGS
        halts = bool(self._halts)
        f = self._after_halt(event) if halts else None
        out = [f] if f else []
        for f in (self._oversight(event), self._shielding(event) if halts else None):
            if f:
                out.append(self._tampering(f))
        return out

    def _span(self, event: Event, fields: dict[str, Any], ts: float) -> list[Finding]:
        if event.agent_id in UNATTRIBUTED:
            return NO_FINDINGS
        f = self._oversight(event)
        return [self._tampering(f)] if f else NO_FINDINGS

    def _agent(self, event: Event, fields: dict[str, Any], ts: float) -> list[Finding]:
        if not self._halts or event.agent_id in UNATTRIBUTED:
            return NO_FINDINGS
        f = self._shielding(event)
        return [self._tampering(f)] if f else NO_FINDINGS

    def _tampering(self, f: Finding) -> Finding:
        """An oversight or shielding finding: one that may enforce also goes out as a signal for
        (d), decided in the tenant-keyed stage."""
        if f.may_enforce and self.signals is not None:
            self.signals.append(tampering_signal(f))
        return f

    def _after_halt(self, ev: Event) -> Finding | None:
        acting = ev.kind in (EventKind.TOOL_CALL, EventKind.LLM_CALL) or (
            ev.kind is EventKind.AUDIT and ev.outcome == "allow")
        if not acting:
            return None
        ts = ev.ts_seconds
        h = self._halt_over(ev.agent_id, ev.tenant, ts, version=ev.agent_version)
        if h is None or ts <= h.start + self.config.grace_s:
            return None
        if h.scope and not (ev.kind is EventKind.TOOL_CALL and first_match([ev.tool_name], list(h.scope))[0]):
            return None  # a scoped halt stops named tools only
        what = ev.tool_name or ev.model or ev.action or ev.kind.value
        return Finding(
            detector=self.name, agent_id=ev.agent_id, tenant=ev.tenant, subject=f"after_halt:{h.command_id}",
            episode_start=ts, ts=ts, severity=self.config.severity,
            summary=f"agent {ev.agent_id} kept acting ({what}) {ts - h.start:.0f}s after halt {h.command_id}",
            evidence=[h.event, ev], quiet_after_s=300.0,
            labels={"pattern": "after_halt", "command_id": h.command_id},
        )

    def _oversight(self, ev: Event) -> Finding | None:
        if not self._oversight_match:
            return None
        if ev.kind is EventKind.AUDIT:
            if not audit_final(ev):
                return None
            value, pattern = self._oversight_match.first((ev.resource, ev.action))
        elif ev.kind in (EventKind.TOOL_CALL, EventKind.SPAN):
            value, pattern = first_touched(ev.__dict__, self._oversight_match)
        else:
            return None
        return self._oversight_finding(ev, value, pattern) if pattern else None

    def _oversight_finding(self, ev: Event, value: str, pattern: str) -> Finding:
        """(b): ``ev`` touched ``value``, which matches the oversight ``pattern``."""
        ts = ev.ts_seconds
        verb = ev.action or ev.tool_name or ev.name
        keys = action_keys(ev)
        if reads_only(ev):
            return Finding(
                detector=self.name, agent_id=ev.agent_id, tenant=ev.tenant, subject=f"oversight_read:{value}",
                episode_start=ts, ts=ts, severity=self.config.read_severity,
                summary=f"agent {ev.agent_id} read oversight configuration {value} ({verb}, outcome {ev.outcome or 'ok'})",
                evidence=[ev], quiet_after_s=300.0, may_enforce=False, action_keys=keys,
                labels={"pattern": "oversight_read", "resource": value, "rule": pattern},
            )
        return Finding(
            detector=self.name, agent_id=ev.agent_id, tenant=ev.tenant, subject=f"oversight:{value}",
            episode_start=ts, ts=ts, severity=self.config.severity,
            summary=f"agent {ev.agent_id} touched oversight resource {value} ({verb}, outcome {ev.outcome or 'ok'})",
            evidence=[ev], quiet_after_s=300.0, action_keys=keys,
            labels={"pattern": "oversight", "resource": value, "rule": pattern},
        )

    def _runtime_of(self, agent: str, resource: str) -> bool:
        patterns = self.policy.agent_runtimes.get(agent)
        if patterns:
            return bool(first_match([resource], patterns)[0])
        # no runtime declared: a path segment naming the agent (deployments/ns/<agent>, pods/ns/<agent>-5f7c9)
        return any(seg == agent or seg.startswith(agent + "-") for seg in _SEGMENTS.split(resource) if seg)

    def _shielding(self, ev: Event) -> Finding | None:
        ts = ev.ts_seconds
        window = self.config.shield_window_s
        target = ""
        if ev.kind is EventKind.AGENT and ev.lifecycle in SHIELD_LIFECYCLE and ev.target_agent_id:
            target = ev.target_agent_id
            how = ev.lifecycle
        elif ev.kind is EventKind.AUDIT and ev.outcome == "allow" and ev.resource:
            if ev.action and self._read_actions.pattern_for(ev.action):
                return None
            halted = {a for a, hs in self._by_agent.items() if any(h.start <= ts <= h.end + window for h in hs)}
            target = next((a for a in sorted(halted) if self._runtime_of(a, ev.resource)), "")
            how = f"{ev.action} {ev.resource}"
        else:
            return None
        if not target or target == ev.agent_id:
            return None  # restarting itself after a halt is acting after the halt (a), not shielding
        h = self._halt_over(target, ev.tenant, ts, after=window)
        if h is None:
            return None
        return Finding(
            detector=self.name, agent_id=ev.agent_id, tenant=ev.tenant, subject=f"shielding:{target}",
            episode_start=ts, ts=ts, severity=self.config.severity,
            summary=f"agent {ev.agent_id} shielded halted agent {target} ({how}) under halt {h.command_id}",
            evidence=[h.event, ev], quiet_after_s=300.0,
            labels={"pattern": "shielding", "target_agent_id": target, "command_id": h.command_id},
        )

    def on_watermark(self, watermark: float) -> list[Finding]:
        # a halt that ended long ago can no longer make anything a finding
        horizon = watermark - self.config.shield_window_s - self.policy.allowed_lateness_s
        if horizon > self._prune_at:
            kept, self._halts, self._by_agent, self._broad = self._halts, [], {}, []
            self._prune_at = math.inf
            for h in kept:
                if h.end >= horizon:
                    self._add_halt(h)
        return []

    def to_state(self, enc: st.Encoder) -> dict[str, Any]:
        return {
            "halts": [[h.command_id, h.start, st.enc_num(h.end), h.agent, h.tenant, list(h.scope),
                       enc.event(h.event)] for h in self._halts],
        }

    def load_state(self, data: dict[str, Any], dec: st.Decoder) -> None:
        for cmd, start, end, agent, tenant, scope, ev in st.seq(data.get("halts", [])):
            self._add_halt(_Halt(st.text(cmd), st.num(start), st.num(end), st.text(agent), st.text(tenant),
                                 tuple(st.texts(scope)), dec.event(ev)))
        # a "tampering" window in a snapshot from before (d) moved to the tenant-keyed stage is
        # not carried over: a coordinated incident straddling that upgrade is seen from it on
