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
from schemas.internal_wire import (FIELDS, MARKER, VERSION, InternalFormatError, RowError, events_from_wire,
                                   events_to_wire, from_columns, row_of)

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


def test_message_groups_events_by_kind_with_shared_values_written_once():
    events = _every_kind() + [Event(event_id="m", kind=EventKind.APPROVAL, ts=T0, source="native")]
    data = orjson.loads(events_to_wire(events))
    assert data[:2] == [MARKER, VERSION]
    order, groups = data[2:]
    assert order == [0, 1, 0]  # the batch's order: approval, control_command, approval
    (kind, shared, names, columns), (kind2, *_) = groups
    assert (kind, kind2) == ("approval", "control_command")
    assert shared == {"ts": T0.isoformat(), "source": "native"}  # one value for the group: written once
    column = dict(zip(names, columns))
    assert column["event_id"] == ["a", "m"] and column["approver"] == ["bob", ""]
    assert column["attributes"] == [{}, {}]  # mutable fields are columns: a fresh object each
    assert "tool_name" not in names and "tool_name" not in shared  # at its default throughout
    assert events_from_wire(events_to_wire(events)) == events


def test_a_single_kind_batch_has_no_order():
    events = _every_kind()[:1] * 3
    assert orjson.loads(events_to_wire(events))[2] is None
    assert events_from_wire(events_to_wire(events)) == events
    assert events_from_wire(events_to_wire([])) == []


def _mangled(edit) -> bytes:
    data = orjson.loads(events_to_wire(_every_kind()))
    edit(data)
    return orjson.dumps(data)


def test_other_version_is_refused():
    data = orjson.loads(events_to_wire(_every_kind()))
    data[1] = VERSION + 1
    with pytest.raises(InternalFormatError, match="version"):
        events_from_wire(orjson.dumps(data))


def test_field_unknown_to_this_worker_is_refused_by_name():
    def colour(data):
        group = data[3][0]
        group[2].append("agent_colour")
        group[3].append(["red"])
    with pytest.raises(InternalFormatError, match="agent_colour"):
        events_from_wire(_mangled(colour))


def test_older_writer_without_a_field_gets_its_default():
    def without_scope(data):
        for group in data[3]:
            i = group[2].index("command_scope")
            del group[2][i], group[3][i]
    back = events_from_wire(_mangled(without_scope))
    assert [e.command_scope for e in back] == [[], []]
    back[0].command_scope.append("x")  # a fresh default each
    assert back[1].command_scope == []
    assert back[0].event_id == "a" and back[1].command_action == "halt"


def _set(path, value):
    def edit(data):
        node = data
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
    return edit


@pytest.mark.parametrize("edit", [
    _set([3], {}), _set([3, 0], ["approval", {}, []]), _set([3, 0, 0], "teleport"), _set([3, 0, 0], ["approval"]),
    _set([3, 0, 1], ["source"]), _set([3, 0, 2], "event_id"), _set([3, 0, 2, 0], 7),
    _set([3, 0, 3, 0], "a"), _set([3, 0, 3, 0], ["a", "b"]), _set([3, 0, 3], []),
    _set([3, 0, 1, "attributes"], {}), _set([3, 0, 2, 0], "attributes"),
    _set([2], [0, 0]), _set([2], [0, 2]), _set([2], [0, -1]), _set([2], [1, 0, 0]), _set([2], None), _set([2], "01"),
])
def test_malformed_message_is_a_format_error(edit):
    with pytest.raises(InternalFormatError):
        events_from_wire(_mangled(edit))


def test_a_group_without_a_required_field_is_refused():
    def without_source(data):
        data[3][0][1].pop("source", None)
        names = data[3][0][2]
        if "source" in names:
            del data[3][0][3][names.index("source")], names[names.index("source")]
    with pytest.raises(InternalFormatError, match="source"):
        events_from_wire(_mangled(without_source))


def test_bad_values_in_a_well_formed_message_are_format_errors():
    data = orjson.loads(events_to_wire(_every_kind()))
    data[3][0][1]["ts"] = "yesterday"
    with pytest.raises(InternalFormatError, match="yesterday"):
        events_from_wire(orjson.dumps(data))
    data[3][0][1]["ts"] = T0.isoformat()
    data[3][0][1]["identity"] = "psychic"
    with pytest.raises(InternalFormatError, match="psychic"):
        events_from_wire(orjson.dumps(data))


def _version_1(events: list[Event]) -> list[object]:
    """A message as the version 1 writer wrote it: every field of every event."""
    return [MARKER, 1, list(FIELDS), *orjson.loads(orjson.dumps([row_of(e.__dict__) for e in events]))]


def test_version_1_messages_are_still_read():
    events = _decoded()[:40] + _every_kind()
    assert events_from_wire(orjson.dumps(_version_1(events))) == events
    data = _version_1(_every_kind())
    i = data[2].index("command_scope")
    for row in [data[2], *data[3:]]:
        del row[i]
    assert [e.command_scope for e in events_from_wire(orjson.dumps(data))] == [[], []]
    data[2].append("agent_colour")
    for row in data[3:]:
        row.append("red")
    with pytest.raises(InternalFormatError, match="agent_colour"):
        events_from_wire(orjson.dumps(data))
    with pytest.raises(InternalFormatError):
        events_from_wire(orjson.dumps([MARKER, 1, list(FIELDS), ["too", "short"]]))


