"""The base of agentwatch's one exception hierarchy.

These classes live in the client package because an agent installs only the
client; ``schemas.errors`` re-exports them and adds the server's own errors, so
``except AgentwatchError`` catches both sides' errors alike.
"""

from __future__ import annotations

import logging


class AgentwatchError(Exception):
    """Base of every error agentwatch raises on purpose."""


class ConfigError(AgentwatchError):
    """A setting or policy value is wrong: names the key and the problem."""

    def __init__(self, key: str, problem: str, *, source: str = "") -> None:
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{key}: {problem}")
        self.key = key
        self.problem = problem
        self.source = source


class BrokerError(AgentwatchError):
    """The Kafka broker could not be started, reached or stopped (retriable: it may come back)."""


class SignatureError(AgentwatchError):
    """A kill-switch command failed verification (forged, unsigned, expired, replayed)."""


class LastLibraryError(logging.Handler):
    """Keeps the last error a library logged (aiokafka says why bootstrapping failed, such
    as bad credentials or an untrusted certificate, only in its log) for a one-line error."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.message = ""

    def emit(self, record: logging.LogRecord) -> None:
        self.message = record.getMessage()
