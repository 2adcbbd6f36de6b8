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
    """ClickHouse could not be opened, written or queried.

    ``retriable`` says whether the same write can succeed later unchanged: a
    connection refused or an overloaded server can, a row the table will never
    accept cannot. A bare StoreError is treated as retriable (do not commit,
    try again), the safe default for a failure nobody classified.
    """

    retriable: bool = True


class StoreUnavailable(StoreError):
    """The store is down, unreachable, overloaded or timed out: retry with backoff."""

    retriable = True


class StoreRejected(StoreError):
    """The store refused the data itself (a value out of a column's range, too many
    partitions in one block, a type it cannot convert): retrying the same rows can
    never succeed, so the writer isolates the offending rows and dead-letters them."""

    retriable = False


class StateError(AgentwatchError):
    """A state snapshot cannot be restored: corrupt, truncated, of another kind or of an
    unknown format version. Not retriable: the same bytes fail the same way; the owner
    starts that state empty (or from an older snapshot) and says so."""
