"""The internal format of events on agentwatch's own topics (by_trace, by_agent) and in
detector state snapshots.

Hostile input is validated once, when it is decoded at ingest. What the stages
send each other after that was produced by agentwatch from validated events,
so re-validating it at every hop (``model_validate`` of every event, twice per
event's journey) bought nothing and cost about a third of the worker. Here a
batch travels as one JSON array (version 2):

    ["agentwatch.events", 2, <order>, [<group>, ...]]
    group: [<kind>, {<field>: <value shared by the group>, ...}, [<field>, ...], [[<values of field>], ...]]

The events of one kind form a group, stored by column: a field at its default
in every event of the group is not written at all, a field with one value for
the whole group is written once (``source``, ``topic``, ``tenant``, ``identity``
usually are), and only the other fields are columns. ``order`` lists each
event's group index, so the batch reads back in its order (null when the batch
has one group). Fields with a mutable default (``attributes``, ``correlation``,
``command_scope``) are always columns: each event gets its own object from the
parser.

Both directions are C-level passes over the batch, no Python per event: the
writer takes each event's field values from its ``__dict__`` with one
itemgetter call, transposes a group with ``zip``, and tells shared and default
columns with ``tuple.count``; the reader copies a dict of the group's defaults
and shared values per event, stores each column into those dicts with ``map``,
parses timestamps and looks up enums column by column, and sets each dict as a
bare ``Event``'s ``__dict__`` through the slots' own descriptors, without
validation. Every event read gets its float timestamp (``ts_seconds``) filled in
the same pass.

The writer reads only the fields an event of the group was given: pydantic's
``fields_set`` (assignment adds to it; the decoders and stages that write
``__dict__`` directly add to it themselves, as ``model_copy`` needs), plus the
required and the mutable fields (those change in place, unseen). A field never
given is at its default. The events of a group read from the wire share one
``fields_set`` (the fields written for the group), so the test costs one
comparison per group there.

Detector state snapshots (``detectors/state.py``) hold events in the same
layout and read them with ``checked=True``: a snapshot comes back from a topic
after a restart, so each column's JSON types are checked against its field (one
``set(map(type, column))``), string containers item by item, identifiers for
emptiness, and timestamps normalised to UTC. A wrong value is refused by field
name; nothing is executed and no event with a mistyped field is produced.

A format change is detected, not misread: the marker and version must match,
and a group naming a field this version does not know (an event written by a
newer worker) is refused with the field's name (the caller dead-letters it). A
field a group lacks (an older writer's) reads as its default. Version 1
messages (a header of names, every event a row of all of them) are still read,
so topics written before an upgrade drain. A message without the marker is the
format before that (a JSON array of event objects): it is read through full
validation, as untrusted data.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timezone
from enum import Enum
from itertools import compress, repeat
from operator import attrgetter, eq, itemgetter, setitem
from types import NoneType
from typing import Any

import orjson
from pydantic import BaseModel

from schemas.errors import DecodeError
from schemas.events import Event, EventKind, IdentitySource, utc

MARKER = "agentwatch.events"
VERSION = 2
READABLE = (1, 2)

FIELDS: tuple[str, ...] = tuple(Event.model_fields)
# an event's field values in FIELDS order, out of its __dict__ in one C-level call
row_of: Callable[[dict[str, Any]], tuple[Any, ...]] = itemgetter(*FIELDS)
_INFO = Event.model_fields
_KNOWN = frozenset(FIELDS)
_KINDS = {k.value: k for k in EventKind}
_REQUIRED = frozenset(name for name, f in _INFO.items() if f.is_required())
_FACTORIES: dict[str, Callable[[], Any]] = {name: f.default_factory for name, f in _INFO.items()  # type: ignore[misc]
                                            if f.default_factory is not None}
# read from every event whatever its fields_set says: the required fields, and the mutable ones
# (changed in place, ev.attributes[k] = v, without pydantic seeing it)
_ALWAYS = _REQUIRED | _FACTORIES.keys()
_MAY_BE_DEFAULT = frozenset(FIELDS) - _ALWAYS
# enum fields other than kind (a group's), by their values
_ENUMS = {name: {m.value: m for m in f.annotation} for name, f in _INFO.items()
          if isinstance(f.annotation, type) and issubclass(f.annotation, Enum) and name != "kind"}
_UTC = timezone.utc
_fromiso = datetime.fromisoformat
_dict_of = attrgetter("__dict__")
_fields_set_of = attrgetter("__pydantic_fields_set__")
_kind_of = itemgetter("kind")
_ts_of = itemgetter("ts")
_timestamp = datetime.timestamp
_tzinfo_of = attrgetter("tzinfo")
_consume = deque(maxlen=0).extend
_copy = dict.copy

# an event's __dict__ with every field at its default, in the model's order (model_dump's);
# the fields without a default hold placeholders every group overwrites
_TEMPLATE: dict[str, Any] = {name: None if f.is_required() or f.default_factory else f.default
                             for name, f in _INFO.items()}
# an Event's slots, set through their descriptors: object.__setattr__ costs twice as much
_new_event = Event.__new__
_set_dict = BaseModel.__dict__["__dict__"].__set__
_set_extra = BaseModel.__dict__["__pydantic_extra__"].__set__
_set_fields_set = BaseModel.__dict__["__pydantic_fields_set__"].__set__
_set_private = BaseModel.__dict__["__pydantic_private__"].__set__
_set_ts_seconds = Event.__dict__["ts_seconds"].__set__

# checked reading (snapshots): the JSON types a field's values may have, by annotation. A field
# with an annotation missing here fails at import, so a new field cannot go unchecked.
_JSON_TYPES: dict[Any, frozenset[type]] = {
    str: frozenset({str}), int: frozenset({int}), bool: frozenset({bool}),
    float | None: frozenset({float, int, NoneType}), datetime: frozenset({str}),
    datetime | None: frozenset({str, NoneType}), EventKind: frozenset({str}), IdentitySource: frozenset({str}),
    dict[str, str]: frozenset({dict}), list[str]: frozenset({list}),
}
_ALLOWED: dict[str, frozenset[type]] = {name: _JSON_TYPES[f.annotation] for name, f in _INFO.items()}
_FLOATS = frozenset(name for name, f in _INFO.items() if f.annotation == float | None)
_NON_EMPTY = frozenset(name for name, f in _INFO.items() if any(getattr(m, "min_length", None) for m in f.metadata))

Columns = tuple[list[int] | None, list[list[Any]]]


class InternalFormatError(DecodeError):
    """An internal message of another format or version than this worker's."""


