"""Native JSON events (the agentwatch client, native audit/approval producers) -> canonical events.

A Kafka message holds one JSON object or a JSON array of objects; a file holds
JSON lines. Each object is validated into ``Event`` on its own, so one bad
element becomes one ``Failure`` (its own bytes, a one-line reason naming the
field) and its neighbours still decode.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
from pydantic import ValidationError

from schemas.decoders import DecodeResult, Failure
from schemas.events import (
    AGENT_LIFECYCLE,
    APPROVAL_DECISIONS,
    AUDIT_OUTCOMES,
    TOOL_OUTCOMES,
    Event,
    EventKind,
    IdentitySource,
    fingerprint_arguments,
    stable_id,
)

SOURCE = "native"

# kind -> (field, allowed values, required): the per-kind vocabulary of DESIGN.md,
# which a flat model cannot express in its field types.
_KIND_RULES: dict[str, tuple[tuple[str, frozenset[str], bool], ...]] = {
    EventKind.TOOL_CALL: (("outcome", TOOL_OUTCOMES, False),),
    EventKind.LLM_CALL: (("outcome", TOOL_OUTCOMES, False),),
    EventKind.AGENT: (("lifecycle", AGENT_LIFECYCLE, True),),
    EventKind.AUDIT: (("outcome", AUDIT_OUTCOMES, False),),
    EventKind.APPROVAL: (("decision", APPROVAL_DECISIONS, True),),
}
_STRING_MAPS = ("attributes", "correlation")


class _Invalid(ValueError):
    """One element's problem; the message is the Failure reason after the prefix."""


def _unix_to_datetime(value: float) -> datetime:
    """Unix time in seconds, milliseconds, microseconds or nanoseconds, told apart by magnitude."""
    magnitude = abs(value)
    if magnitude >= 1e17:
        value /= 1e9
    elif magnitude >= 1e14:
        value /= 1e6
    elif magnitude >= 1e11:
        value /= 1e3
    return datetime.fromtimestamp(value, tz=UTC)


def _as_string_map(value: Any) -> dict[str, Any] | Any:
    # clients send numbers and booleans as attribute values; the model stores text
    if not isinstance(value, dict):
        return value  # let the model report the wrong type
    return {k: v if isinstance(v, str) else orjson.dumps(v).decode() for k, v in value.items()}


def _condense(exc: ValidationError) -> str:
    """pydantic's multi-line report as one line: ``field: message; field: message``."""
    parts = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"]) or "event"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


def _to_event(obj: Any, origin: str) -> Event:
    if not isinstance(obj, dict):
        raise _Invalid(f"expected a JSON object, got {type(obj).__name__}")
    data = dict(obj)
    if "event_id" not in data:
        # stable across replays: the same object always gets the same id
        data["event_id"] = stable_id(SOURCE, orjson.dumps(obj, option=orjson.OPT_SORT_KEYS, default=str).decode())
    ts = data.get("ts")
    if isinstance(ts, (int, float)) and not isinstance(ts, bool):
        data["ts"] = _unix_to_datetime(float(ts))
    if "arguments" in data:
        arguments = data.pop("arguments")
        data.setdefault("args_fingerprint", fingerprint_arguments(arguments))
    for name in _STRING_MAPS:
        if name in data:
            data[name] = _as_string_map(data[name])
    data.setdefault("source", SOURCE)
    if origin:
        data.setdefault("origin", origin)
    if data.get("agent_id"):
        data.setdefault("identity", IdentitySource.NATIVE)
    try:
        event = Event.model_validate(data)
    except ValidationError as exc:
        raise _Invalid(_condense(exc)) from None
    if event.kind is not EventKind.AUDIT and not event.agent_id:
        raise _Invalid(f"agent_id: required for kind {event.kind.value}")
    for field, allowed, required in _KIND_RULES.get(event.kind, ()):
        value = getattr(event, field)
        if (value or required) and value not in allowed:
            want = ", ".join(sorted(allowed))
            raise _Invalid(f"{field}: {value!r} is not one of {want} (kind {event.kind.value})")
    return event


def _decode_one(obj: Any, raw: bytes, where: str, origin: str, result: DecodeResult) -> None:
    try:
        result.events.append(_to_event(obj, origin))
    except _Invalid as exc:
        prefix = f"{SOURCE}: {where}: " if where else f"{SOURCE}: "
        result.failures.append(Failure(raw, prefix + str(exc), SOURCE))


def _decode_lines(payload: bytes, origin: str, first_error: str) -> DecodeResult:
    result = DecodeResult()
    lines = [(n, ln) for n, ln in enumerate(payload.splitlines(), 1) if ln.strip()]
    if len(lines) < 2:
        result.failures.append(Failure(payload, f"{SOURCE}: not JSON: {first_error}", SOURCE))
        return result
    for n, line in lines:
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            result.failures.append(Failure(line, f"{SOURCE}: line {n}: not JSON: {exc}", SOURCE))
            continue
        _decode_one(obj, line, f"line {n}", origin, result)
    return result


def decode_native(payload: bytes, *, origin: str = "") -> DecodeResult:
    """Decode one native message: a JSON object, a JSON array of objects, or JSON lines."""
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        return _decode_lines(payload, origin, str(exc))
    result = DecodeResult()
    if isinstance(doc, list):
        for i, obj in enumerate(doc):
            _decode_one(obj, orjson.dumps(obj), f"[{i}]", origin, result)
    else:
        _decode_one(doc, payload, "", origin, result)
    return result
