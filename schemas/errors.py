"""One exception hierarchy for the whole product.

Every error a user can cause (bad input, bad config, unreachable broker) is an
``AgentwatchError`` whose message says what was wrong and where, so the CLI can
print it on one line instead of a traceback.
"""

from __future__ import annotations

# the errors an agent can meet are defined with the client (installed without the server)
from agentwatch_client.errors import AgentwatchError, BrokerError, ConfigError, SignatureError

__all__ = ["AgentwatchError", "BrokerError", "ConfigError", "DecodeError", "PolicyError", "SignatureError",
           "StateError", "StoreError"]


class DecodeError(AgentwatchError):
    """A record could not be turned into canonical events; ``reason`` goes to the DLQ."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PolicyError(ConfigError):
    """The detector policy file is invalid."""


class StoreError(AgentwatchError):
    """ClickHouse could not be opened, written or queried."""


class StateError(AgentwatchError):
    """A state snapshot cannot be restored: corrupt, truncated, of another kind or of an
    unknown format version. Not retriable: the same bytes fail the same way; the owner
    starts that state empty (or from an older snapshot) and says so."""
