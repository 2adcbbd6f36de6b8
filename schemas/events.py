"""The canonical event model every wire format is decoded into.

One flat model rather than a union of per-kind classes: events travel in
batches of thousands, land in one ClickHouse table, and a flat pydantic model
validates and serialises fastest. Fields that do not apply to a kind keep their
empty default. ``KIND_FIELDS`` documents which fields belong to which kind.
"""

from __future__ import annotations

from datetime import datetime, timezone
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator

# shared with the agent client, which is installed without the server: defined there, once
from agentwatch_client.wire import fingerprint_arguments, stable_id, utc  # noqa: F401 (re-exported)


class EventKind(StrEnum):
    LLM_CALL = "llm_call"
    TOOL_CALL = "tool_call"
    AGENT = "agent"
    AUDIT = "audit"
    APPROVAL = "approval"
    CONTROL_ACK = "control_ack"
    # a kill-switch command as the detectors see it (peer_preservation a: acting after a halt)
    CONTROL_COMMAND = "control_command"
    # a span that is none of the above (an HTTP client span, a DB span ...):
    # kept because it carries trace structure and agent identity for its children.
    SPAN = "span"


class IdentitySource(StrEnum):
    """How ``agent_id`` was decided, so analysts can tell a guess from a fact."""

    ATTRIBUTE = "attribute"  # the event itself names the agent
    ANCESTOR = "ancestor"  # inherited from the nearest agent span of the same trace
    # an agent span named only by its span name (OpenInference AGENT): it yields to the
    # outermost such span enclosing it, so the decoder's name is only a candidate
    SPAN_NAME = "span_name"
    RESOURCE = "resource"  # fell back to the resource: service.name (never a per-process instance id)
    IDENTITY_MAP = "identity_map"  # mapped through the policy (audit principal, or an identity rule)
    JOIN = "join"  # audit event joined with the span that caused it
    NATIVE = "native"  # given by the agentwatch client
    UNKNOWN = "unknown"


KIND_FIELDS: dict[EventKind, tuple[str, ...]] = {
    EventKind.LLM_CALL: ("model", "input_tokens", "output_tokens", "cost_usd", "outcome", "error_type"),
    EventKind.TOOL_CALL: ("tool_name", "args_fingerprint", "outcome", "error_type", "tool_call_id"),
    EventKind.AGENT: ("lifecycle", "target_agent_id"),
    EventKind.AUDIT: ("principal", "action", "resource", "outcome", "correlation"),
    EventKind.APPROVAL: (
        "approver",
        "decision",
        "covers_trace_id",
        "covers_tool_call_id",
        "covers_resource",
        "expires_at",
    ),
    EventKind.CONTROL_ACK: ("command_id", "outcome"),
    EventKind.CONTROL_COMMAND: ("command_id", "command_action", "command_scope", "target_agent_id", "expires_at"),
}

AGENT_LIFECYCLE = frozenset({"invoke", "spawn", "start", "stop", "restart", "scale", "recreate"})
TOOL_OUTCOMES = frozenset({"ok", "error"})
AUDIT_OUTCOMES = frozenset({"allow", "deny", "error"})
APPROVAL_DECISIONS = frozenset({"granted", "denied", "pending"})


def from_unix_nanos(nanos: int) -> datetime:
    return datetime.fromtimestamp(nanos / 1e9, tz=timezone.utc)


