"""Agent traces produced by the REAL OpenTelemetry SDK, for decoder and detector tests.

Spans come from ``TracerProvider`` + ``start_as_current_span`` nesting, are
collected by ``InMemorySpanExporter`` (so in the SDK's export order: children
end, and are exported, before their agent span) and encoded by the SDK's own
OTLP encoder (``encode_spans``) — the bytes an instrumented agent really sends.
Three attribute conventions: OTel GenAI semconv, OpenInference, OpenLLMetry.

Ids come from a seeded generator and every timestamp is explicit, so the
fixture files are deterministic. Regenerate them with::

    python -m tests.otel_traces
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer

from schemas.otlp_json import request_to_otlp_json

FIXTURES = Path(__file__).parent / "fixtures" / "otel"
BASE_NS = 1_768_471_200 * 10**9  # 2026-01-15T10:00:00Z
MS = 10**6

GENAI = "genai"
OPENINFERENCE = "openinference"
OPENLLMETRY = "openllmetry"


class SeededIds(IdGenerator):
    """Deterministic trace/span ids (the SDK's default generator is random)."""

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)

    def generate_span_id(self) -> int:
        return self._rng.getrandbits(64) or 1

    def generate_trace_id(self) -> int:
        return self._rng.getrandbits(128) or 1


@dataclass
class Sdk:
    provider: TracerProvider
    exporter: InMemorySpanExporter
    tracer: Tracer

    def finished(self) -> list[ReadableSpan]:
        """Spans in export order (child first), then cleared for the next trace."""
        spans = list(self.exporter.get_finished_spans())
        self.exporter.clear()
        return spans


def make_sdk(service: str, *, instance_id: str = "", seed: int = 0, resource: dict[str, Any] | None = None) -> Sdk:
    # Resource(...) rather than Resource.create(...): the latter adds the SDK
    # version, which would make fixtures change with every SDK upgrade.
    attrs: dict[str, Any] = {"service.name": service, **(resource or {})}
    if instance_id:
        attrs["service.instance.id"] = instance_id
    provider = TracerProvider(resource=Resource(attrs), id_generator=SeededIds(seed))
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return Sdk(provider, exporter, provider.get_tracer("agentwatch.tests.fleet", "1.0.0"))


@dataclass(frozen=True)
class Chat:
    model: str
    input_tokens: int
    output_tokens: int
    duration_ms: int = 800


@dataclass(frozen=True)
class ToolCall:
    tool: str
    arguments: str  # raw JSON text as the model produced it: key order and whitespace vary
    call_id: str = ""
    error: str = ""  # error class when the call failed
    duration_ms: int = 300


@dataclass
class Clock:
    now: int = BASE_NS

    def advance(self, ms: float) -> int:
        self.now += int(ms * MS)
        return self.now


@dataclass(frozen=True)
class AgentRun:
    agent_id: str
    agent_name: str
    steps: Sequence[Chat | ToolCall]
    conversation_id: str = ""
    gap_ms: int = 2000  # think time between steps
    extra: dict[str, Any] = field(default_factory=dict)  # attributes for the agent span


# --- per-convention span names and attributes -------------------------------


def _agent_span(conv: str, run: AgentRun) -> tuple[str, dict[str, Any]]:
    if conv == GENAI:
        attrs = {
            "gen_ai.operation.name": "invoke_agent",
            "gen_ai.provider.name": "openai",
            "gen_ai.agent.id": run.agent_id,
            "gen_ai.agent.name": run.agent_name,
        }
        if run.conversation_id:
            attrs["gen_ai.conversation.id"] = run.conversation_id
        return f"invoke_agent {run.agent_name}", {**attrs, **run.extra}
    if conv == OPENINFERENCE:
        attrs = {"openinference.span.kind": "AGENT", "agent.name": run.agent_name}
        if run.conversation_id:
            attrs["session.id"] = run.conversation_id
        return run.agent_name, {**attrs, **run.extra}
    attrs = {"traceloop.span.kind": "agent", "traceloop.entity.name": run.agent_name}
    return f"{run.agent_name}.agent", {**attrs, **run.extra}


