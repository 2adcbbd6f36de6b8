"""The internal topics' event format: exact round trip without re-validation, and a
format change detected rather than misread."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import orjson
import pytest

from schemas.decoders.audit import decode_audit
from schemas.decoders.otlp import decode_otlp
from schemas.events import Event, EventKind, IdentitySource, events_to_json
from schemas.internal_wire import FIELDS, MARKER, VERSION, InternalFormatError, events_from_wire, events_to_wire

FIXTURES = Path(__file__).parent / "fixtures"
T0 = datetime(2026, 11, 25, 12, 0, 0, 123456, tzinfo=timezone.utc)


def _decoded() -> list[Event]:
    events: list[Event] = []
    for f in sorted((FIXTURES / "otel").glob("*.jsonl")):
        for line in f.read_bytes().splitlines():
            events.extend(decode_otlp(line, origin="file").events)
    for f in sorted((FIXTURES / "audit").glob("*.json")):
        events.extend(decode_audit(f.read_bytes(), origin="file").events)
    return events


def _every_kind() -> list[Event]:
    return [
        Event(event_id="a", kind=EventKind.APPROVAL, ts=T0, source="native", approver="bob", decision="granted",
              covers_tool_call_id="c1", expires_at=T0 + timedelta(minutes=5), identity=IdentitySource.NATIVE),
        Event(event_id="c", kind=EventKind.CONTROL_COMMAND, ts=T0, source="control", command_id="k",
              command_action="halt", command_scope=["rm", "dd"], target_agent_id="x", duration_ms=1.5,
              cost_usd=None, correlation={"request_id": "r"}, attributes={"k": "v"}, partition=3, offset=9),
    ]


def test_decoded_events_round_trip_exactly():
    events = _decoded() + _every_kind()
    assert len(events) > 50
    back = events_from_wire(events_to_wire(events))
    assert back == events
    for a, b in zip(back, events):
        assert a.model_dump() == b.model_dump()
        assert type(a.kind) is EventKind and type(a.identity) is IdentitySource
        assert a.ts.utcoffset() == timedelta(0) and a.ts == b.ts
    # each event owns its mutable fields (no default shared between events)
    back[0].attributes["x"] = "y"
    assert "x" not in back[1].attributes


def test_message_carries_marker_version_and_fields():
    data = orjson.loads(events_to_wire(_every_kind()))
    assert data[:3] == [MARKER, VERSION, list(FIELDS)]
    assert len(data) == 5


def test_other_version_is_refused():
    data = orjson.loads(events_to_wire(_every_kind()))
    data[1] = VERSION + 1
    with pytest.raises(InternalFormatError, match="version"):
        events_from_wire(orjson.dumps(data))


def test_field_unknown_to_this_worker_is_refused_by_name():
    data = orjson.loads(events_to_wire(_every_kind()))
    data[2].append("agent_colour")
    for row in data[3:]:
        row.append("red")
    with pytest.raises(InternalFormatError, match="agent_colour"):
        events_from_wire(orjson.dumps(data))


def test_older_writer_without_a_field_gets_its_default():
    events = _every_kind()
    data = orjson.loads(events_to_wire(events))
    i = data[2].index("command_scope")
    del data[2][i]
    for row in data[3:]:
        del row[i]
    back = events_from_wire(orjson.dumps(data))
    assert [e.command_scope for e in back] == [[], []]
    assert back[0].event_id == "a" and back[1].command_action == "halt"


@pytest.mark.parametrize("row", [["too", "short"], {"event_id": "x"}, 7])
def test_malformed_row_is_a_format_error(row):
    data = orjson.loads(events_to_wire(_every_kind()))
    data.append(row)
    with pytest.raises(InternalFormatError):
        events_from_wire(orjson.dumps(data))


def test_bad_values_in_a_well_formed_row_are_format_errors():
    data = orjson.loads(events_to_wire(_every_kind()))
    ts, kind = FIELDS.index("ts"), FIELDS.index("kind")
    data[3][ts] = "yesterday"
    with pytest.raises(InternalFormatError, match="yesterday"):
        events_from_wire(orjson.dumps(data))
    data[3][ts] = T0.isoformat()
    data[3][kind] = "teleport"
    with pytest.raises(InternalFormatError, match="teleport"):
        events_from_wire(orjson.dumps(data))


def test_previous_format_is_still_read_with_validation():
    events = _every_kind()
    assert events_from_wire(events_to_json(events)) == events
    assert events_from_wire(events[0].to_json()) == events[:1]
    with pytest.raises(Exception):
        events_from_wire(orjson.dumps([{"event_id": "", "kind": "tool_call"}]))
    with pytest.raises(InternalFormatError):
        events_from_wire(b'"a string"')
