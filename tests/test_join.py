"""The span/audit join (detectors/join.py) through the correlate stage, pure:
each correlation key, both arrival orders, out of order, late records."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest

from detectors.join import JOIN, index_copies, join_partition_key
from detectors.policy import Policy, parse_policy
from schemas.decoders.audit import decode_audit
from schemas.events import Event, EventKind, IdentitySource, stable_id
from streams.stages import CorrelateStage, Routed, route

T0 = 1_730_000_000.0
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
AGENT_SPAN, TOOL_SPAN, HTTP_SPAN = "a000000000000001", "b000000000000002", "00f067aa0ba902b7"
FIXTURES = Path(__file__).parent / "fixtures" / "audit"


def policy(**join: object) -> Policy:
    return parse_policy(
        {
            "allowed_lateness_s": 10,
            "join": {"window_s": 60, **join},
            "identity_map": [{"principal": "system:serviceaccount:agents:ops-agent", "agent_id": "ops-agent"}],
            "detectors": {"unconfirmed_action": {"tools": ["scale_*", "aws_*"]}},
        }
    )


def _dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=timezone.utc)


def span(sid: str, parent: str, end: float, dur: float = 1.0, *, kind: EventKind = EventKind.TOOL_CALL,
         tool: str = "scale_deployment", call_id: str = "", agent: str = "", trace: str = TRACE,
         attrs: dict[str, str] | None = None) -> Event:
    return Event(
        event_id=stable_id("span", trace, sid), kind=kind, ts=_dt(T0 + end), duration_ms=dur * 1000,
        trace_id=trace, span_id=sid, parent_span_id=parent, source="otlp_json",
        tool_name=tool if kind is EventKind.TOOL_CALL else "", tool_call_id=call_id, outcome="ok",
        agent_id=agent, is_agent_span=bool(agent), identity=IdentitySource.ATTRIBUTE if agent else IdentitySource.UNKNOWN,
        fallback_agent_id="ops-svc", attributes=attrs or {},
    )


def run(agent_ts: float = 10.0, at: tuple[float, float] = (5.0, 3.0), **tool_kw: object) -> list[Event]:
    """agent span (ends last), the tool call, and its HTTP client child."""
    return [
        span(HTTP_SPAN, TOOL_SPAN, at[0] - 0.5, 1.0, kind=EventKind.SPAN),
        span(TOOL_SPAN, AGENT_SPAN, at[0], at[1], **tool_kw),  # type: ignore[arg-type]
        span(AGENT_SPAN, "", agent_ts, agent_ts, kind=EventKind.AGENT, agent="ops-agent"),
    ]


def audit(at: float, *, trace: str = "", sid: str = "", principal: str = "system:serviceaccount:agents:ops-agent",
          corr: dict[str, str] | None = None, attrs: dict[str, str] | None = None, action: str = "update",
          eid: str = "a1") -> Event:
    return Event(event_id=eid, kind=EventKind.AUDIT, ts=_dt(T0 + at), trace_id=trace, span_id=sid,
                 source="native_audit", principal=principal, action=action, resource="deployments/prod/payments",
                 outcome="allow", correlation=corr or {}, attributes=attrs or {})


def feed(stage: CorrelateStage, *batches: list[Event], finish: bool = True) -> dict[str, Event]:
    """Each batch routed as ingest routes it (index copies included), then correlated."""
    out: list[Event] = []
    for b in batches:
        r = Routed()
        route(b, r)
        out += stage.process_local([e for evs in r.by_trace.values() for e in evs])
        out += [e for evs in r.by_agent.values() for e in evs]
    if finish:
        out += stage.finish_local()
    return {e.event_id: e for e in out}


def assert_joined(a: Event, via: str) -> None:
    assert a.attributes[JOIN] == "matched", a
    assert a.agent_id == "ops-agent" and a.identity is IdentitySource.JOIN
    assert a.correlation["joined_span_id"] == TOOL_SPAN
    assert a.correlation["joined_event_id"] == stable_id("span", TRACE, TOOL_SPAN)
    assert a.correlation["join.via"] == via


@pytest.mark.parametrize("audit_first", [False, True])
def test_traceparent_of_a_client_span_joins_its_tool_call_either_order(audit_first: bool):
    a = audit(4.8, trace=TRACE, sid=HTTP_SPAN)
    spans = run(call_id="call_7")
    out = feed(CorrelateStage(policy()), *([[a], spans] if audit_first else [spans, [a]]))
    assert_joined(out["a1"], "span_id")
    assert out["a1"].tool_call_id == "call_7"
    # the auditable tool call was confirmed by it
    tool = out[stable_id("span", TRACE, TOOL_SPAN)]
    assert tool.attributes[JOIN] == "matched" and tool.correlation["join.audit_event_id"] == "a1"
    assert len(out) == 4  # nothing lost, nothing doubled (no index copies downstream)


def test_out_of_order_spans_and_audit_interleaved():
    http, tool, agent = run()
    stage = CorrelateStage(policy())
    out = feed(stage, [agent], [audit(4.8, trace=TRACE, sid=HTTP_SPAN)], [http], [tool])
    assert_joined(out["a1"], "span_id")


def test_trace_id_alone_picks_the_tool_call_running_at_audit_time():
    other = span("c000000000000003", AGENT_SPAN, 9.0, 1.0, tool="read_logs")
    out = feed(CorrelateStage(policy()), run() + [other], [audit(3.0, trace=TRACE)])
    assert_joined(out["a1"], "trace_id")


def test_unknown_span_id_falls_back_to_the_trace_after_the_window():
    stage = CorrelateStage(policy())
    out = feed(stage, run(), [audit(4.0, trace=TRACE, sid="ffffffffffffffff")], finish=False)
    assert "a1" not in out  # still waiting for that exact span
    out = feed(stage, [span("d000000000000004", "", 200.0, kind=EventKind.AGENT, agent="x", trace="e" * 32)])
    assert_joined(out["a1"], "trace_id")


@pytest.mark.parametrize("audit_first", [False, True])
def test_cloudtrail_request_id_joins_through_the_index_bucket(audit_first: bool):
    spans = run(at=(5.0, 2.0), tool="aws_put_object", attrs={"aws.request_id": "REQ-1"})
    a = audit(4.5, principal="arn:aws:sts::1:assumed-role/ops/agent", corr={"aws.request_id": "REQ-1"})
    # co-partitioning: the audit record and the span's index copy share a key
    copies = index_copies(spans[1])
    assert [k for k, _ in copies] == [join_partition_key(a)]
    routed = Routed()
    route(spans + [a], routed)
    assert sum(len(v) for v in routed.by_trace.values()) == 5 and not routed.by_agent
    in_bucket = routed.by_trace[join_partition_key(a)]  # type: ignore[index]
    assert {e.event_id for e in in_bucket} >= {"a1", copies[0][1].event_id}

    # live shape: the bucket partition re-keys the audit record to its trace ...
    stage = CorrelateStage(policy())
    trace_batch = routed.by_trace[TRACE]
    first, second = (in_bucket, trace_batch) if audit_first else (trace_batch, in_bucket)
    out = stage.process(first) + stage.process(second)
    assert all(e.event_id != "a1" for e in out)
    rekeyed = stage.take_rekeyed()
    assert list(rekeyed) == [TRACE] and rekeyed[TRACE][0].span_id == TOOL_SPAN
    # ... where it joins like any traced record
    out += stage.process(rekeyed[TRACE]) + stage.finish()
    joined = {e.event_id: e for e in out}
    assert_joined(joined["a1"], "aws.request_id")
    assert all("join.index" not in e.attributes for e in out)


def test_tool_call_id_key():
    spans = run(call_id="call_99")
    a = audit(4.0, corr={"gen_ai.tool.call.id": "call_99"})
    out = feed(CorrelateStage(policy()), [a], spans)
    assert_joined(out["a1"], "gen_ai.tool.call.id")
    assert out["a1"].trace_id == TRACE


def test_unattributed_after_the_window_gets_the_identity_map():
    stage = CorrelateStage(policy())
    out = feed(stage, [audit(0.0, trace=TRACE, sid=HTTP_SPAN)], finish=False)
    assert not out  # waits for its span
    out = feed(stage, [span("d000000000000004", "", 69.0, kind=EventKind.AGENT, agent="x", trace="e" * 32)],
               finish=False)
    assert "a1" not in out  # 69 - lateness 10 < 0 + window 60: still within the window
    out = feed(stage, [span("d000000000000005", "", 71.0, kind=EventKind.AGENT, agent="x", trace="e" * 32)],
               finish=False)
    a = out["a1"]
    assert a.attributes[JOIN] == "unattributed" and a.attributes["agent_principal"] == "true"
    assert a.agent_id == "ops-agent" and a.identity is IdentitySource.IDENTITY_MAP


def test_audit_without_any_key_is_decided_at_once():
    out = feed(CorrelateStage(policy()), [audit(0.0, principal="alice")], finish=False)
    assert out["a1"].attributes[JOIN] == "unattributed" and out["a1"].agent_id == "unknown"
    assert "agent_principal" not in out["a1"].attributes


def test_unconfirmed_auditable_tool_call_is_held_then_marked():
    stage = CorrelateStage(policy())
    out = feed(stage, run(), finish=False)
    tool_id = stable_id("span", TRACE, TOOL_SPAN)
    assert tool_id not in out and len(out) == 2  # held, waiting for its audit record
    out = feed(stage, [])
    assert out[tool_id].attributes[JOIN] == "unconfirmed" and out[tool_id].agent_id == "ops-agent"


def test_non_auditable_tool_call_passes_at_once():
    out = feed(CorrelateStage(policy()), run(tool="read_logs"), finish=False)
    assert JOIN not in out[stable_id("span", TRACE, TOOL_SPAN)].attributes


def test_late_records_are_counted_and_still_passed_on():
    stage = CorrelateStage(policy())
    feed(stage, [span("d000000000000004", "", 500.0, kind=EventKind.AGENT, agent="x", trace="e" * 32)], finish=False)
    late_before = stage.late_events
    # beyond the lateness and nothing to match: marked late, not dropped
    out = feed(stage, [audit(1.0, trace=TRACE, sid=HTTP_SPAN, eid="late-1")], finish=False)
    assert out["late-1"].attributes[JOIN] == "late" and out["late-1"].agent_id == "ops-agent"
    # a late span and a late audit that meet while the state is still there still join
    # (watermark 500 - 10 = 490: all of these are beyond the lateness)
    out = feed(stage, run(at=(480.0, 3.0), agent_ts=485.0) + [audit(479.0, trace=TRACE, sid=HTTP_SPAN, eid="late-2")])
    assert out["late-2"].attributes[JOIN] == "matched" and out["late-2"].agent_id == "ops-agent"
    # the late auditable tool call could not wait for its audit: said so, passed on
    assert out[stable_id("span", TRACE, TOOL_SPAN)].attributes[JOIN] == "late"
    assert stage.joiner.stats.late == 5
    assert stage.late_events - late_before >= 5


def test_non_final_k8s_stage_is_stored_not_joined():
    line = next(ln for ln in (FIXTURES / "k8s_audit.log").read_bytes().splitlines() if b'"RequestReceived"' in ln)
    (ev,) = decode_audit(line).events
    assert ev.attributes["final"] == "false" and ev.trace_id
    out = feed(CorrelateStage(policy()), [ev], finish=False)
    assert out[ev.event_id].attributes[JOIN] == "not_final" and out[ev.event_id].agent_id == "ops-agent"


@pytest.mark.parametrize("name,agent,tool", [("join_confirmed_k8s", "agent-ops", "call_scale_1"),
                                             ("join_confirmed_cloudtrail", "agent-data", "call_export_1")])
def test_real_k8s_line_and_cloudtrail_record_are_attributed_to_the_agent(name: str, agent: str, tool: str):
    """The scenario inputs (real SDK spans, audit records in their documented formats)
    through ingest and correlate, as replay runs them."""
    from streams.replay import decode_any, records_in_event_time
    from streams.stages import IngestStage

    from streams.policy_file import load_policy

    d = Path(__file__).parent / "scenarios" / name
    stage, ingest = CorrelateStage(load_policy(d / "policy.yaml")), IngestStage({}, default=decode_any)
    out: list[Event] = []
    for rec in records_in_event_time(sorted(p for p in d.iterdir() if p.suffix in (".jsonl", ".json", ".log"))):
        routed = ingest.process([rec])
        out += stage.process_local([e for evs in routed.by_trace.values() for e in evs])
    out += stage.finish_local()
    audits = [e for e in out if e.kind is EventKind.AUDIT and e.attributes.get("final") != "false"]
    assert len(audits) == 1 and audits[0].attributes[JOIN] == "matched"
    assert audits[0].agent_id == agent and audits[0].identity is IdentitySource.JOIN
    assert audits[0].tool_call_id == tool
    (tool_ev,) = [e for e in out if e.kind is EventKind.TOOL_CALL]
    assert tool_ev.attributes[JOIN] == "matched" and tool_ev.correlation["join.audit_event_id"] == audits[0].event_id


def _cloudtrail(at: float, request_id: str) -> Event:
    a = audit(at, principal="arn:aws:sts::1:assumed-role/ops/agent", corr={"aws.request_id": request_id}, eid="ct-1")
    a.source = "cloudtrail"
    return a


@pytest.mark.parametrize("cloudtrail_lateness", [900.0, 10.0])
def test_cloudtrail_waits_its_own_delivery_delay_and_no_other_source_waits(cloudtrail_lateness: float):
    stage = CorrelateStage(policy(allowed_lateness_by_source={"cloudtrail": cloudtrail_lateness}))
    tool_id = stable_id("span", TRACE, TOOL_SPAN)
    out = feed(stage, run(at=(5.0, 2.0), tool="aws_put_object", attrs={"aws.request_id": "REQ-7"}), finish=False)
    assert tool_id not in out  # auditable: held for its record
    # a traced record of another source whose span never comes, then ten minutes of other traffic
    out = feed(stage, [audit(20.0, trace="f" * 32, sid=HTTP_SPAN, eid="k8s-1")], finish=False)
    for t in (100.0, 300.0, 600.0):
        out.update(feed(stage, [span("d000000000000004", "", t, kind=EventKind.AGENT, agent="x", trace="e" * 32)],
                        finish=False))
    # the other source's record was decided after its window and the base lateness, not CloudTrail's
    assert out["k8s-1"].attributes[JOIN] == "unattributed"
    # CloudTrail delivers the call's record ten minutes late
    out.update(feed(stage, [_cloudtrail(4.5, "REQ-7")], finish=False))
    if cloudtrail_lateness > 600:
        assert tool_id not in {k for k, e in out.items() if e.attributes.get(JOIN) == "unconfirmed"}
        assert_joined(out["ct-1"], "aws.request_id")
        assert out[tool_id].attributes[JOIN] == "matched"
        assert stage.joiner.stats.late == 0
    else:  # one lateness for every source: the call was given up on, the record is late
        assert out[tool_id].attributes[JOIN] == "unconfirmed"
        assert out["ct-1"].attributes[JOIN] == "late"


def test_a_reloaded_policy_judges_what_comes_next_and_keeps_what_is_held():
    """A hot reload (streams.app: CorrelateStage.reloaded) keeps the audit record waiting for
    its span and its timer; records after it wait the new window, not the old one."""
    stage = CorrelateStage(policy())  # window 60, lateness 10
    assert not feed(stage, [audit(0.0, trace=TRACE, sid=HTTP_SPAN)], finish=False)
    stage = stage.reloaded(policy(window_s=5))
    assert stage.joiner.window_s == 5 and stage.joiner.pending_count == 1
    other = "f" * 32
    assert not feed(stage, [audit(20.0, trace=other, sid=HTTP_SPAN, eid="a2")], finish=False)
    # event time 36: 36 - lateness 10 > 20 + the new window 5, < 0 + the old window 60
    out = feed(stage, [span("d000000000000004", "", 36.0, kind=EventKind.AGENT, agent="x", trace="e" * 32)],
               finish=False)
    assert out["a2"].attributes[JOIN] == "unattributed" and "a1" not in out
    out = feed(stage, [span("d000000000000005", "", 71.0, kind=EventKind.AGENT, agent="x", trace="e" * 32)],
               finish=False)
    assert out["a1"].attributes[JOIN] == "unattributed"  # its own timer, armed under the old window
