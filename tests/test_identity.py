"""Agent identity that survives processes and invocations (detectors/identity.py,
schemas/decoders/otel_profiles.py), on spans from the real OpenTelemetry SDK.

The framework matrix (tests/test_frameworks.py) shows the same on the
frameworks' own spans; these tests pin each rule on its own, quickly.
"""

from __future__ import annotations

import uuid
from datetime import timedelta

import orjson
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from detectors.identity import IdentityResolver
from detectors.policy import parse_policy
from schemas.decoders.otel_profiles import OFFERED_CALLS_ATTR, offered_calls, profile_for
from schemas.decoders.otlp import decode_otlp_proto, resource_agent_id
from schemas.events import Event, EventKind, IdentitySource, fingerprint_arguments
from streams.stages import CorrelateStage, DetectStage
from tests import otel_traces as ot
from tests.test_detectors_core import T0


def _decode(sdk: ot.Sdk) -> list[Event]:
    result = decode_otlp_proto(ot.to_request(sdk.finished()).SerializeToString())
    assert not result.failures
    return result.events


def _scoped_sdk(scope: str, seed: int = 1, service: str = "ops-service") -> ot.Sdk:
    sdk = ot.make_sdk(service, seed=seed)
    return ot.Sdk(sdk.provider, sdk.exporter, sdk.provider.get_tracer(scope, "1.0"))


# --- the resource fallback ----------------------------------------------------------------


def test_service_name_before_any_instance_id():
    assert resource_agent_id({"service.name": "billing", "service.instance.id": "billing-7f9c"}) == "billing"
    # the SDK's unnamed default: a readable instance id is better than nothing ...
    assert resource_agent_id({"service.name": "unknown_service:python", "service.instance.id": "pod-3"}) == "pod-3"
    # ... but never the per-process random UUID4 the SDK puts there
    uuid = "b06eaf2e-f1ee-4a23-b07e-928da4a93a6c"
    assert resource_agent_id({"service.name": "unknown_service", "service.instance.id": uuid}) == "unknown_service"


def _sdk_process(seed: int) -> ot.Sdk:
    """One agent process as the SDK sets it up: Resource.create adds a random service.instance.id,
    drawn once per Python process; another process draws another (done here by hand)."""
    resource = Resource.create({"service.name": "ops-agent"})
    if seed > 1:
        resource = resource.merge(Resource({"service.instance.id": str(uuid.uuid4())}))
    provider = TracerProvider(resource=resource, id_generator=ot.SeededIds(seed))
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return ot.Sdk(provider, exporter, provider.get_tracer("my.agent", "1.0"))


def test_two_sdk_instances_of_one_agent_are_one_agent_to_every_detector():
    policy = parse_policy({"allowlists": {"ops-agent": ["get_order"]},
                           "budgets": {"agent_tokens_per_hour": {"ops-agent": 1500}}})
    events: list[Event] = []
    instances = set()
    for seed, at in ((1, 0), (2, 15_000)):  # two processes, three identical calls each, 1000 tokens each
        sdk, clock = _sdk_process(seed), ot.Clock(ot.BASE_NS + at * ot.MS)
        instances.add(sdk.provider.resource.attributes["service.instance.id"])
        for i in range(3):  # no agent span: spans of an uninstrumented agent fall back to the resource
            with ot._timed_span(sdk.tracer, "execute_tool get_order",
                                {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "get_order",
                                 "gen_ai.tool.call.arguments": '{"order_id": "A-1"}'}, clock):
                clock.advance(100)
            clock.advance(2000)
        with ot._timed_span(sdk.tracer, "chat", {"gen_ai.operation.name": "chat", "gen_ai.usage.input_tokens": 900,
                                                 "gen_ai.usage.output_tokens": 100}, clock):
            clock.advance(100)
        events += _decode(sdk)
    assert len(instances) == 2
    correlate, detect = CorrelateStage(policy), DetectStage(policy)
    attributed = correlate.process(events) + correlate.finish()
    assert {e.agent_id for e in attributed} == {"ops-agent"}
    alerts = list({a.alert_id: a for a in detect.process(attributed) + detect.finish()}.values())  # latest of each
    # six identical calls across both processes: one loop; 2000 tokens against a 1500 budget: one breach
    assert sorted(a.detector for a in alerts) == ["retry_loop", "token_spike"]
    assert {a.agent_id for a in alerts} == {"ops-agent"}


