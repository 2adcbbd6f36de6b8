"""OTLP traces -> canonical events.

Accepts what the OpenTelemetry Collector's Kafka exporter writes (``otlp_proto``:
ExportTraceServiceRequest bytes; ``otlp_json``: the OTLP/JSON mapping, also
written by its file exporter). Both encodings are first flattened into the same
``_Span`` shape, so the attribute-convention mapping (OTel GenAI, OpenInference,
OpenLLMetry) exists once and both encodings of a trace yield identical events.

Speed matters (a record may hold a whole batch): JSON is parsed once with
orjson and walked as plain dicts; pydantic runs once per span, never per
attribute.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from google.protobuf.message import DecodeError as ProtoDecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from schemas.decoders import DecodeResult, Failure
from schemas.decoders.otel_profiles import GENERIC, OFFERED_CALLS_ATTR, Profile, offered_calls, profile_for
from schemas.events import Event, EventKind, IdentitySource, fingerprint_arguments, stable_id

SOURCE_JSON = "otlp_json"
SOURCE_PROTO = "otlp_proto"

_STATUS_ERROR = 2
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_SPAN_KIND_NAMES = ("unspecified", "internal", "server", "client", "producer", "consumer")
_STATUS_NAMES = {"UNSET": 0, "OK": 1, "ERROR": 2}
_ATTR_MAX = 256  # attribute values kept on an event are truncated: they are join keys, not payloads

# --- attribute conventions ---------------------------------------------------

_GENAI_LLM_OPS = frozenset({"chat", "text_completion", "generate_content", "embeddings"})
# enum members as module globals: looking a member up on its Enum class costs several
# times a global's lookup on CPython 3.11, and these are read for every span
_SPAN, _LLM_CALL, _TOOL_CALL, _AGENT = EventKind.SPAN, EventKind.LLM_CALL, EventKind.TOOL_CALL, EventKind.AGENT
_BY_ATTRIBUTE, _BY_SPAN_NAME, _BY_ANCESTOR = IdentitySource.ATTRIBUTE, IdentitySource.SPAN_NAME, IdentitySource.ANCESTOR
# _classify's answers: (kind, agent lifecycle)
_AS_SPAN, _AS_LLM_CALL, _AS_TOOL_CALL = (_SPAN, ""), (_LLM_CALL, ""), (_TOOL_CALL, "")
_AS_AGENT_INVOKE = (_AGENT, "invoke")
_GENAI_AGENT_OPS = {"invoke_agent": _AS_AGENT_INVOKE, "create_agent": (_AGENT, "spawn")}
_OPENINFERENCE_KINDS = {"LLM": _AS_LLM_CALL, "EMBEDDING": _AS_LLM_CALL, "TOOL": _AS_TOOL_CALL}
_AGENT_ID_KEYS = ("gen_ai.agent.id",)  # used only where the instrumentation's profile says it is stable
_AGENT_NAME_KEYS = ("gen_ai.agent.name", "agent.name")
_TENANT_KEYS = ("tenant", "agentwatch.tenant", "tenant.id")
_TOOL_NAME_KEYS = ("gen_ai.tool.name", "tool.name")
# never OpenInference's tool.parameters: that is the tool's JSON schema, the same on every call
_TOOL_ARGS_KEYS = ("gen_ai.tool.call.arguments", "input.value", "traceloop.entity.input")
_TOOL_CALL_ID_KEYS = ("gen_ai.tool.call.id", "tool_call.id")
_INPUT_TOKEN_KEYS = (
    "gen_ai.usage.input_tokens",
    "gen_ai.usage.prompt_tokens",
    "llm.token_count.prompt",
    "llm.usage.prompt_tokens",
)
_OUTPUT_TOKEN_KEYS = (
    "gen_ai.usage.output_tokens",
    "gen_ai.usage.completion_tokens",
    "llm.token_count.completion",
    "llm.usage.completion_tokens",
)
_MODEL_KEYS = ("gen_ai.response.model", "gen_ai.request.model", "llm.model_name")
_COST_KEYS = ("gen_ai.usage.cost", "llm.cost.total")
_CONVERSATION_KEYS = ("gen_ai.conversation.id", "session.id")
_CONVERSATION_ATTR = "gen_ai.conversation.id"
# the agent's version a span names itself; else the resource's service.version, else its
# k8s deployment (a canary usually runs as a deployment of its own)
_VERSION_KEYS = ("gen_ai.agent.version", "agent.version")
_RESOURCE_VERSION_KEYS = ("service.version", "k8s.deployment.name")  # both conventions land under one key, so joins need one column

# Correlation keys and context worth carrying on the event: a later join with
# audit records (CloudTrail requestID, k8s objects, SQL) looks for these.
_KEEP_KEYS = frozenset(
    {
        "service.name",
        "service.namespace",
        "service.instance.id",
        "service.version",
        "deployment.environment",
        "deployment.environment.name",
        "http.method",
        "http.request.method",
        "http.url",
        "url.full",
        "http.route",
        "server.address",
        "db.system",
        "db.statement",
        "db.query.text",
        "rpc.system",
        "rpc.service",
        "rpc.method",
        "gen_ai.system",
        "gen_ai.provider.name",
        # kept so the policy's identity_rules can map what an instrumentation put there
        "gen_ai.agent.id",
        "gen_ai.agent.name",
        "agent.name",
        "graph.node.id",
    }
)
_KEEP_PREFIXES = ("k8s.", "aws.", "cloud.")
# attributes that may list tool calls a span offers (otel_profiles.offered_calls)
_MAY_OFFER_CALLS = ("llm.output_messages.0.message.role", "gen_ai.output.messages", "input.value",
                    "traceloop.entity.input")

# attribute key -> (role, rank): for each role the lowest-ranked key present wins
_ROLES: dict[str, tuple[str, int]] = {
    key: (role, rank)
    for role, keys in (
        ("agent_id", _AGENT_ID_KEYS),
        ("agent_name", _AGENT_NAME_KEYS),
        ("tenant", _TENANT_KEYS),
        ("tool_name", _TOOL_NAME_KEYS),
        ("args", _TOOL_ARGS_KEYS),
        ("call_id", _TOOL_CALL_ID_KEYS),
        ("input_tokens", _INPUT_TOKEN_KEYS),
        ("output_tokens", _OUTPUT_TOKEN_KEYS),
        ("model", _MODEL_KEYS),
        ("cost", _COST_KEYS),
        ("conversation", _CONVERSATION_KEYS),
        ("version", _VERSION_KEYS),
    )
    for rank, key in enumerate(keys)
}


@dataclass(slots=True)
class _Resource:
    """What one resource contributes to each of its spans, computed once per resource."""

    tenant: str
    kept: dict[str, str]
    # a template Event validated once; each span's event is a copy of its fields updated
    # with values this module typed itself. Validating every span instead would cost a
    # quarter of the decode.
    fields: dict[str, Any]
    # the template's fields_set plus the fields every span's event sets (_SPAN_SETS)
    fields_set: set[str]


_new_event = Event.__new__
_set = object.__setattr__


# the fields _span_event sets on every span's event; the others only when the span has them
_SPAN_SETS = frozenset({"event_id", "kind", "ts", "tenant", "trace_id", "span_id", "parent_span_id", "name",
                        "is_agent_span", "attributes", "correlation", "outcome"})
_fromtimestamp = datetime.fromtimestamp


_blake2b = hashlib.blake2b
_FINGERPRINTS: dict[str, str] = {}
_FINGERPRINTS_MAX = 8192


def _fingerprint(args: Any) -> str:
    """fingerprint_arguments, remembered for argument text seen recently: a looping
    agent repeats its arguments, and parsing plus re-serialising them is the
    dearest step of a tool call's decode."""
    if args.__class__ is not str:
        return fingerprint_arguments(args)
    fp = _FINGERPRINTS.get(args)
    if fp is None:
        if len(_FINGERPRINTS) >= _FINGERPRINTS_MAX:
            _FINGERPRINTS.clear()  # cheaper than LRU bookkeeping on every hit; refills in one batch
        fp = _FINGERPRINTS[args] = fingerprint_arguments(args)
    return fp


