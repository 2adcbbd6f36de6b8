"""The internal format of events on agentwatch's own topics (by_trace, by_agent).

Hostile input is validated once, when it is decoded at ingest. What the stages
send each other after that was produced by agentwatch from validated events,
so re-validating it at every hop (``model_validate`` of every event, twice per
event's journey) bought nothing and cost about a third of the worker. Here a
batch travels as one JSON array:

    ["agentwatch.events", 1, [field names...], [values of event 1...], ...]

Each event is a row of its field values in the order the header names them
(taken from the writer's ``Event.__dict__`` in one C-level call, serialised by
orjson in C: no ``model_dump``), and is read back into an ``Event`` without
validation: the row is zipped with the header, its timestamps and enums are
restored, and the dict becomes the model's ``__dict__`` directly. Rows are
40% of the size of the same events as JSON objects, and decode faster.

A format change is detected, not misread: the marker and version must match,
and a header naming a field this version does not know (an event written by a
newer worker) is refused with the field's name (the caller dead-letters it).
A header that lacks fields this version has (an older writer) decodes with
those fields at their defaults. A message without the marker is the previous
format (a JSON array of event objects, still in topics and state replays after
an upgrade): it is read through full validation, as untrusted data.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from operator import itemgetter
from typing import Any

import orjson

from schemas.errors import DecodeError
from schemas.events import Event, EventKind, IdentitySource

MARKER = "agentwatch.events"
VERSION = 1

FIELDS: tuple[str, ...] = tuple(Event.model_fields)
# an event's field values in FIELDS order, out of its __dict__ in one C-level call
row_of: Callable[[dict[str, Any]], tuple[Any, ...]] = itemgetter(*FIELDS)
_KNOWN = frozenset(FIELDS)
_ALL_SET = set(FIELDS)
_KINDS = {k.value: k for k in EventKind}
_IDENTITIES = {i.value: i for i in IdentitySource}
_fromiso = datetime.fromisoformat
_new_event = Event.__new__
_set = object.__setattr__


class InternalFormatError(DecodeError):
    """An internal message of another format or version than this worker's."""


def events_to_wire(events: Sequence[Event]) -> bytes:
    """A batch of events as one internal message (see the module doc)."""
    rows: list[Any] = [MARKER, VERSION, FIELDS]
    rows.extend(row_of(e.__dict__) for e in events)
    return orjson.dumps(rows)


def events_from_wire(payload: bytes) -> list[Event]:
    """The events of one internal message, without re-validating them."""
    data = orjson.loads(payload)
    if not (isinstance(data, list) and data and data[0] == MARKER):
        return _legacy(data)
    if len(data) < 3 or data[1] != VERSION:
        raise InternalFormatError(f"internal event message of version {data[1] if len(data) > 1 else None!r}, "
                                  f"this worker reads version {VERSION}")
    fields = data[2]
    if not isinstance(fields, list) or not all(isinstance(f, str) for f in fields):
        raise InternalFormatError("internal event message without a field list")
    unknown = [f for f in fields if f not in _KNOWN]
    if unknown:
        raise InternalFormatError(f"internal event message with fields this worker does not know: {unknown[:5]}")
    # an older writer's events lack the fields added since: they get their defaults
    missing = [(name, Event.model_fields[name]) for name in FIELDS if name not in fields]
    width = len(fields)
    kinds, identities, fromiso, all_set = _KINDS, _IDENTITIES, _fromiso, _ALL_SET
    out: list[Event] = []
    try:
        for row in data[3:]:
            if not isinstance(row, list) or len(row) != width:
                raise InternalFormatError(f"internal event row is not a list of {width} values")
            d = dict(zip(fields, row))
            for name, info in missing:
                d[name] = info.get_default(call_default_factory=True)
            d["kind"] = kinds[d["kind"]]
            d["identity"] = identities[d["identity"]]
            d["ts"] = fromiso(d["ts"])
            if d["expires_at"] is not None:
                d["expires_at"] = fromiso(d["expires_at"])
            e = _new_event(Event)
            _set(e, "__dict__", d)
            _set(e, "__pydantic_extra__", None)
            _set(e, "__pydantic_fields_set__", all_set.copy())
            _set(e, "__pydantic_private__", None)
            out.append(e)
    except InternalFormatError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise InternalFormatError(f"malformed internal event row: {type(exc).__name__}: {exc}"[:500]) from exc
    return out


def _legacy(data: Any) -> list[Event]:
    """The previous internal format (event objects), validated: it predates this marker."""
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise InternalFormatError(f"internal event message is a JSON {type(data).__name__}, not an array")
    return [Event.model_validate(d) for d in data]
