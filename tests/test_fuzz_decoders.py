"""Every decoder fuzzed: nothing but the project's own decode error escapes.

Each decoder gets arbitrary bytes, arbitrary JSON, and real records (the test
fixtures) mutated: leaves replaced by arbitrary JSON values, keys dropped,
bytes flipped or cut. Whatever comes in, a decoder returns a ``DecodeResult``
(bad input as failures with a reason) or raises ``DecodeError``; the events it
returns serialise (they go to Kafka and ClickHouse next) and survive redaction.
The number of examples is bounded so the suite stays fast.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentwatch_client.wire import ControlAck, KillSwitchCommand
from schemas.decoders import DecodeResult
from schemas.decoders.audit import (
    AuditDecoder,
    decode_audit,
    decode_cloudtrail,
    decode_k8s_audit,
    decode_native_audit,
    decode_ocsf,
)
from schemas.decoders.native import decode_native
from schemas.decoders.otlp import decode_otlp, decode_otlp_json, decode_otlp_proto
from schemas.decoders.pgaudit import PgLogConfig, decode_pgaudit
from schemas.errors import DecodeError
from schemas.events import events_from_json, events_to_json
from schemas.internal_wire import events_from_wire, events_to_wire
from schemas.redact import DEFAULT
from tests.otel_traces import GENAI, retry_loop_records

FIXTURES = Path(__file__).parent / "fixtures"
EXAMPLES = settings(max_examples=100, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# instrumentation scopes schemas/decoders/otel_profiles.py reads differently from the conventions
PROFILE_SCOPES = ("openinference.instrumentation.langchain", "openinference.instrumentation.smolagents",
                  "openinference.instrumentation.crewai", "openinference.instrumentation.openai_agents",
                  "openinference.instrumentation", "opentelemetry.instrumentation.langchain",
                  "opentelemetry.instrumentation.crewai")


def _json_seeds() -> list[Any]:
    seeds: list[Any] = []
    audit = FIXTURES / "audit"
    for name in ("cloudtrail_records.json", "k8s_eventlist.json", "native_audit.json", "ocsf_api_activity.json"):
        seeds.append(json.loads((audit / name).read_text()))
    for line in (audit / "k8s_audit.log").read_text().splitlines()[:3]:
        seeds.append(json.loads(line))
    for line in (FIXTURES / "otel" / "retry_loop_genai.jsonl").read_text().splitlines()[:2]:
        seeds.append(json.loads(line))
    # spans read through each instrumentation profile (chosen by scope name): these parse
    # JSON carried in attribute strings (tool arguments, offered tool calls)
    for scope in PROFILE_SCOPES:
        fixture = "retry_loop_openinference.jsonl" if scope.startswith("openinference") else \
            "retry_loop_openllmetry.jsonl"
        doc = json.loads((FIXTURES / "otel" / fixture).read_text().splitlines()[0])
        for rs in doc["resourceSpans"]:
            for ss in rs["scopeSpans"]:
                ss["scope"]["name"] = scope
        seeds.append(doc)
    seeds.append([{"kind": "tool_call", "agent_id": "a", "ts": "2026-01-15T11:00:00Z", "tool_name": "t",
                   "arguments": {"x": 1}, "outcome": "ok", "attributes": {"k": "v"}}])
    return seeds


JSON_SEEDS = _json_seeds()
TEXT_SEEDS = [(FIXTURES / "audit" / "pgaudit.log").read_bytes()] + [
    p.read_bytes() for p in sorted((FIXTURES / "audit" / "pg").glob("*.log"))]
PROTO_SEEDS = [r.SerializeToString() for r in retry_loop_records(GENAI, per_record=3)[:2]]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)


@st.composite
def mutated_json(draw: st.DrawFn) -> bytes:
    """A real record with some leaves replaced by arbitrary JSON and some keys dropped."""
    doc = json.loads(json.dumps(draw(st.sampled_from(JSON_SEEDS))))
    for _ in range(draw(st.integers(1, 6))):
        path: list[Any] = []
        node = doc
        while isinstance(node, (dict, list)) and node and draw(st.booleans()):
            key = draw(st.sampled_from(list(node.keys()) if isinstance(node, dict) else list(range(len(node)))))
            path.append((node, key))
            node = node[key]
        if not path:
            continue
        parent, key = path[-1]
        if isinstance(parent, dict) and draw(st.booleans()):
            del parent[key]
        else:
            # an arbitrary value, or arbitrary JSON inside a string (as attribute values carry it)
            parent[key] = draw(json_values | json_values.map(json.dumps))
    return _dumps(doc)


def _dumps(doc: Any) -> bytes:
    # the standard library writes integers of any size (orjson refuses > 64 bits): hostile input may
    return json.dumps(doc).encode()


@st.composite
def mutated_bytes(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    """A real record with bytes flipped, cut or spliced."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 8))):
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(["flip", "cut", "insert"]))
        if op == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del data[i: i + draw(st.integers(1, 64))]
        else:
            data[i:i] = draw(st.binary(max_size=16))
    return bytes(data)


payloads = (st.binary(max_size=300) | json_values.map(_dumps) | mutated_json()
            | mutated_bytes(TEXT_SEEDS) | mutated_bytes(PROTO_SEEDS))


def _check(result: object) -> None:
    assert isinstance(result, DecodeResult)
    for f in result.failures:
        assert isinstance(f.reason, str) and f.reason
    if result.events:
        # what a decoder returns goes to Kafka and ClickHouse next: it must serialise and read back
        back = events_from_json(events_to_json(result.events))
        assert [e.event_id for e in back] == [e.event_id for e in result.events]
        # and through the internal topics' format, which trusts it without validation
        assert events_from_wire(events_to_wire(result.events)) == back
        for ev in result.events:
            DEFAULT.event(ev)


def _call(decoder: Callable[[bytes], object], payload: bytes) -> None:
    try:
        result = decoder(payload)
    except DecodeError:
        return  # the one exception a decoder may raise
    _check(result)


DECODERS: dict[str, Callable[[bytes], object]] = {
    "otlp": decode_otlp,
    "otlp_json": decode_otlp_json,
    "otlp_proto": decode_otlp_proto,
    "native": decode_native,
    "audit": decode_audit,
    "k8s_audit": decode_k8s_audit,
    "cloudtrail": decode_cloudtrail,
    "ocsf": decode_ocsf,
    "native_audit": decode_native_audit,
    "pgaudit": decode_pgaudit,
    "audit_decoder": AuditDecoder(),
}


@pytest.mark.parametrize("name", sorted(DECODERS))
@EXAMPLES
@given(payload=payloads)
def test_decoder_never_raises_anything_but_decode_error(name: str, payload: bytes) -> None:
    _call(DECODERS[name], payload)


@EXAMPLES
@given(pieces=st.lists(payloads, min_size=1, max_size=6))
def test_audit_stitching_never_raises(pieces: list[bytes]) -> None:
    decoder = AuditDecoder(PgLogConfig(stitch_s=1.0))
    for i, piece in enumerate(pieces):
        for stitched in decoder.feed(piece, stream=("t", 0, None), offset=i, wall=float(i)):
            _check(stitched.result)
    for _, stitched in decoder.flush(1e9, force=True):
        _check(stitched.result)


@EXAMPLES
@given(payload=payloads)
def test_control_records_fail_only_with_value_errors(payload: bytes) -> None:
    # the worker reads these from topics anyone may write to: a ValueError is "not one"
    for parse in (ControlAck.from_json, KillSwitchCommand.from_json):
        try:
            parse(payload)
        except ValueError:
            pass
