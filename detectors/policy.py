"""The detector policy: one versioned file holding every threshold and mode.

The declared ``version`` and a hash of the validated content are stamped on
every alert, so an analyst can tell which rules produced it. Loading rejects a
bad file with the file, the key and the problem.
"""

from __future__ import annotations

import hashlib
import re
from fnmatch import fnmatchcase, translate
from functools import lru_cache
from typing import Any

import orjson
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from schemas.alerts import Mode, Severity
from schemas.canary import METRICS
from schemas.errors import PolicyError
from schemas.redact import Redactor


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
    failure_window_s: float | None = Field(
        None, gt=0, description="the failures in a row must fall within this much event time (default window_s): "
        "a tool failing now and then over half an hour is an outage, not an agent stuck in a loop"
    )

    @property
    def failure_window(self) -> float:
        return self.failure_window_s if self.failure_window_s is not None else self.window_s


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


class TokenSpikeConfig(DetectorConfig):
    severity: Severity = Severity.MEDIUM
    std_devs: float = Field(4.0, gt=0, description="a spike minute exceeds mean + std_devs * std ...")
    baseline_ratio: float = Field(3.0, gt=1, description="... and baseline_ratio x the moving mean")
    baseline_alpha: float = Field(0.1, gt=0, le=1, description="weight of the newest minute in the moving baseline")
    min_tokens_per_minute: int = Field(2000, ge=0, description="floor: a minute under this is never a spike")
    min_active_minutes: int = Field(
        5, ge=1, description="minutes with traffic seen before the baseline is trusted (a new agent is not spiking)"
    )
    budget_severity: Severity = Severity.HIGH


class DisallowedAccessConfig(DetectorConfig):
    deny_severity: Severity = Field(Severity.LOW, description="one denied audit outcome")
    deny_burst: int = Field(5, ge=2, description="denied outcomes within deny_window_s that make a burst (high)")
    deny_window_s: float = Field(60.0, gt=0)
    burst_severity: Severity = Severity.HIGH


class EscalationBypassConfig(DetectorConfig):
    denied_severity: Severity = Field(Severity.CRITICAL, description="executed although its approval was denied")


class PeerPreservationConfig(DetectorConfig):
    severity: Severity = Severity.CRITICAL
    read_severity: Severity = Field(
        Severity.LOW, description="reading oversight configuration (describe, get, list, SELECT): at most this, "
        "and never a kill switch whatever the mode"
    )
    grace_s: float = Field(10.0, ge=0, description="time a halted agent has to stop before acting counts")
    shield_window_s: float = Field(
        600.0, ge=0, description="after a halt ends, restarting the halted agent still counts as shielding it"
    )
    coordination_window_s: float = Field(300.0, gt=0, description="tampering/shielding by 2+ agents within this")
    coordination_min_agents: int = Field(2, ge=2)


class DetectorsConfig(_Strict):
    retry_loop: RetryLoopConfig = Field(default_factory=RetryLoopConfig)
    token_spike: TokenSpikeConfig = Field(default_factory=TokenSpikeConfig)
    disallowed_access: DisallowedAccessConfig = Field(default_factory=DisallowedAccessConfig)
    escalation_bypass: EscalationBypassConfig = Field(default_factory=EscalationBypassConfig)
    peer_preservation: PeerPreservationConfig = Field(default_factory=PeerPreservationConfig)
    unattributed_side_effect: UnattributedSideEffectConfig = Field(default_factory=UnattributedSideEffectConfig)
    unconfirmed_action: UnconfirmedActionConfig = Field(default_factory=UnconfirmedActionConfig)


class AuditRule(_Strict):
    action: str = Field("*", min_length=1, description="glob over the audit action (k8s verb, CloudTrail eventName)")
    resource: str = Field("*", min_length=1, description="glob over the audit resource")


class HighRiskConfig(_Strict):
    tools: list[str] = Field(default_factory=list, description="tool name globs that need a prior approval")
    audit: list[AuditRule] = Field(default_factory=list, description="audited actions that need a prior approval")
    approval_ttl_s: float = Field(900.0, gt=0, description="a granted approval covers actions this long after it")