@dataclass(slots=True)
class _Span:
    """One span flattened out of either encoding; ids are lowercase hex."""

    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: int
    start_ns: int
    end_ns: int
    status_code: int
    status_message: str
    attrs: dict[str, Any]
    # span events and the encoding's reader of their exception.type: only failed
    # spans without error.type need it, so it is not read up front
    events: Any
    read_exception_type: Callable[[Any], str]
    # what the instrumentation that made the span means by its attributes (by scope name)
    profile: Profile = GENERIC


def _as_int(v: Any) -> int:
    try:
        return int(v)
    except (TypeError, ValueError):
        return 0


def _as_text(v: Any) -> str:
    if isinstance(v, str):
        text = v
    elif isinstance(v, (list, dict)):
        text = orjson.dumps(v, default=str).decode()
    else:
        text = str(v)
    return text if len(text) <= _ATTR_MAX else text[:_ATTR_MAX]


def _is_uuid(v: str) -> bool:
    return len(v) == 36 and v.count("-") == 4 and all(c in "0123456789abcdefABCDEF-" for c in v)


def resource_agent_id(attrs: dict[str, Any]) -> str:
    """The agent a resource is when no span names one.

    ``service.name`` first: it is what the deployment calls the agent and it is
    the same in every process, restart and replica. ``service.instance.id``
    only when the service is unnamed (the SDK's ``unknown_service``) and the
    instance id is not a UUID: the OTel SDK sets a fresh random UUID4 per
    process, which would make every process a different agent.
    """
    service = str(attrs.get("service.name") or "")
    if service and not service.startswith("unknown_service"):
        return service
    instance = str(attrs.get("service.instance.id") or "")
    if instance and not _is_uuid(instance):
        return instance
    return service


