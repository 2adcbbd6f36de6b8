"""One exception hierarchy for the whole product.

Every error a user can cause (bad input, bad config, unreachable broker) is an
``AgentwatchError`` whose message says what was wrong and where, so the CLI can
print it on one line instead of a traceback.
"""

from __future__ import annotations


class AgentwatchError(Exception):
    """Base of every error agentwatch raises on purpose."""


class DecodeError(AgentwatchError):
    """A record could not be turned into canonical events; ``reason`` goes to the DLQ."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ConfigError(AgentwatchError):
    """A setting or policy value is wrong: names the key and the problem."""

    def __init__(self, key: str, problem: str, *, source: str = "") -> None:
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{key}: {problem}")
        self.key = key
        self.problem = problem
        self.source = source


class PolicyError(ConfigError):
    """The detector policy file is invalid."""


class BrokerError(AgentwatchError):
    """The Kafka broker could not be started, reached or stopped."""


class StoreError(AgentwatchError):
    """ClickHouse could not be opened, written or queried."""


class SignatureError(AgentwatchError):
    """A kill-switch command failed verification (forged, unsigned, expired, replayed)."""
