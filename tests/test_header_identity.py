"""Identity from Kafka headers (the Collector's kafka exporter with include_metadata_keys)
for events that carry none, through the ingest stage."""

from __future__ import annotations

from pathlib import Path

import pytest

from detectors.join import is_index_copy
from schemas.decoders.otlp import decode_otlp
from schemas.errors import ConfigError
from schemas.otlp_json import request_to_otlp_json
from streams.settings import load_settings
from streams.stages import IngestStage, RawRecord, header_pairs
from tests.otel_traces import make_sdk, to_records

OTLP = Path(__file__).parent / "fixtures" / "otel" / "healthy_genai.jsonl"
MAPPING = {"X-Tenant-ID": "tenant", "x-agent-id": "agent_id", "x-team": "team"}


TENANT_ATTR = b'{"key":"tenant","value":{"stringValue":"acme"}},'


def ingest(headers: list[tuple[str, bytes]], mapping: dict[str, str] = MAPPING, *, span_tenant: bool = False) -> list:
    stage = IngestStage({"otlp": decode_otlp}, header_identity=mapping)
    data = OTLP.read_bytes()
    assert TENANT_ATTR in data
    lines = (data if span_tenant else data.replace(TENANT_ATTR, b"")).splitlines()
    routed = stage.process([RawRecord("otlp", 0, i, line, None, tuple(headers)) for i, line in enumerate(lines)])
    events = [e for evs in (*routed.by_trace.values(), *routed.by_agent.values()) for e in evs]
    return [e for e in events if not is_index_copy(e)]  # the join's internal copies carry ids only


def test_tenant_agent_and_attributes_from_headers_only_where_events_carry_none() -> None:
    plain = ingest([])
    assert plain and {e.tenant for e in plain} == {"default"}
    events = ingest([("x-tenant-id", b"acme"), ("X-Agent-Id", b"agent-from-header"), ("x-team", b"payments"),
                     ("unrelated", b"ignored")])
    assert {e.tenant for e in events} == {"acme"}
    assert {e.attributes["team"] for e in events} == {"payments"}
    # a tenant the spans carry wins over the header
    assert {e.tenant for e in ingest([("x-tenant-id", b"other")], span_tenant=True)} == {"acme"}
    assert "unrelated" not in events[0].attributes
    # spans that name their agent (or whose agent span came with them) keep it
    assert {e.agent_id for e in events} == {e.agent_id for e in plain} and "" not in {e.agent_id for e in plain}


def test_a_child_span_without_its_agent_takes_the_header_agent_instead_of_waiting() -> None:
    sdk = make_sdk("tools-svc", seed=7)
    with sdk.tracer.start_as_current_span(
            "execute_tool lookup", attributes={"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "lookup"}):
        pass
    payload = request_to_otlp_json(to_records(sdk.finished(), 1)[0])
    stage = IngestStage({"otlp": decode_otlp}, header_identity=MAPPING)
    for headers, agent in (((), ""), ((("x-agent-id", b"agent-7"),), "agent-7")):
        routed = stage.process([RawRecord("otlp", 0, 0, payload, None, headers)])
        [tool] = [e for evs in routed.by_trace.values() for e in evs if not is_index_copy(e)]
        assert tool.agent_id == agent


def test_no_mapping_means_headers_are_ignored() -> None:
    assert {e.tenant for e in ingest([("x-tenant-id", b"acme")], {})} == {"default"}


def test_header_pairs_from_a_list_or_a_mapping() -> None:
    assert header_pairs([("a", b"1")]) == header_pairs({"a": b"1"}) == (("a", b"1"),)
    assert header_pairs(None) == ()


def test_the_setting_is_json_and_a_bad_value_names_the_variable(monkeypatch) -> None:
    monkeypatch.setenv("AGENTWATCH_HEADER_IDENTITY", '{"x-tenant-id": "tenant"}')
    assert load_settings().header_identity == {"x-tenant-id": "tenant"}
    monkeypatch.setenv("AGENTWATCH_HEADER_IDENTITY", "x-tenant-id=tenant")
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert "AGENTWATCH_HEADER_IDENTITY" in str(err.value)


def test_a_postgres_record_stitched_from_several_messages_keeps_the_headers_of_its_first() -> None:
    """An ERROR and its STATEMENT in two messages, and a record closed by the stitch bound,
    take their identity from the message they started in, not from the one that closed them."""
    from schemas.decoders.audit import AuditDecoder
    from schemas.decoders.pgaudit import PgLogConfig

    stage = IngestStage({"audit": AuditDecoder(PgLogConfig("debian", stitch_s=2.0))}, header_identity=MAPPING)
    pg = "2026-11-25 09:22:45.355 UTC [23759] agent_sql@postgres "
    lines = [f"{pg}ERROR:  permission denied for table salaries",
             f"{pg}STATEMENT:  SELECT amount FROM hr.salaries WHERE id = 1;",
             f"{pg}LOG:  disconnection: session time: 0:00:00.011 user=agent_sql database=postgres",
             f"{pg}ERROR:  permission denied for table payroll"]
    tenants = [b"acme", b"", b"other", b"globex"]
    records = [RawRecord("audit", 0, i, line.encode(), b"pg-1", (("x-tenant-id", t),) if t else ())
               for i, (line, t) in enumerate(zip(lines, tenants))]
    routed = stage.process(records, wall=100.0)
    [paired] = [e for evs in routed.by_trace.values() for e in evs]
    assert (paired.resource, paired.tenant, paired.offset) == ("hr.salaries", "acme", 0)
    assert stage.open_offsets() == {("audit", 0): 3}  # the last ERROR may still get its STATEMENT
    [flushed] = [e for evs in stage.tick(103.0).by_trace.values() for e in evs]
    assert (flushed.tenant, flushed.offset) == ("globex", 3) and stage.open_offsets() == {}
