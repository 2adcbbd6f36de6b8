"""What an event touches, and whether it is an agent's own doing.

Shared by the detectors that match events against resource patterns from the
policy (protected, oversight, high-risk, an agent's runtime), so they all look
at the same strings.
"""

from __future__ import annotations

import re
from typing import Any

from detectors.join import JOINED_SPAN, KEY_AWS_REQUEST_ID
from detectors.policy import Matcher, first_match
from schemas.events import Event, EventKind

# agent ids that mean "nobody could tell whose this is": never a per-agent finding
UNATTRIBUTED = frozenset({"", "unknown"})

# span attributes that name what a tool call reached (kept by the OTLP decoder)
_TOUCH_ATTRIBUTES = (
    "db.statement",
    "db.query.text",
    "http.url",
    "url.full",
    "http.route",
    "server.address",
    "rpc.service",
    "rpc.method",
    "resource",
    "path",
    "file.path",
    "messaging.destination.name",
    "aws.s3.bucket",
    "k8s.deployment.name",
)
_TOUCH_KEYS = frozenset(_TOUCH_ATTRIBUTES)

# audit verbs that only look: reading a halted agent's Deployment does not shield it
READ_ACTIONS = ("get", "list", "watch", "describe*", "get*", "list*", "head*", "lookup*", "select", "read*")
# a tool's name is a read when one of its words is a read verb and none says it changes
# something ("cloudtrail_describe_trails", "getEventSelectors"; not "get_and_delete_trail")
_READ_WORDS = frozenset({"get", "list", "watch", "describe", "head", "lookup", "select", "read"})
_CHANGE_WORDS = frozenset({
    "stop", "delete", "put", "update", "patch", "create", "disable", "remove", "set", "modify", "write", "edit",
    "start", "enable", "reset", "drop", "kill", "scale", "restart", "apply", "replace", "insert", "truncate",
    "alter", "grant", "revoke", "register", "deregister", "attach", "detach", "post", "add", "change", "move",
    "rename", "purge", "clear", "silence", "mute", "pause", "suspend", "terminate", "rotate", "upload", "send",
})
_WORDS = re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])")
# the verb of a SQL statement (after comments such as a traceparent)
_SQL_VERB = re.compile(r"\s*(?:/\*.*?\*/\s*|--[^\n]*\n\s*)*([A-Za-z]+)", re.S)


def attributed(ev: Event) -> bool:
    return ev.agent_id not in UNATTRIBUTED


def touched(ev: Event) -> list[str]:
    """The strings naming what an event touched: its resource, its tool and the
    span attributes that carry a target (SQL, URL, topic ...)."""
    out = [ev.resource]
    if ev.kind is EventKind.TOOL_CALL:
        out.append(ev.tool_name)
    attrs = ev.attributes
    if attrs and not _TOUCH_KEYS.isdisjoint(attrs):
        out.extend(attrs[k] for k in _TOUCH_ATTRIBUTES if k in attrs)
    return [s for s in out if s]


def first_touched(fields: dict[str, Any], matcher: Matcher) -> tuple[str, str]:
    """``matcher.first(touched(ev))`` for the event whose field values (its ``__dict__``) are
    ``fields``, without building the list: (value, pattern) of the first thing the event
    touched that matches, in ``touched``'s order; ("", "") when none does."""
    pattern_for = matcher.pattern_for
    v = fields["resource"]
    if v:
        p = pattern_for(v)
        if p:
            return v, p
    if fields["kind"] is EventKind.TOOL_CALL:
        v = fields["tool_name"]
        if v:
            p = pattern_for(v)
            if p:
                return v, p
    attrs = fields["attributes"]
    # most spans carry none of these (a tool or LLM span's attributes name the model, the tool)
    if attrs and not _TOUCH_KEYS.isdisjoint(attrs):
        for k in _TOUCH_ATTRIBUTES:
            v = attrs.get(k)
            if v:
                p = pattern_for(v)
                if p:
                    return v, p
    return "", ""


def audit_final(ev: Event) -> bool:
    """An audit record that says what happened (k8s RequestReceived stages have no outcome yet)."""
    return ev.kind is EventKind.AUDIT and ev.outcome in ("allow", "deny", "error")


def succeeded(ev: Event) -> bool:
    """A tool call that did not fail, or an audited action that was allowed."""
    if ev.kind is EventKind.AUDIT:
        return ev.outcome == "allow"
    return ev.outcome != "error"


def action_verb(ev: Event) -> str:
    """What an event did, as a verb: the audit action (without a CloudTrail/OCSF
    ``service:`` prefix), else the span's RPC method, HTTP method or SQL verb, else the
    tool's name."""
    if ev.kind is EventKind.AUDIT:
        return ev.action.rpartition(":")[2]
    attrs = ev.attributes
    verb = attrs.get("rpc.method") or attrs.get("http.request.method") or attrs.get("http.method")
    if not verb:
        sql = attrs.get("db.statement") or attrs.get("db.query.text")
        m = _SQL_VERB.match(sql) if sql else None
        verb = m.group(1) if m else ""
    return verb or ev.tool_name


def reads_only(ev: Event) -> bool:
    """The event only looked (describe, get, list, watch, SELECT ...). CloudTrail says so
    itself (``readOnly``); otherwise the verb decides. Unknown verbs are not reads."""
    read_only = ev.attributes.get("read_only") if ev.kind is EventKind.AUDIT else None
    if read_only in ("true", "false"):
        return read_only == "true"
    verb = action_verb(ev)
    if not verb:
        return False
    if ev.kind is EventKind.TOOL_CALL and verb == ev.tool_name:
        words = {w.lower() for w in _WORDS.findall(verb)}
        return bool(words & _READ_WORDS) and not words & _CHANGE_WORDS
    return bool(first_match([verb], READ_ACTIONS)[0])


def action_keys(ev: Event) -> tuple[str, ...]:
    """Ids naming the one action an event is part of, as the spans and the join assign
    them: its span, the parent a client span runs under (the tool call that made the
    request), the tool call the join found for an audit record, the tool call id and the
    AWS request id. A tool span, its client span and their audit record share one."""
    keys: list[str] = []
    trace = ev.trace_id
    if trace and ev.span_id:
        keys.append(f"span:{trace}/{ev.span_id}")
    if ev.kind is EventKind.AUDIT:
        joined = ev.correlation.get(JOINED_SPAN)
        if trace and joined:
            keys.append(f"span:{trace}/{joined}")
        request = ev.correlation.get(KEY_AWS_REQUEST_ID, "")
    else:
        if ev.kind is EventKind.SPAN and trace and ev.parent_span_id:
            keys.append(f"span:{trace}/{ev.parent_span_id}")
        request = ev.attributes.get(KEY_AWS_REQUEST_ID, "")
    if ev.tool_call_id:
        keys.append(f"call:{ev.tool_call_id}")
    if request:
        keys.append(f"req:{request}")
    return tuple(keys)
