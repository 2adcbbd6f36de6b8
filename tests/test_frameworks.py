"""The framework matrix: agents built with LangGraph, the OpenAI Agents SDK, pydantic-ai,
smolagents and CrewAI, traced by their real instrumentations (OpenInference,
OpenLLMetry, pydantic-ai's own), recognised as what they are.

Spans are generated once per session by tests/frameworks/gen_*.py in each
framework's own virtualenv (tests/frameworks/venvs.py), from an agent named
``ops-agent`` with four tools and a fake model, over five scenarios
(tests/frameworks/harness.py). Then:

- decoded and attributed: the agent id is the agent's name (never the SDK's
  random ``service.instance.id``), tool names, argument fingerprints as the
  model made the calls, call ids, token counts;
- the call ids at work: an approval covering one call, audit records joined to
  their calls (one by its call id alone), an unaudited call unconfirmed;
- replayed through ``agentwatch replay``: every scenario's alerts, exactly;
- live through a worker on the real broker: the same alerts.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import orjson
import pytest
import yaml

from detectors.join import is_index_copy
from detectors.policy import parse_policy
from streams.policy_file import load_policy
from schemas.alerts import Alert
from schemas.decoders.native import decode_native
from schemas.decoders.otlp import decode_otlp
from schemas.events import Event, EventKind, IdentitySource, fingerprint_arguments
from streams.replay import records_in_event_time
from streams.stages import CorrelateStage, DetectStage, IngestStage, RawRecord
from tests.frameworks import matrix
from tests.frameworks.harness import SCENARIOS, SERVICE_NAME, usage
from tests.frameworks.venvs import COMBOS, Combo, generate
from tests.live import LiveWorker

REPO = Path(__file__).resolve().parent.parent
POLICY = REPO / "tests" / "frameworks" / "policy.yaml"
IDS = [c.name for c in COMBOS]


@pytest.fixture(scope="session")
def recordings(tmp_path_factory: pytest.TempPathFactory) -> dict[Combo, matrix.Recording]:
    """Every combination's spans, generated once per session by the real instrumentations."""
    generated = generate(tmp_path_factory.mktemp("framework-spans"))
    out = tmp_path_factory.mktemp("framework-otlp")
    return {combo: matrix.convert(combo, path, out) for combo, path in generated.items()}


def _attributed(records: list[bytes]) -> list[Event]:
    """The scenario's events as the detectors get them: decoded, agent decided."""
    ingest = IngestStage({"otlp": decode_otlp})
    correlate = CorrelateStage(load_policy(POLICY))
    out: list[Event] = []
    for i, value in enumerate(records):
        routed = ingest.process([RawRecord("otlp", 0, i, value)])
        assert not routed.dead, routed.dead[0].reason
        out += correlate.process_local([e for evs in routed.by_trace.values() for e in evs])
    return out + correlate.finish_local()


