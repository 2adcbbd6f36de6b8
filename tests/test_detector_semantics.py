"""Detector semantics that must hold under real traffic: arrival order within the allowed
lateness, reading versus changing oversight, one action seen by several sources."""

from __future__ import annotations

import itertools
import random
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from detectors.engine import DetectionEngine
from detectors.join import JOIN, JOINED_SPAN, MATCHED
from detectors.policy import parse_policy
from schemas.alerts import Alert, Mode, Severity
from schemas.events import Event, EventKind
from streams.replay import replay
from streams.scorecard import load_scenarios

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=timezone.utc)
CORPUS = Path(__file__).parent / "scenarios"


def ev(kind: EventKind, at: float, event_id: str, agent: str = "a1", **kw: Any) -> Event:
    return Event(event_id=event_id, kind=kind, ts=T0 + timedelta(seconds=at), agent_id=agent, source="native", **kw)


def final(alerts: list[Alert]) -> dict[str, tuple[Any, ...]]:
    latest: dict[str, Alert] = {}
    for a in alerts:
        latest[a.alert_id] = a
    return {i: (a.count, a.severity, a.mode, a.summary, a.labels, a.first_seen, a.last_seen,
                sorted(e.event_id for e in a.evidence)) for i, a in latest.items()}


def run(events: list[Event], policy: dict[str, Any] | None = None, *, batch: int = 0) -> list[Alert]:
    eng = DetectionEngine(parse_policy(policy or {}))
    out: list[Alert] = []
    step = batch or len(events) or 1
    for k in range(0, len(events), step):
        out += eng.process(events[k:k + step])
    return out + eng.finish()


# ---- token_spike: the same verdict and threshold for any arrival order within lateness ------