def _chat_span(conv: str, step: Chat) -> tuple[str, dict[str, Any]]:
    if conv == GENAI:
        return f"chat {step.model}", {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": "openai",
            "gen_ai.request.model": step.model,
            "gen_ai.response.model": step.model,
            "gen_ai.usage.input_tokens": step.input_tokens,
            "gen_ai.usage.output_tokens": step.output_tokens,
        }
    if conv == OPENINFERENCE:
        return "ChatCompletion", {
            "openinference.span.kind": "LLM",
            "llm.model_name": step.model,
            "llm.token_count.prompt": step.input_tokens,
            "llm.token_count.completion": step.output_tokens,
            "llm.token_count.total": step.input_tokens + step.output_tokens,
        }
    return "openai.chat", {
        "llm.request.type": "chat",
        "gen_ai.system": "openai",
        "gen_ai.request.model": step.model,
        "gen_ai.response.model": step.model,
        "gen_ai.usage.prompt_tokens": step.input_tokens,
        "gen_ai.usage.completion_tokens": step.output_tokens,
        "llm.usage.total_tokens": step.input_tokens + step.output_tokens,
    }


def _tool_span(conv: str, step: ToolCall) -> tuple[str, dict[str, Any]]:
    if conv == GENAI:
        attrs = {
            "gen_ai.operation.name": "execute_tool",
            "gen_ai.tool.name": step.tool,
            "gen_ai.tool.type": "function",
            "gen_ai.tool.call.arguments": step.arguments,
        }
        if step.call_id:
            attrs["gen_ai.tool.call.id"] = step.call_id
        if step.error:
            attrs["error.type"] = step.error
        return f"execute_tool {step.tool}", attrs
    if conv == OPENINFERENCE:
        # tool.parameters is the tool's JSON schema (the same on every call); the call's
        # arguments are input.value
        attrs = {
            "openinference.span.kind": "TOOL",
            "tool.name": step.tool,
            "tool.parameters": _json_schema_of(step.arguments),
            "input.value": step.arguments,
            "input.mime_type": "application/json",
        }
        if step.call_id:
            attrs["tool_call.id"] = step.call_id
        return step.tool, attrs
    # OpenLLMetry records the decorated function's call as {"args": [...], "kwargs": {...}}
    return f"{step.tool}.tool", {
        "traceloop.span.kind": "tool",
        "traceloop.entity.name": step.tool,
        "traceloop.entity.input": '{"args": [], "kwargs": ' + step.arguments + "}",
    }


def _json_schema_of(arguments: str) -> str:
    """The JSON schema an OpenInference TOOL span carries in tool.parameters: property names and types."""
    types = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "object"}
    props = {k: {"type": types.get(type(v), "string")} for k, v in sorted(json.loads(arguments).items())}
    return json.dumps({"type": "object", "properties": props, "required": sorted(props)})


@contextmanager
def _timed_span(
    tracer: Tracer, name: str, attrs: dict[str, Any], clock: Clock, kind: SpanKind = SpanKind.INTERNAL
) -> Iterator[Any]:
    """A real SDK span with explicit start and end times taken from ``clock``."""
    with tracer.start_as_current_span(
        name, kind=kind, attributes=attrs, start_time=clock.now, end_on_exit=False
    ) as span:
        yield span
    span.end(end_time=clock.now)


