"""What every framework generator shares: the scenarios, the tools and the span capture.

Runs INSIDE a framework's own virtualenv (tests/frameworks/venvs.py makes them),
so it imports nothing of agentwatch: only the OpenTelemetry SDK and its OTLP
encoder, the same pieces an instrumented agent exports with.

An agent named ``ops-agent`` has four tools and a fake model that answers each
turn with the tool calls of the scenario (then a final answer). Each scenario
is one invocation, one trace. Spans are captured in export order by the SDK's
in-memory exporter (children end, and are exported, before their agent span)
and grouped ``PER_RECORD`` to a record, as a Collector batch would carry them.

Output: JSON lines ``{"scenario", "record"}`` where ``record`` is the base64 of
an ExportTraceServiceRequest encoded by the SDK's OTLP encoder.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

AGENT_NAME = "ops-agent"
# deliberately not the agent's name: the agent id must come from the agent span, and the
# SDK adds its per-process random service.instance.id, which must never become the agent id
SERVICE_NAME = "ops-service"
PER_RECORD = 4
INSTRUCTIONS = "You are the operations agent. Use the tools."


@dataclass(frozen=True)
class Call:
    tool: str
    args: dict[str, Any]
    call_id: str


# scenario -> one turn per model response, each turn the tool calls the model asks for
SCENARIOS: dict[str, list[list[Call]]] = {
    # the same call six times: retry_loop (same_call)
    "same_call": [[Call("get_order", {"order_id": "A-1042"}, f"call_same_{i}")] for i in range(6)],
    # a healthy run: every allowed tool, different arguments
    "healthy": [
        [Call("get_order", {"order_id": "A-2001"}, "call_ok_0")],
        [Call("search_kb", {"query": "refund policy"}, "call_ok_1")],
        [Call("get_order", {"order_id": "A-2002"}, "call_ok_2")],
        [Call("send_email", {"to": "customer@example.com", "body": "Your order shipped"}, "call_ok_3")],
    ],
    # a tool outside the agent's allowlist: disallowed_access
    "disallowed": [
        [Call("get_order", {"order_id": "A-3001"}, "call_dis_0")],
        [Call("refund_payment", {"order_id": "A-3001", "amount": 129.5}, "call_dis_1")],
    ],
    # one tool, six different arguments: nothing
    "varied": [[Call("get_order", {"order_id": f"A-40{i:02d}"}, f"call_var_{i}")] for i in range(6)],
    # one tool failing nine times (different arguments): retry_loop (consecutive_failures)
    "failing": [
        [Call("send_email", {"to": f"user{i}@down.example", "body": "Your refund"}, f"call_fail_{i}")]
        for i in range(9)
    ],
}
TOOL_NAMES = ("get_order", "search_kb", "send_email", "refund_payment")


class MailDown(ConnectionError):
    """What send_email raises for the unreachable domain of the failing scenario."""


# The tools' behaviour, shared by every framework (each wraps them its own way).
def get_order(order_id: str) -> str:
    """Look up an order by id."""
    return json.dumps({"order_id": order_id, "status": "shipped"})


def search_kb(query: str) -> str:
    """Search the knowledge base."""
    return f"3 articles about {query}"


def send_email(to: str, body: str) -> str:
    """Send an email to a customer."""
    if to.endswith("@down.example"):
        raise MailDown(f"mail relay refused {to}")
    return f"sent to {to}"


def refund_payment(order_id: str, amount: float) -> str:
    """Refund an order."""
    return f"refunded {amount} on {order_id}"


TOOLS: dict[str, Callable[..., str]] = {
    "get_order": get_order,
    "search_kb": search_kb,
    "send_email": send_email,
    "refund_payment": refund_payment,
}


def usage(turn: int) -> tuple[int, int]:
    """(input, output) tokens the fake model reports for its response number ``turn``."""
    return 100 + 10 * turn, 7 + turn


def final_answer() -> str:
    return "Done."


class Capture:
    """A TracerProvider set as the global one, with an in-memory exporter."""

    def __init__(self, resource: dict[str, Any] | None = None) -> None:
        # Resource.create: what an application really gets, random service.instance.id included
        self.provider = TracerProvider(resource=Resource.create({"service.name": SERVICE_NAME, **(resource or {})}))
        self.exporter = InMemorySpanExporter()
        trace.set_tracer_provider(self.provider)
        self.lines: list[str] = []

    def start(self) -> None:
        """Export from now on: after the instrumentation's own span processors, which
        (like OpenInference's pydantic-ai processor) may rewrite a span as it ends."""
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))

    def collect(self, scenario: str) -> None:
        self.provider.force_flush()
        spans = list(self.exporter.get_finished_spans())
        self.exporter.clear()
        if not spans:
            raise SystemExit(f"{scenario}: the instrumentation produced no spans")
        for i in range(0, len(spans), PER_RECORD):
            raw = encode_spans(spans[i : i + PER_RECORD]).SerializeToString()
            self.lines.append(json.dumps({"scenario": scenario, "record": base64.b64encode(raw).decode()}))

    def write(self, path: str) -> None:
        with open(path, "w") as f:
            f.write("\n".join(self.lines) + "\n")


def main(run: Callable[[str, list[list[Call]]], None], instrument: Callable[[str, TracerProvider], None],
         instrumentations: tuple[str, ...]) -> None:
    """``python gen_x.py INSTRUMENTATION OUT``: every scenario, one trace each, into OUT."""
    if len(sys.argv) != 3 or sys.argv[1] not in instrumentations:
        raise SystemExit(f"usage: {sys.argv[0]} {{{','.join(instrumentations)}}} OUT.jsonl")
    which, out = sys.argv[1], sys.argv[2]
    warnings.simplefilter("ignore")  # deprecation chatter of the frameworks, not ours to fix
    framework = os.path.basename(sys.argv[0]).removeprefix("gen_").removesuffix(".py")
    # the tenant tells the combinations apart when one worker sees them all
    capture = Capture({"tenant": f"{framework}-{which}"})
    instrument(which, capture.provider)
    capture.start()
    for name, turns in SCENARIOS.items():
        run(name, turns)
        capture.collect(name)
    capture.write(out)
