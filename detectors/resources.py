"""What an event touches, and whether it is an agent's own doing.

Shared by the detectors that match events against resource patterns from the
policy (protected, oversight, high-risk, an agent's runtime), so they all look
at the same strings.
"""

from __future__ import annotations

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

# audit verbs that only look: reading a halted agent's Deployment does not shield it
READ_ACTIONS = ("get", "list", "watch", "describe*", "get*", "list*", "head*", "lookup*", "select", "read*")


def attributed(ev: Event) -> bool:
    return ev.agent_id not in UNATTRIBUTED


def touched(ev: Event) -> list[str]:
    """The strings naming what an event touched: its resource, its tool and the
    span attributes that carry a target (SQL, URL, topic ...)."""
    out = [ev.resource]
    if ev.kind is EventKind.TOOL_CALL:
        out.append(ev.tool_name)
    attrs = ev.attributes
    if attrs:
        out.extend(attrs[k] for k in _TOUCH_ATTRIBUTES if k in attrs)
    return [s for s in out if s]


def audit_final(ev: Event) -> bool:
    """An audit record that says what happened (k8s RequestReceived stages have no outcome yet)."""
    return ev.kind is EventKind.AUDIT and ev.outcome in ("allow", "deny", "error")


def succeeded(ev: Event) -> bool:
    """A tool call that did not fail, or an audited action that was allowed."""
    if ev.kind is EventKind.AUDIT:
        return ev.outcome == "allow"
    return ev.outcome != "error"
