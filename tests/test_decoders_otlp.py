"""OTLP decoders against spans produced by the real OpenTelemetry SDK."""

from __future__ import annotations

import base64
import time
from pathlib import Path

import orjson
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.trace import SpanKind, Status, StatusCode

from schemas.decoders import DecodeResult
from schemas.decoders.otlp import decode_otlp, decode_otlp_json, decode_otlp_proto
from schemas.events import Event, EventKind, IdentitySource, fingerprint_arguments, stable_id
from schemas.otlp_json import request_to_otlp_dict, request_to_otlp_json
from tests import otel_traces as ot

FIXTURES = Path(__file__).parent / "fixtures" / "otel"


def _decode_file(name: str) -> DecodeResult:
    result = DecodeResult()
    for line in (FIXTURES / name).read_bytes().splitlines():
        result.extend(decode_otlp(line, origin="file"))
    return result


def _one_span(name: str, attrs: dict, *, error: str = "", resource: dict | None = None) -> ExportTraceServiceRequest:
    """A single real SDK span with the given attributes, encoded by the SDK."""
    sdk = ot.make_sdk("svc", seed=3, resource=resource)
    clock = ot.Clock()
    with ot._timed_span(sdk.tracer, name, attrs, clock, SpanKind.CLIENT) as span:
        clock.advance(250)
        if error:
            span.add_event("exception", {"exception.type": error}, timestamp=clock.now)
            span.set_status(Status(StatusCode.ERROR, "boom"))
    return ot.to_request(sdk.finished())


def _event(req: ExportTraceServiceRequest):
    result = decode_otlp_proto(req.SerializeToString())
    assert not result.failures and len(result.events) == 1
    return result.events[0]


# --- both encodings ----------------------------------------------------------


@pytest.mark.parametrize("conv", [ot.GENAI, ot.OPENINFERENCE, ot.OPENLLMETRY])
def test_json_and_proto_of_the_same_sdk_traces_decode_identically(conv):
    for req in ot.retry_loop_records(conv) + ot.healthy_records(conv):
        from_proto = decode_otlp(req.SerializeToString())
        from_json = decode_otlp(request_to_otlp_json(req))
        assert not from_proto.failures and not from_json.failures
        strip = lambda evs: [e.model_dump(exclude={"source"}) for e in evs]  # noqa: E731
        assert strip(from_proto.events) == strip(from_json.events)
        assert {e.source for e in from_proto.events} == {"otlp_proto"}
        assert {e.source for e in from_json.events} == {"otlp_json"}


def test_events_survive_validation_unchanged():
    # the decoder copies a validated template instead of validating each span:
    # every value it sets must already be what the model would make of it
    result = _decode_file("healthy_genai.jsonl")
    result.extend(_decode_file("retry_loop_openinference.jsonl"))
    for e in result.events:
        again = Event.model_validate(e.model_dump())
        assert again == e and type(again.ts.tzinfo) is type(e.ts.tzinfo)
    assert result.events[0].correlation is not result.events[1].correlation