# --- agent spans named only by their span name ---------------------------------------------


def _langgraph_shape(sdk: ot.Sdk) -> None:
    """OpenInference's LangGraph trace: the graph is an AGENT span named by the agent's name,
    its model node an AGENT span named "agent", the tool under a "tools" chain."""
    clock = ot.Clock()
    agent = {"openinference.span.kind": "AGENT"}
    with ot._timed_span(sdk.tracer, "ops-agent", agent, clock):
        with ot._timed_span(sdk.tracer, "agent", agent, clock):
            with ot._timed_span(sdk.tracer, "ChatModel", {"openinference.span.kind": "LLM",
                                                          "llm.token_count.prompt": 10}, clock):
                clock.advance(5)
        with ot._timed_span(sdk.tracer, "tools", {"openinference.span.kind": "CHAIN"}, clock):
            with ot._timed_span(sdk.tracer, "get_order", {"openinference.span.kind": "TOOL", "tool.name": "get_order",
                                                          "input.value": "A-1"}, clock):
                clock.advance(5)


def test_span_named_agent_spans_yield_to_the_outermost_even_when_it_arrives_last():
    sdk = _scoped_sdk("openinference.instrumentation.langchain")
    _langgraph_shape(sdk)
    events = _decode(sdk)
    *children, root = events  # the graph's span ends last
    r = IdentityResolver(allowed_lateness_s=30)
    assert r.process(children) == []  # waiting: the chain stops at a span not seen yet
    out = r.process([root])
    assert {e.agent_id for e in out} == {"ops-agent"} and len(out) == len(events)
    inner = next(e for e in out if e.name == "agent")
    assert inner.identity is IdentitySource.ANCESTOR


def test_a_span_named_agent_falls_back_to_its_own_name_when_its_parent_never_comes():
    sdk = _scoped_sdk("openinference.instrumentation.langchain")
    _langgraph_shape(sdk)
    events = [e for e in _decode(sdk) if e.name != "ops-agent"]
    r = IdentityResolver(allowed_lateness_s=30)
    assert r.process(events) == []
    out = r.advance((T0 + timedelta(hours=1)).timestamp())
    llm = next(e for e in out if e.kind is EventKind.LLM_CALL)
    assert llm.agent_id == "agent"  # the outermost span-named agent seen: better than the service
    tool = next(e for e in out if e.kind is EventKind.TOOL_CALL)
    assert tool.agent_id == "ops-service" and tool.identity is IdentitySource.RESOURCE


def test_an_attribute_named_agent_beats_a_span_named_one():
    sdk = _scoped_sdk("openinference.instrumentation.openai_agents")
    clock = ot.Clock()
    with ot._timed_span(sdk.tracer, "Agent workflow", {"openinference.span.kind": "AGENT"}, clock):
        with ot._timed_span(sdk.tracer, "ops-agent", {"openinference.span.kind": "AGENT", "agent.name": "ops-agent"},
                            clock):
            with ot._timed_span(sdk.tracer, "get_order", {"openinference.span.kind": "TOOL", "tool.name": "get_order",
                                                          "input.value": '{"order_id": "A-1"}'}, clock):
                clock.advance(5)
    r = IdentityResolver(allowed_lateness_s=30)
    out = {e.name: e for e in r.process(_decode(sdk)) + r.finish()}
    assert out["get_order"].agent_id == "ops-agent"
    # the SDK's workflow wrapper names no agent in this instrumentation: the service
    assert out["Agent workflow"].agent_id == "ops-service"


# --- profiles: arguments, run ids, call ids ------------------------------------------------


def test_openinference_tool_parameters_is_a_schema_never_the_arguments():
    sdk = _scoped_sdk("openinference.instrumentation.openai_agents")
    schema = '{"properties": {"order_id": {"type": "string"}}, "required": ["order_id"]}'
    clock = ot.Clock()
    for order in ("A-1", "A-2"):
        with ot._timed_span(sdk.tracer, "get_order", {"openinference.span.kind": "TOOL", "tool.name": "get_order",
                                                      "tool.parameters": schema,
                                                      "input.value": f'{{"order_id": "{order}"}}'}, clock):
            clock.advance(5)
    a, b = _decode(sdk)
    assert a.args_fingerprint == fingerprint_arguments({"order_id": "A-1"}) != b.args_fingerprint