class RowError(ValueError):
    """Events in this layout that are malformed; the caller says where they came from."""


# -- writing ---------------------------------------------------------------------------------


# by kind, the fields not given to any event of that kind so far, and the others in model
# order (see _given); only ever shrinks
_never_given: dict[Any, tuple[frozenset[str], tuple[str, ...]]] = {}


def _given(kind: Any, group: Sequence[Event]) -> tuple[str, ...]:
    """The fields (in model order, kind left out) that may be away from their default in
    ``group``: those any event was given (pydantic's fields_set, which the decoders and
    stages keep when they write __dict__ directly), and the required and mutable ones. A
    field never given is at its default in every event, and is not read. What the kind's
    events were never given is remembered, so a batch costs a disjointness test per
    distinct fields_set object (events read together share one); reading more fields than
    needed changes nothing written, as defaults are left out."""
    sets = list(map(_fields_set_of, group))
    distinct = dict(zip(map(id, sets), sets)).values()
    unseen, names = _never_given.get(kind, (_MAY_BE_DEFAULT, ()))
    if not names or not all(map(unseen.isdisjoint, distinct)):
        unseen = unseen.difference(*distinct)
        names = tuple(n for n in FIELDS if n not in unseen and n != "kind")
        _never_given[kind] = (unseen, names)
    return names


def to_columns(events: Sequence[Event]) -> Columns:
    """``(order, groups)`` of a batch (see the module doc)."""
    kinds = list(map(_kind_of, map(_dict_of, events)))
    distinct = list(dict.fromkeys(kinds))
    groups: list[list[Any]] = []
    for kind in distinct:
        group = events if len(distinct) == 1 else list(compress(events, map(eq, kinds, repeat(kind))))
        n = len(group)
        given = _given(kind, group)
        shared: dict[str, Any] = {}
        names: list[str] = []
        columns: list[tuple[Any, ...]] = []
        rows = map(itemgetter(*given), map(_dict_of, group))
        for name, column in zip(given, zip(*rows)):
            first = column[0]
            # one value for the whole group (the last value usually tells a column apart)
            if name not in _FACTORIES and column[-1] == first and column.count(first) == n:
                if name in _REQUIRED or first != _INFO[name].default:
                    shared[name] = first
            else:
                names.append(name)
                columns.append(column)
        groups.append([str(kind), shared, names, columns])
    if len(distinct) < 2:
        return None, groups
    return list(map({k: i for i, k in enumerate(distinct)}.__getitem__, kinds)), groups


