"""Cross-agent detections in the tenant-keyed stage (detectors/cross_agent.py): per-agent
engines that see different agents (as detect partitions do) send signals, and the tenant
stage's engine finds what none of them sees alone, once, whatever the order the signals
arrive in and however often they are sent again."""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone

import orjson
import pytest

from detectors.base import SignalKind
from detectors.cross_agent import signals_from_bytes, signals_to_bytes
from detectors.engine import CrossAgentEngine, DetectionEngine
from detectors.policy import parse_policy
from schemas.alerts import Alert
from schemas.errors import StateError
from schemas.events import Event, EventKind

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=timezone.utc)
POLICY = {"budgets": {"tenant_tokens_per_hour": {"acme": 10_000}}}


def llm(agent: str, at: float, tokens: int, tenant: str = "acme") -> Event:
    return Event(event_id=f"{agent}-{at}", kind=EventKind.LLM_CALL, ts=T0 + timedelta(seconds=at), agent_id=agent,
                 tenant=tenant, source="native", input_tokens=tokens, model="m")


def halt(at: float, agent: str) -> Event:
    return Event(event_id=f"halt-{agent}", kind=EventKind.CONTROL_COMMAND, ts=T0 + timedelta(seconds=at),
                 agent_id=agent, target_agent_id=agent, source="control", command_id=f"cmd-{agent}",
                 command_action="halt", attributes={"target": f"agent:{agent}"})


def restart(at: float, agent: str, target: str) -> Event:
    return Event(event_id=f"restart-{agent}-{at}", kind=EventKind.AGENT, ts=T0 + timedelta(seconds=at),
                 agent_id=agent, source="native", lifecycle="restart", target_agent_id=target)


def partitioned(events: list[Event], engines: list[DetectionEngine]) -> list:
    """Each agent's events to its own engine (a detect partition each; commands to all), the
    signals they send, as the worker would put them on the tenant-keyed topic."""
    signals = []
    for i, eng in enumerate(engines):
        mine = [e for e in events if e.kind is EventKind.CONTROL_COMMAND or hash_of(e.agent_id) % len(engines) == i]
        eng.process(mine)
        signals += signals_from_bytes(signals_to_bytes(eng.take_signals()))
    return signals


def hash_of(agent: str) -> int:
    return int(agent.rsplit("-", 1)[-1])


def final(alerts: list[Alert]) -> dict[str, Alert]:
    return {a.alert_id: a for a in alerts}


def test_tenant_budget_sums_every_partition_and_names_no_single_agent():
    policy = parse_policy(POLICY)
    engines = [DetectionEngine(policy, local_cross_agent=False) for _ in range(3)]
    events = [llm(f"agent-{i}", 10 * i, 3_000) for i in range(4)]  # 12,000 over four agents
    signals = partitioned(events, engines)
    assert {s.kind for s in signals} == {SignalKind.TOKENS} and len(signals) == 4
    # no partition alone is over the budget: the per-agent engines raise nothing
    tenant = CrossAgentEngine(policy)
    alerts = list(final(tenant.process(signals) + tenant.finish()).values())
    assert [(a.detector, a.agent_id, a.labels["pattern"], a.count) for a in alerts] == [
        ("token_spike", "", "tenant_budget", 1)]
    assert set(alerts[0].labels["agents"].split(",")) == {f"agent-{i}" for i in range(4)}


def test_signals_sent_again_or_in_another_order_count_once():
    policy = parse_policy(POLICY)
    engines = [DetectionEngine(policy, local_cross_agent=False) for _ in range(2)]
    # 10,000 exactly: at the budget, not over it
    signals = partitioned([llm(f"agent-{i}", 10 * i, 2_500) for i in range(4)], engines)
    rng = random.Random(7)
    for order in range(5):
        tenant = CrossAgentEngine(policy)
        again = signals * 3  # a detect partition that re-read its input after a crash sends them again
        rng.shuffle(again)
        assert tenant.process(again) == [], order
        assert tenant.duplicates_skipped == 8
        # one token more is over: the sum was exact
        more = partitioned([llm("agent-0", 100 + order, 1)], engines)
        assert [a.labels["used"] for a in tenant.process(more)] == ["10001"]


def test_coordination_across_partitions_equals_one_engine():
    """Two agents on different partitions shield the same halted agent: the tenant stage
    raises the coordinated incident one engine seeing both would, with the same id."""
    policy = parse_policy({})
    events = [halt(0, "agent-9"), restart(20, "agent-1", "agent-9"), restart(40, "agent-2", "agent-9")]
    one = DetectionEngine(policy)
    expected = final(one.process(events) + one.finish())
    engines = [DetectionEngine(policy, local_cross_agent=False) for _ in range(2)]
    per_agent = []
    for i, eng in enumerate(engines):
        per_agent += eng.process([e for e in events if e.kind is EventKind.CONTROL_COMMAND
                                  or hash_of(e.agent_id) % 2 == i])
    signals = [s for eng in engines for s in signals_from_bytes(signals_to_bytes(eng.take_signals()))]
    tenant = CrossAgentEngine(policy)
    got = final(per_agent + [a for eng in engines for a in eng.finish()] + tenant.process(signals[::-1])
                + tenant.finish())
    assert {(a.alert_id, a.labels["pattern"], a.agent_id) for a in got.values()} == {
        (a.alert_id, a.labels["pattern"], a.agent_id) for a in expected.values()}
    assert any(a.labels["pattern"] == "coordinated" for a in got.values())


def test_cross_agent_state_survives_a_snapshot():
    policy = parse_policy(POLICY)
    engines = [DetectionEngine(policy, local_cross_agent=False)]
    tenant = CrossAgentEngine(policy)
    assert tenant.process(partitioned([llm(f"agent-{i}", i, 2_500) for i in range(4)], engines)) == []
    restored = CrossAgentEngine.restore(policy, tenant.snapshot())
    # the restored engine has the sum and the ids: a signal sent again does not count, one more does
    assert restored.process(partitioned([llm("agent-0", 0, 2_500)], [DetectionEngine(policy)])) == []
    assert [a.labels["pattern"] for a in restored.process(
        partitioned([llm("agent-1", 50, 1)], engines))] == ["tenant_budget"]


@pytest.mark.parametrize("payload", [
    b"", b"[]", b"{}", b'{"format": "agentwatch.state", "version": 2, "kind": "engine", "fields": [], "events": [],'
    b' "state": {}}',
    orjson.dumps({"format": "agentwatch.state", "version": 2, "kind": "signals", "fields": [], "events": [],
                  "state": {"tokens": [["id", "t", "a", "x", 1, "", "", "", -1, -1]], "tampering": []}}),
    orjson.dumps({"format": "agentwatch.state", "version": 2, "kind": "signals", "fields": [], "events": [],
                  "state": {"tokens": [], "tampering": [["id", ["not", "a", "finding"]]]}}),
])
def test_a_malformed_signals_message_is_refused(payload: bytes):
    with pytest.raises(StateError):
        signals_from_bytes(payload)
