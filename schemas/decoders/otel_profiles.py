"""What each instrumentation library means by its attributes, chosen by the span's
instrumentation scope name.

The conventions (OTel GenAI, OpenInference, OpenLLMetry) name the fields; the
libraries that implement them fill some fields with something else. Measured on
the real instrumentations (tests/frameworks generates their spans):

- OpenInference TOOL spans: ``tool.parameters`` is the tool's JSON schema (or,
  from some processors, a copy of the arguments); the call's arguments are
  ``input.value``. smolagents wraps them: ``{"args": [...], "kwargs": {...}}``.
- OpenInference AGENT spans often name the agent only by the span name
  (LangChain/LangGraph: the graph's name, and ``agent`` for its model node;
  smolagents: ``<name>.run``; CrewAI: ``<role>._execute_core`` with
  ``graph.node.id``).
- OpenLLMetry LangChain tool spans put an envelope in
  ``gen_ai.tool.call.arguments`` / ``traceloop.entity.input``: ``input_str``,
  ``tags``, ``metadata`` (graph step, checkpoint id), ``inputs`` (the call's
  arguments) and ``kwargs`` (``tool_call_id``).
- ``gen_ai.agent.id`` is a per-run or per-object UUID in OpenLLMetry's LangChain
  and CrewAI instrumentations: not an identity.
- Tool-call ids are not on the tool span in several stacks: they are recovered
  from the calls a model span offers (``llm.output_messages.*.tool_calls``,
  ``gen_ai.output.messages``), a parent chain span's input (LangGraph's
  ``tool_call_with_context``) or a CrewAI task span's output messages, see
  ``offered_calls``; detectors/identity.py matches them to tool spans of the
  same trace.

Only plain functions over an attribute dict, run once per span, and only on the
spans that need them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from schemas.events import fingerprint_arguments

# a kept attribute holding the tool calls a span offers: JSON [[tool, fingerprint, alt, call_id], ...]
OFFERED_CALLS_ATTR = "agentwatch.tool_calls"


def _json(v: Any) -> Any:
    if isinstance(v, (bytes, str)):
        try:
            return orjson.loads(v)
        except orjson.JSONDecodeError:
            return None
    return v


def _openllmetry_envelope(attrs: dict[str, Any]) -> dict[str, Any] | None:
    for key in ("traceloop.entity.input", "gen_ai.tool.call.arguments"):
        doc = _json(attrs.get(key))
        if isinstance(doc, dict) and ("inputs" in doc or "input_str" in doc):
            return doc
    return None


def _openllmetry_langchain_args(attrs: dict[str, Any]) -> Any:
    env = _openllmetry_envelope(attrs)
    if env is None:
        return attrs.get("gen_ai.tool.call.arguments") or attrs.get("traceloop.entity.input")
    return env["inputs"] if "inputs" in env else env.get("input_str")


def _openllmetry_langchain_call_id(attrs: dict[str, Any]) -> str:
    env = _openllmetry_envelope(attrs)
    kwargs = env.get("kwargs") if env else None
    call_id = kwargs.get("tool_call_id") if isinstance(kwargs, dict) else None
    return call_id if isinstance(call_id, str) else ""


def _openinference_args(attrs: dict[str, Any]) -> Any:
    return attrs.get("input.value")


def _smolagents_args(attrs: dict[str, Any]) -> Any:
    doc = _json(attrs.get("input.value"))
    if isinstance(doc, dict) and "kwargs" in doc:
        args, kwargs = doc.get("args") or [], doc.get("kwargs") or {}
        return {"args": args, **kwargs} if args else kwargs
    return attrs.get("input.value")


def _langchain_tool_output_call_id(attrs: dict[str, Any]) -> str:
    """OpenInference LangChain: a successful tool's output is its ToolMessage, with the call id."""
    doc = _json(attrs.get("output.value"))
    data = doc.get("data") if isinstance(doc, dict) else None
    call_id = data.get("tool_call_id") if isinstance(data, dict) else None
    return call_id if isinstance(call_id, str) else ""