def run_agent(sdk: Sdk, conv: str, run: AgentRun, clock: Clock) -> list[ReadableSpan]:
    """One agent invocation as one trace; returns its spans in SDK export order."""
    name, attrs = _agent_span(conv, run)
    with _timed_span(sdk.tracer, name, attrs, clock):
        for step in run.steps:
            clock.advance(run.gap_ms)
            if isinstance(step, Chat):
                name, attrs = _chat_span(conv, step)
                with _timed_span(sdk.tracer, name, attrs, clock, SpanKind.CLIENT):
                    clock.advance(step.duration_ms)
                continue
            name, attrs = _tool_span(conv, step)
            with _timed_span(sdk.tracer, name, attrs, clock) as span:
                clock.advance(step.duration_ms)
                if step.error:
                    # what record_exception does, with a fixed timestamp for deterministic files
                    span.add_event(
                        "exception",
                        {"exception.type": step.error, "exception.message": f"{step.tool} failed"},
                        timestamp=clock.now,
                    )
                    span.set_status(Status(StatusCode.ERROR, f"{step.tool} failed: {step.error}"))
        clock.advance(50)
    return sdk.finished()


def to_request(spans: Sequence[ReadableSpan]) -> ExportTraceServiceRequest:
    return encode_spans(spans)


def to_records(spans: Sequence[ReadableSpan], per_record: int) -> list[ExportTraceServiceRequest]:
    """Split spans, in export order, into records of ``per_record`` spans: the agent
    span ends last, so it lands in a later record than its children."""
    return [encode_spans(spans[i : i + per_record]) for i in range(0, len(spans), per_record)]


