"""The canonical event model's own behaviour: the float timestamp the detectors read."""

from __future__ import annotations

import copy
import pickle
from datetime import datetime, timedelta, timezone

import pytest

from schemas.events import Event, EventKind

T0 = datetime(2026, 11, 25, 12, 0, 0, 123456, tzinfo=timezone.utc)


def _event() -> Event:
    return Event(event_id="e", kind=EventKind.TOOL_CALL, ts=T0, source="native", tool_name="rm")


def test_ts_seconds_is_converted_once_and_kept_outside_the_fields():
    e = _event()
    assert e.ts_seconds == T0.timestamp()
    e.__dict__["ts"] = T0 + timedelta(days=1)  # behind the model's back: not converted again
    assert e.ts_seconds == T0.timestamp()  # kept, a plain attribute read
    e = _event()
    e.ts_seconds  # noqa: B018 (converted and kept)
    # not a field: the store's columns, dumps, equality and copies see only the model's fields
    assert list(e.__dict__) == list(Event.model_fields) and "ts_seconds" not in e.model_dump()
    assert e == _event() and e.model_fields_set == _event().model_fields_set


def test_ts_seconds_follows_an_assigned_ts_and_copies():
    e = _event()
    assert e.ts_seconds == T0.timestamp()
    e.ts = T0 + timedelta(seconds=90)  # through pydantic: ts_seconds is forgotten
    assert e.ts_seconds == T0.timestamp() + 90 and "ts" in e.model_fields_set and e.ts == T0 + timedelta(seconds=90)
    moved = e.model_copy(update={"ts": T0 - timedelta(seconds=1)})
    assert moved.ts_seconds == T0.timestamp() - 1 and e.ts_seconds == T0.timestamp() + 90
    for twin in (pickle.loads(pickle.dumps(e)), copy.deepcopy(e), copy.copy(e), e.model_copy()):
        assert twin.ts_seconds == e.ts_seconds and twin == e


def test_ts_seconds_cannot_be_set_and_other_missing_attributes_still_raise():
    e = _event()
    with pytest.raises(ValueError, match="no field"):
        e.ts_seconds = 1.0  # derived from ts
    with pytest.raises(AttributeError):
        e.no_such_attribute  # noqa: B018
    assert e.total_tokens == 0
