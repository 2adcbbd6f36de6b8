"""token_spike: an agent burning tokens far above its own normal, or over budget.

Tokens are summed per agent per minute of event time (TumblingSum). A minute
is judged only once the watermark has closed it, so a quiet minute counts as a
zero in the moving baseline (and a burst is compared with a baseline that
includes the quiet time before it). A closed minute is a spike when it
exceeds BOTH ``mean + std_devs * std`` and ``baseline_ratio * mean`` of the
agent's moving baseline, and the floor ``min_tokens_per_minute``, and the
baseline has seen ``min_active_minutes`` minutes with traffic: a new or quiet
agent's first busy minutes build its baseline instead of alerting.

Hourly budgets (per agent and per tenant, clock hours of event time) fire once
per hour window, as soon as the running sum crosses the limit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from detectors import state as st
from detectors.base import Detector, Finding
from detectors.policy import Policy, budget_for
from detectors.windows import MovingBaseline, TumblingSum
from schemas.events import Event, EventKind

MINUTE = 60.0
HOUR = 3600.0
# after this many empty minutes the EWMA has forgotten the old level anyway
MAX_ZERO_FILL = 120
EVIDENCE_PER_MINUTE = 20

AgentKey = tuple[str, str]  # (tenant, agent)


@dataclass(slots=True)
class _AgentState:
    baseline: MovingBaseline
    active_minutes: int = 0
    last_closed: int | None = None
    # a few LLM calls of each still-open minute: the evidence of a spike
    evidence: dict[int, list[Event]] = field(default_factory=dict)
    # open minutes already judged a spike as their tokens arrived
    fired: set[int] = field(default_factory=set)


class TokenSpike(Detector):
    name = "token_spike"
    version = "1.0.0"

    def __init__(self, policy: Policy) -> None:
        self.config = policy.detectors.token_spike
        self.budgets = policy.budgets
        self._minutes: TumblingSum[AgentKey] = TumblingSum(MINUTE)
        self._hours: TumblingSum[tuple[str, str, str]] = TumblingSum(HOUR)  # (scope, tenant, key)
        self._state: dict[AgentKey, _AgentState] = {}
        self._budget_fired: set[tuple[str, str, str, int]] = set()

    def _agent(self, key: AgentKey) -> _AgentState:
        st = self._state.get(key)
        if st is None:
            st = self._state[key] = _AgentState(MovingBaseline(alpha=self.config.baseline_alpha))
        return st

    def observe(self, event: Event) -> list[Finding]:
        if event.kind is not EventKind.LLM_CALL:
            return []
        tokens = event.total_tokens
        if tokens <= 0:
            return []
        ts = event.ts_seconds
        key = (event.tenant, event.agent_id)
        self._minutes.add(key, ts, tokens)
        st = self._agent(key)
        ev_list = st.evidence.setdefault(self._minutes.bucket_of(ts), [])
        if len(ev_list) < EVIDENCE_PER_MINUTE:
            ev_list.append(event)
        findings: list[Finding] = []
        spike = self._judge_open(key, self._minutes.bucket_of(ts), st)
        if spike is not None:
            findings.append(spike)
        for scope, who, table in (
            ("agent", event.agent_id, self.budgets.agent_tokens_per_hour),
            ("tenant", event.tenant, self.budgets.tenant_tokens_per_hour),
        ):
            limit = budget_for(who, table)
            if limit is None:
                continue
            used = self._hours.add((scope, event.tenant, who), ts, tokens)
            hour = self._hours.bucket_of(ts)
            fired_key = (scope, event.tenant, who, hour)
            if used > limit and fired_key not in self._budget_fired:
                self._budget_fired.add(fired_key)
                findings.append(
                    Finding(
                        detector=self.name,
                        agent_id=event.agent_id,
                        tenant=event.tenant,
                        subject=f"budget:{scope}:{who}:{hour}",
                        episode_start=hour * HOUR,
                        ts=ts,
                        severity=self.config.budget_severity,
                        summary=f"{scope} {who} used {int(used)} tokens this hour, over its budget of {limit}",
                        evidence=[event],
                        quiet_after_s=HOUR,
                        labels={"pattern": f"{scope}_budget", "limit": str(limit), "used": str(int(used))},
                    )
                )
        return findings

    def on_watermark(self, watermark: float) -> list[Finding]:
        findings: list[Finding] = []
        for key, bucket, total in self._minutes.close(watermark):
            st = self._agent(key)
            # the quiet minutes since the last closed one are zeros in the baseline
            if st.last_closed is not None:
                for _ in range(min(bucket - st.last_closed - 1, MAX_ZERO_FILL)):
                    st.baseline.update(0.0)
            st.last_closed = bucket
            evidence = st.evidence.pop(bucket, [])
            if bucket in st.fired:
                st.fired.discard(bucket)  # already reported while the minute was open
            else:
                f = self._judge(key, bucket, total, st, evidence)
                if f is not None:
                    findings.append(f)
            st.baseline.update(total)
            st.active_minutes += 1
        # budgets are decided as tokens arrive; closed hours only need forgetting
        for _ in self._hours.close(watermark):
            pass
        self._budget_fired = {k for k in self._budget_fired if (k[3] + 1) * HOUR > watermark - HOUR}
        return findings

    def _judge_open(self, key: AgentKey, bucket: int, st: _AgentState) -> Finding | None:
        """A minute still open can already be over every threshold: say so now rather
        than when the minute ends (on-call hears of a burst while it is happening)."""
        if bucket in st.fired or st.active_minutes < self.config.min_active_minutes:
            return None
        total = self._minutes.current(key, bucket * MINUTE)
        if total < self.config.min_tokens_per_minute:
            return None
        # judge against the baseline the minute will have when it closes: the quiet
        # minutes since the last closed one count as zeros
        baseline = MovingBaseline(st.baseline.alpha, st.baseline.mean, st.baseline.var, st.baseline.samples)
        if st.last_closed is not None:
            for _ in range(min(bucket - st.last_closed - 1, MAX_ZERO_FILL)):
                baseline.update(0.0)
        f = self._judge(key, bucket, total, st, list(st.evidence.get(bucket, [])), baseline=baseline)
        if f is not None:
            st.fired.add(bucket)
        return f

    def _judge(
        self, key: AgentKey, bucket: int, total: float, st: _AgentState, evidence: list[Event],
        baseline: MovingBaseline | None = None,
    ) -> Finding | None:
        cfg = self.config
        b = baseline or st.baseline
        if total < cfg.min_tokens_per_minute or st.active_minutes < cfg.min_active_minutes:
            return None
        by_std = b.mean + cfg.std_devs * b.std
        by_ratio = cfg.baseline_ratio * b.mean
        if total <= by_std or total <= by_ratio:
            return None
        tenant, agent = key
        start = bucket * MINUTE
        return Finding(
            detector=self.name,
            agent_id=agent,
            tenant=tenant,
            subject="rate",
            episode_start=start,
            ts=start + MINUTE,
            severity=cfg.severity,
            summary=(
                f"agent {agent} used {int(total)} tokens in one minute; its baseline is "
                f"{b.mean:.0f} ± {b.std:.0f} per minute (threshold {max(by_std, by_ratio):.0f})"
            ),
            evidence=evidence,
            # consecutive spiking minutes are one episode
            quiet_after_s=2 * MINUTE,
            labels={"pattern": "rate", "tokens": str(int(total)), "baseline_mean": f"{b.mean:.1f}"},
        )

    def to_state(self, enc: st.Encoder) -> dict[str, Any]:
        return {
            "minutes": self._minutes.to_state(),
            "hours": self._hours.to_state(),
            "agents": [[k, a.baseline.to_state(), a.active_minutes, a.last_closed,
                        [[b, [enc.event(e) for e in evs]] for b, evs in a.evidence.items()], sorted(a.fired)]
                       for k, a in self._state.items()],
            "budget_fired": [list(k) for k in self._budget_fired],
        }

    def load_state(self, data: dict[str, Any], dec: st.Decoder) -> None:
        self._minutes.load_state(data.get("minutes", []))
        self._hours.load_state(data.get("hours", []))
        for k, baseline, active, last_closed, evidence, fired in st.seq(data.get("agents", [])):
            a = self._agent(st.key(k))
            a.baseline.load_state(baseline)
            a.active_minutes = st.integer(active)
            a.last_closed = st.opt_integer(last_closed)
            a.evidence = {st.integer(b): [dec.event(r) for r in st.seq(evs)] for b, evs in st.seq(evidence)}
            a.fired = {st.integer(b) for b in st.seq(fired)}
        self._budget_fired = {st.key(k) for k in st.seq(data.get("budget_fired", []))}