def test_openllmetry_langchain_envelope_and_run_id():
    sdk = _scoped_sdk("opentelemetry.instrumentation.langchain")
    clock = ot.Clock()
    for step, call in ((2, "call_1"), (4, "call_2")):
        envelope = {"input_str": "{'order_id': 'A-1'}", "tags": ["seq:step:1"],
                    "metadata": {"langgraph_step": step, "checkpoint_ns": f"tools:{step}"},
                    "inputs": {"order_id": "A-1"}, "kwargs": {"color": "green", "tool_call_id": call}}
        with ot._timed_span(sdk.tracer, "execute_tool get_order", {
                "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "get_order",
                "gen_ai.tool.call.arguments": orjson.dumps(envelope).decode(),
                "gen_ai.agent.id": f"01a2-run-{step}", "gen_ai.agent.name": "ops-agent"}, clock):
            clock.advance(5)
    a, b = _decode(sdk)
    # the call's arguments, without the per-call envelope noise: identical calls fingerprint the same
    assert a.args_fingerprint == b.args_fingerprint == fingerprint_arguments({"order_id": "A-1"})
    assert (a.tool_call_id, b.tool_call_id) == ("call_1", "call_2")
    assert a.agent_id == b.agent_id == "ops-agent"  # the name, never the per-run gen_ai.agent.id


def test_a_stable_gen_ai_agent_id_is_used_elsewhere():
    sdk = _scoped_sdk("my.platform")
    clock = ot.Clock()
    with ot._timed_span(sdk.tracer, "invoke_agent", {"gen_ai.operation.name": "invoke_agent",
                                                     "gen_ai.agent.id": "asst_42", "gen_ai.agent.name": "x"}, clock):
        clock.advance(5)
    assert _decode(sdk)[0].agent_id == "asst_42"
    assert profile_for("opentelemetry.instrumentation.crewai.instrumentation").stable_agent_id is False


def test_call_ids_recovered_from_the_calls_a_model_span_offers():
    # OpenInference's OpenAI Agents spans: the tool span has no call id; the model's output does
    sdk = _scoped_sdk("openinference.instrumentation.openai_agents")
    clock = ot.Clock()
    with ot._timed_span(sdk.tracer, "ops-agent", {"openinference.span.kind": "AGENT", "agent.name": "ops-agent"},
                        clock):
        for i in range(2):  # the same call twice: two offers, claimed in order
            base = "llm.output_messages.0.message.tool_calls.0.tool_call."
            with ot._timed_span(sdk.tracer, "response", {
                    "openinference.span.kind": "LLM", "llm.output_messages.0.message.role": "assistant",
                    base + "id": f"call_{i}", base + "function.name": "get_order",
                    base + "function.arguments": '{"order_id": "A-1"}'}, clock):
                clock.advance(5)
            with ot._timed_span(sdk.tracer, "get_order", {"openinference.span.kind": "TOOL", "tool.name": "get_order",
                                                          "input.value": '{"order_id":"A-1"}'}, clock):
                clock.advance(5)
    r = IdentityResolver(allowed_lateness_s=30)
    tools = [e for e in r.process(_decode(sdk)) if e.kind is EventKind.TOOL_CALL]
    assert [e.tool_call_id for e in tools] == ["call_0", "call_1"]


def test_offers_from_a_langgraph_tool_node_input():
    value = orjson.dumps({"__type": "tool_call_with_context", "tool_call": {
        "name": "get_order", "args": {"order_id": "A-1"}, "id": "call_9", "type": "tool_call"}}).decode()
    (tool, fp, alt, call_id), = offered_calls({"input.value": value})
    assert (tool, call_id) == ("get_order", "call_9")
    assert fp == fingerprint_arguments({"order_id": "A-1"}) and alt == fingerprint_arguments("A-1")
    assert offered_calls({"traceloop.entity.input": orjson.dumps({"inputs": orjson.loads(value)}).decode()})
    assert offered_calls({"input.value": "plain text"}) == []