def _no_call_id(attrs: dict[str, Any]) -> str:
    return ""


def _span_name_minus(suffix: str) -> Callable[[str, dict[str, Any]], str]:
    def name(span_name: str, attrs: dict[str, Any]) -> str:
        node = attrs.get("graph.node.id")
        if isinstance(node, str) and node:
            return node
        return span_name.removesuffix(suffix)

    return name


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    # gen_ai.agent.id names the agent (False: a run or object UUID; use gen_ai.agent.name)
    stable_agent_id: bool = True
    # the call's arguments on a tool span; None: the convention's keys
    tool_args: Callable[[dict[str, Any]], Any] | None = None
    # the call id on a tool span when the convention's keys are absent
    tool_call_id: Callable[[dict[str, Any]], str] = _no_call_id
    # an unnamed agent span's name: OpenInference AGENT spans are named by their span name
    agent_span_name: Callable[[str, dict[str, Any]], str] | None = None


# an OpenInference AGENT span of an instrumentation not listed here is still named by its span name
GENERIC = Profile("generic", agent_span_name=_span_name_minus(""))
OPENINFERENCE = Profile("openinference", tool_args=_openinference_args, agent_span_name=_span_name_minus(""))

# scope name (exact, then longest matching prefix) -> profile
_BY_SCOPE: dict[str, Profile] = {
    "openinference.instrumentation.langchain": Profile(
        "openinference.langchain", tool_args=_openinference_args, tool_call_id=_langchain_tool_output_call_id,
        agent_span_name=_span_name_minus("")),
    "openinference.instrumentation.smolagents": Profile(
        "openinference.smolagents", tool_args=_smolagents_args, agent_span_name=_span_name_minus(".run")),
    "openinference.instrumentation.crewai": Profile(
        "openinference.crewai", tool_args=_openinference_args, agent_span_name=_span_name_minus("._execute_core")),
    # its agent spans carry agent.name; the AGENT span without one is the run's workflow ("Agent workflow")
    "openinference.instrumentation.openai_agents": Profile("openinference.openai_agents", tool_args=_openinference_args),
    "openinference.instrumentation": OPENINFERENCE,
    "opentelemetry.instrumentation.langchain": Profile(
        "openllmetry.langchain", stable_agent_id=False, tool_args=_openllmetry_langchain_args,
        tool_call_id=_openllmetry_langchain_call_id),
    "opentelemetry.instrumentation.crewai": Profile("openllmetry.crewai", stable_agent_id=False),
}
_CACHE: dict[str, Profile] = {}


def profile_for(scope_name: str) -> Profile:
    """The profile of an instrumentation scope; spans of unknown scopes follow the conventions."""
    found = _CACHE.get(scope_name)
    if found is None:
        found = _BY_SCOPE.get(scope_name)
        if found is None:
            prefixes = [p for p in _BY_SCOPE if scope_name.startswith(p)]
            found = _BY_SCOPE[max(prefixes, key=len)] if prefixes else GENERIC
        if len(_CACHE) < 4096:  # scope names come from the wire: bound the cache
            _CACHE[scope_name] = found
    return found


# --- tool calls offered by a model or chain span ---------------------------------------


def _flattened_calls(attrs: dict[str, Any]) -> Iterator[tuple[str, Any, str]]:
    """OpenInference: llm.output_messages.{i}.message.tool_calls.{j}.tool_call.{id,function.name,function.arguments}."""
    for key, call_id in attrs.items():
        if key.startswith("llm.output_messages.") and key.endswith(".tool_call.id") and isinstance(call_id, str):
            stem = key[: -len("id")]
            yield str(attrs.get(stem + "function.name") or ""), attrs.get(stem + "function.arguments"), call_id