def write_jsonl(path: Path, requests: Sequence[ExportTraceServiceRequest]) -> None:
    """OTLP JSON lines as the Collector's file exporter writes them: one request per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(request_to_otlp_json(r) + b"\n" for r in requests))


# --- the scenarios ----------------------------------------------------------

# the same arguments six times, as a model re-emits them: key order and whitespace differ
RETRY_ARGS = (
    '{"order_id": "A-1042", "amount": 129.5, "currency": "EUR"}',
    '{"amount": 129.5, "currency": "EUR", "order_id": "A-1042"}',
    '{"currency":"EUR","order_id":"A-1042","amount":129.5}',
    '{ "order_id" : "A-1042" ,\n  "currency": "EUR", "amount": 129.5 }',
    '{"amount":129.5,"order_id":"A-1042","currency":"EUR"}',
    '{"order_id": "A-1042",  "currency": "EUR",  "amount": 129.5}',
)


def retry_loop_run(agent_id: str = "agent-billing-7", agent_name: str = "billing-agent") -> AgentRun:
    """One tool, same arguments, 6 calls within ~25 s; the provider keeps timing out."""
    steps: list[Chat | ToolCall] = [Chat("gpt-4o", 1200, 85)]
    for i, args in enumerate(RETRY_ARGS):
        error = "TimeoutError" if i < 5 else ""
        steps.append(ToolCall("refund_payment", args, call_id=f"call_refund_{i}", error=error))
    steps.append(Chat("gpt-4o", 1900, 40))
    return AgentRun(agent_id, agent_name, steps, conversation_id="conv-retry-1", gap_ms=3000)


def retry_loop_records(conv: str = GENAI, per_record: int = 3) -> list[ExportTraceServiceRequest]:
    sdk = make_sdk("billing-agent-svc", instance_id="billing-agent-svc-5f7c9", seed=7, resource={"tenant": "acme"})
    spans = run_agent(sdk, conv, retry_loop_run(), Clock())
    return to_records(spans, per_record)


def healthy_records(conv: str = GENAI) -> list[ExportTraceServiceRequest]:
    """Busy but healthy: three agents, varied tools and arguments, one trace per record
    plus one record holding a whole batch of traces."""
    sdk = make_sdk("support-fleet", instance_id="support-fleet-0", seed=11, resource={"tenant": "acme"})
    clock = Clock()
    records: list[ExportTraceServiceRequest] = []
    batch: list[ReadableSpan] = []
    tools = ("search_kb", "get_order", "send_email", "lookup_customer", "create_ticket")
    for n in range(9):
        agent = ("triage", "support", "research")[n % 3]
        steps: list[Chat | ToolCall] = [Chat("gpt-4o-mini", 600 + 37 * n, 120 + n)]
        for j in range(3):
            tool = tools[(n + j) % len(tools)]
            steps.append(ToolCall(tool, f'{{"query": "case-{n}-{j}", "limit": {j + 1}}}', call_id=f"call_{n}_{j}"))
        steps.append(Chat("gpt-4o-mini", 900 + 11 * n, 200))
        run = AgentRun(f"agent-{agent}", f"{agent}-agent", steps, conversation_id=f"conv-{n}", gap_ms=1500)
        spans = run_agent(sdk, conv, run, clock)
        clock.advance(20_000)
        if n < 6:
            records.append(to_request(spans))
        else:
            batch.extend(spans)
    records.append(to_request(batch))
    return records


def write_fixtures(directory: Path = FIXTURES) -> list[Path]:
    written = {
        "retry_loop_genai.jsonl": retry_loop_records(GENAI),
        "retry_loop_openinference.jsonl": retry_loop_records(OPENINFERENCE),
        "retry_loop_openllmetry.jsonl": retry_loop_records(OPENLLMETRY),
        "healthy_genai.jsonl": healthy_records(GENAI),
    }
    paths = []
    for name, requests in written.items():
        write_jsonl(directory / name, requests)
        paths.append(directory / name)
    return paths


if __name__ == "__main__":
    for p in write_fixtures():
        print(p)


# --- behaviour-corpus scenarios (tests/scenarios, built by tests/scenario_corpus.py) ---

SEC = 10**9


def _sdk(service: str, seed: int) -> Sdk:
    return make_sdk(service, instance_id=f"{service}-0", seed=seed)


def minutes_of_chat(agent_id: str, per_minute: Sequence[int], *, seed: int, start_s: int = 0,
                    chats: int = 2, tenant: str = "") -> list[ExportTraceServiceRequest]:
    """One trace per minute whose chats use ``per_minute[i]`` tokens in minute i (0 = idle)."""
    sdk = make_sdk(f"{agent_id}-svc", instance_id=f"{agent_id}-svc-0", seed=seed,
                   resource={"tenant": tenant} if tenant else None)
    records = []
    for i, tokens in enumerate(per_minute):
        if not tokens:
            continue
        each = tokens // chats
        steps = [Chat("gpt-4o", each * 3 // 4, each - each * 3 // 4, duration_ms=900) for _ in range(chats)]
        clock = Clock(BASE_NS + (start_s + 60 * i + 5) * SEC)
        records.append(to_request(run_agent(sdk, GENAI, AgentRun(agent_id, agent_id, steps, gap_ms=1000), clock)))
    return records


def tool_calls_at(agent_id: str, calls: Sequence[tuple[float, str, str, str]], *, seed: int,
                  service: str = "") -> list[ExportTraceServiceRequest]:
    """One trace per call: (seconds after BASE, tool, JSON arguments, tool_call_id)."""
    sdk = _sdk(service or f"{agent_id}-svc", seed)
    records = []
    for at, tool, args, call_id in calls:
        clock = Clock(BASE_NS + int(at * SEC))
        run = AgentRun(agent_id, agent_id, [ToolCall(tool, args, call_id=call_id)], gap_ms=100)
        records.append(to_request(run_agent(sdk, GENAI, run, clock)))
    return records


def retry_under_threshold_records() -> list[ExportTraceServiceRequest]:
    """Four identical polls in a minute, twice, two minutes apart: never five in 60 s."""
    calls = [(i * 12.0, "poll_status", '{"job": "j-77"}', f"call_poll_{i}") for i in range(4)]
    calls += [(180 + i * 12.0, "poll_status", '{"job": "j-77"}', f"call_poll_{4 + i}") for i in range(4)]
    return tool_calls_at("agent-poller", calls, seed=31)