class Event(BaseModel):
    """One canonical event: a span turned into an LLM/tool/agent event, an audit
    record, an approval, or a control acknowledgement."""

    model_config = ConfigDict(extra="forbid", validate_assignment=False)
    # ``ts`` in seconds since the epoch, converted on first read and kept: the detectors read
    # it several times per event. A slot, not a field: __dict__ (the store's columns, the
    # internal wire), model_dump, ==, copies and pickles never see it, and a read once set is
    # a plain attribute read. Assigning ts forgets it (see _assign_ts); a copy starts without.
    __slots__ = ("ts_seconds",)

    event_id: str = Field(min_length=1)
    kind: EventKind
    ts: datetime
    agent_id: str = ""
    tenant: str = "default"
    # the agent's version (gen_ai.agent.version, service.version, the k8s deployment): canary analysis
    agent_version: str = ""
    trace_id: str = ""
    span_id: str = ""
    parent_span_id: str = ""
    source: str = Field(min_length=1, description="wire format: otlp_json, otlp_proto, native, k8s_audit ...")
    origin: str = Field("", description="who emitted it: service name, audit log host, topic")
    name: str = ""
    duration_ms: float | None = None

    identity: IdentitySource = IdentitySource.UNKNOWN
    # this span opens an agent scope (invoke_agent, OpenInference AGENT, traceloop agent)
    is_agent_span: bool = False
    # resource-derived identity to fall back on when no agent ancestor shows up in time
    fallback_agent_id: str = ""

    # llm_call
    model: str = ""
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float | None = None
    # tool_call
    tool_name: str = ""
    args_fingerprint: str = ""
    tool_call_id: str = ""
    # outcome: tool_call ok/error, llm_call ok/error, audit allow/deny/error, control_ack ok/refused
    outcome: str = ""
    error_type: str = ""
    # agent lifecycle
    lifecycle: str = ""
    target_agent_id: str = ""
    # audit
    principal: str = ""
    action: str = ""
    resource: str = ""
    correlation: dict[str, str] = Field(default_factory=dict)
    # approval
    approver: str = ""
    decision: str = ""
    covers_trace_id: str = ""
    covers_tool_call_id: str = ""
    covers_resource: str = ""
    expires_at: datetime | None = None
    # control_ack, control_command
    command_id: str = ""
    # control_command: halt | resume; scope = tool names, empty = every tool. The target is
    # target_agent_id (agent target), tenant (tenant target) or neither (all agents).
    command_action: str = ""
    command_scope: list[str] = Field(default_factory=list)

    attributes: dict[str, str] = Field(default_factory=dict)

    # where the record was read from, when known: evidence points back to it
    topic: str = ""
    partition: int = -1
    offset: int = -1

    @field_validator("ts", "expires_at")
    @classmethod
    def _utc(cls, v: datetime | None) -> datetime | None:
        return None if v is None else utc(v)

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    if TYPE_CHECKING:

        @property
        def ts_seconds(self) -> float: ...  # the slot above, as type checkers should see it

    else:

        def __getattr__(self, name: str) -> Any:
            # only called for what normal lookup misses: here, a ts_seconds not read yet
            if name == "ts_seconds":
                seconds = self.__dict__["ts"].timestamp()
                _set_ts_seconds(self, seconds)
                return seconds
            return super().__getattr__(name)

    def to_json(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json", exclude_defaults=True))


_set_ts_seconds = Event.__dict__["ts_seconds"].__set__
_forget_ts_seconds = Event.__dict__["ts_seconds"].__delete__


def _assign_ts(model: Event, name: str, value: Any) -> None:
    """``event.ts = value``: what pydantic does for a field (no validation: validate_assignment
    is off), and ts_seconds forgotten, converted again on its next read."""
    model.__dict__["ts"] = value
    model.__pydantic_fields_set__.add("ts")
    try:
        _forget_ts_seconds(model)
    except AttributeError:  # not read yet
        pass


# pydantic's __setattr__ looks a field's assignment up in this per-class table first (it fills
# it lazily with its own handlers); tests/test_events.py checks that ts_seconds follows
# an assigned ts, so a pydantic that stops consulting the table fails there, not silently
Event.__pydantic_setattr_handlers__["ts"] = _assign_ts


def events_to_json(events: list[Event]) -> bytes:
    """A batch as one JSON array: the unit carried by one Kafka message between stages."""
    return orjson.dumps([e.model_dump(mode="json", exclude_defaults=True) for e in events])


def events_from_json(payload: bytes) -> list[Event]:
    data = orjson.loads(payload)
    if isinstance(data, dict):
        data = [data]
    return [Event.model_validate(d) for d in data]