def test_encoder_writes_collector_otlp_json():
    req = ot.retry_loop_records()[0]
    doc = request_to_otlp_dict(req)
    span = doc["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    assert len(span["traceId"]) == 32 and int(span["traceId"], 16)
    assert len(span["spanId"]) == 16 and len(span["parentSpanId"]) == 16
    assert isinstance(span["kind"], int)
    assert isinstance(span["startTimeUnixNano"], str)
    assert span["traceId"] == req.resource_spans[0].scope_spans[0].spans[0].trace_id.hex()


def test_fixture_files_are_what_the_generator_writes(tmp_path):
    for path in ot.write_fixtures(tmp_path):
        assert path.read_bytes() == (FIXTURES / path.name).read_bytes(), (
            f"regenerate: python -m tests.otel_traces ({path.name})"
        )


# --- conventions ---------------------------------------------------------------


def test_genai_retry_loop_fixture():
    result = _decode_file("retry_loop_genai.jsonl")
    assert not result.failures
    tools = [e for e in result.events if e.kind is EventKind.TOOL_CALL]
    assert len(tools) == 6
    assert {e.tool_name for e in tools} == {"refund_payment"}
    assert len({e.args_fingerprint for e in tools}) == 1  # key order and whitespace normalised
    assert tools[0].args_fingerprint == fingerprint_arguments(
        {"order_id": "A-1042", "amount": 129.5, "currency": "EUR"}
    )
    assert [e.outcome for e in tools] == ["error"] * 5 + ["ok"]
    assert {e.error_type for e in tools[:5]} == {"TimeoutError"}
    assert tools[0].tool_call_id == "call_refund_0"
    assert (tools[-1].ts - tools[0].ts).total_seconds() < 60
    assert tools[0].duration_ms == pytest.approx(300)
    for e in result.events:
        assert e.tenant == "acme"
        # service.name, never the instance id: every process of an agent is the same agent
        assert e.fallback_agent_id == "billing-agent-svc"
        assert e.event_id == stable_id("span", e.trace_id, e.span_id)
        assert e.origin == "file"
    agent = next(e for e in result.events if e.kind is EventKind.AGENT)
    assert agent.is_agent_span and agent.lifecycle == "invoke"
    assert agent.agent_id == "agent-billing-7" and agent.identity is IdentitySource.ATTRIBUTE
    assert agent.attributes["gen_ai.conversation.id"] == "conv-retry-1"
    llm = [e for e in result.events if e.kind is EventKind.LLM_CALL]
    assert [(e.model, e.input_tokens, e.output_tokens) for e in llm] == [("gpt-4o", 1200, 85), ("gpt-4o", 1900, 40)]


def test_identity_resolved_within_a_record_only():
    # the fixture splits the trace 3 spans per record: the agent span ends last
    lines = (FIXTURES / "retry_loop_genai.jsonl").read_bytes().splitlines()
    first, last = decode_otlp(lines[0]), decode_otlp(lines[-1])
    assert all(e.agent_id == "" and e.identity is IdentitySource.UNKNOWN for e in first.events)
    children = [e for e in last.events if not e.is_agent_span]
    assert children and all(e.agent_id == "agent-billing-7" for e in children)
    assert all(e.identity is IdentitySource.ANCESTOR for e in children)


def test_nearest_named_agent_ancestor_wins():
    sdk = ot.make_sdk("svc", seed=5)
    clock = ot.Clock()
    outer = {"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.id": "planner"}
    inner = {"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "coder"}
    anonymous = {"openinference.span.kind": "AGENT"}
    tool = {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "run"}
    with ot._timed_span(sdk.tracer, "invoke_agent planner", outer, clock):
        with ot._timed_span(sdk.tracer, "invoke_agent coder", inner, clock):
            with ot._timed_span(sdk.tracer, "http", {}, clock):  # a plain span in between
                with ot._timed_span(sdk.tracer, "execute_tool run", tool, clock):
                    clock.advance(1)
        with ot._timed_span(sdk.tracer, "helper", anonymous, clock):
            with ot._timed_span(sdk.tracer, "execute_tool run", tool, clock):
                clock.advance(1)
    result = decode_otlp_proto(ot.to_request(sdk.finished()).SerializeToString())
    coder_tool, http, coder, helper_tool, helper, planner = result.events  # export order: child first
    assert (coder_tool.agent_id, coder_tool.identity) == ("coder", IdentitySource.ANCESTOR)
    assert http.agent_id == "coder"
    assert (coder.agent_id, coder.identity) == ("coder", IdentitySource.ATTRIBUTE)
    # an agent span named only by its span name yields to a named one, as detectors/identity.py does
    assert helper.is_agent_span and (helper.agent_id, helper.identity) == ("planner", IdentitySource.ANCESTOR)
    assert (helper_tool.agent_id, helper_tool.identity) == ("planner", IdentitySource.ANCESTOR)
    assert planner.agent_id == "planner"


def test_openinference_fixture():
    result = _decode_file("retry_loop_openinference.jsonl")
    assert not result.failures
    tools = [e for e in result.events if e.kind is EventKind.TOOL_CALL]
    assert len(tools) == 6 and len({e.args_fingerprint for e in tools}) == 1
    assert tools[0].tool_name == "refund_payment" and tools[0].tool_call_id == "call_refund_0"
    assert [e.outcome for e in tools] == ["error"] * 5 + ["ok"]
    assert tools[0].error_type == "TimeoutError"  # from the exception span event
    llm = [e for e in result.events if e.kind is EventKind.LLM_CALL]
    assert (llm[0].model, llm[0].input_tokens, llm[0].output_tokens) == ("gpt-4o", 1200, 85)
    agent = next(e for e in result.events if e.is_agent_span)
    assert agent.agent_id == "billing-agent" and agent.lifecycle == "invoke"
    assert agent.attributes["gen_ai.conversation.id"] == "conv-retry-1"  # session.id


def test_openllmetry_fixture():
    result = _decode_file("retry_loop_openllmetry.jsonl")
    assert not result.failures
    tools = [e for e in result.events if e.kind is EventKind.TOOL_CALL]
    assert len(tools) == 6 and {e.tool_name for e in tools} == {"refund_payment"}
    assert len({e.args_fingerprint for e in tools}) == 1
    llm = [e for e in result.events if e.kind is EventKind.LLM_CALL]
    assert (llm[0].model, llm[0].input_tokens, llm[0].output_tokens) == ("gpt-4o", 1200, 85)
    agent = next(e for e in result.events if e.is_agent_span)
    assert agent.agent_id == "billing-agent"  # traceloop.entity.name of the agent span


def test_healthy_fixture_has_varied_calls():
    result = _decode_file("healthy_genai.jsonl")
    assert not result.failures
    tools = [e for e in result.events if e.kind is EventKind.TOOL_CALL]
    assert len(tools) == 27 and len({e.args_fingerprint for e in tools}) == 27
    assert all(e.outcome == "ok" for e in tools)
    assert {e.agent_id for e in result.events} == {"agent-triage", "agent-support", "agent-research"}


@pytest.mark.parametrize(
    ("attrs", "want"),
    [
        ({"gen_ai.operation.name": "chat", "gen_ai.usage.input_tokens": 10, "gen_ai.usage.output_tokens": 3}, (10, 3)),
        (
            {
                "gen_ai.operation.name": "text_completion",
                "gen_ai.usage.prompt_tokens": 7,
                "gen_ai.usage.completion_tokens": 2,
            },
            (7, 2),
        ),
        ({"gen_ai.system": "openai", "llm.usage.prompt_tokens": 5, "llm.usage.completion_tokens": 1}, (5, 1)),
        ({"openinference.span.kind": "LLM", "llm.token_count.prompt": 4, "llm.token_count.completion": 9}, (4, 9)),
        # current keys win over legacy ones on the same span
        ({"gen_ai.operation.name": "chat", "gen_ai.usage.prompt_tokens": 1, "gen_ai.usage.input_tokens": 2}, (2, 0)),
    ],
)
def test_token_conventions(attrs, want):
    e = _event(_one_span("llm", attrs))
    assert e.kind is EventKind.LLM_CALL
    assert (e.input_tokens, e.output_tokens) == want


@pytest.mark.parametrize(
    ("name", "attrs", "kind", "lifecycle"),
    [
        ("embeddings m", {"gen_ai.operation.name": "embeddings"}, EventKind.LLM_CALL, ""),
        ("generate_content m", {"gen_ai.operation.name": "generate_content"}, EventKind.LLM_CALL, ""),
        ("create_agent x", {"gen_ai.operation.name": "create_agent", "gen_ai.agent.id": "x"}, EventKind.AGENT, "spawn"),
        ("wf", {"traceloop.span.kind": "workflow"}, EventKind.SPAN, ""),
        ("task", {"traceloop.span.kind": "task", "gen_ai.system": "openai"}, EventKind.SPAN, ""),
        ("chain", {"openinference.span.kind": "CHAIN"}, EventKind.SPAN, ""),
        ("GET", {"http.request.method": "GET"}, EventKind.SPAN, ""),
    ],
)
def test_kind_conventions(name, attrs, kind, lifecycle):
    e = _event(_one_span(name, attrs))
    assert (e.kind, e.lifecycle) == (kind, lifecycle)
    assert e.is_agent_span == (kind is EventKind.AGENT)
    if lifecycle == "spawn":
        assert e.target_agent_id == "x"


def test_tool_fallbacks_error_and_kept_attributes():
    attrs = {
        "gen_ai.operation.name": "execute_tool",
        "gen_ai.tool.call.arguments": '{"b": 2, "a": 1}',
        "tool.parameters": '{"type": "object", "properties": {"a": {}, "b": {}}}',  # a schema: never the arguments
        "tool_call.id": "c-9",
        "aws.request_id": "req-123",
        "http.request.method": "POST",
        "db.statement": "SELECT " + "x" * 1000,
        "gen_ai.usage.cost": 0.25,
        "agent.name": "oi-agent",
        "irrelevant.payload": "dropped",
    }
    resource = {"k8s.pod.name": "pod-1", "agentwatch.tenant": "t1"}
    e = _event(_one_span("execute_tool delete_user", attrs, error="PermissionError", resource=resource))
    assert e.tool_name == "delete_user"  # span name minus the prefix
    assert e.args_fingerprint == fingerprint_arguments({"a": 1, "b": 2})
    assert e.tool_call_id == "c-9"
    assert (e.outcome, e.error_type) == ("error", "PermissionError")
    assert (e.agent_id, e.identity) == ("oi-agent", IdentitySource.ATTRIBUTE)
    assert e.cost_usd == 0.25 and e.tenant == "t1"
    assert e.attributes["aws.request_id"] == "req-123"
    assert e.attributes["http.request.method"] == "POST"
    assert e.attributes["k8s.pod.name"] == "pod-1"
    assert e.attributes["span.kind"] == "client"
    assert len(e.attributes["db.statement"]) == 256
    assert "irrelevant.payload" not in e.attributes
    assert e.fallback_agent_id == "svc"  # no service.instance.id: service.name


def test_error_type_from_status_message_when_nothing_else():
    sdk = ot.make_sdk("svc", seed=9)
    clock = ot.Clock()
    with ot._timed_span(sdk.tracer, "execute_tool x", {"gen_ai.operation.name": "execute_tool"}, clock) as span:
        span.set_status(Status(StatusCode.ERROR, "upstream 503"))
    e = _event(ot.to_request(sdk.finished()))
    assert (e.outcome, e.error_type) == ("error", "upstream 503")


# --- leniency ------------------------------------------------------------------


def _to_snake(obj):
    if isinstance(obj, dict):
        snake = {"".join("_" + c.lower() if c.isupper() else c for c in k): _to_snake(v) for k, v in obj.items()}
        return snake
    if isinstance(obj, list):
        return [_to_snake(v) for v in obj]
    return obj


def test_snake_case_base64_ids_numbers_and_kind_names_are_accepted():
    req = ot.retry_loop_records(per_record=100)[0]
    want = [e.model_dump() for e in decode_otlp_json(request_to_otlp_json(req)).events]
    doc = request_to_otlp_dict(req)
    for rs in doc["resourceSpans"]:
        for ss in rs["scopeSpans"]:
            for sp in ss["spans"]:
                for key in ("traceId", "spanId", "parentSpanId"):
                    if key in sp:
                        sp[key] = base64.b64encode(bytes.fromhex(sp[key])).decode()
                sp["startTimeUnixNano"] = int(sp["startTimeUnixNano"])  # numbers, not strings
                sp["kind"] = {1: "SPAN_KIND_INTERNAL", 3: "SPAN_KIND_CLIENT"}[sp["kind"]]
                if sp.get("status", {}).get("code") == 2:
                    sp["status"]["code"] = "STATUS_CODE_ERROR"
    snake = _to_snake(doc)
    # old exporters: instrumentation_library_spans instead of scope_spans
    for rs in snake["resource_spans"]:
        rs["instrumentation_library_spans"] = rs.pop("scope_spans")
    got = decode_otlp(orjson.dumps(snake))
    assert not got.failures
    assert [e.model_dump() for e in got.events] == want


def test_missing_optional_fields_and_empty_parent():
    span = {
        "traceId": "0af7651916cd43dd8448eb211c80319c",
        "spanId": "b7ad6b7169203331",
        "parentSpanId": "",
        "name": "x",
        "endTimeUnixNano": 1700000000000000000,
    }
    result = decode_otlp_json(orjson.dumps({"resourceSpans": [{"scopeSpans": [{"spans": [span]}]}]}))
    assert not result.failures
    (e,) = result.events
    assert (e.kind, e.parent_span_id, e.tenant, e.outcome, e.duration_ms) == (EventKind.SPAN, "", "default", "ok", None)
    assert e.ts.timestamp() == 1_700_000_000


def test_bad_spans_fail_with_reasons_and_good_spans_survive():
    doc = request_to_otlp_dict(ot.retry_loop_records(per_record=100)[0])
    spans = doc["resourceSpans"][0]["scopeSpans"][0]["spans"]
    total = len(spans)
    del spans[3]["traceId"]
    spans[4]["spanId"] = "zz"
    spans[5]["endTimeUnixNano"] = "soon"
    spans[6] = "not a span"
    result = decode_otlp(orjson.dumps(doc))
    assert len(result.events) == total - 4
    reasons = [f.reason for f in result.failures]
    assert reasons == [
        "otlp_json: resourceSpans[0].scopeSpans[0].spans[3]: missing traceId",
        "otlp_json: resourceSpans[0].scopeSpans[0].spans[4]: invalid spanId 'zz' (want 16 hex chars or base64 of 8 bytes)",
        "otlp_json: resourceSpans[0].scopeSpans[0].spans[5]: invalid endTimeUnixNano 'soon'",
        "otlp_json: resourceSpans[0].scopeSpans[0].spans[6]: expected an object, got str",
    ]
    # each failure is a replayable record: the bad span with its resource and scope
    raw = orjson.loads(result.failures[0].raw)
    assert raw["resourceSpans"][0]["resource"] == doc["resourceSpans"][0]["resource"]
    assert raw["resourceSpans"][0]["scopeSpans"][0]["spans"] == [spans[3]]
    assert {f.source for f in result.failures} == {"otlp_json"}


def test_bad_proto_span_fails_and_the_rest_decode():
    req = ot.retry_loop_records(per_record=100)[0]
    spans = req.resource_spans[0].scope_spans[0].spans
    spans[2].trace_id = b""
    result = decode_otlp(req.SerializeToString())
    assert len(result.events) == len(spans) - 1
    (failure,) = result.failures
    assert failure.reason == "otlp_proto: resourceSpans[0].scopeSpans[0].spans[2]: missing traceId"
    replay = ExportTraceServiceRequest.FromString(failure.raw)
    assert replay.resource_spans[0].scope_spans[0].spans[0] == spans[2]


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "otlp: empty record"),
        (b"{not json", "otlp_json: not JSON"),
        (b'{"hello": 1}', "otlp_json: missing resourceSpans"),
        (b'{"resourceSpans": {}}', "otlp_json: resourceSpans: expected a list, got dict"),
        (b"[1]", "otlp_json: [0]: expected an ExportTraceServiceRequest object, got int"),
        (b"\xff\xff\xff\xff", "otlp_proto: not an ExportTraceServiceRequest"),
    ],
)
def test_whole_record_failures(payload, reason):
    result = decode_otlp(payload)
    assert not result.events
    (failure,) = result.failures
    assert failure.reason.startswith(reason)
    assert failure.raw == payload or payload == b"[1]"


