"""Decoders from wire formats into canonical events.

Every decoder takes the bytes of one record (a Kafka message value or a line of
a file) and returns a ``DecodeResult``: the events it could decode and, for each
part it could not, a ``Failure`` with that part's original bytes and the reason.
A decoder never raises for bad input; the caller routes failures to the DLQ.
Parts that are valid but carry nothing to monitor (a PostgreSQL server's
checkpoint and connection lines among its audit records) are counted in
``skipped``: neither events nor failures.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from schemas.events import Event


@dataclass(slots=True)
class Failure:
    raw: bytes
    reason: str
    source: str = ""


@dataclass(slots=True)
class DecodeResult:
    events: list[Event] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    skipped: int = 0

    def extend(self, other: "DecodeResult") -> None:
        self.events.extend(other.events)
        self.failures.extend(other.failures)
        self.skipped += other.skipped
