"""Alerts: what a detector decided, with the evidence that made it decide."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

import orjson
from pydantic import BaseModel, Field, field_validator

from schemas.events import stable_id, utc


class Severity(StrEnum):
    INFO = "info"
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    CRITICAL = "critical"

    @property
    def rank(self) -> int:
        return _SEVERITY_RANK[self]


_SEVERITY_RANK = {s: i for i, s in enumerate(Severity)}


class Mode(StrEnum):
    SHADOW = "shadow"  # recorded, never sent to on-call
    ALERT = "alert"
    ENFORCE = "enforce"  # alert plus kill switch


class Evidence(BaseModel):
    event_id: str
    ts: datetime | None = None
    trace_id: str = ""
    topic: str = ""
    partition: int = -1
    offset: int = -1


class Alert(BaseModel):
    alert_id: str
    detector: str
    detector_version: str
    policy_version: str
    policy_hash: str = ""
    mode: Mode
    severity: Severity
    agent_id: str
    tenant: str = "default"
    # the version of the agent the evidence came from ("" when unknown or mixed)
    agent_version: str = ""
    trace_ids: list[str] = Field(default_factory=list)
    first_seen: datetime
    last_seen: datetime
    # how many times the condition was seen in this alert's window (repeats update one alert)
    count: int = 1
    summary: str
    evidence: list[Evidence] = Field(default_factory=list)
    action: str = "notify"  # notify | record (shadow) | halt
    labels: dict[str, str] = Field(default_factory=dict)

    @field_validator("first_seen", "last_seen")
    @classmethod
    def _utc(cls, v: datetime) -> datetime:
        return utc(v)

    def to_json(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json"))


# an enforce-mode alert with this label halts only that version of its agent (a failed
# canary's rollback): the kill switch's target names the version
HALT_VERSION_LABEL = "halt_version"


def alert_id_for(detector: str, agent_id: str, window_key: object, *, tenant: str = "default") -> str:
    """Deterministic fingerprint of detector, agent and window: a replay yields the same id."""
    return stable_id("alert", detector, tenant, agent_id, window_key)
