"""The analyst's questions about the join, answered in plain SQL on the real
engine (chDB): the example queries of docs/join.md, run as written."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from schemas.events import EventKind, stable_id
from sinks.clickhouse import ClickHouseStore, open_store
from streams.stages import CorrelateStage
from tests.test_join import HTTP_SPAN, TOOL_SPAN, TRACE, audit, feed, policy, run, span

DOC = Path(__file__).resolve().parent.parent / "docs" / "join.md"
RESOURCE = "deployments.apps/prod/payments"


def doc_queries() -> list[str]:
    return re.findall(r"```sql\n(.*?)```", DOC.read_text(), re.S)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClickHouseStore]:
    s = open_store(f"chdb://{tmp_path_factory.mktemp('chdb') / 'store'}")
    s.apply_schema()
    s.apply_schema()  # idempotent
    yield s
    s.close()


def test_example_queries_name_the_tool_call_and_the_unexplained_write(store: ClickHouseStore) -> None:
    caused = audit(4.8, trace=TRACE, sid=HTTP_SPAN, eid="write-by-tool")
    unexplained = audit(30.0, trace="f" * 32, sid="1111111111111111", eid="write-no-span")
    a_read = audit(31.0, eid="read-no-span", action="get")
    for a in (caused, unexplained, a_read):
        a.resource = RESOURCE
    other_trace = span("d000000000000004", "", 200.0, kind=EventKind.AGENT, agent="x", trace="e" * 32)
    events = list(feed(CorrelateStage(policy()), run(call_id="call_7"), [caused, unexplained, a_read, other_trace]).values())
    store.insert_events(events)

    which_tool, no_span = doc_queries()
    res = store.query(which_tool)
    rows = [dict(zip(res.columns, r)) for r in res.rows]
    assert [r["agent_id"] for r in rows] == ["ops-agent"] * 3  # caused, unexplained, and a read
    by_tool = next(r for r in rows if r["tool_name"])
    assert by_tool == {**by_tool, "tool_name": "scale_deployment", "tool_call_id": "call_7", "trace_id": TRACE,
                       "tool_span_id": TOOL_SPAN, "joined_via": "span_id", "principal": caused.principal}

    res = store.query(no_span)
    rows = [dict(zip(res.columns, r)) for r in res.rows]
    assert len(rows) == 1, rows  # the read is not a side effect, the joined write is explained
    assert rows[0]["agent_id"] == "ops-agent" and rows[0]["identity"] == "identity_map" and rows[0]["agent_principal"]

    confirmed = store.query(
        "SELECT join_status, audit_event_id FROM agentwatch.tool_call_confirmation WHERE event_id = {e:String}",
        {"e": stable_id("span", TRACE, TOOL_SPAN)},
    ).rows
    assert confirmed == [("matched", "write-by-tool")]
