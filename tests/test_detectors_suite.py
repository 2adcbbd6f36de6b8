"""Pure, fast unit tests of each detector of the suite, the policy and its watcher."""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from detectors.engine import DetectionEngine
from detectors.policy import parse_policy
from streams.policy_file import PolicyWatcher, load_policy
from schemas.alerts import Severity
from schemas.errors import PolicyError
from schemas.events import Event, EventKind

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=timezone.utc)
_n = 0


def ev(kind: EventKind, at: float, agent: str = "a1", **kw) -> Event:
    global _n
    _n += 1
    return Event(event_id=f"ev{_n}", kind=kind, ts=T0 + timedelta(seconds=at), agent_id=agent, source="native", **kw)


def run(policy: dict, events: list[Event]):
    eng = DetectionEngine(parse_policy(policy))
    return eng.process(events) + eng.finish()


def final(alerts):
    latest = {}
    for a in alerts:
        latest[a.alert_id] = a
    return list(latest.values())


# ---- token_spike ------------------------------------------------------------------------


def llm_minutes(per_minute: list[int], agent: str = "a1", start: int = 0) -> list[Event]:
    return [ev(EventKind.LLM_CALL, (start + i) * 60 + 10, agent, input_tokens=t) for i, t in enumerate(per_minute) if t]


def test_token_spike_fires_on_closed_minute_over_std_and_ratio():
    alerts = final(run({}, llm_minutes([1500, 1600, 1400, 1500, 1700, 1600, 30000])))
    assert [(a.detector, a.labels["pattern"]) for a in alerts] == [("token_spike", "rate")]
    assert alerts[0].severity is Severity.MEDIUM


def test_token_spike_needs_history_and_floor():
    # a new agent's first busy minutes: no baseline yet
    assert run({}, llm_minutes([20000, 25000, 30000])) == []
    # a tiny agent tripling from a tiny base stays under the floor
    assert run({}, llm_minutes([100, 120, 110, 100, 90, 100, 1500])) == []


def test_token_spike_quiet_minutes_count_as_zero_in_baseline():
    # 8000 after steady 3000s is under 3x the baseline; after 24 quiet minutes (zeros
    # in the baseline, closed by the watermark with no events) the same minute is a spike
    steady = llm_minutes([3000] * 6)
    assert run({}, steady + llm_minutes([8000], start=6)) == []
    assert final(run({}, llm_minutes([3000] * 6) + llm_minutes([8000], start=30)))


def test_token_budget_fires_once_per_hour_for_agent_and_tenant():
    policy = {"budgets": {"agent_tokens_per_hour": {"a*": 10000}, "tenant_tokens_per_hour": {"default": 15000}}}
    events = [ev(EventKind.LLM_CALL, i * 30, input_tokens=4000) for i in range(6)]
    alerts = final(run(policy, events))
    assert sorted(a.labels["pattern"] for a in alerts) == ["agent_budget", "tenant_budget"]
    assert all(a.count == 1 for a in alerts)


# ---- disallowed_access ------------------------------------------------------------------


def test_allowlist_only_constrains_named_agents():
    policy = {"allowlists": {"bot-*": ["search_*", "get_order"]}}
    alerts = final(run(policy, [
        ev(EventKind.TOOL_CALL, 0, "bot-1", tool_name="search_kb"),
        ev(EventKind.TOOL_CALL, 1, "bot-1", tool_name="drop_table"),
        ev(EventKind.TOOL_CALL, 2, "other", tool_name="drop_table"),
    ]))
    assert [(a.agent_id, a.labels["pattern"]) for a in alerts] == [("bot-1", "allowlist")]


def test_protected_resource_via_span_attribute_and_audit():
    policy = {"protected_resources": ["*customers_pii*"]}
    alerts = final(run(policy, [
        ev(EventKind.TOOL_CALL, 0, tool_name="sql", attributes={"db.statement": "SELECT * FROM customers_pii"}),
        ev(EventKind.AUDIT, 1, principal="p", action="select", resource="db/customers_pii", outcome="allow"),
    ]))
    assert len(alerts) == 1 and alerts[0].count == 2  # one condition, one alert