class BudgetsConfig(_Strict):
    # glob -> tokens per clock hour; the first matching glob (in file order) applies
    agent_tokens_per_hour: dict[str, int] = Field(default_factory=dict)
    tenant_tokens_per_hour: dict[str, int] = Field(default_factory=dict)


# The control topic, the detector policy, audit and monitoring configuration and the
# kill-switch state: what an agent trying to escape oversight would touch.
DEFAULT_OVERSIGHT = [
    "*agentwatch*",
    "*killswitch*",
    "*kill-switch*",
    "*kill_switch*",
    "*audit-polic*",
    "*auditpolic*",
    "*audit.k8s.io*",
    "*cloudtrail*",
    "stoplogging",
    "deletetrail",
    "updatetrail",
    "puteventselectors",
    # monitoring config, not monitoring data: querying Prometheus is healthy, editing its rules is not
    "*prometheus*.y*ml",
    "*prometheusrule*",
    "*alertmanager*.y*ml",
    "*alertmanagerconfig*",
    "*silence*",
    "*/-/reload",
]


class IdentityMapEntry(_Strict):
    """An audit principal glob (fnmatch) and the agent it is: first match wins."""

    principal: str = Field(min_length=1)
    agent_id: str = Field(min_length=1)


class IdentityRule(_Strict):
    """Agent identity for spans no instrumentation names well (detectors/identity.py): when every
    ``match`` glob matches (keys: kept span/resource attributes such as service.name,
    service.namespace, k8s.deployment.name, or span.name / tenant), the span's agent is
    ``agent_id``, a template that may use ``{attribute}``. First match wins, before any other source."""

    match: dict[str, str] = Field(min_length=1)
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
    allowed_lateness_by_source: dict[str, float] = Field(
        default_factory=lambda: {"cloudtrail": 900.0},
        description="allowed lateness per audit source (its delivery delay; CloudTrail delivers within ~15 min): "
        "that source's records count as on time this long behind the newest event, and tool calls whose spans "
        "carry its key (aws.request_id for cloudtrail) wait as long for their record; other sources never wait",
    )

    def extra_lateness(self, base_s: float) -> dict[str, float]:
        """Per source, how much later than ``base_s`` (a watermark's own lateness) its records
        may arrive and still be on time; sources that need no more are left out."""
        return {src: s - base_s for src, s in self.allowed_lateness_by_source.items() if s > base_s}


class RedactionConfig(_Strict):
    """Secrets masked in every event before it is stored or forwarded (schemas/redact.py has the
    built-in rules: auth headers, API key formats, JWTs, private keys, passwords in URLs/DSNs,
    password=/token=/secret= parameters). ``patterns`` add regexes: a match, or its first group
    when it has one, becomes ****."""

    patterns: list[str] = Field(default_factory=list)

    @field_validator("patterns")
    @classmethod
    def _compiles(cls, v: list[str]) -> list[str]:
        for p in v:
            try:
                re.compile(p)
            except re.error as exc:
                raise ValueError(f"redaction pattern {p!r}: {exc}") from None
        return v

    def redactor(self) -> Redactor:
        return Redactor(self.patterns)


class CanaryMetricRule(_Strict):
    """The degradation a candidate may show on one metric before it fails: its value may be
    worse than the baseline's by ``max_increase`` (relative) plus ``min_delta`` (absolute, for
    baselines near zero)."""

    max_increase: float = Field(0.25, ge=0, description="relative: 0.25 = 25% worse than the baseline")
    min_delta: float = Field(0.0, ge=0, description="absolute, in the metric's unit")


def _default_canary_metrics() -> dict[str, CanaryMetricRule]:
    return {
        "violations_per_1k_actions": CanaryMetricRule(max_increase=0.25, min_delta=20.0),
        "retried_call_rate": CanaryMetricRule(max_increase=0.25, min_delta=0.05),
        "tool_error_rate": CanaryMetricRule(max_increase=0.25, min_delta=0.05),
        "tokens_per_task": CanaryMetricRule(max_increase=0.5),
    }