def _genai_output_calls(value: Any) -> Iterator[tuple[str, Any, str]]:
    """GenAI semconv gen_ai.output.messages: [{"parts": [{"type": "tool_call", "id", "name", "arguments"}]}]."""
    if isinstance(value, str) and "tool_call" not in value:
        return  # most model answers call no tool: not worth parsing
    doc = _json(value)
    for msg in doc if isinstance(doc, list) else ():
        parts = msg.get("parts") if isinstance(msg, dict) else None
        for part in parts if isinstance(parts, list) else ():
            if isinstance(part, dict) and part.get("type") == "tool_call" and isinstance(part.get("id"), str):
                yield str(part.get("name") or ""), part.get("arguments"), part["id"]


_TOOL_NODE_INPUTS = ('{"__type": "tool_call_with_context"', '{"inputs": {"__type": "tool_call_with_context"',
                     '{"__type":"tool_call_with_context"', '{"inputs":{"__type":"tool_call_with_context"')


def _chain_input_call(value: Any) -> Iterator[tuple[str, Any, str]]:
    """LangGraph's ToolNode input (both instrumentations): {"__type": "tool_call_with_context", "tool_call": {...}},
    bare (OpenInference input.value) or in OpenLLMetry's envelope under "inputs"."""
    # by prefix: every LangGraph span's input holds the graph state, which may mention the marker
    if not isinstance(value, str) or not value.startswith(_TOOL_NODE_INPUTS):
        return
    doc = _json(value)
    if isinstance(doc, dict) and isinstance(doc.get("inputs"), dict):
        doc = doc["inputs"]
    call = doc.get("tool_call") if isinstance(doc, dict) else None
    if isinstance(call, dict) and isinstance(call.get("id"), str):
        yield str(call.get("name") or ""), call.get("args"), call["id"]


def _task_output_calls(value: Any) -> Iterator[tuple[str, Any, str]]:
    """CrewAI (OpenInference): the agent span's ``output.value`` is the task's output, whose
    ``messages`` hold the model's tool calls in OpenAI's format when it does native function
    calling. Only a completed task has one: a run CrewAI stopped records none."""
    if not isinstance(value, str) or '"tool_calls"' not in value:
        return
    doc = _json(value)
    messages = doc.get("messages") if isinstance(doc, dict) else None
    for msg in messages if isinstance(messages, list) else ():
        calls = msg.get("tool_calls") if isinstance(msg, dict) and msg.get("role") == "assistant" else None
        for call in calls if isinstance(calls, list) else ():
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict) and isinstance(call.get("id"), str):
                yield str(fn.get("name") or ""), fn.get("arguments"), call["id"]


def offered_calls(attrs: dict[str, Any]) -> list[list[str]]:
    """Tool calls a span records but does not execute: [tool, fingerprint, alt fingerprint, call id].

    The alt fingerprint is that of a one-argument call's bare value: OpenInference's
    LangChain tool span records such a call's input as the value alone.
    """
    found: list[list[str]] = []
    sources: list[Iterator[tuple[str, Any, str]]] = []
    if "llm.output_messages.0.message.role" in attrs:
        sources.append(_flattened_calls(attrs))
    if "gen_ai.output.messages" in attrs:
        sources.append(_genai_output_calls(attrs["gen_ai.output.messages"]))
    for key in ("input.value", "traceloop.entity.input"):
        if key in attrs:
            sources.append(_chain_input_call(attrs[key]))
    # a CrewAI task span (it has an input.value too, which is what brings the decoder here)
    if "crew_id" in attrs and "output.value" in attrs:
        sources.append(_task_output_calls(attrs["output.value"]))
    for source in sources:
        for tool, args, call_id in source:
            value = _json(args) if isinstance(args, str) else args
            alt = ""
            if isinstance(value, dict) and len(value) == 1:
                (only,) = value.values()
                alt = fingerprint_arguments(only if isinstance(only, str) else orjson.dumps(only).decode())
            found.append([tool, fingerprint_arguments(args), alt, call_id])
    return found
