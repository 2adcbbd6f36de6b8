"""token_spike: an agent burning tokens far above its own normal, or over budget.

Tokens are summed per agent per minute of event time (TumblingSum). A minute
is judged against the baseline of the minutes closed before it, so a quiet
minute counts as a zero in the moving baseline (and a burst is compared with
a baseline that includes the quiet time before it). A minute is a spike when
it exceeds BOTH ``mean + std_devs * std`` and ``baseline_ratio * mean`` of the
agent's moving baseline, and the floor ``min_tokens_per_minute``, and the
baseline has seen ``min_active_minutes`` minutes with traffic: a new or quiet
agent's first busy minutes build its baseline instead of alerting.

Same verdict whatever the arrival order within the allowed lateness: minutes
close in order once the watermark passes them, and the closed-minute cursor
only moves forward, so an event later than the allowed lateness for a minute
already closed is left out of the rate (it still counts for the budgets)
rather than reopening the minute or padding zeros. A minute still open is
judged early, as its tokens arrive, only once every earlier minute is closed
(the watermark has passed its start), so the baseline and the threshold are
final; its tokens only grow, so an early spike is a spike at close too. The
early finding names the tokens so far; at close a revision states the
minute's total and its evidence (the earliest LLM calls, by event time and
id) without counting a second spike.

Hourly budgets per agent (clock hours of event time) fire once per hour
window, as soon as the running sum crosses the limit. A tenant's agents may be
on different partitions, so for a tenant with a budget each LLM call goes out
as a token signal and the tenant-keyed stage sums them (``TenantBudget`` in
detectors/cross_agent.py).

An agent quiet for ``FORGET_AFTER_S`` is forgotten (its baseline has decayed
to nothing by then): when it comes back it builds a baseline like a new agent.
"""

from __future__ import annotations

from bisect import insort
from dataclasses import dataclass, field
from typing import Any

from detectors import state as st
from detectors.base import NO_FINDINGS, Detector, Finding, Handler, token_signal
from detectors.policy import MATCH_CACHE_SIZE, Policy, budget_for
from detectors.windows import ExpirySet, MovingBaseline, TumblingSum
from schemas.events import Event, EventKind

MINUTE = 60.0
HOUR = 3600.0
# after this many empty minutes the EWMA has forgotten the old level anyway
MAX_ZERO_FILL = 120
FORGET_AFTER_S = MAX_ZERO_FILL * MINUTE
EVIDENCE_PER_MINUTE = 20

AgentKey = tuple[str, str]  # (tenant, agent)


@dataclass(slots=True)
class _AgentState:
    baseline: MovingBaseline
    active_minutes: int = 0
    last_closed: int | None = None
    # the earliest LLM calls of each still-open minute, as (ts, event id, event): the evidence
    evidence: dict[int, list[tuple[float, str, Event]]] = field(default_factory=dict)
    # open minutes already judged a spike as their tokens arrived
    fired: set[int] = field(default_factory=set)


