"""The analyst's questions about the join, answered in plain SQL on the real engine
(chDB): the audit queries of README.md and docs/join.md, run as written on the
shipped join scenarios (tests/scenarios/join_*), return their rows and read only
the granules of their time range (EXPLAIN indexes = 1)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from schemas.events import Event
from sinks.clickhouse import ClickHouseStore, open_store
from streams.replay import _ReplayDecoder, records_in_event_time
from streams.scorecard import load_scenarios
from streams.stages import CorrelateStage, IngestStage

REPO = Path(__file__).resolve().parent.parent
SCENARIOS = [s for s in load_scenarios(REPO / "tests" / "scenarios") if s.name.startswith("join_")]


def sql_blocks(path: Path, section: str) -> list[str]:
    text = path.read_text()
    text = text[text.index(section):]
    return re.findall(r"```sql\n(.*?)```", text, re.S)


README_QUERIES = sql_blocks(REPO / "README.md", "## Joining spans with audit records")[:3]
DOC_QUERIES = sql_blocks(REPO / "docs" / "join.md", "## Questions in SQL")


def scenario_events() -> list[Event]:
    """What the worker stores for each join scenario (replay's stages, every event kept)."""
    out: list[Event] = []
    for sc in SCENARIOS:
        ingest, correlate = IngestStage({}, default=_ReplayDecoder()), CorrelateStage(sc.policy())
        for rec in records_in_event_time(sc.inputs):
            routed = ingest.process([rec])
            out += correlate.process_local([e for evs in routed.by_trace.values() for e in evs])
            out += [e for evs in routed.by_agent.values() for e in evs]
        out += correlate.finish_local()
    return out


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClickHouseStore]:
    s = open_store(f"chdb://{tmp_path_factory.mktemp('chdb') / 'store'}")
    s.apply_schema()
    s.apply_schema()  # idempotent
    events = scenario_events()
    s.insert_events(events)
    # the same records a month earlier, in parts of their own: what a bounded query must not read
    for e in events:
        e.ts = e.ts - timedelta(days=31)
        e.event_id += "-old"
    s.insert_events(events)
    yield s
    s.close()


def rows(store: ClickHouseStore, sql: str) -> list[dict[str, object]]:
    res = store.query(sql)
    return [dict(zip(res.columns, r)) for r in res.rows]


def test_readme_and_docs_ask_the_same_questions() -> None:
    assert len(README_QUERIES) == len(DOC_QUERIES) == 3
    assert [" ".join(q.split()) for q in README_QUERIES] == [" ".join(q.split()) for q in DOC_QUERIES]


def test_which_tool_call_caused_the_write(store: ClickHouseStore) -> None:
    got = rows(store, README_QUERIES[0])
    assert {r["resource"] for r in got} == {"deployments.apps/prod/payments"}  # the object, subresource apart
    assert all(r["ts"] >= datetime.fromisoformat("2026-01-15T00:00:00+00:00") for r in got)  # bounded
    joined = [r for r in got if r["tool_name"]]
    assert [(r["agent_id"], r["tool_name"], r["tool_call_id"], r["joined_via"]) for r in joined] == [
        ("agent-ops", "scale_deployment", "call_scale_1", "span_id")]
    assert any(not r["tool_name"] and r["agent_id"] == "agent-ops" for r in got)  # the unexplained one


def test_which_side_effects_have_no_span(store: ClickHouseStore) -> None:
    got = rows(store, README_QUERIES[1])
    assert {(r["audit_source"], r["action"], r["agent_id"], r["identity"]) for r in got} == {
        ("k8s_audit", "update", "agent-ops", "identity_map"),
        ("cloudtrail", "s3.amazonaws.com:PutObject", "agent-data", "identity_map"),
        ("pgaudit", "DELETE", "agent-sql", "identity_map"),
    }
    assert all(r["agent_principal"] for r in got)


def test_who_read_or_was_refused_the_protected_table(store: ClickHouseStore) -> None:
    got = rows(store, README_QUERIES[2])
    assert [(r["action"], r["outcome"], r["agent_id"], r["join_status"]) for r in got] == [
        ("SELECT", "allow", "agent-sql", "unattributed")]
    bonus = rows(store, README_QUERIES[2].replace("hr.salaries", "hr.bonuses"))
    assert [(r["outcome"], r["tool_name"], r["join_status"]) for r in bonus] == [("deny", "read_bonus", "matched")]


@pytest.mark.parametrize("index", range(3))
def test_queries_read_only_their_time_range(store: ClickHouseStore, index: int) -> None:
    plan = "\n".join(r[0] for r in store.query("EXPLAIN indexes = 1 " + README_QUERIES[index]).rows)
    reads = plan.split("ReadFromMergeTree (agentwatch.events)")[1:]
    assert len(reads) == 2, plan  # the audit side and the tool-call side of the join
    for read in reads:
        key = read[read.index("PrimaryKey"):]
        assert "toStartOfHour(ts)" in key.split("Condition:")[1].split("\n")[0], plan
        selected, total = map(int, re.search(r"Granules: (\d+)/(\d+)", key).groups())  # type: ignore[union-attr]
        assert selected < total, plan  # last month's parts are not read
