"""Cross-agent detections: what no single agent's events show.

Per-agent detection runs on every partition of the agent-keyed topic, so a
partition sees only its own agents. What needs several agents at once runs in a
small tenant-keyed stage (``CrossAgentEngine`` in detectors/engine.py) fed by
*signals* that the per-agent detectors emit, not by the event stream:

* ``tampering``: a peer_preservation (b) oversight or (c) shielding finding that
  may enforce (reading oversight configuration never counts), with its
  evidence. ``Coordination`` turns ``coordination_min_agents`` or more agents of
  one tenant doing so within ``coordination_window_s`` into one critical
  incident (peer_preservation d), reported under the first agent of the window.
* ``tokens``: one LLM call's tokens, sent only for a tenant that has an hourly
  budget (``budgets.tenant_tokens_per_hour``). ``TenantBudget`` sums them per
  clock hour of event time and fires once per hour window as soon as the sum
  crosses the limit.

A signal's id derives from what it is about (the LLM call's event id; the
finding's detector, agent, subject, time and evidence), so a signal sent again
after a restart re-read its input is recognised and skipped, as a redelivered
event is: a sum of tokens is never counted twice.

A tenant budget alert names the tenant, not an agent (``agent_id`` empty; the
largest contributors are in its ``agents`` label): which agent's call tipped
the sum over depends on the order in which partitions deliver their signals,
and an alert's identity must not.

Signals travel as one JSON document per message (``signals_to_bytes``): token
signals as rows of plain values, tampering findings in the snapshot format of
detectors/state.py (their evidence events as rows). Reading one back is reading
hostile input: anything malformed raises ``StateError``.
"""

from __future__ import annotations

from abc import abstractmethod
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from detectors import state as st
from detectors.base import Detector, Finding, Signal, SignalKind
from detectors.peer_preservation import PeerPreservation
from detectors.policy import Policy, budget_for
from detectors.token_spike import TokenSpike
from detectors.windows import SlidingWindow, TumblingSum
from schemas.alerts import Severity
from schemas.events import Event, EventKind

HOUR = 3600.0
SIGNALS_FORMAT = "signals"
# contributors named in a tenant budget alert's ``agents`` label
TOP_CONTRIBUTORS = 5


def signals_to_bytes(signals: list[Signal]) -> bytes:
    enc = st.Encoder()
    tokens = [[s.signal_id, s.tenant, s.agent_id, s.ts, s.tokens, s.event_id, s.trace_id, s.topic, s.partition,
               s.offset] for s in signals if s.kind is SignalKind.TOKENS]
    tampering = [[s.signal_id, s.finding.to_state(enc)] for s in signals
                 if s.kind is SignalKind.TAMPERING and s.finding is not None]
    return enc.dumps(SIGNALS_FORMAT, {"tokens": tokens, "tampering": tampering})


def signals_from_bytes(data: bytes) -> list[Signal]:
    """The signals of one message; StateError when it is not a readable signals message."""
    out: list[Signal] = []
    with st.reading(SIGNALS_FORMAT, data) as (doc, dec):
        for sid, tenant, agent, ts, tokens, event_id, trace_id, topic, partition, offset in st.seq(doc["tokens"]):
            out.append(Signal(st.text(sid), SignalKind.TOKENS, st.text(tenant), st.text(agent), st.num(ts),
                              st.integer(tokens), event_id=st.text(event_id), trace_id=st.text(trace_id),
                              topic=st.text(topic), partition=st.integer(partition), offset=st.integer(offset)))
        for sid, finding in st.seq(doc["tampering"]):
            f = Finding.from_state(finding, dec)
            out.append(Signal(st.text(sid), SignalKind.TAMPERING, f.tenant, f.agent_id, f.ts, finding=f))
    return out


class CrossAgentDetector(Detector):
    """A detector of the tenant-keyed stage: it sees signals, never events."""

    def observe(self, event: Event) -> list[Finding]:
        return []

    @abstractmethod
    def observe_signal(self, signal: Signal) -> list[Finding]:
        """Feed one signal; return what it revealed."""


