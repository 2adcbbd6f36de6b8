"""The detection engine: runs every detector over a stream of events in event time.

It owns what all detectors share: the watermark, deduplication of redelivered
events (at-least-once input), and the lifecycle of alerts. Repeats of one
condition (same detector, agent and subject) within its quiet period update a
single alert, whose id is a fingerprint of detector, agent, subject and the
event time the episode began, so replaying the same input yields the same ids.

The same engine runs in the live worker, in ``agentwatch replay`` and in the
behaviour tests.

State snapshots (for partition-scoped state kept in Kafka)
-----------------------------------------------------------
``engine.snapshot() -> bytes`` writes everything the engine and its detectors
hold: watermark, redelivery memory, open alert episodes with their closing
timers, every detector's windows, streaks and timers, and the ``resolved``
list not yet drained. ``DetectionEngine.restore(policy, data)`` builds a fresh
engine for ``policy`` and loads it; fed the events that follow, it emits
exactly what the engine that wrote the snapshot would have (same alert ids,
counts and timers: a timer due by the restored watermark fires at the next
``tick``/``process`` with no new traffic). Take a snapshot between calls, after
draining the returned alerts; it is a pure function of the state, so the
caller may hold it until its batch is durable.

The format is JSON with a version (detectors/state.py), never pickle: a
corrupt, truncated or foreign snapshot raises ``schemas.errors.StateError``
(not retriable) and executes nothing. Thresholds and modes come from the
``policy`` given to ``restore``, not from the snapshot, so a snapshot written
under an older policy version carries its windows into the new one.
Detectors passed in by the caller (``detectors=``) are not restored: only the
built-in suite is.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from detectors import state as st
from detectors.base import Detector, Finding, Handler, Signal
from detectors.canary import CANARY, OWN_DETECTORS, CanaryAnalysis
from detectors.cross_agent import CrossAgentDetector, build_cross_agent, signals_from_bytes, signals_to_bytes
from detectors.dedup import RedeliveryMemory
from detectors.disallowed_access import DisallowedAccess
from detectors.escalation_bypass import EscalationBypass
from detectors.identity import IDENTIFIED
from detectors.join_detectors import UnattributedSideEffect, UnconfirmedAction
from detectors.peer_preservation import PeerPreservation
from detectors.policy import Policy
from detectors.retry_loop import RetryLoop
from detectors.token_spike import TokenSpike
from detectors.windows import FOREVER, TimerQueue, Watermark
from schemas.alerts import Alert, Evidence, Mode, alert_id_for
from schemas.canary import CanaryVerdict, VersionWindow
from schemas.events import Event, EventKind, IdentitySource

MAX_EVIDENCE = 50
# event-time granularity of window closing and timers within a batch
TICK_EVERY_S = 1.0
# redelivery memory: event ids in buckets of event time, each dropped whole once the
# watermark is the policy's dedup_window_s (plus twice the allowed lateness) past its end
DEDUP_BUCKET_S = 60.0
_ACTION = {Mode.SHADOW: "record", Mode.ALERT: "notify", Mode.ENFORCE: "halt"}


def build_detectors(policy: Policy) -> list[Detector]:
    d = policy.detectors
    return [
        RetryLoop(d.retry_loop),
        TokenSpike(policy),
        DisallowedAccess(policy),
        EscalationBypass(policy),
        PeerPreservation(policy),
        UnattributedSideEffect(d.unattributed_side_effect),
        UnconfirmedAction(d.unconfirmed_action),
        CanaryAnalysis(policy),  # last: it counts the alerts the others opened for the same event
    ]


_AUDIT, _AGENT, _CONTROL_COMMAND = EventKind.AUDIT, EventKind.AGENT, EventKind.CONTROL_COMMAND


def _dispatch_table(detectors: list[Detector]) -> dict[EventKind, tuple[Handler, ...]]:
    """Per event kind, the handlers of the detectors that kind concerns, in the detectors'
    order (the order findings are merged in): built once per policy, so an event costs a
    call into the detectors that care about it, not into every detector."""
    table: dict[EventKind, list[Handler]] = {kind: [] for kind in EventKind}
    for det in detectors:
        handlers = det.handlers()
        for kind in EventKind:
            if handlers is None:
                table[kind].append(_observe_of(det))
            elif kind in handlers:
                table[kind].append(handlers[kind])
    return {kind: tuple(hs) for kind, hs in table.items()}


def _observe_of(det: Detector) -> Handler:
    """A detector without per-kind handlers: its ``observe`` for every event."""
    observe = det.observe

    def handler(ev: Event, fields: dict[str, Any], ts: float) -> list[Finding]:
        return observe(ev)

    return handler


def _modes(policy: Policy) -> dict[str, Mode]:
    modes = {name: cfg.mode for name, cfg in policy.detectors}
    modes[CANARY] = policy.canary.mode
    return modes


def _canary_of(detectors: list[Detector]) -> CanaryAnalysis | None:
    return next((d for d in detectors if isinstance(d, CanaryAnalysis)), None)


def _dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=timezone.utc)


def _action_entry(v: object) -> tuple[str, str, bool, str]:
    det, agent, may_enforce, key = st.seq(v)
    return st.text(det), st.text(agent), st.boolean(may_enforce), st.text(key)


@dataclass(slots=True)
class _Episode:
    alert: Alert
    last_ts: float
    quiet_after_s: float
    emitted_count: int = 0
    # ids of the events in alert.evidence (bounded by MAX_EVIDENCE)
    seen_evidence: set[str] = field(default_factory=set)
    # its entries in the engine's action index (removed when the episode closes)
    actions: list[tuple[str, str, bool, str]] = field(default_factory=list)


class DetectionEngine:
    """Per-agent detection. What needs several agents at once (coordinated incidents, tenant
    budgets) goes out as signals to a ``CrossAgentEngine``: with ``local_cross_agent`` (replay,
    tests: one process sees every agent) this engine feeds its own and returns its alerts too;
    the worker runs that engine in a tenant-keyed stage and sends it ``take_signals()``."""

    def __init__(self, policy: Policy, detectors: list[Detector] | None = None, *,
                 local_cross_agent: bool = True) -> None:
        self.policy = policy
        self.detectors = detectors if detectors is not None else self._build(policy)
        # signals for the tenant-keyed stage, appended by the detectors (detectors/cross_agent.py)
        self._signals: list[Signal] = []
        self._bind(self.detectors)
        self.cross_agent: CrossAgentEngine | None = CrossAgentEngine(policy) if local_cross_agent else None
        self.watermark = Watermark(policy.allowed_lateness_s)
        self._source_extra = policy.join.extra_lateness(policy.allowed_lateness_s)
        # stamped on every alert; a hash of the whole policy's dump, so computed once per policy
        self._policy_hash = policy.content_hash
        self._modes = _modes(policy)
        self._versions = {det.name: det.version for det in self.detectors}
        self._canary = _canary_of(self.detectors)
        self._episodes: dict[tuple[str, str, str, str], _Episode] = {}
        self._closing = TimerQueue()
        # (detector, agent, may_enforce, action key) -> the open episode holding that action
        self._actions: dict[tuple[str, str, bool, str], tuple[str, str, str, str]] = {}
        # alert ids whose condition has cleared (quiet period over), for outputs that resolve
        # alerts (Alertmanager); the caller drains the list
        self.resolved: list[str] = []
        # event ids seen recently, by event-time bucket, so a redelivered batch is not counted
        # twice (detectors/dedup.py: 64-bit keys, past buckets frozen into sorted arrays)
        self._dedup = RedeliveryMemory(DEDUP_BUCKET_S)
        self.events_processed = 0
        self.duplicates_skipped = 0
        self._ticked_at = -FOREVER

    def reload(self, policy: Policy) -> None:
        """Put a new policy in force for the events that follow.

        The watermark, redelivery memory and open alert episodes carry over, so
        an alert in progress keeps its id. Detectors are rebuilt from the new
        policy, which restarts their windows: a pattern that straddles the
        reload is seen only from the reload on.
        """
        self.policy = policy
        self.detectors = self._build(policy)
        self._bind(self.detectors)
        if self.cross_agent is not None:
            self.cross_agent.reload(policy)
        self.watermark.allowed_lateness_s = policy.allowed_lateness_s
        self._source_extra = policy.join.extra_lateness(policy.allowed_lateness_s)
        self._policy_hash = policy.content_hash
        self._modes = _modes(policy)
        self._versions = {det.name: det.version for det in self.detectors}
        self._canary = _canary_of(self.detectors)

    def _build(self, policy: Policy) -> list[Detector]:
        return build_detectors(policy)

    def _bind(self, detectors: list[Detector]) -> None:
        for det in detectors:
            det.signals = self._signals
        self._dispatch = _dispatch_table(detectors)

    def take_signals(self) -> list[Signal]:
        """Signals for the tenant-keyed stage since the last call (none with a local cross-agent engine)."""
        out = list(self._signals)
        self._signals.clear()  # in place: the detectors hold this list
        return out

    def _cross_agent(self, alerts: list[Alert], *, wall: float | None = None, tick: bool = False,
                     until: float | None = None) -> None:
        """With a local cross-agent engine: feed it this engine's signals, then move its
        clock as this one's moved (idle time by ``wall`` on a tick; to ``until``), and
        take its alerts and resolutions."""
        c = self.cross_agent
        if c is None:
            return
        if self._signals:
            alerts.extend(c.process(self.take_signals(), wall=wall))
        if until is not None:
            alerts.extend(c.advance(until))
        elif tick and wall is not None:
            alerts.extend(c.tick(wall))
        self.resolved.extend(c.resolved)
        c.resolved.clear()

    def take_canary(self) -> tuple[list[VersionWindow], list[CanaryVerdict]]:
        """Metric windows closed and canary verdicts reached since the last call (detectors/canary.py)."""
        c = self._canary
        if c is None or not (c.windows_out or c.verdicts_out):
            return [], []
        out = c.windows_out, c.verdicts_out
        c.windows_out, c.verdicts_out = [], []
        return out

    # -- feeding -------------------------------------------------------------------------

    def process(self, events: Iterable[Event], *, wall: float | None = None) -> list[Alert]:
        """Feed a batch; return alerts that are new or changed enough to re-send.

        ``wall`` is the processing time of the batch (live worker only); it lets
        ``tick`` advance event time while no events arrive.
        """
        out: list[Alert] = []
        merge = self._merge
        dispatch = self._dispatch
        first_time = self._dedup.first_time
        # the watermark, read once: within a batch only this loop moves it (its floor and
        # lateness move from outside, between calls), so its value changes only when an
        # event raises the newest event time, and is kept here as Watermark.value computes it
        wm = self.watermark
        lateness, floor = wm.allowed_lateness_s, wm.floor
        newest = wm.max_event_ts
        value = wm.value
        tick_at = self._ticked_at + TICK_EVERY_S
        source_extra = self._source_extra
        processed = 0
        try:
            for ev in events:
                # its fields read from its __dict__: an Event's attribute reads go through
                # pydantic's __getattr__ hook, several times the cost of a dict lookup
                fields = ev.__dict__
                ts = ev.ts_seconds
                if not first_time(fields["event_id"], ts):  # redelivered input is skipped
                    self.duplicates_skipped += 1
                    continue
                kind = fields["kind"]
                # a source late by design (CloudTrail) is on time within its own lateness, as in the
                # join; no window waits for it (the watermark moves with the other sources)
                if kind is not _CONTROL_COMMAND:
                    # a kill-switch command is stamped by the monitor's clock when it is issued,
                    # not by the agents' event time: observed, one issued while recorded or
                    # backlogged traffic is read would move event time to today at once, closing
                    # every window and episode and dropping the redelivery memory
                    # (Watermark.observe, inline)
                    if ts < value - (source_extra.get(fields["source"], 0.0) if source_extra else 0.0):
                        wm.late_events += 1
                    if ts >= newest:
                        wm.max_event_ts = newest = ts
                        wm.wall_at_max = wall
                        value = ts - lateness
                        if floor > value:
                            value = floor
                processed += 1
                if value >= tick_at:
                    # windows close as event time passes inside a batch too, so a detector
                    # sees the same sequence whether its input came in one batch or many
                    out.extend(self._tick())
                    tick_at = self._ticked_at + TICK_EVERY_S
                if kind is _AUDIT:
                    if fields["agent_id"] in ("", "unknown"):
                        # an audit record nobody attributed upstream: its principal may be an agent
                        agent = self.policy.agent_for_principal(fields["principal"])
                        if agent:
                            ev.agent_id, ev.identity = agent, IdentitySource.IDENTITY_MAP
                elif kind is _AGENT and fields["lifecycle"] == IDENTIFIED:
                    self._identified(ev, out)  # detectors/identity.py: not an agent's action
                    continue
                # only the detectors this kind of event concerns, in the suite's order
                for handler in dispatch[kind]:
                    found = handler(ev, fields, ts)
                    if found:
                        for f in found:
                            merge(f, out)
        finally:
            self.events_processed += processed
        out.extend(self._tick())
        self._cross_agent(out, wall=wall)
        return out

    def _first_time(self, item_id: str, ts: float) -> bool:
        """False for an id already seen (redelivered input)."""
        if self._dedup.first_time(item_id, ts):
            return True
        self.duplicates_skipped += 1
        return False

    def _identified(self, ev: Event, out: list[Alert]) -> None:
        """Spans of ``ev.trace_id`` fell back to ``ev.agent_id`` before their agent span named
        ``ev.target_agent_id``: link the fallback's open alerts of that trace to the real agent."""
        for ep in self._episodes.values():
            a = ep.alert
            if (a.agent_id == ev.agent_id and a.tenant == ev.tenant and ev.trace_id in a.trace_ids
                    and a.labels.get("identified_agent_id") != ev.target_agent_id):
                a.labels["identified_agent_id"] = ev.target_agent_id
                a.summary += (f" [agent identified later as {ev.target_agent_id}: its spans fell back to"
                              f" {ev.agent_id} before its agent span arrived]")
                out.append(a.model_copy(deep=True))

    def advance(self, now: float) -> list[Alert]:
        """Move event time forward from outside (wall clock in the worker)."""
        self.watermark.advance_to(now)
        out = self._tick()
        self._cross_agent(out, until=now)
        return out

    def tick(self, wall_now: float) -> list[Alert]:
        """Periodic call from the live worker: idle event time follows the wall clock."""
        self.watermark.idle_advance(wall_now)
        out = self._tick()
        self._cross_agent(out, wall=wall_now, tick=True)
        return out

    def finish(self) -> list[Alert]:
        """End of input: close every window and fire every timer."""
        return self.advance(FOREVER)

    @property
    def open_alerts(self) -> list[Alert]:
        own = [ep.alert for ep in self._episodes.values()]
        return own + self.cross_agent.open_alerts if self.cross_agent is not None else own

    # -- state snapshots (see the module docstring) -----------------------------------------

    def snapshot(self) -> bytes:
        """Everything this engine holds, as bytes for ``restore``."""
        enc = st.Encoder()
        state = {
            "policy_version": self.policy.version,
            "watermark": self.watermark.to_state(),
            "ticked_at": st.enc_num(self._ticked_at),
            "events_processed": self.events_processed,
            "duplicates_skipped": self.duplicates_skipped,
            "dedup": self._dedup.to_state(),
            "episodes": [[list(k), ep.alert.model_dump(mode="json"), ep.last_ts, ep.quiet_after_s,
                          ep.emitted_count, [list(i) for i in ep.actions]] for k, ep in self._episodes.items()],
            "closing": self._closing.to_state(),
            "resolved": self.resolved,
            "detectors": {det.name: det.to_state(enc) for det in self.detectors},
            "signals": [],
        }
        if self._signals:  # not taken yet: the tenant-keyed stage still needs them
            state["signals"] = signals_to_bytes(self._signals).decode()
        if self.cross_agent is not None:
            state["cross_agent"] = self.cross_agent.snapshot().decode()
        return enc.dumps("engine", state)

    @classmethod
    def restore(cls, policy: Policy, data: bytes, *, local_cross_agent: bool = True) -> "DetectionEngine":
        """A fresh engine for ``policy`` holding the state ``snapshot`` wrote.

        Raises StateError when ``data`` is not a readable engine snapshot."""
        eng = cls(policy, local_cross_agent=local_cross_agent)
        with st.reading("engine", data) as (state, dec):
            eng.watermark.load_state(st.mapping(state["watermark"]))
            eng._ticked_at = st.num(state["ticked_at"])
            eng.events_processed = st.integer(state["events_processed"])
            eng.duplicates_skipped = st.integer(state["duplicates_skipped"])
            if "dedup" in state:
                eng._dedup.load_state(state["dedup"])
            else:  # snapshots before detectors/dedup.py: the ids themselves
                eng._dedup.load_ids(state["seen"])
            for k, alert, last_ts, quiet, emitted, actions in st.seq(state["episodes"]):
                key = st.key(k)
                a = Alert.model_validate(st.mapping(alert))
                ep = eng._episodes[key] = _Episode(
                    alert=a, last_ts=st.num(last_ts), quiet_after_s=st.num(quiet), emitted_count=st.integer(emitted),
                    seen_evidence={e.event_id for e in a.evidence}, actions=[_action_entry(i) for i in st.seq(actions)])
                for idx in ep.actions:
                    eng._actions[idx] = key
            eng._closing.load_state(state["closing"])
            eng.resolved = st.texts(state["resolved"])
            saved = st.mapping(state["detectors"])
            for det in eng.detectors:
                det.load_state(st.mapping(saved.get(det.name, {})), dec)
            if state.get("signals"):
                eng._signals.extend(signals_from_bytes(st.text(state["signals"]).encode()))
            cross = state.get("cross_agent")
            if cross is not None and eng.cross_agent is not None:
                eng.cross_agent = CrossAgentEngine.restore(policy, st.text(cross).encode())
        return eng

    # -- internals -----------------------------------------------------------------------

    def _tick(self) -> list[Alert]:
        wm = self.watermark.value
        self._ticked_at = wm
        out: list[Alert] = []
        for det in self.detectors:
            for f in det.on_watermark(wm):
                self._merge(f, out)
        for timer in self._closing.due(wm):
            key = timer.key
            ep = self._episodes.pop(key)  # type: ignore[arg-type]
            self._close(key, ep, out)  # type: ignore[arg-type]
            self.resolved.append(ep.alert.alert_id)
        lateness = self.policy.allowed_lateness_s
        self._dedup.advance(wm, closed_after_s=lateness, forget_before=wm - 2 * lateness - self.policy.dedup_window_s)
        return out

    def _merge(self, f: Finding, out: list[Alert]) -> None:
        if self._canary is not None and not f.revision and f.detector not in OWN_DETECTORS:
            self._canary.on_finding(f)  # a violation by its agent's version
        if f.action_keys:
            same = self._same_action(f)
            if same is not None:
                self._merge_action(same, f, out)
                return
        key = (f.detector, f.tenant, f.agent_id, f.subject)
        ep = self._episodes.get(key)
        if ep is not None and f.ts <= ep.last_ts + ep.quiet_after_s:
            a = ep.alert
            ep.last_ts = max(ep.last_ts, f.ts)
            a.last_seen = _dt(ep.last_ts)
            escalated = f.severity.rank > a.severity.rank
            if escalated:
                a.severity = f.severity
            a.summary = f.summary
            self._add_evidence(ep, f.evidence)
            if f.revision:
                # the final figures of an observation already counted: not a repeat
                a.labels.update(f.labels)
                out.append(a.model_copy(deep=True))
            else:
                a.count += 1
                # re-send on doubling (on-call sees the storm grow without a message per
                # repeat) and at once when the condition got more severe
                if escalated or a.count >= 2 * ep.emitted_count:
                    ep.emitted_count = a.count
                    out.append(a.model_copy(deep=True))
        else:
            if ep is not None:  # the earlier episode is over: emit its final state first
                self._close(key, ep, out)
            ep = self._open(f)
            self._episodes[key] = ep
            out.append(ep.alert.model_copy(deep=True))
        self._remember_action(key, ep, f)
        self._closing.arm(key, ep.last_ts + ep.quiet_after_s)

    # -- one action, several sources --------------------------------------------------------
    # A tool span, its client span and the audit record the join matched to them are one
    # action: findings about it carry the ids the join assigned (Finding.action_keys), and
    # the first episode to hold one of them takes the others as evidence, not as repeats.
    # Findings that may not enforce (reads) never merge into ones that may, nor back.

    @staticmethod
    def _action_index(f: Finding, action_key: str) -> tuple[str, str, bool, str]:
        # not the tenant: the ids are global, and sources name tenants differently (a
        # CloudTrail record carries its AWS account, the span its resource's tenant)
        return f.detector, f.agent_id, f.may_enforce, action_key

    def _same_action(self, f: Finding) -> tuple[str, str, str, str] | None:
        for k in f.action_keys:
            key = self._actions.get(self._action_index(f, k))
            if key is not None and key in self._episodes:
                return key
        return None

    def _merge_action(self, key: tuple[str, str, str, str], f: Finding, out: list[Alert]) -> None:
        ep = self._episodes[key]
        a = ep.alert
        before = len(a.evidence), a.severity
        if f.severity.rank > a.severity.rank:
            a.severity = f.severity
        if f.ts > ep.last_ts:
            ep.last_ts = f.ts
            a.last_seen = _dt(f.ts)
        self._add_evidence(ep, f.evidence)
        self._remember_action(key, ep, f)
        self._closing.arm(key, ep.last_ts + ep.quiet_after_s)
        if (len(a.evidence), a.severity) != before:
            out.append(a.model_copy(deep=True))

    def _remember_action(self, key: tuple[str, str, str, str], ep: _Episode, f: Finding) -> None:
        for k in f.action_keys:
            idx = self._action_index(f, k)
            if idx not in self._actions:
                self._actions[idx] = key
                ep.actions.append(idx)

    def _close(self, key: tuple[str, str, str, str], ep: _Episode, out: list[Alert]) -> None:
        """The episode is over: emit its final state if not sent yet, forget its actions."""
        self._closing.cancel(key)
        if ep.alert.count != ep.emitted_count:
            out.append(ep.alert.model_copy(deep=True))
        for idx in ep.actions:
            if self._actions.get(idx) == key:
                del self._actions[idx]

    def _open(self, f: Finding) -> _Episode:
        mode = self._modes.get(f.detector, Mode.ALERT)
        if mode is Mode.ENFORCE and not f.may_enforce:
            mode = Mode.ALERT  # e.g. reading oversight configuration: worth a look, never a halt
        alert = Alert(
            alert_id=alert_id_for(f.detector, f.agent_id, (f.subject, round(f.episode_start, 6)), tenant=f.tenant),
            detector=f.detector,
            detector_version=self._versions.get(f.detector, "0"),
            policy_version=self.policy.version,
            policy_hash=self._policy_hash,
            mode=mode,
            severity=f.severity,
            agent_id=f.agent_id,
            tenant=f.tenant,
            agent_version=next((e.agent_version for e in f.evidence if e.agent_version), ""),
            first_seen=_dt(f.episode_start),
            last_seen=_dt(f.ts),
            count=1,
            summary=f.summary,
            action=_ACTION[mode],
            labels=dict(f.labels),
        )
        ep = _Episode(alert=alert, last_ts=f.ts, quiet_after_s=f.quiet_after_s, emitted_count=1)
        self._add_evidence(ep, f.evidence)
        return ep

    @staticmethod
    def _add_evidence(ep: _Episode, events: list[Event]) -> None:
        a = ep.alert
        for ev in events:
            if ev.event_id in ep.seen_evidence:
                continue
            if ev.trace_id and len(a.trace_ids) < MAX_EVIDENCE and ev.trace_id not in a.trace_ids:
                a.trace_ids.append(ev.trace_id)
            if len(a.evidence) < MAX_EVIDENCE:
                ep.seen_evidence.add(ev.event_id)
                a.evidence.append(
                    Evidence(
                        event_id=ev.event_id,
                        ts=ev.ts,
                        trace_id=ev.trace_id,
                        topic=ev.topic,
                        partition=ev.partition,
                        offset=ev.offset,
                    )
                )