def events_to_wire(events: Sequence[Event], version: int = VERSION) -> bytes:
    """A batch of events as one internal message (see the module doc). ``version=1`` writes
    the layout before this one (a header of every field, then each event a row of all of
    them), which workers of older releases read, for the length of a rolling upgrade."""
    if version == 1:
        return orjson.dumps([MARKER, 1, FIELDS, *map(row_of, map(_dict_of, events))])
    if version != VERSION:
        raise ValueError(f"internal event messages are written in version 1 or {VERSION}, not {version!r}")
    order, groups = to_columns(events)
    return orjson.dumps([MARKER, VERSION, order, groups])


# -- reading ---------------------------------------------------------------------------------


def from_columns(order: Any, groups: Any, *, checked: bool = False) -> list[Event]:
    """The events of ``(order, groups)``; RowError for anything that is not this layout.

    Unchecked (internal topics, written by agentwatch from validated events): the layout,
    the field names, the kinds, enums and timestamps are checked, as reading them needs
    anyway. Checked (snapshots): also every value's JSON type, the contents of string
    containers, non-empty identifiers, and timestamps in UTC."""
    if not isinstance(groups, list):
        raise RowError(f"event groups are a JSON {type(groups).__name__}, not a list")
    try:
        batches = [_group(g, checked) for g in groups]
        if order is None:
            if len(batches) > 1:
                raise RowError(f"{len(batches)} event groups without an order")
            return batches[0] if batches else []
        if not isinstance(order, list):
            raise RowError(f"event order is a JSON {type(order).__name__}, not a list")
        # every index counted to its group's size: no index outside the groups, none exhausted
        if len(order) != sum(map(len, batches)) or any(order.count(i) != len(b) for i, b in enumerate(batches)):
            raise RowError("event order does not match the groups' sizes")
        iters = [iter(b) for b in batches]
        return list(map(next, map(iters.__getitem__, order)))
    except RowError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, ArithmeticError) as exc:
        raise RowError(f"malformed events: {type(exc).__name__}: {exc}"[:500]) from exc


def _group(group: Any, checked: bool) -> list[Event]:
    """The events of one group (see the module doc)."""
    if not (isinstance(group, list) and len(group) == 4):
        raise RowError("event group is not [kind, shared, fields, columns]")
    kind_value, shared, names, columns = group
    kind = _KINDS.get(kind_value) if isinstance(kind_value, str) else None
    if kind is None:
        raise RowError(f"events of a kind this worker does not know: {kind_value!r}"[:200])
    if not (isinstance(shared, dict) and isinstance(names, list) and isinstance(columns, list)
            and len(names) == len(columns) and all(type(c) is list for c in columns)):
        raise RowError(f"{kind_value} event group is malformed")
    if not all(isinstance(n, str) for n in names):
        raise RowError(f"{kind_value} event group's field names are not strings")
    unknown = [n for n in (*shared, *names) if n not in _KNOWN]
    if unknown:
        raise RowError(f"{kind_value} events with fields this worker does not know: {unknown[:5]}"[:300])
    if "kind" in shared or "kind" in names:
        raise RowError(f"{kind_value} event group names kind as a field: the group's own")
    if len(set(names)) != len(names) or not shared.keys().isdisjoint(names):
        raise RowError(f"{kind_value} event group repeats a field")
    lacking = [n for n in _REQUIRED if n != "kind" and n not in shared and n not in names]
    if lacking:
        raise RowError(f"{kind_value} events without the required fields {lacking}")
    mutable_shared = [n for n in shared if n in _FACTORIES]
    if mutable_shared or not columns:
        raise RowError(f"{kind_value} event group shares {mutable_shared or 'every field'}")
    m = len(columns[0])
    if any(len(c) != m for c in columns):
        raise RowError(f"{kind_value} event group's columns differ in length")

    template = _TEMPLATE.copy()
    template["kind"] = kind
    for name, value in shared.items():
        if checked:
            (value,) = _checked(name, [value])
        template[name] = _converted(name, [value])[0]
    dicts = list(map(_copy, repeat(template, m)))
    for name, column in zip(names, columns):
        if checked:
            column = _checked(name, column)
        _consume(map(setitem, dicts, repeat(name), _converted(name, column)))
    for name, factory in _FACTORIES.items():  # an older writer's group may lack one: fresh defaults
        if name not in names:
            _consume(map(setitem, dicts, repeat(name), map(_call, repeat(factory, m))))
    if checked:
        _normalise_times(dicts)

    events = list(map(_new_event, repeat(Event, m)))
    _consume(map(_set_dict, events, dicts))
    _consume(map(_set_extra, events, repeat(None)))
    # one fields_set for the group: the fields written for it. Assigning a field of one event
    # adds its name for all of them, which only makes the next writer read that field of each
    _consume(map(_set_fields_set, events, repeat({"kind", *shared, *names})))
    _consume(map(_set_private, events, repeat(None)))
    # the stages read every event's ts_seconds, several times: converted here, column-wise (a
    # slot left unset would cost its first reader an exception to find it so)
    if "ts" in shared:
        seconds: Iterable[float] = repeat(template["ts"].timestamp())
    else:
        seconds = map(_timestamp, map(_ts_of, dicts))
    _consume(map(_set_ts_seconds, events, seconds))
    return events


