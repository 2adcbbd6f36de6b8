"""The detector policy: one versioned file holding every threshold and mode.

The declared ``version`` and a hash of the validated content are stamped on
every alert, so an analyst can tell which rules produced it. Loading rejects a
bad file with the file, the key and the problem.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import orjson
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from schemas.alerts import Mode, Severity
from schemas.errors import PolicyError


class _Strict(BaseModel):
    # a misspelt key in a safety policy must not silently fall back to a default
    model_config = ConfigDict(extra="forbid")


class DetectorConfig(_Strict):
    mode: Mode = Mode.ALERT
    severity: Severity = Severity.HIGH


class RetryLoopConfig(DetectorConfig):
    same_call_threshold: int = Field(5, ge=2, description="identical calls within window_s that make a loop")
    window_s: float = Field(60.0, gt=0)
    consecutive_failures: int = Field(8, ge=2, description="failures of one tool in a row, whatever the arguments")


# -- join-derived detectors (issue 4; see detectors/join.py) ------------------------------

# actions that read rather than change state: an unexplained read is not a side effect
_READ_ONLY_ACTIONS = ["get", "list", "watch", "Get*", "List*", "Describe*", "Head*", "Lookup*", "SELECT",
                      "*:Get*", "*:List*", "*:Describe*", "*:get", "*:list", "*:watch", "*:read"]


class UnattributedSideEffectConfig(DetectorConfig):
    read_only_actions: list[str] = Field(
        default_factory=lambda: list(_READ_ONLY_ACTIONS),
        description="audit action globs that are not side effects (case-sensitive, fnmatch syntax)",
    )


class UnconfirmedActionConfig(DetectorConfig):
    severity: Severity = Severity.MEDIUM
    tools: list[str] = Field(
        default_factory=list, description="tool name globs whose successful calls must leave an audit record"
    )


class DetectorsConfig(_Strict):
    retry_loop: RetryLoopConfig = Field(default_factory=RetryLoopConfig)
    unattributed_side_effect: UnattributedSideEffectConfig = Field(default_factory=UnattributedSideEffectConfig)
    unconfirmed_action: UnconfirmedActionConfig = Field(default_factory=UnconfirmedActionConfig)


class IdentityMapEntry(_Strict):
    """An audit principal glob (fnmatch) and the agent it is: first match wins."""

    principal: str = Field(min_length=1)
    agent_id: str = Field(min_length=1)


class JoinConfig(_Strict):
    """The span/audit join (detectors/join.py)."""

    window_s: float = Field(
        300.0, gt=0, description="max event-time distance between an audit event and the span that caused it "
        "(0 while the audit falls inside the span); also how long each side waits for the other"
    )
    allowed_lateness_s: float | None = Field(
        None, ge=0, description="lateness for the join's watermark (default: the policy's allowed_lateness_s); "
        "raise it to cover an audit source's delivery delay"
    )
    agent_principals: list[str] = Field(
        default_factory=list, description="principal globs that are agents, besides those in identity_map"
    )


class Policy(_Strict):
    version: str = Field("builtin-1", min_length=1)
    allowed_lateness_s: float = Field(
        30.0, ge=0, description="how long a late or out-of-order event still counts in its window"
    )
    detectors: DetectorsConfig = Field(default_factory=DetectorsConfig)
    join: JoinConfig = Field(default_factory=JoinConfig)
    identity_map: list[IdentityMapEntry] = Field(
        default_factory=list, description="audit principal glob -> agent_id, first match wins"
    )

    @property
    def content_hash(self) -> str:
        canonical = orjson.dumps(self.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS)
        return hashlib.sha256(canonical).hexdigest()[:16]


def _location(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def parse_policy(data: Any, *, source: str = "<policy>") -> Policy:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PolicyError("(top level)", "a policy must be a mapping of keys to values", source=source)
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        more = f" (and {exc.error_count() - 1} more problems)" if exc.error_count() > 1 else ""
        raise PolicyError(_location(first["loc"]), first["msg"] + more, source=source) from None


def load_policy(path: str | Path | None) -> Policy:
    """Load and validate a policy file; ``None`` gives the built-in defaults."""
    if path is None:
        return Policy()
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise PolicyError("(file)", f"cannot read: {exc.strerror}", source=str(p)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "(file)"
        raise PolicyError(where, f"not valid YAML: {getattr(exc, 'problem', exc)}", source=str(p)) from None
    return parse_policy(data, source=str(p))