@pytest.mark.parametrize("combo", COMBOS, ids=IDS)
def test_agent_tools_arguments_call_ids_and_tokens(recordings, combo: Combo):
    rec = recordings[combo]
    for scenario, turns in SCENARIOS.items():
        events = _attributed(rec.records[scenario])
        where = f"{combo.name}/{scenario}"
        assert events, where
        # one agent, named by its agent span: never the SDK's per-process service.instance.id
        work = [e for e in events if e.kind in (EventKind.TOOL_CALL, EventKind.LLM_CALL)]
        assert {e.agent_id for e in work} <= {matrix.agent_id(combo)}, where
        assert all(e.identity is not IdentitySource.RESOURCE for e in work), where
        assert matrix.agent_id(combo) in {e.agent_id for e in events if e.kind is EventKind.AGENT}, where
        # wrappers around the agent (a crew, a workflow) that name none fall back to service.name
        assert {e.agent_id for e in events} <= {matrix.agent_id(combo), SERVICE_NAME}, where
        assert {e.tenant for e in events} == {matrix.tenant(combo)}, where
        calls = matrix.calls(combo, scenario)
        tools = sorted((e for e in events if e.kind is EventKind.TOOL_CALL), key=lambda e: e.ts)
        if combo.framework == "smolagents":  # every smolagents run ends by calling its final_answer tool
            assert tools[-1].tool_name == "final_answer", where
            tools = tools[:-1]
        if combo.name in matrix.NO_TOOL_SPANS:
            assert tools == [], f"{where}: the instrumentation now records tool calls: add them to the matrix"
            continue
        assert [e.tool_name for e in tools] == [c.tool for c in calls], where
        # arguments as the model made the call: the same call fingerprints the same, any other differently
        assert [e.args_fingerprint for e in tools] == [fingerprint_arguments(c.args) for c in calls], where
        if combo.name not in matrix.NO_CALL_IDS and (combo.framework, scenario) not in matrix.NO_CALL_IDS_IN:
            assert [e.tool_call_id for e in tools] == [c.call_id for c in calls], where
        failing = scenario == "failing"
        assert [e.outcome for e in tools] == ["error" if failing else "ok"] * len(calls), where
        if combo.name not in matrix.NO_TOKENS:
            want_in = sum(usage(n)[0] for n in range(len(turns) + 1))
            want_out = sum(usage(n)[1] for n in range(len(turns) + 1))
            llm = [e for e in events if e.kind is EventKind.LLM_CALL]  # what token budgets and spikes count
            assert (sum(e.input_tokens for e in llm), sum(e.output_tokens for e in llm)) == (want_in, want_out), where
    same = [e for e in _attributed(rec.records["same_call"]) if e.tool_name == "get_order"]
    varied = [e for e in _attributed(rec.records["varied"]) if e.tool_name == "get_order"]
    if combo.name not in matrix.NO_TOOL_SPANS:
        assert len({e.args_fingerprint for e in same}) == 1 and len({e.args_fingerprint for e in varied}) == 6


@pytest.mark.parametrize("combo", [c for c in COMBOS if c.name not in matrix.NO_CALL_IDS],
                         ids=[c.name for c in COMBOS if c.name not in matrix.NO_CALL_IDS])
def test_recovered_call_ids_serve_approvals_audit_joins_and_unconfirmed_action(recordings, combo: Combo):
    """The healthy run (get_order call_ok_0, search_kb, get_order call_ok_2, send_email call_ok_3) with
    what the call ids are for: send_email is high risk, and so is the audited mail.send it causes;
    an approval covers call_ok_3 by its id; every get_order must leave an audit record, and the one of
    call_ok_0 names the call by its id alone (as a tool writing its call id into a SQL comment does),
    while call_ok_2 leaves none. Where the stack put the id elsewhere than on the tool span, only the
    recovered id lets these match: exactly one alert, unconfirmed_action for call_ok_2."""
    doc = yaml.safe_load(POLICY.read_text())
    doc["high_risk"] = {"tools": ["send_email"], "audit": [{"action": "mail.send"}]}
    doc.setdefault("detectors", {})["unconfirmed_action"] = {"tools": ["get_order"]}
    policy = parse_policy(doc)
    ingest = IngestStage({"otlp": decode_otlp, "native": decode_native})
    spans = ingest.process([RawRecord("otlp", 0, i, v) for i, v in enumerate(recordings[combo].records["healthy"])])
    tools = sorted((e for evs in spans.by_trace.values() for e in evs
                    if e.kind is EventKind.TOOL_CALL and not is_index_copy(e)), key=lambda e: e.ts)
    # the healthy run's calls (smolagents' then ends with final_answer)
    assert [e.tool_name for e in tools][:4] == ["get_order", "search_kb", "get_order", "send_email"]
    first, mail = tools[0], tools[3]
    tenant = matrix.tenant(combo)

    def at(ev: Event, shift_s: float = 0.0) -> float:
        return (ev.ts.timestamp() - ev.duration_ms / 2000) + shift_s  # inside the span

    native = [
        {"kind": "approval", "ts": at(mail, -30), "agent_id": "ops-agent", "tenant": tenant,
         "approver": "oncall@example.com", "decision": "granted", "covers_tool_call_id": "call_ok_3"},
        {"kind": "audit", "ts": at(mail), "principal": "svc-mail", "action": "mail.send", "tenant": tenant,
         "resource": "customer@example.com", "outcome": "allow", "trace_id": mail.trace_id, "span_id": mail.span_id},
        {"kind": "audit", "ts": at(first), "principal": "svc-orders", "action": "orders.read", "tenant": tenant,
         "resource": "A-2001", "outcome": "allow", "tool_call_id": "call_ok_0"},
    ]
    audits = ingest.process([RawRecord("native", 0, 0, orjson.dumps(native))])
    assert not spans.dead and not audits.dead
    correlate, detect = CorrelateStage(policy), DetectStage(policy)
    events = [e for r in (spans, audits) for evs in r.by_trace.values() for e in evs]
    attributed = correlate.process_local(events) + correlate.finish_local()
    alerts = detect.process(sorted(attributed + [e for evs in audits.by_agent.values() for e in evs],
                                   key=lambda e: e.ts)) + detect.finish()
    joined = {e.action: e for e in attributed if e.kind is EventKind.AUDIT}
    assert {a: (e.attributes.get("join"), e.agent_id, e.tool_call_id) for a, e in joined.items()} == {
        "mail.send": ("matched", "ops-agent", "call_ok_3"), "orders.read": ("matched", "ops-agent", "call_ok_0")}
    latest = {a.alert_id: a for a in alerts}.values()
    assert [(a.detector, a.agent_id) for a in latest] == [("unconfirmed_action", "ops-agent")]
    assert "call_ok_2" in next(iter(latest)).summary


