"""Pure-logic tests of the window machinery, identity resolution and retry_loop."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from detectors.engine import DetectionEngine
from detectors.identity import IdentityResolver
from detectors.policy import parse_policy
from streams.policy_file import load_policy
from detectors.windows import SlidingWindow, TimerQueue, TumblingSum, Watermark
from schemas.errors import PolicyError
from schemas.events import Event, EventKind, IdentitySource, fingerprint_arguments

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=timezone.utc)


def tool(i: int, *, agent: str = "a1", tool: str = "search", args: object = None, outcome: str = "ok",
         at: float | None = None, **kw) -> Event:
    return Event(
        event_id=f"e{i}-{agent}-{tool}", kind=EventKind.TOOL_CALL, ts=T0 + timedelta(seconds=i if at is None else at),
        agent_id=agent, source="native", tool_name=tool,
        args_fingerprint=fingerprint_arguments(args if args is not None else {"q": "x"}), outcome=outcome, **kw,
    )


def test_sliding_window_keeps_order_and_horizon():
    w: SlidingWindow[str, int] = SlidingWindow(10)
    assert w.add("k", 100, 1) == [1]
    assert w.add("k", 105, 2) == [1, 2]
    assert w.add("k", 103, 3) == [1, 3, 2]  # late item slots in by event time
    assert w.add("k", 111, 4) == [3, 2, 4]  # 100 fell out of (101, 111]
    assert w.expire(200) == 1 and len(w) == 0


def test_timer_rearm_replaces_and_fires_on_watermark():
    q = TimerQueue()
    q.arm("x", 10)
    q.arm("x", 20)
    assert q.due(15) == []
    assert [t.key for t in q.due(20)] == ["x"]
    q.arm("y", 5)
    q.cancel("y")
    assert q.due(100) == []


def test_tumbling_sum_closes_buckets_by_watermark():
    s: TumblingSum[str] = TumblingSum(60)
    s.add("a", 0, 5)
    s.add("a", 30, 5)
    s.add("a", 61, 1)
    assert list(s.close(59)) == []
    assert list(s.close(60)) == [("a", 0, 10.0)]


def test_watermark_counts_late_events():
    wm = Watermark(allowed_lateness_s=5)
    assert wm.observe(100)
    assert wm.observe(96)
    assert not wm.observe(94)
    assert wm.late_events == 1


def test_retry_loop_same_call_fires_once_per_episode_with_stable_id():
    events = [tool(i * 5, args={"q": "x", "n": 1} if i % 2 else '{ "n":1,"q":"x"}') for i in range(7)]
    eng = DetectionEngine(parse_policy({}))
    alerts = eng.process(events) + eng.finish()
    ids = {a.alert_id for a in alerts}
    assert len(ids) == 1
    final = alerts[-1]
    assert final.detector == "retry_loop" and final.agent_id == "a1"
    assert final.count == 3  # calls 5, 6 and 7 each re-observed the loop
    assert len(final.evidence) == 7
    # a replay of the same input yields the same alert id
    eng2 = DetectionEngine(parse_policy({}))
    assert {a.alert_id for a in eng2.process(events) + eng2.finish()} == ids


def test_retry_loop_under_threshold_and_spread_out_is_quiet():
    eng = DetectionEngine(parse_policy({}))
    # four identical calls in a minute, then four more two minutes later: never five in 60 s
    events = [tool(i * 10) for i in range(4)] + [tool(200 + i * 10) for i in range(4)]
    assert eng.process(events) + eng.finish() == []


def test_retry_loop_varied_arguments_is_quiet_but_consecutive_failures_fire():
    eng = DetectionEngine(parse_policy({}))
    quiet = [tool(i, args={"q": i}) for i in range(10)]
    assert eng.process(quiet) == []
    failing = [tool(100 + i, args={"q": i}, outcome="error", tool="deploy") for i in range(8)]
    alerts = eng.process(failing)
    assert [a.labels["pattern"] for a in alerts] == ["consecutive_failures"]


def test_success_resets_failure_streak():
    eng = DetectionEngine(parse_policy({}))
    evs = [tool(i, args={"q": i}, outcome="error") for i in range(7)]
    evs.append(tool(7, args={"q": 7}, outcome="ok"))
    evs += [tool(8 + i, args={"q": 8 + i}, outcome="error") for i in range(7)]
    assert eng.process(evs) + eng.finish() == []


def test_redelivered_events_are_not_counted_twice():
    eng = DetectionEngine(parse_policy({}))
    batch = [tool(i) for i in range(4)]
    assert eng.process(batch) == [] and eng.process(batch) == []
    assert eng.duplicates_skipped == 4


def span(span_id: str, parent: str, *, agent: str = "", is_agent: bool = False, at: float = 0,
         kind: EventKind = EventKind.TOOL_CALL, fallback: str = "svc") -> Event:
    return Event(
        event_id=span_id, kind=kind, ts=T0 + timedelta(seconds=at), trace_id="t1", span_id=span_id,
        parent_span_id=parent, agent_id=agent, is_agent_span=is_agent, source="otlp_json",
        tool_name="x", fallback_agent_id=fallback,
        identity=IdentitySource.ATTRIBUTE if agent else IdentitySource.UNKNOWN,
    )


def test_children_wait_for_their_agent_span_arriving_later():
    r = IdentityResolver(allowed_lateness_s=30)
    first = r.process([span("c1", "llm"), span("llm", "root", kind=EventKind.LLM_CALL, at=1)])
    assert first == []  # waiting: the chain stops at an unseen span
    later = r.process([span("root", "", agent="planner", is_agent=True, at=5)])
    ids = {e.span_id: e for e in later}
    assert ids["c1"].agent_id == "planner" and ids["c1"].identity is IdentitySource.ANCESTOR
    assert ids["llm"].agent_id == "planner"


def test_orphan_falls_back_to_resource_after_lateness():
    r = IdentityResolver(allowed_lateness_s=30)
    assert r.process([span("c1", "missing")]) == []
    assert r.advance((T0 + timedelta(seconds=31)).timestamp())[0].agent_id == "svc"


def test_complete_chain_without_agent_falls_back_immediately():
    r = IdentityResolver(allowed_lateness_s=30)
    out = r.process([span("root", "", kind=EventKind.SPAN), span("c", "root", at=1)])
    assert {e.agent_id for e in out} == {"svc"}
    assert all(e.identity is IdentitySource.RESOURCE for e in out)


def test_bad_policy_names_key_and_problem(tmp_path):
    p = tmp_path / "policy.yaml"
    p.write_text("version: v1\ndetectors:\n  retry_loop:\n    same_call_threshold: one\n")
    with pytest.raises(PolicyError) as e:
        load_policy(p)
    assert "detectors.retry_loop.same_call_threshold" in str(e.value) and str(p) in str(e.value)
    p.write_text("detectors:\n  retry_lop: {}\n")
    with pytest.raises(PolicyError, match="retry_lop"):
        load_policy(p)
    with pytest.raises(PolicyError, match="cannot read"):
        load_policy(tmp_path / "missing.yaml")


def test_idle_event_time_follows_wall_clock_so_episodes_close_without_traffic():
    eng = DetectionEngine(parse_policy({}))
    events = [tool(i) for i in range(5)]
    wall = 1_000_000.0
    opened = eng.process(events, wall=wall)
    assert len(opened) == 1 and eng.open_alerts
    assert eng.tick(wall + 10) == [] and eng.open_alerts  # quiet period not over yet
    eng.tick(wall + 30 + 60 + 1)  # allowed lateness + quiet period of wall time later
    assert eng.open_alerts == []


def test_an_alert_that_becomes_more_severe_is_re_sent_at_once():
    from detectors.base import Finding
    from schemas.alerts import Severity

    eng = DetectionEngine(parse_policy({}))

    def finding(ts: float, sev: Severity) -> Finding:
        return Finding("retry_loop", "a1", "default", "s", 0.0, ts, sev, "x", [tool(int(ts))])

    out: list = []
    eng._merge(finding(1, Severity.LOW), out)
    eng._merge(finding(2, Severity.LOW), out)  # count 2: doubling re-send
    eng._merge(finding(3, Severity.HIGH), out)  # count 3: no doubling, but more severe
    assert [a.severity for a in out] == [Severity.LOW, Severity.LOW, Severity.HIGH]


def test_calls_without_recorded_arguments_are_not_taken_for_identical_ones():
    eng = DetectionEngine(parse_policy({}))
    events = [tool(i * 5, args="") for i in range(7)]  # instrumentation did not record arguments
    assert all(e.args_fingerprint == "" for e in events)
    assert eng.process(events) + eng.finish() == []


def test_failure_run_is_bounded_in_time_so_an_intermittent_outage_does_not_page():
    # a tool failing once every four minutes for half an hour, other tools fine in between
    events = []
    for i in range(9):
        events.append(tool(i * 240, tool="deploy", args={"n": i}, outcome="error"))
        events.append(tool(i * 240 + 30, tool="search", args={"q": i}))
    eng = DetectionEngine(parse_policy({}))
    assert eng.process(events) + eng.finish() == []
    # the same nine failures within a minute are a loop
    eng = DetectionEngine(parse_policy({}))
    alerts = eng.process([tool(i * 5, tool="deploy", args={"n": i}, outcome="error") for i in range(8)])
    assert [a.labels["pattern"] for a in alerts] == ["consecutive_failures"]


def test_failure_window_is_configurable():
    events = [tool(i * 20, tool="deploy", args={"n": i}, outcome="error") for i in range(8)]  # 140 s
    eng = DetectionEngine(parse_policy({}))
    assert eng.process(events) + eng.finish() == []
    eng = DetectionEngine(parse_policy({"detectors": {"retry_loop": {"failure_window_s": 180}}}))
    assert [a.labels["pattern"] for a in eng.process(events)] == ["consecutive_failures"]


def test_a_failure_older_than_the_last_success_joins_no_run():
    # the success at 7 s arrives after the failures before it: they no longer count, in any order
    fails = [tool(i, tool="deploy", args={"n": i}, outcome="error") for i in range(7)]
    ok = tool(7, tool="deploy", args={"n": 7})
    more = [tool(8 + i, tool="deploy", args={"n": 8 + i}, outcome="error") for i in range(7)]
    for order in (fails + [ok] + more, [ok] + more + fails, more + [ok] + fails):
        eng = DetectionEngine(parse_policy({}))
        assert eng.process(order) + eng.finish() == []


def test_failure_runs_expire_with_event_time():
    eng = DetectionEngine(parse_policy({}))
    eng.process([tool(i, tool=f"t{i}", args={"n": i}, outcome="error") for i in range(100)])
    eng.process([tool(i, tool=f"t{i}", args={"n": i}) for i in range(100, 200)])
    eng.advance(T0.timestamp() + 1000)
    retry = eng.detectors[0]
    assert len(retry._failures) == 0 and len(retry._calls) == 0 and retry._last_ok == {}


def test_a_source_late_by_design_is_on_time_in_detect_within_its_own_lateness():
    """CloudTrail delivers minutes after the call (policy join.allowed_lateness_by_source, 900 s by
    default): its records are not late in the engine, while the other sources keep the policy's
    30 s and no window waits for CloudTrail."""
    eng = DetectionEngine(parse_policy({}))
    eng.process([tool(1, at=1000)])

    def denied(source: str, event_id: str) -> Event:
        return Event(event_id=event_id, kind=EventKind.AUDIT, ts=T0 + timedelta(seconds=400), agent_id="a1",
                     source=source, principal="arn:aws:iam::1:role/a1", action="GetSecretValue",
                     resource="secret/prod", outcome="deny")

    alerts = eng.process([denied("cloudtrail", "ct-1")])
    assert eng.watermark.late_events == 0 and [a.detector for a in alerts] == ["disallowed_access"]
    eng.process([denied("k8s", "k8s-1")])
    assert eng.watermark.late_events == 1  # 600 s behind is late for every other source
    eng.process([denied("cloudtrail", "ct-1")])  # redelivered
    assert eng.duplicates_skipped == 1