class CrossAgentEngine(DetectionEngine):
    """The tenant-keyed stage's engine: signals from the per-agent engines in, the alerts no
    single agent's events show out (detectors/cross_agent.py). Alert lifecycle, redelivery
    memory (by signal id) and snapshots are the per-agent engine's."""

    def __init__(self, policy: Policy, detectors: list[Detector] | None = None, *,
                 local_cross_agent: bool = False) -> None:
        super().__init__(policy, detectors, local_cross_agent=False)
        self._cross = [d for d in self.detectors if isinstance(d, CrossAgentDetector)]

    def _build(self, policy: Policy) -> list[Detector]:
        return list(build_cross_agent(policy))

    def reload(self, policy: Policy) -> None:
        super().reload(policy)
        self._cross = [d for d in self.detectors if isinstance(d, CrossAgentDetector)]

    def process(self, signals: Iterable[Signal], *, wall: float | None = None) -> list[Alert]:  # type: ignore[override]
        out: list[Alert] = []
        for s in signals:
            if not self._first_time(s.signal_id, s.ts):
                continue
            self.watermark.observe(s.ts, wall)
            self.events_processed += 1
            if self.watermark.value >= self._ticked_at + TICK_EVERY_S:
                out.extend(self._tick())
            for det in self._cross:
                for f in det.observe_signal(s):
                    self._merge(f, out)
        out.extend(self._tick())
        return out