def test_offers_from_a_crewai_task_output():
    """CrewAI's OpenInference agent span: the completed task's messages hold the model's tool calls."""
    call = {"id": "call_7", "type": "function", "function": {"name": "get_order", "arguments": '{"order_id": "A-1"}'}}
    output = orjson.dumps({"description": "t", "raw": "Done.", "messages": [
        {"role": "user", "content": "go"}, {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "ok", "tool_call_id": "call_7"}]}).decode()
    (tool, fp, _, call_id), = offered_calls({"crew_id": "c1", "input.value": "{}", "output.value": output})
    assert (tool, fp, call_id) == ("get_order", fingerprint_arguments({"order_id": "A-1"}), "call_7")
    assert offered_calls({"input.value": "{}", "output.value": output}) == []  # not a CrewAI task span


# --- the policy hook -------------------------------------------------------------------------


def test_identity_rules_map_attributes_to_an_agent_first():
    policy = parse_policy({"identity_rules": [
        {"match": {"service.name": "billing-*", "k8s.namespace.name": "prod"}, "agent_id": "{service.name}-prod"},
    ]})
    sdk = ot.make_sdk("billing-worker", seed=4, resource={"k8s.namespace.name": "prod"})
    other = ot.make_sdk("search", seed=5, resource={"k8s.namespace.name": "prod"})
    for s in (sdk, other):
        with ot._timed_span(s.tracer, "execute_tool x", {"gen_ai.operation.name": "execute_tool",
                                                         "gen_ai.agent.name": "named"}, ot.Clock()):
            pass
    correlate = CorrelateStage(policy)
    out = correlate.process(_decode(sdk) + _decode(other)) + correlate.finish()
    assert sorted((e.agent_id, e.identity) for e in out) == [
        ("billing-worker-prod", IdentitySource.IDENTITY_MAP), ("named", IdentitySource.ATTRIBUTE)]


def test_offered_calls_are_kept_on_the_event_only_when_there_are_some():
    sdk = _scoped_sdk("pydantic-ai")
    with ot._timed_span(sdk.tracer, "chat", {"gen_ai.operation.name": "chat", "gen_ai.output.messages": orjson.dumps(
            [{"role": "assistant", "parts": [{"type": "text", "content": "hi"}]}]).decode()}, ot.Clock()):
        pass
    assert OFFERED_CALLS_ATTR not in _decode(sdk)[0].attributes


# --- a fallback identity found out later -----------------------------------------------------


def test_alerts_under_a_fallback_identity_are_linked_to_the_agent_whose_span_arrives_later():
    """Six identical calls whose agent span comes after the allowed lateness: they fall back to
    the service and loop under it; when the agent span arrives, the alert says whose they were."""
    policy = parse_policy({"allowed_lateness_s": 5})
    sdk, clock = ot.make_sdk("ops-service", seed=8), ot.Clock()
    with ot._timed_span(sdk.tracer, "invoke_agent ops-agent", {"gen_ai.operation.name": "invoke_agent",
                                                               "gen_ai.agent.name": "ops-agent"}, clock):
        for i in range(6):
            with ot._timed_span(sdk.tracer, "execute_tool get_order", {
                    "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "get_order",
                    "gen_ai.tool.call.arguments": '{"order_id": "A-1"}'}, clock):
                clock.advance(100)
            clock.advance(1000)
        clock.advance(8000)  # the agent span ends later than the lateness allows its children to wait
    spans = sdk.finished()  # exported in two records: the children, then (later) their agent span
    tools, (agent,) = (decode_otlp_proto(ot.to_request(part).SerializeToString()).events
                       for part in (spans[:-1], spans[-1:]))
    correlate, detect = CorrelateStage(policy), DetectStage(policy)
    alerts = {}
    wall = 1_000_000.0
    # the children arrive; the agent span stays out while 7 s pass (the worker's tick): longer than
    # the 5 s its children wait, shorter than the 10 s the span tree is kept for a late agent span
    for a in detect.process(correlate.process(tools, wall=wall)) + detect.process(correlate.tick(wall + 7)):
        alerts[a.alert_id] = a
    assert {a.agent_id for a in alerts.values()} == {"ops-service"}  # fell back
    for a in detect.process(correlate.process([agent], wall=wall + 7)):
        alerts[a.alert_id] = a
    for a in detect.process(correlate.finish()) + detect.finish():
        alerts[a.alert_id] = a
    (loop,) = alerts.values()
    assert (loop.detector, loop.agent_id) == ("retry_loop", "ops-service")
    assert loop.labels["identified_agent_id"] == "ops-agent"
    assert "identified later as ops-agent" in loop.summary