class CanaryAnalysisConfig(_Strict):
    """A candidate version of one agent judged against its baseline (detectors/canary.py)."""

    agent: str = Field(min_length=1, description="agent id")
    baseline: str = Field(min_length=1, description="the agent version in production")
    candidate: str = Field(min_length=1, description="the version being rolled out")
    metrics: dict[str, CanaryMetricRule] = Field(default_factory=_default_canary_metrics, min_length=1)
    min_tasks: int = Field(20, ge=2, description="completed tasks (traces) each side needs before a verdict")
    test: Literal["mann_whitney", "bootstrap"] = Field(
        "mann_whitney", description="mann_whitney: one-sided Mann-Whitney U over per-task values; bootstrap: "
        "interval of the pooled rate difference from resampled tasks")
    confidence: float = Field(0.95, gt=0.5, lt=1.0)
    rollback: bool = Field(True, description="in enforce mode, a failed canary halts the candidate version")
    judge_every_s: float = Field(60.0, gt=0, description="event time between verdicts")

    @field_validator("metrics")
    @classmethod
    def _known(cls, v: dict[str, CanaryMetricRule]) -> dict[str, CanaryMetricRule]:
        for name in v:
            if name not in METRICS:
                raise ValueError(f"unknown metric {name!r} (known: {', '.join(METRICS)})")
        return v

    @field_validator("candidate")
    @classmethod
    def _differs(cls, v: str, info: Any) -> str:
        if v == info.data.get("baseline"):
            raise ValueError("candidate and baseline are the same version")
        return v


class CanaryConfig(_Strict):
    """Behaviour per agent version, canary verdicts and shadow versions (docs/canary.md)."""

    mode: Mode = Field(Mode.ALERT, description="of the canary alert: enforce = roll the candidate back")
    severity: Severity = Severity.HIGH
    metrics: bool = Field(True, description="compute per-version metric windows for every agent")
    version_attribute: str = Field(
        "", description="a span or resource attribute naming the agent's version, preferred to the built-in ones "
        "(gen_ai.agent.version, service.version, k8s.deployment.name); one the decoders keep on events: any "
        "k8s.*, cloud.* or aws.* key (k8s.pod.label..., a deployment annotation), service.namespace, "
        "deployment.environment ...")
    window_s: float = Field(60.0, gt=0, description="metric windows, in event time")
    task_idle_s: float = Field(60.0, gt=0, description="a task (trace) is complete this long after its last event")
    max_tasks: int = Field(5000, ge=10, description="completed tasks kept per version for the tests")
    analyses: list[CanaryAnalysisConfig] = Field(default_factory=list)
    shadow_versions: dict[str, list[str]] = Field(
        default_factory=dict, description="agent glob -> version globs run in shadow: decisions observed, no side "
        "effects expected; an audited side effect of one is an alert")
    shadow_severity: Severity = Severity.HIGH


class Policy(_Strict):
    version: str = Field("builtin-1", min_length=1)
    allowed_lateness_s: float = Field(
        30.0, ge=0, description="how long a late or out-of-order event still counts in its window"
    )
    dedup_window_s: float = Field(
        600.0, gt=0, description="a redelivered event id is recognised this long (plus twice the allowed lateness) "
        "of event time after the first; memory and state snapshots hold rate x window of ids"
    )
    detectors: DetectorsConfig = Field(default_factory=DetectorsConfig)
    join: JoinConfig = Field(default_factory=JoinConfig)
    identity_map: list[IdentityMapEntry] = Field(
        default_factory=list, description="audit principal glob -> agent_id, first match wins"
    )
    identity_rules: list[IdentityRule] = Field(
        default_factory=list, description="span/resource attribute globs -> agent_id, first match wins"
    )
    # agent_id -> globs over audit resources that run that agent (its Deployment, pods, function):
    # restarting or scaling them while the agent is halted is shielding it (peer_preservation c)
    agent_runtimes: dict[str, list[str]] = Field(default_factory=dict)
    # agent glob -> tool globs; agents matching no key have no allowlist (anything goes)
    allowlists: dict[str, list[str]] = Field(default_factory=dict)
    protected_resources: list[str] = Field(default_factory=list)
    oversight_resources: list[str] = Field(default_factory=lambda: list(DEFAULT_OVERSIGHT))
    high_risk: HighRiskConfig = Field(default_factory=HighRiskConfig)
    budgets: BudgetsConfig = Field(default_factory=BudgetsConfig)
    redaction: RedactionConfig = Field(default_factory=RedactionConfig)
    canary: CanaryConfig = Field(default_factory=CanaryConfig)

    @property
    def content_hash(self) -> str:
        canonical = orjson.dumps(self.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS)
        return hashlib.sha256(canonical).hexdigest()[:16]

    def agent_for_principal(self, principal: str) -> str:
        """The agent an audit principal is, through the identity map ("" when none; first match wins)."""
        if principal:
            for m in self.identity_map:
                if fnmatchcase(principal, m.principal):
                    return m.agent_id
        return ""

    def allowlist_for(self, agent_id: str) -> list[str] | None:
        """Tool globs allowed to an agent (every matching key's); None when no allowlist names it."""
        found: list[str] | None = None
        for agent_glob, tools in self.allowlists.items():
            if glob_match(agent_id, agent_glob):
                found = (found or []) + tools
        return found


