"""agentwatch's own audit event (``kind: audit``), for systems with no audit log of their own."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from schemas.decoders.audit_base import (
    _HEX16,
    _HEX32,
    _audit_event,
    _compact,
    CORR_TOOL_CALL_ID,
    _Ctx,
    _parse_ts,
    _require,
    SOURCE_NATIVE,
    _str,
)
from schemas.errors import DecodeError
from schemas.events import AUDIT_OUTCOMES, Event, IdentitySource, stable_id


_NATIVE_ID_FIELDS = ("ts", "principal", "action", "resource", "outcome", "trace_id", "span_id", "tool_call_id")


def _native_event(doc: Mapping[str, Any], ctx: _Ctx) -> Event:
    fmt = SOURCE_NATIVE
    principal = _require(doc, "principal", fmt)
    action = _require(doc, "action", fmt)
    outcome = _require(doc, "outcome", fmt)
    if outcome not in AUDIT_OUTCOMES:
        raise DecodeError(f"native_audit: field 'outcome' is {outcome!r}, expected one of {sorted(AUDIT_OUTCOMES)}")
    ts = _parse_ts(doc.get("ts"), "ts", fmt)
    trace_id, span_id = _str(doc, "trace_id").lower(), _str(doc, "span_id").lower()
    if trace_id and not _HEX32.match(trace_id):
        raise DecodeError(f"native_audit: field 'trace_id' is not 32 hex digits: {trace_id!r}")
    if span_id and not _HEX16.match(span_id):
        raise DecodeError(f"native_audit: field 'span_id' is not 16 hex digits: {span_id!r}")
    correlation = doc.get("correlation") or {}
    attributes = doc.get("attributes") or {}
    if not isinstance(correlation, Mapping) or not isinstance(attributes, Mapping):
        raise DecodeError("native_audit: 'correlation' and 'attributes' must be JSON objects")
    tool_call_id = _str(doc, "tool_call_id")
    agent_id = _str(doc, "agent_id")
    return _audit_event(
        ctx,
        SOURCE_NATIVE,
        # the client's own id when it sends one; else the fields that make the event what it is
        event_id=_str(doc, "event_id") or stable_id(SOURCE_NATIVE, *(_str(doc, f) for f in _NATIVE_ID_FIELDS)),
        ts=ts,
        tenant=_str(doc, "tenant") or ctx.tenant,
        agent_id=agent_id,
        identity=IdentitySource.NATIVE if agent_id else IdentitySource.UNKNOWN,
        name=action,
        principal=principal,
        action=action,
        resource=_str(doc, "resource"),
        outcome=outcome,
        trace_id=trace_id,
        span_id=span_id,
        tool_call_id=tool_call_id,
        correlation=_compact(correlation.items()) | _compact([(CORR_TOOL_CALL_ID, tool_call_id)]),
        attributes=_compact(attributes.items()),
    )