def test_a_group_shares_the_fields_set_of_what_was_written_and_assignment_is_written_next():
    approval = _every_kind()[0]
    other = Event(event_id="m", kind=EventKind.APPROVAL, ts=T0, source="native")
    a, b = events_from_wire(events_to_wire([approval, other]))
    assert a.__pydantic_fields_set__ is b.__pydantic_fields_set__
    assert {"event_id", "approver", "expires_at"} <= a.model_fields_set and "tool_name" not in a.model_fields_set
    a.tool_name = "rm"  # pydantic adds the name to the shared set: the next writer reads it of both
    b.attributes["k"] = "v"  # changed in place, unseen by pydantic: mutable fields are always read
    again = events_from_wire(events_to_wire([a, b]))
    assert [e.tool_name for e in again] == ["rm", ""] and again[1].attributes == {"k": "v"}
    assert again == [a, b]
    c = a.model_copy(update={"tenant": "t"})
    assert c.__pydantic_fields_set__ is not a.__pydantic_fields_set__ and "tenant" not in a.model_fields_set


def test_every_field_away_from_its_default_is_written():
    """The writer reads the fields an event was given (pydantic's fields_set, which the
    decoders and stages keep when they write __dict__ directly): each field, set alone."""
    for name, info in Event.model_fields.items():
        if info.is_required() or name == "kind":
            continue
        value = {str: "x", int: 7, bool: True, float | None: 1.5, dict[str, str]: {"k": "v"}, list[str]: ["v"],
                 datetime | None: T0, IdentitySource: IdentitySource.JOIN}[info.annotation]
        ev = Event(event_id="e", kind=EventKind.SPAN, ts=T0, source="s", **{name: value})
        (back,) = events_from_wire(events_to_wire([ev]))
        assert getattr(back, name) == value and back == ev, name


def test_events_read_hold_the_model_fields_in_order_and_their_float_timestamp():
    events = _every_kind() * 2
    for e in events_from_wire(events_to_wire(events)):
        assert list(e.__dict__) == list(FIELDS)  # exactly the model's fields, in model_dump's order
        assert Event.__dict__["ts_seconds"].__get__(e) == e.ts.timestamp()  # converted while reading


def _layout(events: list[Event]) -> list:
    return orjson.loads(events_to_wire(events))[2:]


def _places(layout):
    """(group, field, setter) for every shared value and every column's first value."""
    for group in layout[1]:
        for name in group[1]:
            yield group, name, (lambda v, g=group, n=name: g[1].__setitem__(n, v))
        for name, column in zip(group[2], group[3]):
            yield group, name, (lambda v, c=column: c.__setitem__(0, v))


def test_checked_reading_refuses_each_mistyped_field_by_name():
    events = _every_kind() * 2
    assert from_columns(*_layout(events), checked=True) == events
    for i in range(len(list(_places(_layout(events))))):
        for bad in (7, 1.5, True, None, "x", [1], {"k": 1}, ""):
            layout = _layout(events)
            group, name, put = list(_places(layout))[i]
            put(bad)
            try:
                back = from_columns(*layout, checked=True)
            except RowError:
                continue
            # what is accepted is well typed: a model validation of it changes nothing
            for ev in back:
                assert Event.model_validate(ev.model_dump()) == ev, (name, bad)


@pytest.mark.parametrize("field,value,match", [
    ("attributes", {"k": 1}, "attributes"), ("command_scope", ["rm", 2], "command_scope"),
    ("event_id", "", "event_id"), ("source", "", "source"), ("partition", 1.5, "partition"),
    ("partition", True, "partition"), ("identity", 7, "identity"), ("ts", 1700000000, "ts"),
])
def test_checked_reading_refuses_wrong_values(field, value, match):
    layout = _layout(_every_kind() * 2)
    next(put for _, name, put in _places(layout) if name == field)(value)
    with pytest.raises(RowError, match=match):
        from_columns(*layout, checked=True)


def test_checked_reading_normalises_timestamps_and_numbers():
    layout = _layout(_every_kind()[1:])
    group = layout[1][0]
    group[1]["ts"] = "2026-11-25T13:00:00.123456+01:00"
    group[1]["duration_ms"] = 2
    (ev,) = from_columns(*layout, checked=True)
    assert ev.ts == T0 and ev.ts.tzinfo is timezone.utc and ev.ts_seconds == T0.timestamp()
    assert ev.duration_ms == 2.0 and type(ev.duration_ms) is float


def test_previous_format_is_still_read_with_validation():
    events = _every_kind()
    assert events_from_wire(events_to_json(events)) == events
    assert events_from_wire(events[0].to_json()) == events[:1]
    with pytest.raises(Exception):
        events_from_wire(orjson.dumps([{"event_id": "", "kind": "tool_call"}]))
    with pytest.raises(InternalFormatError):
        events_from_wire(b'"a string"')


def test_version_1_writes_what_the_previous_release_wrote_and_reads():
    # a rolling upgrade: until every worker reads version 2, new workers write version 1
    # (AGENTWATCH_INTERNAL_FORMAT_VERSION=1). The fixture is a message the previous release's
    # writer made of these events, byte for byte, so its reader takes what we write.
    events = _every_kind() + _decoded()[:20]
    written_then = (FIXTURES / "internal" / "v1_message.json").read_bytes()
    assert events_to_wire(events, 1) == written_then
    assert events_from_wire(written_then) == events
    with pytest.raises(ValueError, match="version 1 or 2"):
        events_to_wire(events, 3)


def test_the_written_version_is_a_setting_checked_by_name(monkeypatch):
    from schemas.errors import ConfigError
    from streams.settings import load_settings

    monkeypatch.setenv("AGENTWATCH_INTERNAL_FORMAT_VERSION", "1")
    assert load_settings().internal_format_version == 1
    monkeypatch.setenv("AGENTWATCH_INTERNAL_FORMAT_VERSION", "3")
    with pytest.raises(ConfigError, match="AGENTWATCH_INTERNAL_FORMAT_VERSION: Input should be less than or equal to 2"):
        load_settings()
