"""Native JSON events: object, array and JSON lines; one bad element, one failure."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest

from schemas.decoders.native import decode_native
from schemas.events import EventKind, IdentitySource, fingerprint_arguments

TS = datetime(2026, 1, 15, 10, 0, tzinfo=UTC)

TOOL = {
    "kind": "tool_call",
    "ts": "2026-01-15T10:00:00Z",
    "agent_id": "agent-1",
    "tool_name": "refund_payment",
    "arguments": {"order_id": "A-1", "amount": 3},
    "outcome": "ok",
    "trace_id": "0af7651916cd43dd8448eb211c80319c",
}


def test_single_object():
    result = decode_native(orjson.dumps(TOOL), origin="agentwatch.events.in")
    assert not result.failures
    (e,) = result.events
    assert e.kind is EventKind.TOOL_CALL and e.ts == TS
    assert (e.source, e.origin, e.identity) == ("native", "agentwatch.events.in", IdentitySource.NATIVE)
    assert e.args_fingerprint == fingerprint_arguments('{"amount":3, "order_id":"A-1"}')
    assert e.event_id  # filled, stable
    assert decode_native(orjson.dumps(TOOL)).events[0].event_id == e.event_id
    assert decode_native(orjson.dumps({**TOOL, "outcome": "error"})).events[0].event_id != e.event_id


def test_given_event_id_is_kept():
    (e,) = decode_native(orjson.dumps({**TOOL, "event_id": "ev-1"})).events
    assert e.event_id == "ev-1"


@pytest.mark.parametrize(
    "ts", [1768471200, 1768471200.0, 1768471200000, 1768471200000000000, "2026-01-15T11:00:00+01:00"]
)
def test_timestamps(ts):
    (e,) = decode_native(orjson.dumps({**TOOL, "ts": ts})).events
    assert e.ts == TS


def test_array_with_a_bad_element():
    items = [
        TOOL,
        {**TOOL, "ts": "yesterday"},
        {
            "kind": "audit",
            "ts": 1768471200,
            "principal": "system:serviceaccount:a",
            "action": "delete",
            "outcome": "deny",
        },
        {**TOOL, "agent_id": ""},
        7,
        {**TOOL, "colour": "blue"},
        {"kind": "approval", "ts": 1768471200, "agent_id": "a", "approver": "bob", "decision": "maybe"},
        {"kind": "agent", "ts": 1768471200, "agent_id": "b", "lifecycle": "restart", "target_agent_id": "a"},
        {"kind": "control_ack", "ts": 1768471200, "agent_id": "a", "command_id": "c-1", "outcome": "ok"},
    ]
    result = decode_native(orjson.dumps(items))
    assert [e.kind.value for e in result.events] == ["tool_call", "audit", "agent", "control_ack"]
    audit = result.events[1]
    assert audit.agent_id == "" and audit.identity is IdentitySource.UNKNOWN
    reasons = [f.reason for f in result.failures]
    assert reasons[0].startswith("native: [1]: ts: Input should be a valid datetime")
    assert reasons[1:] == [
        "native: [3]: agent_id: required for kind tool_call",
        "native: [4]: expected a JSON object, got int",
        "native: [5]: colour: Extra inputs are not permitted",
        "native: [6]: decision: 'maybe' is not one of denied, granted, pending (kind approval)",
    ]
    assert orjson.loads(result.failures[0].raw) == items[1]  # the element's own bytes
    assert "\n" not in "".join(reasons)


def test_json_lines():
    lines = [orjson.dumps(TOOL), b"", orjson.dumps({**TOOL, "kind": "nonsense"}), b"{broken", orjson.dumps([TOOL])]
    result = decode_native(b"\n".join(lines) + b"\n")
    assert len(result.events) == 1
    reasons = [f.reason for f in result.failures]
    assert reasons[0].startswith("native: line 3: kind: Input should be")
    assert reasons[1].startswith("native: line 4: not JSON")
    assert reasons[2] == "native: line 5: expected a JSON object, got list"
    assert result.failures[1].raw == b"{broken"


def test_attribute_values_become_text_and_missing_fields_are_named():
    (e,) = decode_native(orjson.dumps({**TOOL, "attributes": {"n": 3, "ok": True, "s": "x"}})).events
    assert e.attributes == {"n": "3", "ok": "true", "s": "x"}
    result = decode_native(b'{"agent_id": "a"}')
    (failure,) = result.failures
    assert failure.reason == "native: kind: Field required; ts: Field required"
    assert decode_native(b"not json").failures[0].reason.startswith("native: not JSON")
