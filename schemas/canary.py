"""Canary analysis contracts: behavioural metrics per agent version, and verdicts.

A ``VersionWindow`` is one agent version's behaviour in one window of event time
(stored for dashboards and the weekly review). A ``CanaryVerdict`` compares a
candidate version with its baseline (pass, fail, inconclusive) with the numbers
behind it; it is published on the canary topic and stored. detectors/canary.py
computes both; docs/canary.md explains them.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

import orjson
from pydantic import BaseModel, Field


class MetricSpec(BaseModel):
    """How a per-task metric is read: ``numerator / denominator * scale`` pooled over tasks."""

    description: str
    higher_is_worse: bool = True
    scale: float = 1.0


# the metrics a canary analysis may judge (a task is a trace: one unit of an agent's work)
METRICS: dict[str, MetricSpec] = {
    "violations_per_1k_actions": MetricSpec(description="alerts per 1,000 actions (tool and model calls)",
                                            scale=1000.0),
    "retried_call_rate": MetricSpec(description="tool calls repeating an earlier call of the task (same tool "
                                    "and arguments), per tool call"),
    "tool_error_rate": MetricSpec(description="failed tool calls per tool call"),
    "side_effect_errors_per_1k_actions": MetricSpec(description="unattributed side effects and unconfirmed "
                                                    "actions per 1,000 actions", scale=1000.0),
    "escalation_rate": MetricSpec(description="tasks that asked a human for approval, per task"),
    "tokens_per_task": MetricSpec(description="model tokens (input + output) per task"),
    "cost_per_task": MetricSpec(description="model cost (USD, where reported) per task"),
    "success_rate": MetricSpec(description="tasks with no alert, no side-effect error and no failing last tool "
                               "call, per task (a success proxy)", higher_is_worse=False),
}


class Verdict(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    INCONCLUSIVE = "inconclusive"


class MetricResult(BaseModel):
    metric: str
    outcome: str  # pass | fail | nodata
    baseline: float
    candidate: float
    # the worst candidate value allowed (baseline plus the allowed degradation)
    threshold: float
    # mann_whitney: one-sided p that the candidate is worse; bootstrap: the interval of candidate - baseline
    p_value: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None


class CanaryVerdict(BaseModel):
    verdict_id: str
    tenant: str = "default"
    agent_id: str
    baseline_version: str
    candidate_version: str
    verdict: Verdict
    test: str
    confidence: float
    judged_at: datetime  # event time of the judgement
    baseline_tasks: int
    candidate_tasks: int
    min_tasks: int
    metrics: list[MetricResult] = Field(default_factory=list)
    reason: str = ""
    policy_version: str = ""
    # the alert a failed verdict raised (its rollback, in enforce mode)
    alert_id: str = ""

    def to_json(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json"))


class VersionWindow(BaseModel):
    """One agent version's behaviour in one event-time window."""

    tenant: str = "default"
    agent_id: str
    agent_version: str
    window_start: datetime
    window_s: float
    actions: int = 0
    tool_calls: int = 0
    llm_calls: int = 0
    retried_calls: int = 0
    tool_errors: int = 0
    tokens: int = 0
    cost_usd: float = 0.0
    approvals: int = 0  # approval events (escalations answered by a person)
    tasks: int = 0  # tasks that ended in the window
    successful_tasks: int = 0
    violations: int = 0
    side_effect_errors: int = 0
    # alerts by detector, and tool calls by tool
    violations_by_detector: dict[str, int] = Field(default_factory=dict)
    tool_calls_by_tool: dict[str, int] = Field(default_factory=dict)