class TokenSpike(Detector):
    name = "token_spike"
    version = "1.1.0"

    def __init__(self, policy: Policy) -> None:
        self.config = policy.detectors.token_spike
        self.budgets = policy.budgets
        self._minutes: TumblingSum[AgentKey] = TumblingSum(MINUTE)
        self._hours: TumblingSum[tuple[str, str, str]] = TumblingSum(HOUR)  # ("agent", tenant, agent)
        self._tenant_limit: dict[str, int | None] = {}  # budget_for per tenant, once
        self._agent_budgets = bool(self.budgets.agent_tokens_per_hour)
        self._agent_limits: dict[str, int | None] = {}  # budget_for per agent (bounded)
        self._state: dict[AgentKey, _AgentState] = {}
        self._idle: ExpirySet[AgentKey] = ExpirySet()
        self._budget_fired: dict[int, set[tuple[str, str, str]]] = {}  # hour -> ("agent", tenant, agent)
        self._watermark = float("-inf")

    def _agent(self, key: AgentKey) -> _AgentState:
        st_ = self._state.get(key)
        if st_ is None:
            st_ = self._state[key] = _AgentState(MovingBaseline(alpha=self.config.baseline_alpha))
        return st_

    def observe(self, event: Event) -> list[Finding]:
        if event.kind is not EventKind.LLM_CALL:
            return []
        return self._llm_call(event, event.__dict__, event.ts_seconds)

    def handlers(self) -> dict[EventKind, Handler]:
        return {EventKind.LLM_CALL: self._llm_call}

    def _agent_limit(self, agent_id: str) -> int | None:
        """``budget_for`` the agent, remembered per agent id (bounded: emptied when full)."""
        limits = self._agent_limits
        if agent_id in limits:
            return limits[agent_id]
        if len(limits) >= MATCH_CACHE_SIZE:
            limits.clear()
        limit = limits[agent_id] = budget_for(agent_id, self.budgets.agent_tokens_per_hour)
        return limit

    def _llm_call(self, event: Event, fields: dict[str, Any], ts: float) -> list[Finding]:
        tokens = fields["input_tokens"] + fields["output_tokens"]
        if tokens <= 0:
            return NO_FINDINGS
        tenant, agent_id = fields["tenant"], fields["agent_id"]
        key = (tenant, agent_id)
        findings = NO_FINDINGS
        bucket = int(ts // MINUTE)
        agent = self._state.get(key)
        if agent is None:
            agent = self._agent(key)
        if agent.last_closed is None or bucket > agent.last_closed:
            # (a minute already closed is not reopened by a straggler)
            self._minutes.add(key, ts, tokens)
            self._idle.touch(key, (bucket + 1) * MINUTE + FORGET_AFTER_S)
            ev_list = agent.evidence.get(bucket)
            if ev_list is None:
                ev_list = agent.evidence[bucket] = []
            event_id = fields["event_id"]
            item = (ts, event_id, event)
            if len(ev_list) < EVIDENCE_PER_MINUTE:
                last = ev_list[-1] if ev_list else None
                if last is None or (ts, event_id) >= (last[0], last[1]):
                    ev_list.append(item)  # in order, as most calls come: where insort would put it
                else:
                    insort(ev_list, item, key=_evidence_order)
            elif (ts, event_id) < _evidence_order(ev_list[-1]):
                insort(ev_list, item, key=_evidence_order)
                ev_list.pop()
            if bucket * MINUTE <= self._watermark:
                spike = self._judge_open(key, bucket, agent)
                if spike is not None:
                    findings = [spike]
        limits = self._tenant_limit
        if tenant not in limits:
            limits[tenant] = budget_for(tenant, self.budgets.tenant_tokens_per_hour)
        if limits[tenant] is not None and self.signals is not None:
            self.signals.append(token_signal(event, ts, tokens))  # summed in the tenant-keyed stage
        if not self._agent_budgets:
            return findings
        limit = self._agent_limit(agent_id)
        if limit is not None:
            who = ("agent", tenant, agent_id)
            used = self._hours.add(who, ts, tokens)
            hour = self._hours.bucket_of(ts)
            fired = self._budget_fired.get(hour)
            if fired is None:
                fired = self._budget_fired[hour] = set()
            if used > limit and who not in fired:
                fired.add(who)
                findings = [*findings, Finding(
                    detector=self.name,
                    agent_id=agent_id,
                    tenant=tenant,
                    subject=f"budget:agent:{agent_id}:{hour}",
                    episode_start=hour * HOUR,
                    ts=ts,
                    severity=self.config.budget_severity,
                    summary=f"agent {agent_id} used {int(used)} tokens this hour, over its budget of {limit}",
                    evidence=[event],
                    quiet_after_s=HOUR,
                    labels={"pattern": "agent_budget", "limit": str(limit), "used": str(int(used))},
                )]
        return findings

    def on_watermark(self, watermark: float) -> list[Finding]:
        self._watermark = watermark
        findings: list[Finding] = []
        for key, bucket, total in self._minutes.close(watermark):
            agent = self._agent(key)
            # the quiet minutes since the last closed one are zeros in the baseline
            if agent.last_closed is not None:
                for _ in range(min(bucket - agent.last_closed - 1, MAX_ZERO_FILL)):
                    agent.baseline.update(0.0)
            agent.last_closed = bucket
            evidence = [e for _, _, e in agent.evidence.pop(bucket, [])]
            early = bucket in agent.fired
            agent.fired.discard(bucket)
            f = self._judge(key, bucket, total, agent, evidence)
            if f is not None:
                # judged early: this is the same spike with its final figures, not a second one
                f.revision = early
                findings.append(f)
            agent.baseline.update(total)
            agent.active_minutes += 1
        # budgets are decided as tokens arrive; closed hours only need forgetting
        self._hours.close(watermark)
        for hour in [h for h in self._budget_fired if (h + 2) * HOUR <= watermark]:
            del self._budget_fired[hour]
        for key in self._idle.due(watermark):
            self._state.pop(key, None)
        return findings

    def _judge_open(self, key: AgentKey, bucket: int, agent: _AgentState) -> Finding | None:
        """Every earlier minute is closed, so the baseline is the one this minute will be
        judged against at close: a minute already over the threshold is a spike now (on-call
        hears of a burst while it is happening). The quiet minutes since the last closed one
        count as zeros."""
        if bucket in agent.fired or agent.active_minutes < self.config.min_active_minutes:
            return None
        total = self._minutes.current(key, bucket * MINUTE)
        if total < self.config.min_tokens_per_minute:
            return None
        b = agent.baseline
        baseline = MovingBaseline(b.alpha, b.mean, b.var, b.samples)
        if agent.last_closed is not None:
            for _ in range(min(bucket - agent.last_closed - 1, MAX_ZERO_FILL)):
                baseline.update(0.0)
        # the evidence comes with the minute's final figures at close
        f = self._judge(key, bucket, total, agent, [], baseline=baseline)
        if f is not None:
            agent.fired.add(bucket)
        return f

    def _judge(
        self, key: AgentKey, bucket: int, total: float, agent: _AgentState, evidence: list[Event],
        baseline: MovingBaseline | None = None,
    ) -> Finding | None:
        cfg = self.config
        b = baseline or agent.baseline
        if total < cfg.min_tokens_per_minute or agent.active_minutes < cfg.min_active_minutes:
            return None
        by_std = b.mean + cfg.std_devs * b.std
        by_ratio = cfg.baseline_ratio * b.mean
        if total <= by_std or total <= by_ratio:
            return None
        tenant, agent_id = key
        start = bucket * MINUTE
        return Finding(
            detector=self.name,
            agent_id=agent_id,
            tenant=tenant,
            subject="rate",
            episode_start=start,
            ts=start + MINUTE,
            severity=cfg.severity,
            summary=(
                f"agent {agent_id} used {int(total)} tokens in one minute; its baseline is "
                f"{b.mean:.0f} ± {b.std:.0f} per minute (threshold {max(by_std, by_ratio):.0f})"
            ),
            evidence=evidence,
            # consecutive spiking minutes are one episode
            quiet_after_s=2 * MINUTE,
            labels={"pattern": "rate", "tokens": str(int(total)), "baseline_mean": f"{b.mean:.1f}"},
        )

    def to_state(self, enc: st.Encoder) -> dict[str, Any]:
        return {
            "watermark": st.enc_num(self._watermark),
            "minutes": self._minutes.to_state(),
            "hours": self._hours.to_state(),
            "agents": [[k, a.baseline.to_state(), a.active_minutes, a.last_closed,
                        [[b, [enc.event(e) for _, _, e in evs]] for b, evs in a.evidence.items()], sorted(a.fired),
                        self._idle.deadline(k)]
                       for k, a in self._state.items()],
            "budget_fired": [[h, [list(k) for k in keys]] for h, keys in self._budget_fired.items()],
        }

    def load_state(self, data: dict[str, Any], dec: st.Decoder) -> None:
        self._watermark = st.num(data.get("watermark", "-inf"))
        self._minutes.load_state(data.get("minutes", []))
        self._hours.load_state(data.get("hours", []))
        for k, baseline, active, last_closed, evidence, fired, idle in st.seq(data.get("agents", [])):
            key = st.key(k)
            a = self._agent(key)
            a.baseline.load_state(baseline)
            a.active_minutes = st.integer(active)
            a.last_closed = st.opt_integer(last_closed)
            for b, refs in st.seq(evidence):
                evs = [dec.event(r) for r in st.seq(refs)]
                a.evidence[st.integer(b)] = sorted(((e.ts_seconds, e.event_id, e) for e in evs), key=_evidence_order)
            a.fired = {st.integer(b) for b in st.seq(fired)}
            if idle is not None:
                self._idle.touch(key, st.num(idle))
        for h, keys in st.seq(data.get("budget_fired", [])):
            self._budget_fired[st.integer(h)] = {st.key(k) for k in st.seq(keys)}


def _evidence_order(item: tuple[float, str, Event]) -> tuple[float, str]:
    return item[0], item[1]