def _resource(attrs: dict[str, Any], origin: str, source: str) -> _Resource:
    service = attrs.get("service.name") or ""
    kept: dict[str, str] = {}
    roles = _roles(attrs, kept)
    template = Event(
        event_id="-",
        kind=EventKind.SPAN,
        ts=_EPOCH,
        source=source,
        origin=origin or str(service),
        fallback_agent_id=resource_agent_id(attrs),
        agent_version=next((_as_text(attrs[k]) for k in _RESOURCE_VERSION_KEYS if attrs.get(k)), ""),
    )
    return _Resource(tenant=str(roles.get("tenant") or ""), kept=kept, fields=template.__dict__,
                     fields_set=template.__pydantic_fields_set__ | _SPAN_SETS)


def _classify(attrs: dict[str, Any]) -> tuple[EventKind, str]:
    """(kind, agent lifecycle) by the first convention the span follows."""
    op = attrs.get("gen_ai.operation.name")
    if op is not None:
        if op in _GENAI_LLM_OPS:
            return _AS_LLM_CALL
        if op == "execute_tool":
            return _AS_TOOL_CALL
        if op in _GENAI_AGENT_OPS:
            return _GENAI_AGENT_OPS[op]
        return _AS_SPAN
    oi = attrs.get("openinference.span.kind")
    if oi is not None:
        oi = str(oi).upper()
        if oi == "AGENT":
            return _AS_AGENT_INVOKE
        return _OPENINFERENCE_KINDS.get(oi, _AS_SPAN)
    tl = attrs.get("traceloop.span.kind")
    if tl == "tool":
        return _AS_TOOL_CALL
    if tl == "agent":
        return _AS_AGENT_INVOKE
    if tl is None and ("llm.request.type" in attrs or "gen_ai.system" in attrs):
        return _AS_LLM_CALL
    return _AS_SPAN


# attribute keys of a span (in order) -> what _roles reads of them: the keys to keep, and for
# each role its candidate keys by rank. Spans of one instrumentation repeat a handful of key
# sets, so the per-key lookups run once per key set instead of once per span.
_Plan = tuple[tuple[str, ...], tuple[tuple[str, tuple[str, ...]], ...]]
_PLANS: dict[tuple[str, ...], _Plan] = {}
_PLANS_MAX = 4096


def _plan(keys: tuple[str, ...]) -> _Plan:
    keep: list[str] = []
    by_role: dict[str, list[tuple[int, str]]] = {}
    for k in keys:
        role = _ROLES.get(k)
        if role is not None:
            by_role.setdefault(role[0], []).append((role[1], k))
        elif k in _KEEP_KEYS or k.startswith(_KEEP_PREFIXES):
            keep.append(k)
    # a stable sort: keys of equal rank stay in attribute order, as the single pass took them
    plan = (tuple(keep), tuple((name, tuple(k for _, k in sorted(c, key=lambda rk: rk[0])))
                               for name, c in by_role.items()))
    if len(_PLANS) >= _PLANS_MAX:
        _PLANS.clear()  # hostile input with ever new key sets: refills from what is current
    _PLANS[keys] = plan
    return plan


def _roles(attrs: dict[str, Any], kept: dict[str, str]) -> dict[str, Any]:
    """The best-ranked value of each role among a span's attributes (an empty value
    counts as absent), and the attributes worth keeping (added to ``kept``)."""
    keys = tuple(attrs)
    plan = _PLANS.get(keys)
    if plan is None:
        plan = _plan(keys)
    keep, by_role = plan
    for k in keep:
        kept[k] = _as_text(attrs[k])
    roles: dict[str, Any] = {}
    for name, candidates in by_role:
        for k in candidates:
            v = attrs[k]
            if v is not None and v != "":
                roles[name] = v
                break
    return roles


def _tool_name(span: _Span, roles: dict[str, Any]) -> str:
    name = roles.get("tool_name")
    if name is None and span.attrs.get("traceloop.span.kind") == "tool":
        name = span.attrs.get("traceloop.entity.name")
    if name is None:
        name = span.name.removeprefix("execute_tool ")
    return str(name)