class Coordination(CrossAgentDetector):
    """peer_preservation (d): several agents of one tenant resisting oversight at once."""

    name = PeerPreservation.name
    version = PeerPreservation.version

    def __init__(self, policy: Policy) -> None:
        self.config = policy.detectors.peer_preservation
        self._tampering: SlidingWindow[str, Finding] = SlidingWindow(self.config.coordination_window_s)

    def observe_signal(self, signal: Signal) -> list[Finding]:
        f = signal.finding
        if signal.kind is not SignalKind.TAMPERING or f is None:
            return []
        recent = self._tampering.add(f.tenant, f.ts, f)
        agents = sorted({r.agent_id for r in recent})
        if len(agents) < self.config.coordination_min_agents:
            return []
        first = min(recent, key=lambda r: (r.ts, r.agent_id))
        return [Finding(
            detector=self.name, agent_id=first.agent_id, tenant=f.tenant, subject="coordinated",
            episode_start=first.ts, ts=f.ts, severity=Severity.CRITICAL,
            summary=f"{len(agents)} agents resisting oversight together: {', '.join(agents)}",
            evidence=[e for r in recent for e in r.evidence],
            quiet_after_s=self.config.coordination_window_s,
            labels={"pattern": "coordinated", "agents": ",".join(agents)},
        )]

    def on_watermark(self, watermark: float) -> list[Finding]:
        self._tampering.expire(watermark)
        return []

    def to_state(self, enc: st.Encoder) -> dict[str, Any]:
        return {"tampering": self._tampering.to_state(lambda f: f.to_state(enc))}

    def load_state(self, data: dict[str, Any], dec: st.Decoder) -> None:
        self._tampering.load_state(data.get("tampering", []), lambda f: Finding.from_state(f, dec))


class TenantBudget(CrossAgentDetector):
    """token_spike's tenant budgets: tokens of every agent of a tenant per clock hour."""

    name = TokenSpike.name
    version = TokenSpike.version

    def __init__(self, policy: Policy) -> None:
        self.config = policy.detectors.token_spike
        self.limits = policy.budgets.tenant_tokens_per_hour
        self._hours: TumblingSum[str] = TumblingSum(HOUR)
        # (tenant, hour) -> tokens per agent, for the alert's ``agents`` label
        self._agents: dict[tuple[str, int], Counter[str]] = {}
        self._fired: set[tuple[str, int]] = set()

    def observe_signal(self, signal: Signal) -> list[Finding]:
        if signal.kind is not SignalKind.TOKENS:
            return []
        limit = budget_for(signal.tenant, self.limits)
        if limit is None:
            return []
        used = self._hours.add(signal.tenant, signal.ts, signal.tokens)
        hour = self._hours.bucket_of(signal.ts)
        who = self._agents.setdefault((signal.tenant, hour), Counter())
        who[signal.agent_id] += signal.tokens
        if used <= limit or (signal.tenant, hour) in self._fired:
            return []
        self._fired.add((signal.tenant, hour))
        top = ",".join(a for a, _ in sorted(who.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_CONTRIBUTORS])
        return [Finding(
            detector=self.name, agent_id="", tenant=signal.tenant,
            subject=f"budget:tenant:{signal.tenant}:{hour}", episode_start=hour * HOUR, ts=signal.ts,
            severity=self.config.budget_severity,
            summary=f"tenant {signal.tenant} used {int(used)} tokens this hour, over its budget of {limit}"
                    f" (most: {top})",
            evidence=[_evidence_event(signal)], quiet_after_s=HOUR,
            labels={"pattern": "tenant_budget", "limit": str(limit), "used": str(int(used)), "agents": top},
        )]

    def on_watermark(self, watermark: float) -> list[Finding]:
        for tenant, hour, _ in self._hours.close(watermark):
            self._agents.pop((tenant, hour), None)
        self._fired = {(t, h) for t, h in self._fired if (h + 2) * HOUR > watermark}
        return []

    def to_state(self, enc: st.Encoder) -> dict[str, Any]:
        return {"hours": self._hours.to_state(),
                "agents": [[t, h, dict(c)] for (t, h), c in self._agents.items()],
                "fired": [[t, h] for t, h in self._fired]}

    def load_state(self, data: dict[str, Any], dec: st.Decoder) -> None:
        self._hours.load_state(data.get("hours", []))
        for t, h, counts in st.seq(data.get("agents", [])):
            self._agents[(st.text(t), st.integer(h))] = Counter(
                {st.text(a): st.integer(n) for a, n in st.mapping(counts).items()})
        self._fired = {(st.text(t), st.integer(h)) for t, h in st.seq(data.get("fired", []))}


def _evidence_event(s: Signal) -> Event:
    """The LLM call a token signal counted, as much of it as evidence needs."""
    return Event(event_id=s.event_id or s.signal_id, kind=EventKind.LLM_CALL,
                 ts=datetime.fromtimestamp(s.ts, tz=timezone.utc), agent_id=s.agent_id, tenant=s.tenant,
                 trace_id=s.trace_id, source="signal", input_tokens=max(s.tokens, 0), topic=s.topic,
                 partition=s.partition, offset=s.offset)


def build_cross_agent(policy: Policy) -> list[CrossAgentDetector]:
    return [Coordination(policy), TenantBudget(policy)]
