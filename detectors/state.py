"""Detector state as bytes: the snapshot format shared by every stateful detector object.

A snapshot is one JSON document (orjson), never pickle: snapshots travel
through Kafka topics, which are hostile input, so restoring one only ever
builds plain values, ``Event``s (every field's type checked) and the
project's own classes; a corrupt, truncated or foreign snapshot raises
``schemas.errors.StateError`` and executes nothing.

Envelope::

    {"format": "agentwatch.state", "version": 3, "kind": "<engine|identity|join>",
     "events": [<order>, [<group>, ...]], "state": {...}}

Events are in the internal topics' layout (``schemas.internal_wire``: grouped
by kind, stored by column, defaults left out): a stage snapshots its state
every few seconds, and a join holding its allowed lateness of spans holds
many, so writing them is C-level column building, not a ``model_dump``.
Restoring reads them through the same pass as the internal topics, with each
column's types checked against its field instead of a pydantic validation: a
snapshot comes from a topic, so a mistyped, foreign or truncated event is
refused with StateError naming the field. Version 2 snapshots (every event a
row of all fields under one ``fields`` header) and version 1 (events as JSON
objects) are still read, validated by the model.

Events held in several places (a call in a retry window and in a failure
streak) are written once in ``events`` and referenced by index, so a snapshot
costs one copy per held event and restoring keeps them one object.

Numbers that may be infinite (a watermark before the first event, a halt that
never expires) are written as the strings ``"inf"`` / ``"-inf"``: JSON has no
infinity and orjson would write ``null``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import orjson
from pydantic import ValidationError

from schemas.errors import StateError
from schemas.events import Event
from schemas.internal_wire import RowError, from_columns, to_columns

FORMAT = "agentwatch.state"
VERSION = 3
READABLE = (1, 2, 3)


class Encoder:
    """Collects the events a snapshot refers to; each object is written once."""

    __slots__ = ("events", "_refs")

    def __init__(self) -> None:
        # the events themselves, not their ids alone: alive until dumps, an id is never reused
        self.events: list[Event] = []
        self._refs: dict[int, int] = {}

    def event(self, ev: Event) -> int:
        ref = self._refs.setdefault(id(ev), len(self.events))
        if ref == len(self.events):
            self.events.append(ev)
        return ref

    def dumps(self, kind: str, state: dict[str, Any]) -> bytes:
        return orjson.dumps({"format": FORMAT, "version": VERSION, "kind": kind, "events": to_columns(self.events),
                             "state": state})


class Decoder:
    """Resolves event references of a snapshot. Version 3 events are read (and checked) all
    at once by ``loads``; versions 1 and 2 are validated by the model, each on first use."""

    __slots__ = ("_raw", "_objs", "_fields")

    def __init__(self, raw: list[Any], fields: list[str] | None = None, events: list[Event] | None = None) -> None:
        self._raw = raw
        self._objs: list[Event | None] = [None] * len(raw) if events is None else events  # type: ignore[assignment]
        self._fields = fields  # version 2: events are rows of these fields; version 1: objects

    def event(self, ref: Any) -> Event:
        i = integer(ref)
        if not 0 <= i < len(self._objs):
            raise StateError(f"event reference {i} out of range")
        ev = self._objs[i]
        if ev is None:
            raw = self._raw[i]
            if self._fields is not None:
                row = seq(raw)
                if len(row) != len(self._fields):
                    raise StateError(f"event {i} has {len(row)} values for {len(self._fields)} fields")
                raw = dict(zip(self._fields, row))
            ev = self._objs[i] = Event.model_validate(mapping(raw))
        return ev


def loads(kind: str, data: bytes) -> tuple[dict[str, Any], Decoder]:
    """The state dict and event decoder of a snapshot of ``kind``; StateError if it is not one."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise StateError(f"{kind} snapshot: expected bytes, got {type(data).__name__}")
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise StateError(f"{kind} snapshot: not JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise StateError(f"{kind} snapshot: not an agentwatch state snapshot")
    version = doc.get("version")
    if version not in READABLE:
        raise StateError(f"{kind} snapshot: format version {version!r}, this build reads {READABLE}")
    if doc.get("kind") != kind:
        raise StateError(f"{kind} snapshot: it holds {doc.get('kind')!r} state")
    state, raw = mapping(doc.get("state")), seq(doc.get("events"))
    if version == 3:
        if len(raw) != 2:
            raise StateError(f"{kind} snapshot: events are not [order, groups]")
        try:
            return state, Decoder(raw, events=from_columns(*raw, checked=True))
        except RowError as exc:
            raise StateError(f"{kind} snapshot: {exc}") from None
    return state, Decoder(raw, texts(doc.get("fields")) if version == 2 else None)


@contextmanager
def reading(kind: str, data: bytes) -> Iterator[tuple[dict[str, Any], Decoder]]:
    """``with reading(kind, data) as (state, dec):`` the snapshot's state; whatever a
    malformed state makes the restore code trip over becomes StateError."""
    state, dec = loads(kind, data)
    try:
        yield state, dec
    except StateError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RecursionError, ValidationError) as exc:
        raise StateError(f"{kind} snapshot is corrupt: {type(exc).__name__}: {exc}") from None


# -- checked value readers: a wrong type is a corrupt snapshot, not a later crash ------------


def num(v: Any) -> float:
    if isinstance(v, bool):
        raise StateError(f"expected a number, got {v!r}")
    if isinstance(v, (int, float)):
        x = float(v)
        if math.isnan(x):
            raise StateError("expected a number, got NaN")
        return x
    if v == "inf":
        return math.inf
    if v == "-inf":
        return -math.inf
    raise StateError(f"expected a number, got {type(v).__name__}")


def opt_num(v: Any) -> float | None:
    return None if v is None else num(v)


def enc_num(x: float) -> float | str:
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def enc_opt_num(x: float | None) -> float | str | None:
    return None if x is None else enc_num(x)


def integer(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise StateError(f"expected an integer, got {type(v).__name__}")
    return v


def opt_integer(v: Any) -> int | None:
    return None if v is None else integer(v)


def text(v: Any) -> str:
    if not isinstance(v, str):
        raise StateError(f"expected a string, got {type(v).__name__}")
    return v


def boolean(v: Any) -> bool:
    if not isinstance(v, bool):
        raise StateError(f"expected true/false, got {type(v).__name__}")
    return v


def seq(v: Any) -> list[Any]:
    if not isinstance(v, list):
        raise StateError(f"expected a list, got {type(v).__name__}")
    return v


def mapping(v: Any) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise StateError(f"expected an object, got {type(v).__name__}")
    return v


def key(v: Any) -> Any:
    """A dict or timer key written as JSON: lists become tuples again (keys are tuples of
    strings and numbers, possibly nested)."""
    if isinstance(v, list):
        return tuple(key(x) for x in v)
    if isinstance(v, (str, int, float)) and not isinstance(v, bool):
        return v
    raise StateError(f"expected a key, got {type(v).__name__}")


def texts(v: Any) -> list[str]:
    return [text(x) for x in seq(v)]