def _agent_attribute(span: _Span, roles: dict[str, Any], kind: EventKind) -> tuple[str, IdentitySource]:
    """The agent a span names itself, and how sure that is (see detectors/identity.py for the order)."""
    agent = roles.get("agent_id") if span.profile.stable_agent_id else None
    if agent is None:
        agent = roles.get("agent_name")
    if agent is None and kind is EventKind.AGENT:
        if span.attrs.get("traceloop.span.kind") == "agent":
            agent = span.attrs.get("traceloop.entity.name")  # OpenLLMetry names its agent spans this way
        elif span.profile.agent_span_name is not None and span.attrs.get("openinference.span.kind") is not None:
            # only the span name: a candidate that yields to an enclosing agent span
            name = span.profile.agent_span_name(span.name, span.attrs)
            return (name, IdentitySource.SPAN_NAME) if name else ("", IdentitySource.UNKNOWN)
    return ("", IdentitySource.UNKNOWN) if agent is None else (str(agent), IdentitySource.ATTRIBUTE)


def _tool_args(span: _Span, roles: dict[str, Any]) -> Any:
    """The call's arguments: where the span's instrumentation puts them, else the conventions' keys."""
    extract = span.profile.tool_args
    if extract is not None:
        value = extract(span.attrs)
        if value is not None:
            return value
    return roles.get("args")


def _span_event(span: _Span, res: _Resource) -> Event:
    """The span's event: a copy of the resource's template with the span's fields.

    Written for speed (it runs once per span): the event's ``__dict__`` is filled
    in place and its fields_set extended by hand, with the values this module
    typed itself, so the result is what ``template.model_copy(update=...)`` gives
    without pydantic's generic copy and without validation.
    """
    attrs = span.attrs
    kind, lifecycle = _classify(attrs)
    kept = res.kept.copy()
    roles = _roles(attrs, kept)
    trace_id, span_id, start_ns, end_ns = span.trace_id, span.span_id, span.start_ns, span.end_ns
    d = res.fields.copy()
    fields_set = res.fields_set.copy()
    # stable_id("span", trace_id, span_id), spelled out: the ids are ASCII hex already
    d["event_id"] = _blake2b(b"span\x1f" + trace_id.encode() + b"\x1f" + span_id.encode() + b"\x1f",
                             digest_size=16).hexdigest()
    d["kind"] = kind
    d["ts"] = _fromtimestamp((end_ns or start_ns) / 1e9, UTC)
    tenant = roles.get("tenant") or res.tenant or "default"
    d["tenant"] = tenant if tenant.__class__ is str else str(tenant)
    d["trace_id"] = trace_id
    d["span_id"] = span_id
    d["parent_span_id"] = span.parent_span_id
    d["name"] = span.name
    d["is_agent_span"] = kind is _AGENT
    d["attributes"] = kept
    d["correlation"] = {}  # a copy is shallow: never share the template's dict
    if start_ns and end_ns >= start_ns:
        d["duration_ms"] = (end_ns - start_ns) / 1e6
        fields_set.add("duration_ms")

    if roles:
        if "version" in roles:
            d["agent_version"] = _as_text(roles["version"])
            fields_set.add("agent_version")
    agent, identity = _agent_attribute(span, roles, kind)
    if agent:
        d["agent_id"] = agent
        d["identity"] = identity
        fields_set.add("agent_id")
        fields_set.add("identity")

    error_type = attrs.get("error.type")
    if span.status_code == _STATUS_ERROR or error_type is not None:
        d["outcome"] = "error"
        d["error_type"] = str(error_type or span.read_exception_type(span.events) or span.status_message or "error")
        fields_set.add("error_type")
    else:
        d["outcome"] = "ok"

    if kind is _TOOL_CALL:
        d["tool_name"] = _tool_name(span, roles)
        fields_set.add("tool_name")
        args = _tool_args(span, roles)
        if args is not None and args != "":
            d["args_fingerprint"] = _fingerprint(args)
            fields_set.add("args_fingerprint")
        call_id = roles.get("call_id") or span.profile.tool_call_id(attrs)
        if call_id:
            d["tool_call_id"] = str(call_id)
            fields_set.add("tool_call_id")
    elif kind is _AGENT:
        d["lifecycle"] = lifecycle
        fields_set.add("lifecycle")
        if lifecycle == "spawn" and agent:
            d["target_agent_id"] = agent  # create_agent names the agent it creates
            fields_set.add("target_agent_id")

    # usage and model are read on every kind: frameworks also put them on agent
    # and chain spans, and a token budget must not miss them.
    if roles:
        if "input_tokens" in roles:
            d["input_tokens"] = _as_int(roles["input_tokens"])
            fields_set.add("input_tokens")
        if "output_tokens" in roles:
            d["output_tokens"] = _as_int(roles["output_tokens"])
            fields_set.add("output_tokens")
        if "model" in roles:
            d["model"] = str(roles["model"])
            fields_set.add("model")
        if "cost" in roles:
            try:
                d["cost_usd"] = float(roles["cost"])
                fields_set.add("cost_usd")
            except (TypeError, ValueError):
                pass
        if "conversation" in roles:
            kept[_CONVERSATION_ATTR] = _as_text(roles["conversation"])
    if 2 <= span.kind <= 5:  # server/client/producer/consumer: tells a downstream call from internal work
        kept["span.kind"] = _SPAN_KIND_NAMES[span.kind]
    if kind is not _TOOL_CALL and not attrs.keys().isdisjoint(_MAY_OFFER_CALLS):
        offers = offered_calls(attrs)
        if offers:  # tool calls a model or chain span records: the call ids of tool spans that lack one
            kept[OFFERED_CALLS_ATTR] = orjson.dumps(offers).decode()
    e = _new_event(Event)
    _set(e, "__dict__", d)
    _set(e, "__pydantic_extra__", None)
    _set(e, "__pydantic_fields_set__", fields_set)
    _set(e, "__pydantic_private__", None)
    return e


