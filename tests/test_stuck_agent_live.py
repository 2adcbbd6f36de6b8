"""A stuck agent is alerted as it loops, under its own id, though its root span never ends.

The agent follows docs/frameworks/README.md: W3C baggage holds ``gen_ai.agent.id``
and the OpenTelemetry baggage span processor copies it onto every span. Its
``invoke_agent`` span stays open (that is what a stuck agent looks like), and
each tool span is shipped to the worker as it ends, as a Collector would. The
worker runs the default policy (30 s allowed lateness): nothing waits for the
missing agent span, so the fifth identical call is alerted within 2 s, under
the agent's id, never under the SDK's per-process ``service.instance.id``.
"""

from __future__ import annotations

import time

import orjson
import pytest
from opentelemetry import baggage, context
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.processor.baggage import BaggageSpanProcessor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import set_span_in_context

from schemas.alerts import Alert
from tests.live import LiveWorker

pytestmark = pytest.mark.kafka

AGENT = "ops-agent"


def test_stuck_agent_alerted_within_two_seconds_of_its_fifth_identical_call(kafka_bootstrap, tmp_path):
    provider = TracerProvider(resource=Resource.create({"service.name": "stuck-service"}))
    # the documented two lines: baggage onto spans, the agent's id in baggage
    provider.add_span_processor(BaggageSpanProcessor(lambda key: key == "gen_ai.agent.id"))
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("my.agent")
    token = context.attach(baggage.set_baggage("gen_ai.agent.id", AGENT))
    try:
        with LiveWorker(kafka_bootstrap, tmp_path) as w:
            root = tracer.start_span("invoke_agent ops-agent", attributes={
                "gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": AGENT})
            ctx = set_span_in_context(root)  # in the baggage context: the tool spans are the root's children
            latencies = []
            for order in ("A-1", "A-2"):  # the worker's very first alert, and one more
                sent_ms = 0.0
                for i in range(5):  # the fifth identical call must raise the alert: no sixth is needed
                    with tracer.start_as_current_span("execute_tool get_order", context=ctx, attributes={
                            "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "get_order",
                            "gen_ai.tool.call.id": f"call_{order}_{i}",
                            "gen_ai.tool.call.arguments": f'{{"order_id": "{order}"}}'}):
                        pass
                    spans = exporter.get_finished_spans()
                    exporter.clear()
                    assert all(s.attributes.get("gen_ai.agent.id") == AGENT for s in spans)
                    w.produce(w.settings.topic_otlp, [encode_spans(spans).SerializeToString()])
                    sent_ms = time.time() * 1000

                def alerted(records: list, n: int = len(latencies) + 1) -> bool:
                    return sum(Alert.model_validate(orjson.loads(r.value)).detector == "retry_loop"
                               for r in records) >= n

                records = w.consume(w.settings.topic_alerts, alerted, timeout=60)
                loops = [(r.timestamp, Alert.model_validate(orjson.loads(r.value))) for r in records]
                loops = [(ts, a) for ts, a in loops if a.detector == "retry_loop"]
                assert len(loops) > len(latencies), w.log_tail()
                ts, alert = loops[len(latencies)]
                assert alert.agent_id == AGENT  # not the SDK's random service.instance.id, not the service
                latencies.append(ts - sent_ms)
            print(f"alerted {latencies[0]:.0f} ms and {latencies[1]:.0f} ms after the fifth call")
            # a fresh worker's first alert too: it says it is ready only once it has joined its group,
            # restored its state and warmed its producer and store (it measured ~4.5 s before that)
            assert max(latencies) < 2000, f"alerted {latencies} ms after the fifth call"
            assert root.is_recording()  # the agent span never ended
    finally:
        context.detach(token)
