"""Turning the generators' records into inputs for replay and the live worker, and
what each scenario must give.

Every (combination, scenario) trace is moved to an hour of event time of its own
(intervals kept as recorded), so one replay or one worker sees all of them
without one scenario's calls counting in another's window; the tenant (a
resource attribute set by the harness) tells the combinations apart as well.
Records are written as OTLP/JSON lines, as the Collector's file exporter does.
"""

from __future__ import annotations

import base64
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import orjson
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from schemas.alerts import Alert
from schemas.otlp_json import request_to_otlp_json
from tests.frameworks.harness import AGENT_NAME, SCENARIOS, Call
from tests.frameworks.venvs import COMBOS, Combo

BASE_S = 1_768_471_200  # 2026-01-15T10:00:00Z
HOUR_S = 3600
SCENARIO_NAMES = tuple(SCENARIOS)

# (detector, retry_loop pattern or "") each scenario must raise, and nothing else
EXPECTED: dict[str, set[tuple[str, str]]] = {
    "same_call": {("retry_loop", "same_call")},
    "healthy": set(),
    "disallowed": {("disallowed_access", "")},
    "varied": set(),
    "failing": {("retry_loop", "consecutive_failures")},
}

# What the instrumentations do not record at all (measured; see docs/frameworks), by combination.
# OpenLLMetry's CrewAI instrumentation wraps the crew, the task, the agent and LLM.call, no tool.
NO_TOOL_SPANS = {"crewai-openllmetry"}
NO_CALL_IDS = {"crewai-openllmetry"}
# CrewAI's call ids are only in a completed task's output messages: none in the run CrewAI stops
NO_CALL_IDS_IN = {("crewai", "same_call")}
# CrewAI records no per-call token usage on a span (OpenLLMetry only as a text summary)
NO_TOKENS = {"crewai-openinference", "crewai-openllmetry"}
# CrewAI stops a run on the fifth identical call (MAX_REPEATED_TOOL_CALLS): five of the six are made
SAME_CALLS_MADE = {"crewai": 5}


def agent_id(combo: Combo) -> str:
    """Every combination's agent is ops-agent; smolagents' ``ops_agent`` (a Python identifier, as
    smolagents requires) is mapped to it by the policy's identity rule, as docs/frameworks/smolagents.md says."""
    return AGENT_NAME


def calls(combo: Combo, scenario: str) -> list[Call]:
    """The tool calls the framework really makes in the scenario, in order."""
    made = [c for turn in SCENARIOS[scenario] for c in turn]
    if scenario == "same_call":
        made = made[: SAME_CALLS_MADE.get(combo.framework, len(made))]
    return made


def tenant(combo: Combo) -> str:
    return combo.name


def hour_of(combo: Combo, scenario: str) -> int:
    return COMBOS.index(combo) * len(SCENARIO_NAMES) + SCENARIO_NAMES.index(scenario)


def scenario_at(combo_by_tenant: dict[str, Combo], alert: Alert) -> tuple[Combo, str] | None:
    combo = combo_by_tenant.get(alert.tenant)
    if combo is None:
        return None
    hour = int((alert.first_seen.timestamp() - BASE_S) // HOUR_S) - COMBOS.index(combo) * len(SCENARIO_NAMES)
    return (combo, SCENARIO_NAMES[hour]) if 0 <= hour < len(SCENARIO_NAMES) else None


def _shift(req: ExportTraceServiceRequest, offset_ns: int) -> None:
    for rs in req.resource_spans:
        for ss in rs.scope_spans:
            for sp in ss.spans:
                sp.start_time_unix_nano += offset_ns
                sp.end_time_unix_nano += offset_ns
                for ev in sp.events:
                    ev.time_unix_nano += offset_ns


def _first_start(reqs: Iterable[ExportTraceServiceRequest]) -> int:
    return min(sp.start_time_unix_nano for r in reqs for rs in r.resource_spans for ss in rs.scope_spans
               for sp in ss.spans)


@dataclass
class Recording:
    combo: Combo
    path: Path  # OTLP/JSON lines, every scenario at its own hour
    records: dict[str, list[bytes]] = field(default_factory=dict)  # scenario -> OTLP/JSON records


def convert(combo: Combo, generated: Path, out_dir: Path) -> Recording:
    by_scenario: dict[str, list[ExportTraceServiceRequest]] = {}
    for line in generated.read_bytes().splitlines():
        doc = orjson.loads(line)
        req = ExportTraceServiceRequest()
        req.ParseFromString(base64.b64decode(doc["record"]))
        by_scenario.setdefault(doc["scenario"], []).append(req)
    rec = Recording(combo, out_dir / f"{combo.name}.jsonl")
    for name in SCENARIO_NAMES:
        reqs = by_scenario[name]
        offset = (BASE_S + hour_of(combo, name) * HOUR_S) * 10**9 - _first_start(reqs)
        for r in reqs:
            _shift(r, offset)
        rec.records[name] = [request_to_otlp_json(r) for r in reqs]
    rec.path.write_bytes(b"".join(r + b"\n" for name in SCENARIO_NAMES for r in rec.records[name]))
    return rec


def verdicts(alerts: Iterable[Alert], recordings: Iterable[Recording]) -> dict[tuple[str, str], set[tuple[str, str]]]:
    """(combination, scenario) -> {(detector, pattern)} of the alerts raised in it; alerts
    that belong to no scenario land under ("?", tenant)."""
    by_tenant = {tenant(r.combo): r.combo for r in recordings}
    out: dict[tuple[str, str], set[tuple[str, str]]] = {(r.combo.name, s): set() for r in recordings
                                                        for s in SCENARIO_NAMES}
    for a in alerts:
        where = scenario_at(by_tenant, a)
        key = (where[0].name, where[1]) if where else ("?", a.tenant)
        pattern = a.labels.get("pattern", "") if a.detector == "retry_loop" else ""
        out.setdefault(key, set()).add((a.detector, pattern))
        out.setdefault((key[0], key[1] + ":agents"), set()).add(("agent", a.agent_id))
    return out


def expected_verdicts(recordings: Iterable[Recording]) -> dict[tuple[str, str], set[tuple[str, str]]]:
    out: dict[tuple[str, str], set[tuple[str, str]]] = {}
    for r in recordings:
        for s in SCENARIO_NAMES:
            want = set() if r.combo.name in NO_TOOL_SPANS else EXPECTED[s]
            out[(r.combo.name, s)] = set(want)
            if want:
                out[(r.combo.name, s + ":agents")] = {("agent", agent_id(r.combo))}
    return out


def expected_call_ids(recordings: Iterable[Recording]) -> Counter[tuple[str, str, str]]:
    """(tenant, agent, tool call id) -> how many tool calls the store must hold: the id as the
    model made the call, "" where the stack records none (final_answer calls left out)."""
    out: Counter[tuple[str, str, str]] = Counter()
    for r in recordings:
        if r.combo.name in NO_TOOL_SPANS:
            continue
        for s in SCENARIO_NAMES:
            no_id = r.combo.name in NO_CALL_IDS or (r.combo.framework, s) in NO_CALL_IDS_IN
            for c in calls(r.combo, s):
                out[(tenant(r.combo), agent_id(r.combo), "" if no_id else c.call_id)] += 1
    return out