def _resolve_in_record(events: list[Event]) -> None:
    """Give spans the identity of their nearest named agent ancestor when it is in the same record.

    Only a convenience: parents usually arrive in later records, and the
    stateful resolver in detectors/identity.py handles that. It follows the
    same rules (the nearest attribute-named agent span wins, anonymous and
    span-named agent spans are passed through, a "default" tenant is taken from
    the agent span) so an event's identity does not depend on how the exporter
    happened to batch its trace. Which span-named agent span is outermost is
    left to the resolver: it needs the whole chain.
    """
    # read through the events' __dict__: an attribute of a pydantic model goes through
    # its __getattr__ hook, several times a dict lookup, and this runs for every span
    rows = [e.__dict__ for e in events]
    if not any(r["is_agent_span"] for r in rows):
        return
    by_span = {(r["trace_id"], r["span_id"]): r for r in rows}
    for e, d in zip(events, rows):
        if d["agent_id"] and d["identity"] is not _BY_SPAN_NAME:
            continue
        parent = by_span.get((d["trace_id"], d["parent_span_id"]))
        hops = 0
        while parent is not None and hops < len(events):  # hops bound guards against id cycles
            if parent["is_agent_span"] and parent["identity"] is _BY_ATTRIBUTE:
                # what pydantic's __setattr__ does without validate_assignment, minus its dispatch
                fields_set = e.__pydantic_fields_set__
                d["agent_id"] = parent["agent_id"]
                d["identity"] = _BY_ANCESTOR
                fields_set.update(("agent_id", "identity"))
                if parent["agent_version"]:  # the version of the agent the span works for
                    d["agent_version"] = parent["agent_version"]
                    fields_set.add("agent_version")
                if d["tenant"] == "default":
                    d["tenant"] = parent["tenant"]
                    fields_set.add("tenant")
                break
            parent = by_span.get((parent["trace_id"], parent["parent_span_id"]))
            hops += 1


def _finish(result: DecodeResult) -> DecodeResult:
    if result.events:
        _resolve_in_record(result.events)
    return result


# --- otlp_proto --------------------------------------------------------------