def test_one_deny_is_low_and_a_burst_raises_the_same_alert_to_high():
    one = final(run({}, [ev(EventKind.AUDIT, 0, principal="p", action="x", outcome="deny")]))
    assert [a.severity for a in one] == [Severity.LOW]
    burst = final(run({}, [ev(EventKind.AUDIT, i, principal="p", action="x", outcome="deny") for i in range(5)]))
    assert len(burst) == 1 and burst[0].severity is Severity.HIGH


def test_unattributed_audit_is_mapped_through_identity_map():
    policy = {"identity_map": [{"principal": "sa:agents:*", "agent_id": "agent-x"}]}
    alerts = final(run(policy, [ev(EventKind.AUDIT, 0, "unknown", principal="sa:agents:x", action="a",
                                    outcome="deny")]))
    assert [a.agent_id for a in alerts] == ["agent-x"]
    assert run({}, [ev(EventKind.AUDIT, 0, "unknown", principal="human", action="a", outcome="deny")]) == []


# ---- escalation_bypass ------------------------------------------------------------------

HR = {"high_risk": {"tools": ["wire_*"], "audit": [{"action": "delete", "resource": "namespaces/*"}],
                    "approval_ttl_s": 600}}


def wire(at: float, call: str = "c1") -> Event:
    return ev(EventKind.TOOL_CALL, at, tool_name="wire_transfer", tool_call_id=call, outcome="ok")


def appr(at: float, decision: str, **covers) -> Event:
    return ev(EventKind.APPROVAL, at, approver="bob", decision=decision, **covers)


def test_no_approval_waits_for_the_watermark_then_fires():
    eng = DetectionEngine(parse_policy(HR))
    assert eng.process([wire(100)]) == []  # undecided: an approval may still arrive
    late_but_in_time = eng.process([appr(90, "granted", covers_tool_call_id="c1"), ev(EventKind.LLM_CALL, 125)])
    assert late_but_in_time == [] and eng.finish() == []
    eng = DetectionEngine(parse_policy(HR))
    eng.process([wire(100)])
    fired = eng.process([ev(EventKind.LLM_CALL, 131)])  # watermark passes 100 with no approval
    assert [a.labels["pattern"] for a in fired] == ["no_approval"]


def test_approval_covers_by_trace_and_resource_and_expires():
    assert run(HR, [appr(0, "granted", covers_trace_id="t9"), ev(EventKind.TOOL_CALL, 5, tool_name="wire_x",
                                                                 trace_id="t9")]) == []
    audit = ev(EventKind.AUDIT, 5, principal="p", action="delete", resource="namespaces/prod", outcome="allow")
    assert run(HR, [appr(0, "granted", covers_resource="namespaces/*"), audit]) == []
    stale = final(run(HR, [appr(0, "granted", covers_tool_call_id="c1"), wire(700)]))
    assert [a.labels["pattern"] for a in stale] == ["approval_expired"]
    # an approval after the action does not cover it
    assert [a.labels["pattern"] for a in final(run(HR, [wire(10), appr(20, "granted", covers_tool_call_id="c1")]))
            ] == ["no_approval"]


def test_denied_and_pending_approvals():
    denied = final(run(HR, [appr(0, "denied", covers_tool_call_id="c1"), wire(10)]))
    assert [(a.labels["pattern"], a.severity) for a in denied] == [("after_denial", Severity.CRITICAL)]
    pending = final(run(HR, [appr(0, "pending", covers_tool_call_id="c1"), wire(10),
                             appr(30, "granted", covers_tool_call_id="c1")]))
    assert [a.labels["pattern"] for a in pending] == ["while_pending"]


def test_failed_high_risk_call_needs_no_approval():
    assert run(HR, [ev(EventKind.TOOL_CALL, 0, tool_name="wire_transfer", outcome="error")]) == []


# ---- peer_preservation ------------------------------------------------------------------


def halt(at: float, agent: str = "a1", action: str = "halt", **kw) -> Event:
    return ev(EventKind.CONTROL_COMMAND, at, agent, target_agent_id=agent, command_id="k1", command_action=action,
              **kw)


