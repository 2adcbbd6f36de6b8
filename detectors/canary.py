"""Agent versions judged on behaviour: metric windows, canary verdicts, shadow versions.

Three things, all in event time, all deterministic (the same input gives the same
windows, verdicts and alerts in the live worker, in replay and in tests):

* **Metric windows** (``VersionWindow``): per tenant, agent, version and window of
  ``canary.window_s``: actions, tool calls by tool, retried calls, tool errors,
  tokens and cost, approvals, completed and successful tasks, alerts by detector
  and side-effect errors. A window is emitted once, when event time has passed
  its end by the task idle time plus the allowed lateness.
* **Canary verdicts** (``CanaryVerdict``): a *task* is a trace (one unit of the
  agent's work); it is complete ``task_idle_s`` after its last event. Completed
  tasks of the baseline and candidate versions named by a ``canary.analyses``
  entry are samples; every ``judge_every_s`` each metric is compared, by a
  one-sided Mann-Whitney U test over per-task values or a bootstrap interval of
  the pooled rate difference (resampling tasks, seeded from the analysis so a
  replay gives the same numbers), against the allowed degradation. Too few tasks
  on either side is ``inconclusive``; any metric worse than allowed with the
  test's confidence is ``fail``; else ``pass``. A failure is a ``canary`` finding
  (an alert; in enforce mode with ``rollback`` a halt scoped to the candidate
  version, schemas.alerts.HALT_VERSION_LABEL), after which that analysis stops
  judging until the policy changes.
* **Shadow versions**: an allowed, non-read-only audited action attributed to a
  version the policy runs in shadow is a ``shadow_version`` finding.

Findings of the other detectors count as violations of the version and task
they are about (every repeat of a condition counts, not only the alert it
opened): the engine hands each to ``on_finding``.
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass, field, make_dataclass
from datetime import datetime, timezone
from fnmatch import fnmatchcase
from typing import Any

from detectors import state as st
from detectors.base import Detector, Finding, Handler
from detectors.policy import CanaryAnalysisConfig, Policy, glob_match
from detectors.windows import ExpiryQueue
from schemas.alerts import HALT_VERSION_LABEL, alert_id_for
from schemas.canary import METRICS, CanaryVerdict, MetricResult, Verdict, VersionWindow
from schemas.events import Event, EventKind, stable_id

CANARY = "canary"
SHADOW_VERSION = "shadow_version"
# their own alerts are not violations of the version they judge
OWN_DETECTORS = frozenset({CANARY, SHADOW_VERSION})
SIDE_EFFECT_DETECTORS = frozenset({"unattributed_side_effect", "unconfirmed_action"})
BOOTSTRAP_RESAMPLES = 400
MAX_EVIDENCE = 10

# -- statistics (pure functions) ---------------------------------------------------------------


def _normal_sf(z: float) -> float:
    """P(Z > z) for a standard normal Z."""
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def mann_whitney_greater(baseline: list[float], candidate: list[float]) -> tuple[float, float]:
    """(U of the candidate, one-sided p that candidate values tend to be greater).

    Normal approximation with tie correction and continuity correction (fine from
    about eight values a side; the policy's ``min_tasks`` is at least that in practice).
    When every value is tied the test has no information: p = 1.
    """
    n1, n2 = len(candidate), len(baseline)
    if n1 == 0 or n2 == 0:
        return 0.0, 1.0
    pooled = sorted([(v, 1) for v in candidate] + [(v, 0) for v in baseline])
    rank_sum = 0.0
    tie_term = 0.0
    i, n = 0, n1 + n2
    while i < n:
        j = i
        while j + 1 < n and pooled[j + 1][0] == pooled[i][0]:
            j += 1
        avg = (i + j) / 2.0 + 1.0
        t = j - i + 1
        tie_term += t**3 - t
        rank_sum += avg * sum(1 for k in range(i, j + 1) if pooled[k][1] == 1)
        i = j + 1
    u = rank_sum - n1 * (n1 + 1) / 2.0
    mean = n1 * n2 / 2.0
    var = n1 * n2 / 12.0 * ((n + 1) - tie_term / (n * (n - 1)))
    if var <= 0:
        return u, 1.0
    z = (u - mean - 0.5) / math.sqrt(var)
    return u, _normal_sf(z)


def pooled(samples: list[tuple[float, float]], scale: float = 1.0) -> float | None:
    """sum(numerators) / sum(denominators) * scale; None when there is no denominator."""
    den = sum(d for _, d in samples)
    return None if den <= 0 else sum(n for n, _ in samples) / den * scale


def bootstrap_difference(baseline: list[tuple[float, float]], candidate: list[tuple[float, float]], *,
                         scale: float, confidence: float, seed: str,
                         resamples: int = BOOTSTRAP_RESAMPLES) -> tuple[float, float] | None:
    """Percentile interval of pooled(candidate) - pooled(baseline), resampling tasks with
    replacement on each side; None when either side has no denominator. Seeded: the same
    samples and seed give the same interval."""
    if not baseline or not candidate:
        return None
    rng = random.Random(seed)
    diffs: list[float] = []
    for _ in range(resamples):
        b = pooled(rng.choices(baseline, k=len(baseline)), scale)
        c = pooled(rng.choices(candidate, k=len(candidate)), scale)
        if b is not None and c is not None:
            diffs.append(c - b)
    if len(diffs) < resamples // 2:
        return None
    diffs.sort()
    tail = (1.0 - confidence) / 2.0
    lo = diffs[int(tail * (len(diffs) - 1))]
    hi = diffs[int(math.ceil((1.0 - tail) * (len(diffs) - 1)))]
    return lo, hi


# -- tasks and windows -------------------------------------------------------------------------


@dataclass(slots=True)
class Task:
    """One trace of one agent version: the unit a canary samples."""

    tenant: str
    agent: str
    version: str
    last: float
    actions: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    retried: int = 0
    tokens: int = 0
    cost: float = 0.0
    approvals: int = 0
    violations: int = 0
    side_effect_errors: int = 0
    last_tool_failed: bool = False
    calls: dict[str, int] = field(default_factory=dict)  # tool + argument fingerprint -> times called

    @property
    def success(self) -> bool:
        return not (self.violations or self.side_effect_errors or self.last_tool_failed)

    def sample(self, metric: str) -> tuple[float, float]:
        """(numerator, denominator) of ``metric`` for this task."""
        if metric == "violations_per_1k_actions":
            return float(self.violations), float(self.actions)
        if metric == "retried_call_rate":
            return float(self.retried), float(self.tool_calls)
        if metric == "tool_error_rate":
            return float(self.tool_errors), float(self.tool_calls)
        if metric == "side_effect_errors_per_1k_actions":
            return float(self.side_effect_errors), float(self.actions)
        if metric == "escalation_rate":
            return (1.0 if self.approvals else 0.0), 1.0
        if metric == "tokens_per_task":
            return float(self.tokens), 1.0
        if metric == "cost_per_task":
            return self.cost, 1.0
        if metric == "success_rate":
            return (1.0 if self.success else 0.0), 1.0
        raise KeyError(metric)

    def to_state(self) -> list[Any]:
        return [self.tenant, self.agent, self.version, self.last, self.actions, self.tool_calls, self.tool_errors,
                self.retried, self.tokens, self.cost, self.approvals, self.violations, self.side_effect_errors,
                self.last_tool_failed, self.calls]

    @classmethod
    def from_state(cls, v: Any) -> "Task":
        (tenant, agent, version, last, actions, tool_calls, tool_errors, retried, tokens, cost, approvals,
         violations, side_effects, last_failed, calls) = st.seq(v)
        return cls(st.text(tenant), st.text(agent), st.text(version), st.num(last), st.integer(actions),
                   st.integer(tool_calls), st.integer(tool_errors), st.integer(retried), st.integer(tokens),
                   st.num(cost), st.integer(approvals), st.integer(violations), st.integer(side_effects),
                   st.boolean(last_failed), {st.text(k): st.integer(n) for k, n in st.mapping(calls).items()})


WindowKey = tuple[str, str, str, float]  # tenant, agent, version, window start
# VersionWindow's counters (every int/float field but the window's size): an open window keeps
# them in a slots object, not in the pydantic model, because it is updated on every event of a
# versioned agent and pydantic's __setattr__ costs about ten times a slot's
_COUNTERS = tuple(name for name, f in VersionWindow.model_fields.items()
                  if f.annotation in (int, float) and name != "window_s")
_MAPS = ("violations_by_detector", "tool_calls_by_tool")


class _CountsMethods:
    __slots__ = ()
    size: float

    def window(self, key: WindowKey) -> VersionWindow:
        tenant, agent, version, start = key
        return VersionWindow(tenant=tenant, agent_id=agent, agent_version=version, window_start=_dt(start),
                             window_s=self.size, **{n: getattr(self, n) for n in (*_COUNTERS, *_MAPS)})

    def to_state(self) -> list[Any]:
        return [self.size, *(getattr(self, n) for n in (*_COUNTERS, *_MAPS))]

    @classmethod
    def from_state(cls, v: Any) -> Any:
        size, *values = st.seq(v)
        c = cls(st.num(size))  # type: ignore[call-arg]
        for name, value in zip((*_COUNTERS, *_MAPS), values, strict=True):
            if name in _MAPS:
                value = {st.text(k): st.integer(n) for k, n in st.mapping(value).items()}
            else:
                value = st.num(value) if VersionWindow.model_fields[name].annotation is float else st.integer(value)
            setattr(c, name, value)
        return c


_Counts = make_dataclass(
    "_Counts",
    [("size", float),
     *((n, VersionWindow.model_fields[n].annotation, field(default=0)) for n in _COUNTERS),
     *((n, dict, field(default_factory=dict)) for n in _MAPS)],
    bases=(_CountsMethods,), slots=True)


_TOOL, _LLM, _AUDIT = EventKind.TOOL_CALL, EventKind.LLM_CALL, EventKind.AUDIT
_OBSERVED = frozenset({_TOOL, _LLM, _AUDIT, EventKind.APPROVAL})
_NONE: list[Finding] = []  # returned empty and never appended to: no list per event


def _dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=timezone.utc)


@dataclass(slots=True)
class _Analysis:
    cfg: CanaryAnalysisConfig
    tenant: str
    next_judge: float
    failed: bool = False


class CanaryAnalysis(Detector):
    """Metric windows, canary verdicts and shadow versions (see the module docstring)."""

    name = CANARY
    version = "1.0.0"

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.cfg = policy.canary
        self._lateness = policy.allowed_lateness_s
        self._read_only = tuple(policy.detectors.unattributed_side_effect.read_only_actions)
        # (agent, version) pairs whose completed tasks are kept as samples
        self._sampled = {(a.agent, v) for a in self.cfg.analyses for v in (a.baseline, a.candidate)}
        self._agents = {a.agent for a in self.cfg.analyses}
        self._tasks: dict[str, Task] = {}  # open tasks by trace id
        self._task_due: ExpiryQueue[str] = ExpiryQueue()
        self._samples: dict[tuple[str, str, str], deque[Task]] = {}  # (tenant, agent, version)
        self._windows: dict[WindowKey, Any] = {}  # open windows' _Counts
        self._window_due: ExpiryQueue[WindowKey] = ExpiryQueue()
        self._analyses: dict[tuple[int, str], _Analysis] = {}  # (analysis index, tenant)
        self._evidence: dict[tuple[str, str, str], deque[Event]] = {}  # recent candidate events
        # outputs for the caller (the engine's take_canary drains them)
        self.windows_out: list[VersionWindow] = []
        self.verdicts_out: list[CanaryVerdict] = []
        self.late_updates = 0  # counted into a window already emitted: dropped
        self._watermark = -math.inf
        self._metrics = self.cfg.metrics
        self._shadow_versions = bool(self.cfg.shadow_versions)

    # -- events ------------------------------------------------------------------------------

    def handlers(self) -> dict[EventKind, Handler]:
        out: dict[EventKind, Handler] = {}
        if self._metrics or self._agents:  # windows to count into, or tasks to sample
            for kind in (_TOOL, _LLM, EventKind.APPROVAL):
                out[kind] = self._observe
        if self._shadow_versions:  # an audited side effect of a shadow version
            out[_AUDIT] = self._observe
        return out

    def observe(self, event: Event) -> list[Finding]:
        if event.kind not in _OBSERVED:
            return _NONE
        return self._observe(event, event.__dict__, event.ts_seconds)

    def _observe(self, event: Event, fields: dict[str, Any], ts: float) -> list[Finding]:
        version = fields["agent_version"]
        if not version:  # most events of most fleets: nothing to count
            return _NONE
        kind = fields["kind"]
        agent = fields["agent_id"]
        out = _NONE
        if kind is _AUDIT:
            if self._shadow_versions:
                f = self._shadow(event)
                if f is not None:
                    out = [f]
            return out
        if not agent:
            return out
        sampled = agent in self._agents and (agent, version) in self._sampled
        metrics = self._metrics
        if not metrics and not sampled:
            return out
        w = self._window(event.tenant, agent, version, ts) if metrics else None
        # tasks of every versioned agent for the windows' task counts; kept as samples only
        # for the versions an analysis compares
        task = self._task(event, ts) if event.trace_id else None
        if kind is _TOOL:
            tool = event.tool_name
            failed = event.outcome == "error"
            retried = False
            if task is not None:
                call = tool + "\x1f" + event.args_fingerprint
                seen = task.calls.get(call, 0)
                task.calls[call] = seen + 1
                retried = seen > 0
                task.actions += 1
                task.tool_calls += 1
                task.retried += retried
                task.tool_errors += failed
                task.last_tool_failed = failed
            if w is not None:
                w.actions += 1
                w.tool_calls += 1
                w.retried_calls += retried
                w.tool_errors += failed
                by_tool = w.tool_calls_by_tool
                by_tool[tool] = by_tool.get(tool, 0) + 1
        elif kind is _LLM:
            tokens = event.input_tokens + event.output_tokens
            cost = event.cost_usd or 0.0
            if task is not None:
                task.actions += 1
                task.tokens += tokens
                task.cost += cost
            if w is not None:
                w.actions += 1
                w.llm_calls += 1
                w.tokens += tokens
                w.cost_usd += cost
        else:  # approval
            if task is not None:
                task.approvals += 1
            if w is not None:
                w.approvals += 1
        if sampled:
            key = (event.tenant, agent, version)
            recent = self._evidence.get(key)
            if recent is None:
                recent = self._evidence[key] = deque(maxlen=MAX_EVIDENCE)
            recent.append(event)
        return out

    def on_finding(self, f: Finding) -> None:
        """Another detector's finding (a repeat included, a revision not): one violation by the
        version of its evidence, in the window of its time and in the tasks of its traces."""
        version = next((e.agent_version for e in f.evidence if e.agent_version), "")
        if f.detector in OWN_DETECTORS or not version:
            return
        side_effect = f.detector in SIDE_EFFECT_DETECTORS
        if self.cfg.metrics:
            w = self._window(f.tenant, f.agent_id, version, f.ts)
            if w is not None:
                w.violations += 1
                w.side_effect_errors += side_effect
                w.violations_by_detector[f.detector] = w.violations_by_detector.get(f.detector, 0) + 1
        sampled = (f.agent_id, version) in self._sampled
        for trace in {e.trace_id for e in f.evidence if e.trace_id}:
            task = self._tasks.get(trace)
            if task is None and sampled:
                # the finding came from the task's first event, before this detector (last) saw it
                task = self._tasks[trace] = Task(f.tenant, f.agent_id, version, f.ts)
                self._task_due.touch(trace, task.last + self.cfg.task_idle_s)
            if task is not None and task.agent == f.agent_id and task.version == version:
                task.violations += 1
                task.side_effect_errors += side_effect

    def _task(self, ev: Event, ts: float) -> Task:
        task = self._tasks.get(ev.trace_id)
        if task is None or task.agent != ev.agent_id or task.version != ev.agent_version:
            task = self._tasks[ev.trace_id] = Task(ev.tenant, ev.agent_id, ev.agent_version, ts)
        if ts > task.last:
            task.last = ts
        self._task_due.touch(ev.trace_id, task.last + self.cfg.task_idle_s)
        return task

    def _window(self, tenant: str, agent: str, version: str, ts: float) -> Any:
        size = self.cfg.window_s
        start = math.floor(ts / size) * size
        key = (tenant, agent, version, start)
        w = self._windows.get(key)
        if w is None:
            closes = start + size + self.cfg.task_idle_s + self._lateness
            if closes <= self._watermark:
                self.late_updates += 1  # that window was emitted already: a second row would replace it
                return None
            w = self._windows[key] = _Counts(size)
            self._window_due.touch(key, closes)
        return w

    def _shadow(self, ev: Event) -> Finding | None:
        if ev.outcome != "allow" or any(fnmatchcase(ev.action, p) for p in self._read_only):
            return None
        for agent_glob, versions in self.cfg.shadow_versions.items():
            if glob_match(ev.agent_id, agent_glob) and any(glob_match(ev.agent_version, v) for v in versions):
                return Finding.of_event(
                    SHADOW_VERSION, ev, f"{ev.agent_version}:{ev.action}:{ev.resource}", self.cfg.shadow_severity,
                    f"shadow version {ev.agent_version} of {ev.agent_id} caused a side effect: {ev.action} "
                    f"{ev.resource} ({ev.source}); a shadow version should only observe and decide",
                    {"agent_version": ev.agent_version, "action": ev.action, "resource": ev.resource})
        return None

    # -- time --------------------------------------------------------------------------------

    def on_watermark(self, watermark: float) -> list[Finding]:
        self._watermark = watermark
        for trace in self._task_due.due(watermark):
            task = self._tasks.pop(trace, None)
            if task is None:
                continue
            if task.agent in self._agents and (task.agent, task.version) in self._sampled:
                key = (task.tenant, task.agent, task.version)
                self._samples.setdefault(key, deque(maxlen=self.cfg.max_tasks)).append(task)
                self._register(task)
            if self.cfg.metrics:
                w = self._window(task.tenant, task.agent, task.version, task.last)
                if w is not None:
                    w.tasks += 1
                    w.successful_tasks += task.success
        for key in self._window_due.due(watermark):
            w = self._windows.pop(key, None)
            if w is not None:
                self.windows_out.append(w.window(key))
        out: list[Finding] = []
        for a in self._analyses.values():
            if not a.failed and watermark >= a.next_judge:
                a.next_judge = watermark + a.cfg.judge_every_s
                f = self._judge(a, watermark)
                if f is not None:
                    out.append(f)
        return out

    def _register(self, task: Task) -> None:
        """Judge the analyses of a task's agent from now on, where its tasks are: the worker
        runs one engine per agent-keyed partition, and only one of them sees that agent."""
        for i, cfg in enumerate(self.cfg.analyses):
            if cfg.agent == task.agent and (i, task.tenant) not in self._analyses:
                self._analyses[(i, task.tenant)] = _Analysis(cfg, task.tenant,
                                                             next_judge=task.last + cfg.judge_every_s)

    def verdict(self, cfg: CanaryAnalysisConfig, tenant: str, at: float) -> CanaryVerdict:
        """The verdict on ``cfg`` from the tasks completed so far."""
        base = list(self._samples.get((tenant, cfg.agent, cfg.baseline), ()))
        cand = list(self._samples.get((tenant, cfg.agent, cfg.candidate), ()))
        return judge(cfg, base, cand, tenant=tenant, at=at, policy_version=self.policy.version)

    def _judge(self, a: _Analysis, at: float) -> Finding | None:
        cfg = a.cfg
        v = self.verdict(cfg, a.tenant, at)
        finding = None
        if v.verdict is Verdict.FAIL:
            a.failed = True
            subject = f"{cfg.baseline}->{cfg.candidate}"
            failed = [m for m in v.metrics if m.outcome == "fail"]
            labels = {"baseline_version": cfg.baseline, "candidate_version": cfg.candidate, "verdict": "fail",
                      "verdict_id": v.verdict_id, "failed_metrics": ",".join(m.metric for m in failed)}
            if cfg.rollback:
                labels[HALT_VERSION_LABEL] = cfg.candidate
            numbers = "; ".join(f"{m.metric} {m.candidate:.4g} vs {m.baseline:.4g} (allowed {m.threshold:.4g}"
                                + (f", p={m.p_value:.3g}" if m.p_value is not None else "")
                                + (f", diff in [{m.ci_low:.4g}, {m.ci_high:.4g}]" if m.ci_low is not None else "")
                                + ")" for m in failed)
            finding = Finding(
                detector=CANARY, agent_id=cfg.agent, tenant=a.tenant, subject=subject, episode_start=at, ts=at,
                severity=self.cfg.severity,
                summary=(f"canary {cfg.candidate} of {cfg.agent} failed against {cfg.baseline} "
                         f"({v.candidate_tasks} vs {v.baseline_tasks} tasks, {cfg.test}): {numbers}"),
                evidence=list(self._evidence.get((a.tenant, cfg.agent, cfg.candidate), ())),
                quiet_after_s=86400.0, labels=labels, may_enforce=cfg.rollback)
            v.alert_id = alert_id_for(CANARY, cfg.agent, (subject, round(at, 6)), tenant=a.tenant)
        self.verdicts_out.append(v)
        return finding

    # -- state -------------------------------------------------------------------------------

    def to_state(self, enc: st.Encoder) -> dict[str, Any]:
        return {
            "tasks": [[t, task.to_state()] for t, task in self._tasks.items()],
            "samples": [[list(k), [t.to_state() for t in q]] for k, q in self._samples.items()],
            "windows": [[list(k), w.to_state()] for k, w in self._windows.items()],
            "analyses": [[i, tenant, a.next_judge, a.failed] for (i, tenant), a in self._analyses.items()],
            "evidence": [[list(k), [enc.event(e) for e in q]] for k, q in self._evidence.items()],
            "out": [[w.model_dump(mode="json") for w in self.windows_out],
                    [v.model_dump(mode="json") for v in self.verdicts_out]],
        }

    def load_state(self, data: dict[str, Any], dec: st.Decoder) -> None:
        for trace, task in st.seq(data.get("tasks", [])):
            t = self._tasks[st.text(trace)] = Task.from_state(task)
            self._task_due.touch(st.text(trace), t.last + self.cfg.task_idle_s)
        for k, tasks in st.seq(data.get("samples", [])):
            tenant, agent, version = st.texts(k)
            self._samples[(tenant, agent, version)] = deque((Task.from_state(t) for t in st.seq(tasks)),
                                                            maxlen=self.cfg.max_tasks)
        for k, raw in st.seq(data.get("windows", [])):
            tenant, agent, version, start = st.seq(k)
            key = (st.text(tenant), st.text(agent), st.text(version), st.num(start))
            # the window size may have changed with the policy: the stored window keeps its own
            w = self._windows[key] = _Counts.from_state(raw)
            self._window_due.touch(key, key[3] + w.size + self.cfg.task_idle_s + self._lateness)
        for i, tenant, next_judge, failed in st.seq(data.get("analyses", [])):
            idx = st.integer(i)
            if idx < len(self.cfg.analyses):  # analyses are the policy's: a removed one is gone
                self._analyses[(idx, st.text(tenant))] = _Analysis(self.cfg.analyses[idx], st.text(tenant),
                                                                   st.num(next_judge), st.boolean(failed))
        for k, refs in st.seq(data.get("evidence", [])):
            tenant, agent, version = st.texts(k)
            self._evidence[(tenant, agent, version)] = deque((dec.event(r) for r in st.seq(refs)),
                                                             maxlen=MAX_EVIDENCE)
        windows, verdicts = st.seq(data.get("out", [[], []]))
        self.windows_out = [VersionWindow.model_validate(st.mapping(w)) for w in st.seq(windows)]
        self.verdicts_out = [CanaryVerdict.model_validate(st.mapping(v)) for v in st.seq(verdicts)]


def judge(cfg: CanaryAnalysisConfig, baseline: list[Task], candidate: list[Task], *, tenant: str = "default",
          at: float, policy_version: str = "") -> CanaryVerdict:
    """Compare the candidate's completed tasks with the baseline's (pure: the tests call it directly)."""
    seed = f"{tenant}\x1f{cfg.agent}\x1f{cfg.baseline}\x1f{cfg.candidate}"
    results: list[MetricResult] = []
    for metric, rule in cfg.metrics.items():
        spec = METRICS[metric]
        b_samples = [t.sample(metric) for t in baseline]
        c_samples = [t.sample(metric) for t in candidate]
        b = pooled(b_samples, spec.scale)
        c = pooled(c_samples, spec.scale)
        if b is None or c is None:
            results.append(MetricResult(metric=metric, outcome="nodata", baseline=b or 0.0, candidate=c or 0.0,
                                        threshold=0.0))
            continue
        sign = 1.0 if spec.higher_is_worse else -1.0
        # the worst value allowed: worse than the baseline by the relative and absolute allowances
        threshold = b + sign * (abs(b) * rule.max_increase + rule.min_delta)
        beyond = sign * (c - threshold) > 0
        p = lo = hi = None
        if cfg.test == "mann_whitney":
            b_vals = [sign * n / d * spec.scale for n, d in b_samples if d > 0]
            c_vals = [sign * n / d * spec.scale for n, d in c_samples if d > 0]
            _, p = mann_whitney_greater(b_vals, c_vals)
            worse = beyond and p < 1.0 - cfg.confidence
        else:
            ci = bootstrap_difference(b_samples, c_samples, scale=spec.scale, confidence=cfg.confidence,
                                      seed=seed + "\x1f" + metric)
            if ci is None:
                results.append(MetricResult(metric=metric, outcome="nodata", baseline=b, candidate=c,
                                            threshold=threshold))
                continue
            lo, hi = ci
            allowed = threshold - b
            # worse than allowed even at the interval's end most favourable to the candidate
            worse = (lo > allowed) if spec.higher_is_worse else (hi < allowed)
        results.append(MetricResult(metric=metric, outcome="fail" if worse else "pass", baseline=b, candidate=c,
                                    threshold=threshold, p_value=p, ci_low=lo, ci_high=hi))
    if len(baseline) < cfg.min_tasks or len(candidate) < cfg.min_tasks:
        verdict, reason = Verdict.INCONCLUSIVE, (
            f"too little traffic: {len(candidate)} candidate and {len(baseline)} baseline tasks, "
            f"{cfg.min_tasks} needed on each side")
    elif any(r.outcome == "fail" for r in results):
        verdict = Verdict.FAIL
        reason = "worse than allowed: " + ", ".join(r.metric for r in results if r.outcome == "fail")
    elif all(r.outcome == "nodata" for r in results):
        verdict, reason = Verdict.INCONCLUSIVE, "no metric had data on both sides"
    else:
        verdict, reason = Verdict.PASS, "every metric within the allowed degradation"
    return CanaryVerdict(
        verdict_id=stable_id("canary_verdict", tenant, cfg.agent, cfg.baseline, cfg.candidate, round(at, 6)),
        tenant=tenant, agent_id=cfg.agent, baseline_version=cfg.baseline, candidate_version=cfg.candidate,
        verdict=verdict, test=cfg.test, confidence=cfg.confidence, judged_at=_dt(at),
        baseline_tasks=len(baseline), candidate_tasks=len(candidate), min_tasks=cfg.min_tasks,
        metrics=results, reason=reason, policy_version=policy_version)