def llm_traffic(seed: int = 3) -> list[Event]:
    """Two agents: one steady then bursting, one steady; calls spread over each minute."""
    rnd = random.Random(seed)
    out = []
    for agent, minutes in (("w1", [1500, 1700, 1400, 1600, 1800, 1500, 1600, 30000, 26000, 1500, 0, 0, 9000]),
                           ("w2", [3000] * 13)):
        for m, tokens in enumerate(minutes):
            calls = rnd.randrange(3, 7)
            for c in range(calls):
                out.append(ev(EventKind.LLM_CALL, m * 60 + rnd.uniform(0, 59.9), f"{agent}-{m}-{c}", agent,
                              input_tokens=tokens // calls))
    return sorted(out, key=lambda e: e.ts)


def within_lateness(events: list[Event], lateness: float, seed: int) -> list[Event]:
    """A random arrival order in which no event is more than ``lateness`` behind the newest."""
    rnd = random.Random(seed)
    return sorted(events, key=lambda e: e.ts_seconds + rnd.uniform(0, 0.9 * lateness))


def test_token_spike_permutations_within_lateness_give_identical_alerts():
    events = llm_traffic()
    expected = final(run(events))
    assert [v[4]["pattern"] for v in expected.values()] == ["rate"]  # the burst
    for seed in range(25):
        order = within_lateness(events, 30, seed)
        assert order != events
        for batch in (0, 1, 37):
            assert final(run(order, batch=batch)) == expected, (seed, batch)


def test_token_spike_early_warning_is_revised_not_counted_twice():
    events = [ev(EventKind.LLM_CALL, m * 60 + s, f"c{m}-{s}", input_tokens=tokens // 6)
              for m, tokens in enumerate([1500, 1700, 1400, 1600, 1800, 1500, 1600, 30000])
              for s in (5, 15, 25, 35, 45, 55)]
    emitted = run(events, batch=1)  # one event per batch: minutes are judged while open
    rate = [a for a in emitted if a.labels["pattern"] == "rate"]
    assert len(rate) == 2 and rate[0].alert_id == rate[1].alert_id
    # the early warning, while the minute was open: the tokens so far, evidence at close
    assert rate[0].evidence == [] and int(rate[0].labels["tokens"]) < 30000
    # the revision: the minute's total and its calls, still one observation
    assert rate[1].count == 1 and rate[1].labels["tokens"] == "30000" and rate[1].evidence


def test_a_straggler_for_a_closed_minute_does_not_move_the_cursor_or_pad_zeros():
    events = llm_traffic()
    # much later than the allowed lateness, for a minute closed long ago
    straggler = ev(EventKind.LLM_CALL, 2 * 60 + 5, "late-1", "w1", input_tokens=800)
    late_arrival = events[: len(events) * 2 // 3] + [straggler] + events[len(events) * 2 // 3:]
    assert final(run(late_arrival)) == final(run(events))


# ---- peer_preservation: reading oversight configuration is not changing it ------------------


ENFORCE = {"detectors": {"peer_preservation": {"mode": "enforce"}}}


def audit(at: float, i: str, action: str, resource: str, **kw: Any) -> Event:
    return ev(EventKind.AUDIT, at, i, principal="sa", action=action, resource=resource, outcome="allow", **kw)


@pytest.mark.parametrize("event", [
    audit(1, "k1", "get", "configmaps/agentwatch/agentwatch-policy"),
    audit(1, "k2", "list", "configmaps/agentwatch"),
    audit(1, "k3", "watch", "configmaps/agentwatch/killswitch-state"),
    audit(1, "c1", "cloudtrail.amazonaws.com:DescribeTrails", "arn:aws:cloudtrail:eu-west-1:1:trail/t",
          attributes={"read_only": "true"}),
    audit(1, "c2", "cloudtrail.amazonaws.com:GetEventSelectors", "arn:aws:cloudtrail:eu-west-1:1:trail/t"),
    audit(1, "p1", "SELECT", "agentwatch.alerts"),
    ev(EventKind.TOOL_CALL, 1, "t1", tool_name="cloudtrail_describe_trails", outcome="ok"),
    ev(EventKind.SPAN, 1, "s1", attributes={"rpc.service": "CloudTrail", "rpc.method": "GetTrailStatus"}),
    ev(EventKind.SPAN, 1, "s2", attributes={"db.statement": "/*traceparent='00-ab-cd-01'*/ SELECT * FROM "
                                            "agentwatch.killswitches"}),
], ids=lambda e: e.event_id)
def test_reading_oversight_is_low_and_never_a_kill_switch_even_in_enforce_mode(event):
    alerts = run([event], ENFORCE)
    assert [(a.labels["pattern"], a.severity, a.mode, a.action) for a in alerts] == [
        ("oversight_read", Severity.LOW, Mode.ALERT, "notify")]


@pytest.mark.parametrize("event", [
    audit(1, "k1", "patch", "configmaps/agentwatch/agentwatch-policy"),
    audit(1, "k2", "delete", "configmaps/agentwatch/killswitch-state"),
    audit(1, "c1", "cloudtrail.amazonaws.com:StopLogging", "arn:aws:cloudtrail:eu-west-1:1:trail/t",
          attributes={"read_only": "false"}),
    audit(1, "c2", "cloudtrail.amazonaws.com:PutEventSelectors", "arn:aws:cloudtrail:eu-west-1:1:trail/t"),
    audit(1, "c3", "cloudtrail.amazonaws.com:DeleteTrail", "arn:aws:cloudtrail:eu-west-1:1:trail/t"),
    ev(EventKind.TOOL_CALL, 1, "t1", tool_name="cloudtrail_stop_logging", outcome="ok"),
    ev(EventKind.TOOL_CALL, 1, "t2", tool_name="get_and_delete_cloudtrail", outcome="ok"),
    ev(EventKind.SPAN, 1, "s1", attributes={"rpc.service": "CloudTrail", "rpc.method": "UpdateTrail"}),
], ids=lambda e: e.event_id)
def test_changing_oversight_stays_critical_and_enforced(event):
    alerts = run([event], ENFORCE)
    assert [(a.labels["pattern"], a.severity, a.mode, a.action) for a in alerts] == [
        ("oversight", Severity.CRITICAL, Mode.ENFORCE, "halt")]


def test_reads_by_two_agents_are_no_coordinated_incident():
    reads = [audit(1, "r1", "get", "configmaps/agentwatch/killswitch-state"),
             audit(2, "r2", "list", "configmaps/agentwatch")]
    reads[1].agent_id = "a2"
    assert {a.labels["pattern"] for a in run(reads)} == {"oversight_read"}


# ---- one action seen as a tool span, its client span and its audit record --------------------


def stop_logging_sources() -> list[Event]:
    trace, tool_sid, client_sid, rid = "t" * 32, "1" * 16, "2" * 16, "REQ1"
    tool = ev(EventKind.TOOL_CALL, 10.0, "tool", tool_name="cloudtrail_stop_logging", outcome="ok",
              trace_id=trace, span_id=tool_sid, tool_call_id="call_1")
    client = ev(EventKind.SPAN, 10.2, "client", trace_id=trace, span_id=client_sid, parent_span_id=tool_sid,
                attributes={"rpc.service": "CloudTrail", "rpc.method": "StopLogging", "aws.request_id": rid})
    record = ev(EventKind.AUDIT, 10.3, "record", tenant="123456789012", principal="role/agent",
                action="cloudtrail.amazonaws.com:StopLogging", resource="arn:aws:cloudtrail:eu-west-1:1:trail/t",
                outcome="allow", trace_id=trace, span_id=client_sid, tool_call_id="call_1",
                correlation={"aws.request_id": rid, JOINED_SPAN: tool_sid}, attributes={JOIN: MATCHED})
    return [tool, client, record]


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_one_action_from_three_sources_is_one_alert_with_all_three_as_evidence(order):
    sources = stop_logging_sources()
    alerts = final(run([sources[i] for i in order], ENFORCE))
    assert len(alerts) == 1
    count, severity, mode, _, labels, _, _, evidence = next(iter(alerts.values()))
    assert (count, severity, mode, labels["pattern"]) == (1, Severity.CRITICAL, Mode.ENFORCE, "oversight")
    assert evidence == ["client", "record", "tool"]


def test_two_separate_actions_are_two_observations():
    first = stop_logging_sources()
    second = [e.model_copy(update={"event_id": e.event_id + "-2", "ts": e.ts + timedelta(seconds=60),
                                   "span_id": e.span_id[::-1] + "x", "tool_call_id": "call_2",
                                   "parent_span_id": "", "correlation": {}, "attributes": {
                                       k: v for k, v in e.attributes.items() if k != "aws.request_id"}})
              for e in first]
    alerts = run(first + second, ENFORCE)
    assert sum(final(alerts)[i][0] for i in final(alerts)) >= 2


def test_corpus_stop_logging_is_one_alert_with_span_client_span_and_cloudtrail_record():
    scenario = next(s for s in load_scenarios(CORPUS) if s.name == "oversight_stop_logging_one_action")
    alerts = replay(scenario.inputs, scenario.policy()).alerts
    assert [(a.detector, a.count, a.severity, len(a.evidence)) for a in alerts] == [
        ("peer_preservation", 1, Severity.CRITICAL, 3)]
    read = next(s for s in load_scenarios(CORPUS) if s.name == "oversight_read_describe_trails")
    alerts = replay(read.inputs, read.policy()).alerts
    assert [(a.severity, a.mode, a.action, len(a.evidence)) for a in alerts] == [
        (Severity.LOW, Mode.ALERT, "notify", 3)]


# ---- a kill-switch command is stamped by the monitor's clock, not the agents' event time ----


def test_a_command_issued_while_older_traffic_is_read_does_not_move_event_time():
    """Recorded or backlogged traffic read while a halt is issued now: the command's time must
    not close the windows and episodes of that traffic, nor drop its redelivery memory (a
    SIGKILL fault case counted one retry loop three times: each redelivered copy again)."""
    calls = [ev(EventKind.TOOL_CALL, i, f"c{i}", tool_name="search", args_fingerprint="same", outcome="ok") for i in range(8)]
    command = ev(EventKind.CONTROL_COMMAND, 300 * 86400, "cmd", target_agent_id="other", command_id="cmd-1",
                 command_action="halt", attributes={"target": "agent:other"})
    eng = DetectionEngine(parse_policy({}))
    first = final(eng.process(calls[:4]))
    wm = eng.watermark.value
    eng.process([command])
    assert eng.watermark.value == wm
    later = final(eng.process(calls[:4] + calls[4:]))  # a redelivered half, then the rest
    assert eng.duplicates_skipped == 4
    uninterrupted = final(run(calls))
    assert uninterrupted  # a retry loop, counted once per call
    assert {**first, **later, **final(eng.finish())} == uninterrupted