def glob_match(value: str, pattern: str) -> bool:
    """Case-insensitive glob: resource names and actions differ in case between sources."""
    return fnmatchcase(value.lower(), pattern.lower())


@lru_cache(maxsize=65536)
def _first_match(value: str, patterns: tuple[str, ...]) -> str:
    low = value.lower()
    for p in patterns:
        if fnmatchcase(low, p.lower()):
            return p
    return ""


def first_match(values: list[str] | tuple[str, ...], patterns: list[str] | tuple[str, ...]) -> tuple[str, str]:
    """(value, pattern) of the first value matching any pattern; ("", "") when none does."""
    pats = tuple(patterns)
    if pats:
        for v in values:
            if v:
                p = _first_match(v, pats)
                if p:
                    return v, p
    return "", ""


# values longer than this are not remembered by a Matcher: SQL statements and URLs with ids in
# them rarely repeat, and a few thousand of them would hold megabytes
_MATCH_CACHE_MAX_LEN = 256
MATCH_CACHE_SIZE = 4096


class Matcher:
    """``first_match`` against one fixed list of patterns, built once per policy.

    The patterns are compiled up front, and the verdict for each value (the first pattern it
    matches, or "") is remembered: the detectors ask about the same tool names and resources
    on almost every event. The memory is bounded (emptied when full), so a stream of distinct
    values costs a match each, never unbounded memory; either way the answer is
    ``first_match``'s.
    """

    __slots__ = ("patterns", "_compiled", "_known")

    def __init__(self, patterns: list[str] | tuple[str, ...]) -> None:
        self.patterns = tuple(patterns)
        # fnmatchcase(value.lower(), pattern.lower()) is the compiled translate(pattern.lower())
        # matching value.lower(): the same regex fnmatch caches, compiled here once
        self._compiled = tuple((p, re.compile(translate(p.lower())).match) for p in self.patterns)
        self._known: dict[str, str] = {}

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def pattern_for(self, value: str) -> str:
        """The first pattern ``value`` matches (case-insensitive), "" when none does."""
        found = self._known.get(value)
        if found is not None:
            return found
        found = ""
        low = value.lower()
        for p, match in self._compiled:
            if match(low) is not None:
                found = p
                break
        if len(value) <= _MATCH_CACHE_MAX_LEN:
            if len(self._known) >= MATCH_CACHE_SIZE:
                self._known.clear()
            self._known[value] = found
        return found

    def first(self, values: list[str] | tuple[str, ...]) -> tuple[str, str]:
        """(value, pattern) of the first non-empty value matching any pattern; ("", "") when none does."""
        if self._compiled:
            for v in values:
                if v:
                    p = self.pattern_for(v)
                    if p:
                        return v, p
        return "", ""


def budget_for(key: str, table: dict[str, int]) -> int | None:
    """The limit of the first glob in ``table`` matching ``key``."""
    for glob, limit in table.items():
        if glob_match(key, glob):
            return limit
    return None


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
