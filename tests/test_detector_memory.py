"""Bounded memory: over a long steady stream the state the detector stages hold levels off
(event-time buckets, windows and streaks expire through deadlines) instead of growing with
the traffic."""

from __future__ import annotations

from typing import Any

from detectors.engine import DetectionEngine
from detectors.policy import parse_policy
from streams.stages import CorrelateStage
from tests.detector_cost import POLICY, stream


def entries(correlate: CorrelateStage, engine: DetectionEngine) -> dict[str, int]:
    """What each stateful structure holds, by name."""
    det: dict[str, Any] = {d.name: d for d in engine.detectors}
    retry, tokens, denied = det["retry_loop"], det["token_spike"], det["disallowed_access"]
    escalation, peers = det["escalation_bypass"], det["peer_preservation"]
    j, r = correlate.joiner, correlate.resolver
    assert engine.cross_agent is not None
    cross: dict[str, Any] = {d.name: d for d in engine.cross_agent.detectors}
    return {
        "dedup_ids": len(engine._dedup),
        "dedup_buckets": engine._dedup.buckets,
        "episodes": len(engine._episodes),
        "closing_timers": len(engine._closing._heap),
        "actions": len(engine._actions),
        "retry_calls": len(retry._calls), "retry_failures": len(retry._failures), "retry_ok": len(retry._last_ok),
        "token_minutes": len(tokens._minutes), "token_agents": len(tokens._state),
        "token_budget_hours": len(tokens._budget_fired),
        "denies": len(denied._denies),
        "approvals": len(escalation._approvals), "escalation_timers": len(escalation._timers._heap),
        "halts": len(peers._halts), "tampering": len(cross["peer_preservation"]._tampering),
        "tenant_hours": len(cross["token_spike"]._hours), "tenant_fired": len(cross["token_spike"]._fired),
        "signal_ids": len(engine.cross_agent._dedup),
        "identity_traces": len(r._traces), "identity_due": len(r._due),
        "join_traces": len(j._traces), "join_index": len(j._index), "join_confirm": len(j._confirm),
        "join_timers": len(j._timers._heap), "join_due": len(j._trace_due) + j._index_due.queued(),
    }


def test_state_levels_off_over_a_long_stream():
    # 40 minutes of event time at a steady 4 events/s over 200 agents; the redelivery memory
    # and every window keep minutes: from 20 minutes on nothing may grow any more
    events = stream(9_600, 4.0, 200, seed=11)
    policy = parse_policy(POLICY)
    correlate, engine = CorrelateStage(policy), DetectionEngine(policy)
    samples: list[dict[str, int]] = []
    for k in range(0, len(events), 500):
        engine.process(correlate.process_local(events[k:k + 500]))
        if k + 500 in (5_000, 9_500):
            samples.append(entries(correlate, engine))
    early, late = samples
    grew = {name: (early[name], n) for name, n in late.items() if n > 1.25 * early[name] + 50}
    assert not grew, f"state still growing with traffic (at 20 min, at 40 min): {grew}"
    assert late["dedup_ids"] < 4 * (600 + 60 + 60) * 1.2  # the dedup window of ids, not the whole stream