def test_proto_whose_length_byte_looks_like_json_is_still_proto():
    # a proto request starts 0x0A <len>; with len == 123 that is "\n{"
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    span = rs.scope_spans.add().spans.add(trace_id=b"\x01" * 16, span_id=b"\x02" * 8, end_time_unix_nano=10**18)
    while len(rs.SerializeToString()) < 123:
        span.name += "x"
    payload = req.SerializeToString()
    assert payload[:2] == b"\n{"
    result = decode_otlp(payload)
    assert not result.failures and len(result.events) == 1


def test_json_lines_handed_over_whole():
    payload = (FIXTURES / "retry_loop_genai.jsonl").read_bytes() + b"garbage\n"
    result = decode_otlp(payload)
    assert len(result.events) == 9
    (failure,) = result.failures
    assert failure.reason.startswith("otlp_json: line 4: not JSON") and failure.raw == b"garbage"
    # whole-file decoding sees the agent span, so every child resolves
    assert all(e.agent_id == "agent-billing-7" for e in result.events)


def test_throughput_print():
    big = ExportTraceServiceRequest()
    for _ in range(20):
        for req in ot.healthy_records():
            big.resource_spans.extend(req.resource_spans)
    n = sum(len(ss.spans) for rs in big.resource_spans for ss in rs.scope_spans)
    for label, decode, payload in (
        ("otlp_json", decode_otlp_json, request_to_otlp_json(big)),
        ("otlp_proto", decode_otlp_proto, big.SerializeToString()),
    ):
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            assert len(decode(payload).events) == n
            best = min(best, time.perf_counter() - start)
        print(f"\n{label}: {n / best:,.0f} spans/s ({n} spans, {len(payload) / n:.0f} B/span)")