def _replay_cli(paths: list[Path]) -> list[Alert]:
    proc = subprocess.run([sys.executable, "-m", "streams.cli", "replay", "--policy", str(POLICY),
                           *map(str, paths)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "0 undecodable records" in proc.stderr, proc.stderr
    return [Alert.model_validate(orjson.loads(line)) for line in proc.stdout.splitlines() if line.strip()]


def test_replay_gives_every_scenario_exactly_its_alerts(recordings):
    recs = list(recordings.values())
    alerts = _replay_cli([r.path for r in recs])
    assert matrix.verdicts(alerts, recs) == matrix.expected_verdicts(recs)


@pytest.mark.kafka
def test_live_worker_gives_every_scenario_exactly_its_alerts(recordings, kafka_bootstrap, tmp_path):
    """A worker on the real broker: every scenario's alerts, and every tool call stored with its agent and the
    call id recovered (by the correlate stage, keyed by trace) from wherever its stack recorded it."""
    recs = list(recordings.values())
    want = matrix.expected_verdicts(recs)
    expected_alerts = sum(len(v) for k, v in want.items() if not k[1].endswith(":agents"))
    # one partition: the scenarios sit an hour of event time apart, and across partitions a later
    # scenario's spans could move the watermark past an earlier one's still in flight
    with LiveWorker(kafka_bootstrap, tmp_path, policy=POLICY, partitions=1) as w:
        ordered = records_in_event_time([r.path for r in recs])  # as a Collector would have sent them
        w.produce(w.settings.topic_otlp, [rec.value for rec in ordered])
        w.wait_settled()
        settled = time.monotonic()

        def done(alerts: list[Alert]) -> bool:
            # the lateness must pass in idle event time so an unexpected alert would have fired too
            return time.monotonic() - settled >= 15 and len(alerts) >= expected_alerts

        alerts = w.wait_alerts(done, timeout=180)
        # every tool call stored under ops-agent with the call id its stack recorded, wherever it did
        want_ids = matrix.expected_call_ids(recs)
        stored = w.wait_rows(
            "SELECT tenant, agent_id, tool_call_id, count() FROM agentwatch.events FINAL WHERE kind = 'tool_call' "
            "AND tool_name != 'final_answer' GROUP BY tenant, agent_id, tool_call_id",
            lambda rows: sum(n for *_, n in rows) >= want_ids.total(), timeout=120)
    assert matrix.verdicts(alerts, recs) == want
    assert Counter(a.detector for a in alerts) == Counter(
        d for k, v in want.items() if not k[1].endswith(":agents") for d, _ in v)
    assert Counter({tuple(key): n for *key, n in stored}) == want_ids
