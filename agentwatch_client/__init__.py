"""The agentwatch agent client: publish an agent's tool and LLM calls, obey signed kill switches.

Installed by ``pip install agentwatch`` without the server (no faust, no
ClickHouse driver). Named ``agentwatch_client`` so it cannot collide with an
application's own modules (``schemas`` is a common name in web apps).
See docs/client.md; the kill-switch wire format is specified in
docs/killswitch-wire-format.md.
"""

from __future__ import annotations

from agentwatch_client.client import AgentClient
from agentwatch_client.errors import AgentwatchError, BrokerError, ConfigError, SignatureError
from agentwatch_client.sync import SyncAgentClient
from agentwatch_client.wire import (
    AckStatus,
    CommandAction,
    ControlAck,
    KillSwitchCommand,
    Target,
    TargetKind,
    load_public_keys,
    verify,
)

__all__ = [
    "AckStatus", "AgentClient", "AgentwatchError", "BrokerError", "CommandAction", "ConfigError", "ControlAck",
    "KillSwitchCommand", "SignatureError", "SyncAgentClient", "Target", "TargetKind", "load_public_keys",
    "verify",
]
