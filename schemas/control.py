"""Kill-switch commands, their signatures, and agents' acknowledgements (the server's view).

The wire format itself (command, signature, verification, acknowledgement) is
defined once in ``agentwatch_client.wire``, the package agents install without
the server; it is re-exported here so the server keeps one contracts layer.
What only the server needs, turning a command into the canonical event the
detectors see, is defined here.
"""

from __future__ import annotations

from agentwatch_client.wire import (
    DEFAULT_CLOCK_SKEW_S,
    DEFAULT_MAX_AGE_S,
    AckStatus,
    CommandAction,
    ControlAck,
    KillSwitchCommand,
    Target,
    TargetKind,
    command_id_for_alert,
    generate_keypair,
    key_id,
    load_private_key,
    load_public_key,
    load_public_keys,
    public_key_text,
    refusal_reason,
    sign,
    verify,
)
from schemas.events import Event, EventKind, IdentitySource, stable_id

__all__ = [
    "DEFAULT_CLOCK_SKEW_S", "DEFAULT_MAX_AGE_S", "AckStatus", "CommandAction", "ControlAck", "KillSwitchCommand",
    "Target", "TargetKind", "command_event", "command_id_for_alert", "generate_keypair", "key_id",
    "load_private_key", "load_public_key", "load_public_keys", "public_key_text", "refusal_reason", "sign", "verify",
]


def command_event(cmd: KillSwitchCommand) -> Event:
    """The canonical ``control_command`` event the detectors see (peer_preservation a).

    An agent target sets ``agent_id`` and ``target_agent_id``; a tenant target
    sets ``tenant``; an ``all`` target sets neither (``attributes["target"]``
    always holds the target key).
    """
    t = cmd.target
    agent = t.value if t.kind is TargetKind.AGENT else ""
    return Event(
        event_id=stable_id("control_command", cmd.command_id),
        kind=EventKind.CONTROL_COMMAND,
        ts=cmd.issued_at,
        agent_id=agent,
        tenant=t.value if t.kind is TargetKind.TENANT else "default",
        agent_version=t.version,  # a version-scoped halt (canary rollback) stops that version only
        source="agentwatch",
        origin="agentwatch.control",
        name=f"killswitch {cmd.action.value} {t.key}",
        identity=IdentitySource.NATIVE if agent else IdentitySource.UNKNOWN,
        target_agent_id=agent,
        command_id=cmd.command_id,
        command_action=cmd.action.value,
        command_scope=list(cmd.scope),
        expires_at=cmd.expires_at,
        attributes={"target": t.key, "issued_by": cmd.issued_by, "alert_id": cmd.alert_id},
    )
