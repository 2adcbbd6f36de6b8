"""Canary analysis: the statistics, the metric windows, and verdicts through the detection
engine as the worker and replay run it (detectors/canary.py, docs/canary.md)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import pytest

from agentwatch_client.wire import generate_keypair, load_private_key
from detectors.canary import Task, bootstrap_difference, judge, mann_whitney_greater, pooled
from detectors.engine import DetectionEngine
from detectors.policy import CanaryAnalysisConfig, parse_policy
from schemas.alerts import HALT_VERSION_LABEL, Alert, Mode
from schemas.canary import CanaryVerdict, Verdict, VersionWindow
from schemas.control import TargetKind, command_event
from schemas.errors import PolicyError
from schemas.events import Event, EventKind
from streams.control_plane import ControlPlane

T0 = 1_780_000_000.0
AGENT = "support-bot"

# -- statistics -----------------------------------------------------------------------------------


def test_mann_whitney_separated_tied_and_reversed() -> None:
    u, p = mann_whitney_greater([1, 2, 3, 4, 5], [6, 7, 8, 9, 10])
    assert u == 25 and 0.004 < p < 0.008  # exact 1/252 = 0.004; normal approximation 0.0061
    _, p_rev = mann_whitney_greater([6, 7, 8, 9, 10], [1, 2, 3, 4, 5])
    assert p_rev > 0.99
    assert mann_whitney_greater([0.0] * 20, [0.0] * 20)[1] == 1.0  # all tied: no information
    _, p_mixed = mann_whitney_greater([0.0] * 15 + [1.0] * 5, [0.0] * 14 + [1.0] * 6)
    assert 0.3 < p_mixed < 0.7
    assert mann_whitney_greater([], [1.0]) == (0.0, 1.0)


def test_bootstrap_interval_is_deterministic_and_covers_the_difference() -> None:
    base = [(1.0, 10.0)] * 30 + [(0.0, 10.0)] * 30  # rate 0.05
    cand = [(3.0, 10.0)] * 30 + [(1.0, 10.0)] * 30  # rate 0.2
    assert pooled(base) == pytest.approx(0.05) and pooled(cand) == pytest.approx(0.2)
    ci = bootstrap_difference(base, cand, scale=1.0, confidence=0.95, seed="s")
    assert ci is not None and ci == bootstrap_difference(base, cand, scale=1.0, confidence=0.95, seed="s")
    lo, hi = ci
    assert 0.09 < lo < 0.15 < hi < 0.21
    assert bootstrap_difference(base, [], scale=1.0, confidence=0.95, seed="s") is None
    assert pooled([(1.0, 0.0)]) is None


def _task(version: str, *, actions: int = 4, tool_calls: int = 3, retried: int = 0, violations: int = 0,
          tokens: int = 500) -> Task:
    return Task("default", AGENT, version, T0, actions=actions, tool_calls=tool_calls, retried=retried,
                violations=violations, tokens=tokens)


CFG = CanaryAnalysisConfig(agent=AGENT, baseline="1.4", candidate="1.5", min_tasks=10,
                           metrics={"retried_call_rate": {"max_increase": 0.25, "min_delta": 0.05},
                                    "success_rate": {"max_increase": 0.1}})


@pytest.mark.parametrize("test", ["mann_whitney", "bootstrap"])
def test_judge_fail_pass_inconclusive(test: str) -> None:
    cfg = CFG.model_copy(update={"test": test})
    base = [_task("1.4", retried=i % 10 == 0) for i in range(40)]
    worse = [_task("1.5", retried=2, violations=1) for _ in range(40)]
    v = judge(cfg, base, worse, at=T0)
    assert v.verdict is Verdict.FAIL, v
    by = {m.metric: m for m in v.metrics}
    assert by["retried_call_rate"].outcome == "fail" and by["success_rate"].outcome == "fail"
    assert by["retried_call_rate"].candidate == pytest.approx(2 / 3)
    assert by["retried_call_rate"].baseline == pytest.approx(4 / 120)
    same = [_task("1.5", retried=i % 10 == 3) for i in range(40)]
    assert judge(cfg, base, same, at=T0).verdict is Verdict.PASS
    few = judge(cfg, base, worse[:5], at=T0)
    assert few.verdict is Verdict.INCONCLUSIVE and "5 candidate" in few.reason
    # numbers behind the verdict are part of it, and it round-trips as published
    assert CanaryVerdict.model_validate_json(v.to_json()) == v


def test_policy_rejects_a_bad_canary_section_by_key() -> None:
    with pytest.raises(PolicyError, match=r"canary\.analyses\.0\.metrics.*unknown metric 'loops'"):
        parse_policy({"canary": {"analyses": [{"agent": "a", "baseline": "1", "candidate": "2",
                                               "metrics": {"loops": {}}}]}})
    with pytest.raises(PolicyError, match=r"canary\.analyses\.0\.test"):
        parse_policy({"canary": {"analyses": [{"agent": "a", "baseline": "1", "candidate": "2", "test": "t"}]}})
    with pytest.raises(PolicyError, match=r"canary\.analyses\.0\.candidate.*same version"):
        parse_policy({"canary": {"analyses": [{"agent": "a", "baseline": "1", "candidate": "1"}]}})


# -- through the engine ---------------------------------------------------------------------------


def _ev(kind: EventKind, version: str, trace: str, at: float, n: int, **kw: Any) -> Event:
    return Event(event_id=f"{version}-{trace}-{n}", kind=kind, ts=datetime.fromtimestamp(at, tz=timezone.utc),
                 agent_id=AGENT, agent_version=version, trace_id=trace, span_id=f"{n:016x}", source="native", **kw)


def _task_events(version: str, i: int, start: float, *, degraded: bool) -> list[Event]:
    trace = f"{version}-t{i:04d}"
    evs = [_ev(EventKind.LLM_CALL, version, trace, start, 0, input_tokens=300, output_tokens=200, outcome="ok"),
           _ev(EventKind.TOOL_CALL, version, trace, start + 1, 1, tool_name="search", args_fingerprint=f"q{i}",
               outcome="ok"),
           _ev(EventKind.TOOL_CALL, version, trace, start + 2, 2, tool_name="reply", args_fingerprint=f"r{i}",
               outcome="ok")]
    if degraded:
        # retries the search twice more and reads a protected resource
        evs += [_ev(EventKind.TOOL_CALL, version, trace, start + 3 + k, 3 + k, tool_name="search",
                    args_fingerprint=f"q{i}", outcome="ok") for k in range(2)]
        evs.append(_ev(EventKind.TOOL_CALL, version, trace, start + 5, 5, tool_name="read_secret",
                       resource="secrets/prod-db", outcome="ok"))
    return evs


def _policy(**canary: Any) -> Any:
    return parse_policy({
        "version": "canary-test",
        "protected_resources": ["secrets/*"],
        "canary": {"mode": "enforce", "window_s": 60, "task_idle_s": 20, **canary,
                   "analyses": [{"agent": AGENT, "baseline": "1.4", "candidate": "1.5", "min_tasks": 15,
                                 "judge_every_s": 120, "test": "mann_whitney",
                                 "metrics": {"violations_per_1k_actions": {"max_increase": 0.25, "min_delta": 20},
                                             "retried_call_rate": {"max_increase": 0.25, "min_delta": 0.05}}}]},
    })


def _run(engine: DetectionEngine, *, candidate_tasks: int, degraded: bool, seconds: int = 600,
         ) -> tuple[list[Alert], list[VersionWindow], list[CanaryVerdict]]:
    events: list[Event] = []
    for i in range(seconds // 10):
        events += _task_events("1.4", i, T0 + 10 * i, degraded=False)
        if i < candidate_tasks:
            events += _task_events("1.5", i, T0 + 10 * i + 5, degraded=degraded)
    events.sort(key=lambda e: e.ts)
    alerts: list[Alert] = []
    windows: list[VersionWindow] = []
    verdicts: list[CanaryVerdict] = []
    for k in range(0, len(events), 50):  # in batches, as the worker feeds it
        alerts += engine.process(events[k:k + 50])
        w, v = engine.take_canary()
        windows += w
        verdicts += v
    alerts += engine.advance(T0 + seconds + 300)
    w, v = engine.take_canary()
    return alerts, windows + w, verdicts + v


def test_degraded_canary_fails_and_only_its_version_is_halted() -> None:
    engine = DetectionEngine(_policy())
    alerts, windows, verdicts = _run(engine, candidate_tasks=60, degraded=True)
    final = verdicts[-1]
    assert final.verdict is Verdict.FAIL and final.candidate_tasks >= 15, final
    failed = {m.metric: m for m in final.metrics if m.outcome == "fail"}
    assert set(failed) == {"violations_per_1k_actions", "retried_call_rate"}
    assert failed["retried_call_rate"].candidate == pytest.approx(2 / 5)  # 2 of 5 tool calls repeat one
    assert failed["retried_call_rate"].baseline == 0.0 and failed["violations_per_1k_actions"].p_value < 0.05
    canary = [a for a in alerts if a.detector == "canary"]
    assert canary and canary[0].alert_id == final.alert_id
    a = canary[0]
    assert (a.mode, a.action, a.agent_version, a.labels[HALT_VERSION_LABEL]) == (Mode.ENFORCE, "halt", "1.5", "1.5")
    # the rollback: a halt of that version only
    plane = ControlPlane(load_private_key(generate_keypair()[0]))
    (cmd,) = plane.on_alerts(canary, datetime.fromtimestamp(T0 + 700, tz=timezone.utc))
    assert (cmd.target.kind, cmd.target.value, cmd.target.version) == (TargetKind.AGENT, AGENT, "1.5")
    assert cmd.target.matches(AGENT, "default", "1.5") and not cmd.target.matches(AGENT, "default", "1.4")
    # after it, the baseline keeps working unflagged; the candidate acting is peer_preservation (a)
    engine.process([command_event(cmd)])
    after = T0 + 700 + 60
    more = engine.process(_task_events("1.4", 900, after, degraded=False)
                          + _task_events("1.5", 900, after, degraded=False))
    halted = [x for x in more if x.detector == "peer_preservation"]
    assert halted and {x.agent_version for x in halted} == {"1.5"}
    # metric windows per version: the candidate's violations by detector, the baseline's none
    cand = [w for w in windows if w.agent_version == "1.5"]
    base = [w for w in windows if w.agent_version == "1.4"]
    assert sum(w.tasks for w in base) == 60 and sum(w.violations for w in base) == 0
    assert sum(w.actions for w in base) == 180 and sum(w.tokens for w in base) == 60 * 500
    assert sum(w.violations_by_detector.get("disallowed_access", 0) for w in cand) == 60
    assert sum(w.retried_calls for w in cand) == 120 and sum(w.successful_tasks for w in cand) == 0


def test_healthy_canary_passes_and_a_thin_one_is_inconclusive() -> None:
    _, _, verdicts = _run(DetectionEngine(_policy()), candidate_tasks=60, degraded=False)
    assert verdicts and verdicts[-1].verdict is Verdict.PASS, verdicts[-1]
    alerts, _, verdicts = _run(DetectionEngine(_policy()), candidate_tasks=5, degraded=True)
    assert verdicts and {v.verdict for v in verdicts} == {Verdict.INCONCLUSIVE}
    assert not [a for a in alerts if a.detector == "canary"]


def test_canary_state_survives_a_snapshot() -> None:
    """A restored engine reaches the same verdict as one that ran through."""
    whole = DetectionEngine(_policy())
    _, _, straight = _run(whole, candidate_tasks=60, degraded=True)
    first = DetectionEngine(_policy())
    events: list[Event] = []
    for i in range(60):
        events += _task_events("1.4", i, T0 + 10 * i, degraded=False)
        events += _task_events("1.5", i, T0 + 10 * i + 5, degraded=True)
    events.sort(key=lambda e: e.ts)
    half = len(events) // 2
    first.process(events[:half])
    _, v1 = first.take_canary()
    second = DetectionEngine.restore(_policy(), first.snapshot())
    second.process(events[half:])
    second.advance(T0 + 900)
    _, v2 = second.take_canary()
    assert [(v.verdict, v.candidate_tasks, v.baseline_tasks) for v in v1 + v2] == [
        (v.verdict, v.candidate_tasks, v.baseline_tasks) for v in straight]


def test_shadow_version_side_effect_is_an_alert() -> None:
    engine = DetectionEngine(_policy(shadow_versions={AGENT: ["2.0-shadow"]}))
    audit = dict(principal="sa:bot", resource="deployments/web", outcome="allow")
    alerts = engine.process([
        _ev(EventKind.AUDIT, "2.0-shadow", "s1", T0, 1, action="get", **audit),  # a read: fine
        _ev(EventKind.AUDIT, "1.4", "s2", T0 + 1, 2, action="patch", **audit),  # not a shadow version
        _ev(EventKind.AUDIT, "2.0-shadow", "s3", T0 + 2, 3, action="patch", **audit),
    ])
    shadow = [a for a in alerts if a.detector == "shadow_version"]
    assert len(shadow) == 1 and shadow[0].agent_version == "2.0-shadow" and "patch" in shadow[0].summary


# -- detector candidates ----------------------------------------------------------------------------


def test_compare_detectors_over_the_corpus(tmp_path: Any, capsys: Any) -> None:
    from pathlib import Path

    from streams.cli import main
    from streams.compare import compare_corpus

    corpus = Path(__file__).parent / "scenarios"
    cmp = compare_corpus(corpus, {"version": "retry-v2", "detectors": {"retry_loop": {"same_call_threshold": 3}}})
    assert cmp.candidate_version == "retry-v2"
    # the benign poller calls its status tool 4 times a minute: a threshold of 3 flags it
    poller = cmp.scenarios["benign_retry_under_threshold"]["retry_loop"]
    assert (poller.live, poller.candidate, poller.both, len(poller.only_candidate)) == (0, 2, 0, 2)
    others = {(s, det) for s, ds in cmp.scenarios.items() for det, d in ds.items()
              if (d.only_live or d.only_candidate) and (s, det) != ("benign_retry_under_threshold", "retry_loop")}
    assert others == set()
    total = cmp.detectors["retry_loop"]
    assert total.candidate == total.live + 2 and total.both == total.live
    # the CLI prints the same report; a bad candidate key is one line, exit 2
    cand = tmp_path / "cand.yaml"
    cand.write_text("detectors:\n  retry_loop:\n    same_call_treshold: 3\n")
    assert main(["compare-detectors", "--candidate", str(cand), "--corpus", str(corpus)]) == 2
    err = capsys.readouterr().err
    assert "detectors.retry_loop.same_call_treshold" in err and "Traceback" not in err