def _proto_value(v: Any) -> Any:
    which = v.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [_proto_value(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return {kv.key: _proto_value(kv.value) for kv in v.kvlist_value.values}
    if which == "bytes_value":
        return base64.b64encode(v.bytes_value).decode()
    return getattr(v, which)


def _proto_attrs(kvs: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in kvs:
        v = kv.value
        text = v.string_value  # most attributes are strings: a non-empty one needs no WhichOneof
        out[kv.key] = text if text else _proto_value(v)
    return out


def _proto_exception_type(events: Any) -> str:
    for ev in events:
        if ev.name == "exception":
            for kv in ev.attributes:
                if kv.key == "exception.type":
                    return str(_proto_value(kv.value) or "")
    return ""


def _proto_span_exception_type(span: Any) -> str:
    # a span's events are read only for a failed span without error.type
    return _proto_exception_type(span.events)


def _proto_single(rs: Any, ss: Any, span: Any) -> bytes:
    """A bad span re-wrapped with its resource and scope, so the DLQ holds a replayable record."""
    req = ExportTraceServiceRequest()
    r = req.resource_spans.add()
    r.resource.CopyFrom(rs.resource)
    r.schema_url = rs.schema_url
    s = r.scope_spans.add()
    s.scope.CopyFrom(ss.scope)
    s.spans.add().CopyFrom(span)
    return req.SerializeToString()


_ZERO16, _ZERO8 = bytes(16), bytes(8)


def _proto_span_problem(span: Any) -> str:
    if len(span.trace_id) != 16 or not any(span.trace_id):
        return "missing traceId" if not span.trace_id else f"invalid traceId ({len(span.trace_id)} bytes)"
    if len(span.span_id) != 8 or not any(span.span_id):
        return "missing spanId" if not span.span_id else f"invalid spanId ({len(span.span_id)} bytes)"
    if span.parent_span_id and len(span.parent_span_id) != 8:
        return f"invalid parentSpanId ({len(span.parent_span_id)} bytes)"
    if not span.end_time_unix_nano and not span.start_time_unix_nano:
        return "missing endTimeUnixNano and startTimeUnixNano"
    return ""


def decode_otlp_proto(payload: bytes, *, origin: str = "") -> DecodeResult:
    """Decode ExportTraceServiceRequest bytes (one span, a trace or a whole batch)."""
    result = DecodeResult()
    req = ExportTraceServiceRequest()
    try:
        req.ParseFromString(payload)
    except (ProtoDecodeError, RuntimeError, ValueError) as exc:
        result.failures.append(
            Failure(payload, f"{SOURCE_PROTO}: not an ExportTraceServiceRequest: {exc}", SOURCE_PROTO)
        )
        return result
    # spans of one trace share their trace id and parents: convert each id once per record
    hexed: dict[bytes, str] = {}
    append = result.events.append
    for ri, rs in enumerate(req.resource_spans):
        res = _resource(_proto_attrs(rs.resource.attributes), origin, SOURCE_PROTO)
        for si, ss in enumerate(rs.scope_spans):
            profile = profile_for(ss.scope.name)
            for pi, sp in enumerate(ss.spans):
                trace_id, span_id, parent_id = sp.trace_id, sp.span_id, sp.parent_span_id
                start_ns, end_ns = sp.start_time_unix_nano, sp.end_time_unix_nano
                # the common, valid case is told by lengths and comparisons; only a
                # suspect span pays for the full check and its message
                suspect = (len(trace_id) != 16 or len(span_id) != 8 or trace_id == _ZERO16 or span_id == _ZERO8
                           or (parent_id and len(parent_id) != 8) or not (end_ns or start_ns))
                problem = _proto_span_problem(sp) if suspect else ""
                if problem:
                    where = f"resourceSpans[{ri}].scopeSpans[{si}].spans[{pi}]"
                    reason = f"{SOURCE_PROTO}: {where}: {problem}"
                    result.failures.append(Failure(_proto_single(rs, ss, sp), reason, SOURCE_PROTO))
                    continue
                trace_hex = hexed.get(trace_id)
                if trace_hex is None:
                    trace_hex = hexed[trace_id] = trace_id.hex()
                parent_hex = hexed.get(parent_id)
                if parent_hex is None:
                    parent_hex = hexed[parent_id] = parent_id.hex()
                status = sp.status
                code = status.code
                attrs = _proto_attrs(sp.attributes)
                # the status message is read only where _span_event uses it: for an error
                message = status.message if code == _STATUS_ERROR or "error.type" in attrs else ""
                # positional: the dataclass's keyword parsing would cost more than the rest of this loop
                span = _Span(trace_hex, span_id.hex(), parent_hex, sp.name, sp.kind, start_ns, end_ns, code,
                             message, attrs, sp, _proto_span_exception_type, profile)
                append(_span_event(span, res))
    return _finish(result)


# --- otlp_json ---------------------------------------------------------------


class _Bad(ValueError):
    """A span field that cannot be read; the message becomes the Failure reason."""


def _key(d: dict[str, Any], *names: str) -> tuple[str, Any]:
    """The first of ``names`` present in ``d`` (camelCase first, then snake_case or legacy)."""
    for n in names:
        v = d.get(n)
        if v is not None:
            return n, v
    return names[0], None


def _json_int64(v: Any, field: str) -> int:
    # proto3 JSON writes 64-bit ints as strings; some producers write numbers
    if v is None or v == "":
        return 0
    if isinstance(v, bool):
        raise _Bad(f"invalid {field} {v!r}")
    try:
        return int(v)
    except (TypeError, ValueError):
        raise _Bad(f"invalid {field} {v!r}") from None


def _json_id(v: Any, nbytes: int, field: str, *, required: bool) -> str:
    """Hex (the Collector's form) or base64 (plain proto3 JSON) ids, as lowercase hex."""
    if v is None or v == "":
        if required:
            raise _Bad(f"missing {field}")
        return ""
    if isinstance(v, str):
        raw: bytes | None = None
        if len(v) == nbytes * 2:
            try:
                raw = bytes.fromhex(v)
            except ValueError:
                raw = None
            if raw is not None and len(raw) == nbytes and (not required or any(raw)):
                return v if v.islower() or v.isdigit() else v.lower()  # fast path: the Collector's hex
        if raw is None or len(raw) != nbytes:
            try:
                raw = base64.b64decode(v, validate=True)
            except (binascii.Error, ValueError):
                raw = None
        if raw is not None and len(raw) == nbytes:
            if required and not any(raw):
                raise _Bad(f"invalid {field} (all zeros)")
            return raw.hex()
    raise _Bad(f"invalid {field} {v!r} (want {nbytes * 2} hex chars or base64 of {nbytes} bytes)")


def _json_value(v: Any) -> Any:
    if not isinstance(v, dict) or not v:
        return v  # tolerate producers that put a bare scalar where an AnyValue belongs
    text = v.get("stringValue")  # most attributes are strings: skip the generic path
    if text is not None:
        return text
    for k, x in v.items():
        conv = _JSON_ANY.get(k)
        if conv is not None:
            return conv(x)
    return None


def _json_array(x: Any) -> list[Any]:
    values = x.get("values") if isinstance(x, dict) else None
    return [_json_value(i) for i in values or ()]


def _json_kvlist(x: Any) -> dict[str, Any]:
    values = x.get("values") if isinstance(x, dict) else None
    return _json_attrs(values)


def _json_lenient_int(x: Any) -> Any:
    try:
        return int(x)
    except (TypeError, ValueError):
        return x


_JSON_ANY: dict[str, Callable[[Any], Any]] = {}
for _camel, _snake, _conv in (
    ("stringValue", "string_value", lambda x: x),
    ("intValue", "int_value", _json_lenient_int),
    ("boolValue", "bool_value", bool),
    ("doubleValue", "double_value", lambda x: x),
    ("bytesValue", "bytes_value", lambda x: x),
    ("arrayValue", "array_value", _json_array),
    ("kvlistValue", "kvlist_value", _json_kvlist),
):
    _JSON_ANY[_camel] = _JSON_ANY[_snake] = _conv


def _json_attrs(kvs: Any) -> dict[str, Any]:
    if not kvs:
        return {}
    if not isinstance(kvs, list):
        raise _Bad("attributes: expected a list of {key, value}")
    out: dict[str, Any] = {}
    for kv in kvs:
        if kv.__class__ is dict:
            k = kv.get("key")
            if k.__class__ is str:
                v = kv.get("value")
                # inlined fast path: most attribute values are strings
                text = v.get("stringValue") if v.__class__ is dict else None
                out[k] = text if text is not None else _json_value(v)
    return out


def _json_status_code(v: Any) -> int:
    if isinstance(v, str):
        return _STATUS_NAMES.get(v.upper().removeprefix("STATUS_CODE_"), 0)
    return v if isinstance(v, int) else 0


def _json_span_kind(v: Any) -> int:
    if isinstance(v, str):
        name = v.lower().removeprefix("span_kind_")
        return _SPAN_KIND_NAMES.index(name) if name in _SPAN_KIND_NAMES else 0
    return v if isinstance(v, int) else 0


def _json_exception_type(events: Any) -> str:
    for ev in events if isinstance(events, list) else ():
        if isinstance(ev, dict) and ev.get("name") == "exception":
            try:
                etype = _json_attrs(ev.get("attributes")).get("exception.type")
            except _Bad:
                continue
            if etype:
                return str(etype)
    return ""


def _json_span(sp: dict[str, Any], profile: Profile) -> _Span:
    status = sp.get("status")
    status = status if isinstance(status, dict) else {}
    start_ns = _json_int64(sp.get("startTimeUnixNano") or sp.get("start_time_unix_nano"), "startTimeUnixNano")
    end_ns = _json_int64(sp.get("endTimeUnixNano") or sp.get("end_time_unix_nano"), "endTimeUnixNano")
    if not start_ns and not end_ns:
        raise _Bad("missing endTimeUnixNano and startTimeUnixNano")
    # positional: the dataclass's keyword parsing costs more than most of these fields' reading
    return _Span(
        _json_id(sp.get("traceId") or sp.get("trace_id"), 16, "traceId", required=True),
        _json_id(sp.get("spanId") or sp.get("span_id"), 8, "spanId", required=True),
        _json_id(sp.get("parentSpanId") or sp.get("parent_span_id"), 8, "parentSpanId", required=False),
        str(sp.get("name") or ""),
        _json_span_kind(sp.get("kind")),
        start_ns,
        end_ns,
        _json_status_code(status.get("code")),
        str(status.get("message") or ""),
        _json_attrs(sp.get("attributes")),
        sp.get("events"),
        _json_exception_type,
        profile,
    )


def _json_single(rs: dict[str, Any], ss: dict[str, Any], sp: Any) -> bytes:
    """A bad part re-wrapped with its resource and scope, so the DLQ holds a replayable record."""
    scope = {k: v for k, v in ss.items() if k in ("scope", "instrumentationLibrary", "schemaUrl")}
    resource = {k: v for k, v in rs.items() if k in ("resource", "schemaUrl")}
    return orjson.dumps({"resourceSpans": [{**resource, "scopeSpans": [{**scope, "spans": [sp]}]}]})


def _list_at(d: dict[str, Any], *names: str) -> tuple[str, list[Any]]:
    name, v = _key(d, *names)
    if v is None:
        return name, []
    if not isinstance(v, list):
        raise _Bad(f"{name}: expected a list, got {type(v).__name__}")
    return name, v


def _decode_json_request(doc: Any, raw: bytes, prefix: str, origin: str, result: DecodeResult) -> None:
    def fail(where: str, problem: str, part: bytes) -> None:
        loc = (prefix + where).rstrip(". :")
        reason = f"{SOURCE_JSON}: {loc}: {problem}" if loc else f"{SOURCE_JSON}: {problem}"
        result.failures.append(Failure(part, reason, SOURCE_JSON))

    if not isinstance(doc, dict):
        fail("", f"expected an ExportTraceServiceRequest object, got {type(doc).__name__}", raw)
        return
    rs_name, rss = _key(doc, "resourceSpans", "resource_spans")
    if not isinstance(rss, list):
        problem = (
            "missing resourceSpans" if rss is None else f"resourceSpans: expected a list, got {type(rss).__name__}"
        )
        fail("", problem, raw)
        return
    for ri, rs in enumerate(rss):
        r_where = f"{rs_name}[{ri}]"
        if not isinstance(rs, dict):
            fail(r_where, f"expected an object, got {type(rs).__name__}", orjson.dumps(rs))
            continue
        try:
            resource = rs.get("resource")
            res = _resource(
                _json_attrs(resource.get("attributes")) if isinstance(resource, dict) else {}, origin, SOURCE_JSON
            )
            ss_name, sss = _list_at(
                rs, "scopeSpans", "scope_spans", "instrumentationLibrarySpans", "instrumentation_library_spans"
            )
        except _Bad as exc:
            fail(r_where, str(exc), orjson.dumps({"resourceSpans": [rs]}))
            continue
        for si, ss in enumerate(sss):
            s_where = f"{r_where}.{ss_name}[{si}]"
            if not isinstance(ss, dict):
                fail(s_where, f"expected an object, got {type(ss).__name__}", orjson.dumps({"resourceSpans": [rs]}))
                continue
            spans = ss.get("spans")
            scope = ss.get("scope") or ss.get("instrumentationLibrary")
            name = scope.get("name") if isinstance(scope, dict) else None
            profile = profile_for(name) if isinstance(name, str) else GENERIC
            if not isinstance(spans, list):
                if spans is not None:
                    fail(s_where, "spans: expected a list", _json_single(rs, ss, spans))
                continue
            for pi, sp in enumerate(spans):
                try:
                    if not isinstance(sp, dict):
                        raise _Bad(f"expected an object, got {type(sp).__name__}")
                    span = _json_span(sp, profile)
                except _Bad as exc:
                    fail(f"{s_where}.spans[{pi}]", str(exc), _json_single(rs, ss, sp))
                    continue
                result.events.append(_span_event(span, res))


def decode_otlp_json(payload: bytes, *, origin: str = "") -> DecodeResult:
    """Decode OTLP/JSON: one ExportTraceServiceRequest, a JSON array of them, or JSON lines."""
    result = DecodeResult()
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        lines = [ln for ln in payload.splitlines() if ln.strip()]
        if len(lines) > 1:  # the file exporter's JSON lines, handed over whole
            for li, line in enumerate(lines):
                try:
                    _decode_json_request(orjson.loads(line), line, f"line {li + 1}: ", origin, result)
                except orjson.JSONDecodeError as line_exc:
                    result.failures.append(
                        Failure(line, f"{SOURCE_JSON}: line {li + 1}: not JSON: {line_exc}", SOURCE_JSON)
                    )
            return _finish(result)
        result.failures.append(Failure(payload, f"{SOURCE_JSON}: not JSON: {exc}", SOURCE_JSON))
        return result
    if isinstance(doc, list):
        for i, item in enumerate(doc):
            _decode_json_request(item, orjson.dumps(item), f"[{i}].", origin, result)
    else:
        _decode_json_request(doc, payload, "", origin, result)
    return _finish(result)


# --- either ------------------------------------------------------------------


def decode_otlp(payload: bytes, *, origin: str = "") -> DecodeResult:
    """Decode an OTLP traces record in either encoding, told apart by its first byte.

    A proto request starts with 0x0A (field 1, length-delimited), which is ASCII
    newline, and its length byte can be ``{`` (123): so a record that looks
    like JSON but does not parse as JSON is retried as proto before failing.
    """
    stripped = payload.lstrip()
    if not stripped:
        return DecodeResult(failures=[Failure(payload, "otlp: empty record", "otlp")])
    if stripped[:1] not in (b"{", b"["):
        return decode_otlp_proto(payload, origin=origin)
    result = decode_otlp_json(payload, origin=origin)
    if payload[:1] == b"\n" and not result.events and result.failures:
        proto = decode_otlp_proto(payload, origin=origin)
        if not proto.failures:
            return proto
    return result