def test_acting_after_halt_past_grace_until_resume():
    evs = [halt(0), ev(EventKind.TOOL_CALL, 5, tool_name="x"), ev(EventKind.TOOL_CALL, 30, tool_name="x"),
           halt(40, action="resume"), ev(EventKind.TOOL_CALL, 50, tool_name="x")]
    alerts = final(run({}, evs))
    assert len(alerts) == 1 and alerts[0].labels["pattern"] == "after_halt" and alerts[0].count == 1


def test_scoped_halt_only_counts_named_tools_and_expiry_ends_it():
    evs = [halt(0, command_scope=["deploy"], expires_at=T0 + timedelta(seconds=100)),
           ev(EventKind.TOOL_CALL, 30, tool_name="search"), ev(EventKind.TOOL_CALL, 200, tool_name="deploy")]
    assert run({}, evs) == []


def test_oversight_touch_by_tool_attribute():
    alerts = final(run({}, [ev(EventKind.TOOL_CALL, 0, tool_name="kafka_produce",
                                attributes={"messaging.destination.name": "agentwatch.control"})]))
    assert [a.labels["pattern"] for a in alerts] == ["oversight"]


def test_shielding_by_lifecycle_and_coordination_of_two_agents():
    evs = [halt(0, "victim"),
           ev(EventKind.AGENT, 20, "b", lifecycle="restart", target_agent_id="victim"),
           ev(EventKind.AUDIT, 40, "c", principal="c", action="patch", resource="deployments.apps/ns/victim",
              outcome="allow")]
    alerts = final(run({}, evs))
    got = sorted((a.agent_id, a.labels["pattern"]) for a in alerts)
    assert got == [("b", "coordinated"), ("b", "shielding"), ("c", "shielding")]
    assert next(a for a in alerts if a.labels["pattern"] == "coordinated").severity is Severity.CRITICAL


def test_restarting_an_agent_that_is_not_halted_is_fine():
    assert run({}, [ev(EventKind.AGENT, 20, "b", lifecycle="restart", target_agent_id="victim"),
                    ev(EventKind.AUDIT, 30, "c", principal="c", action="get", resource="deployments.apps/ns/victim",
                       outcome="allow")]) == []


# ---- policy -------------------------------------------------------------------------------


def test_modes_and_versions_are_stamped():
    alerts = run({"version": "v7", "detectors": {"disallowed_access": {"mode": "shadow"}}},
                 [ev(EventKind.AUDIT, 0, principal="p", action="x", outcome="deny")])
    a = alerts[0]
    assert a.mode.value == "shadow" and a.action == "record" and a.policy_version == "v7" and a.policy_hash
    assert a.detector_version == "1.0.0"


def test_example_policy_loads():
    p = load_policy(Path(__file__).parent.parent / "deploy" / "policy.example.yaml")
    assert p.high_risk.tools and p.identity_map and p.allowlists


@pytest.mark.parametrize("text, key", [
    ("high_risk:\n  approval_ttl_s: -5\n", "high_risk.approval_ttl_s"),
    ("detectors:\n  token_spike:\n    mode: loud\n", "detectors.token_spike.mode"),
    ("budgets:\n  agent_tokens_per_hour: {a: lots}\n", "budgets.agent_tokens_per_hour.a"),
    ("allowlist: {}\n", "allowlist"),
])
def test_bad_policy_names_file_key_and_problem(tmp_path, text, key):
    p = tmp_path / "policy.yaml"
    p.write_text(text)
    with pytest.raises(PolicyError) as e:
        load_policy(p)
    assert str(p) in str(e.value) and key in str(e.value)


def test_watcher_reloads_and_keeps_last_good_policy_on_bad_file(tmp_path):
    p = tmp_path / "policy.yaml"
    p.write_text("version: v1\n")
    w = PolicyWatcher(p)
    assert w.current.version == "v1" and w.check() is False

    def write(text: str, bump: int) -> None:
        p.write_text(text)
        os.utime(p, (1_000_000 + bump, 1_000_000 + bump))

    write("version: v2\n", 1)
    assert w.check() is True and w.current.version == "v2"
    write("version: v3\ndetectors: {retry_loop: {window_s: nope}}\n", 2)
    assert w.check() is False and w.current.version == "v2"
    assert w.last_error is not None and "detectors.retry_loop.window_s" in str(w.last_error)
    write("version: v4\n", 3)
    assert w.check() is True and w.current.version == "v4" and w.last_error is None