def _call(factory: Callable[[], Any]) -> Any:
    return factory()


def _converted(name: str, column: list[Any]) -> list[Any]:
    """A column's JSON values as the model's values: timestamps parsed, enums looked up."""
    annotation = _INFO[name].annotation
    if annotation is datetime:
        return list(map(_fromiso, column))
    if annotation == datetime | None:
        return [None if v is None else _fromiso(v) for v in column]
    if name in _ENUMS:
        return list(map(_ENUMS[name].__getitem__, column))
    return column


def _checked(name: str, column: list[Any]) -> list[Any]:
    """A snapshot's column with each value of a JSON type its field allows (integers in a
    float field become floats), string containers holding strings, identifiers non-empty."""
    types = set(map(type, column))
    wrong = types - _ALLOWED[name]
    if wrong:
        raise RowError(f"event field {name} holds a JSON {min(t.__name__ for t in wrong)}")
    if name in _FLOATS and int in types:
        column = [float(v) if type(v) is int else v for v in column]
    if types & {dict, list}:
        for v in column:
            if not all(type(x) is str for x in (v.values() if type(v) is dict else v)):
                raise RowError(f"event field {name} holds a value that is not a string")
    if name in _NON_EMPTY and not all(column):
        raise RowError(f"event field {name} is empty")
    return column


def _normalise_times(dicts: list[dict[str, Any]]) -> None:
    """Timestamps in UTC (naive ones taken as UTC, as the model's validator does)."""
    for name in ("ts", "expires_at"):
        values = set(map(_tzinfo_of, filter(None, map(itemgetter(name), dicts))))
        if values - {_UTC}:
            for d in dicts:
                if d[name] is not None and d[name].tzinfo is not _UTC:
                    d[name] = utc(d[name])


def events_from_wire(payload: bytes) -> list[Event]:
    """The events of one internal message, without re-validating them."""
    data = orjson.loads(payload)
    if not (isinstance(data, list) and data and data[0] == MARKER):
        return _legacy(data)
    version = data[1] if len(data) > 1 else None
    try:
        if version == VERSION and len(data) == 4:
            return from_columns(data[2], data[3])
        if version == 1 and len(data) >= 3:
            return _version_1(data)
    except RowError as exc:
        raise InternalFormatError(f"internal event message: {exc}") from exc
    raise InternalFormatError(f"internal event message of version {version!r} ({len(data)} parts), "
                              f"this worker reads versions {READABLE}")


def _version_1(data: list[Any]) -> list[Event]:
    """A version 1 message: a header of field names, every event a row of all of them; read
    as one group per kind."""
    fields, rows = data[2], data[3:]
    if not isinstance(fields, list) or not all(isinstance(f, str) for f in fields) or "kind" not in fields:
        raise RowError("version 1 message without a field list")
    if not all(type(r) is list and len(r) == len(fields) for r in rows):
        raise RowError(f"version 1 event row is not a list of {len(fields)} values")
    at = fields.index("kind")
    names = [f for f in fields if f != "kind"]
    kinds = [r[at] for r in rows]
    if not all(isinstance(k, str) for k in kinds):
        raise RowError("version 1 event of a kind that is not a string")
    distinct = list(dict.fromkeys(kinds))
    groups = []
    for kind in distinct:
        members = [r[:at] + r[at + 1:] for r, k in zip(rows, kinds) if k == kind]
        groups.append([kind, {}, names, [list(c) for c in zip(*members)]])
    order = None if len(distinct) < 2 else [distinct.index(k) for k in kinds]
    return from_columns(order, groups)


def _legacy(data: Any) -> list[Event]:
    """The format before version 1 (event objects), validated: it predates this marker."""
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise InternalFormatError(f"internal event message is a JSON {type(data).__name__}, not an array")
    return [Event.model_validate(d) for d in data]
