"""retry_loop: an agent stuck repeating a tool call.

Two shapes of the same failure: the same agent calls the same tool with the
same normalised arguments ``same_call_threshold`` times within ``window_s``
(only when arguments were recorded);
or one tool fails ``consecutive_failures`` times in a row whatever its
arguments, within ``failure_window_s`` (default ``window_s``) of event time.
Arguments are fingerprinted by the decoders after normalisation (key order,
whitespace), so cosmetic differences do not hide a loop.

"In a row" is in event time: a success of the tool ends the run of the
failures before it, and a failure older than the tool's latest success (a
late arrival) joins no run. The time bound is what tells a loop from an
outage: a tool failing once every few minutes across half an hour of separate
conversations, with other calls succeeding in between, never makes a run.
Runs and the last-success marks expire through the windows' deadlines.
"""

from __future__ import annotations

from typing import Any

from detectors import state as st
from detectors.base import NO_FINDINGS, Detector, Finding, Handler
from detectors.policy import RetryLoopConfig
from detectors.windows import DeadlineQueue, SlidingWindow
from schemas.events import Event, EventKind

ToolKey = tuple[str, str, str]  # (tenant, agent, tool)


class RetryLoop(Detector):
    name = "retry_loop"
    version = "1.2.0"

    def __init__(self, config: RetryLoopConfig) -> None:
        self.config = config
        self._calls: SlidingWindow[tuple[str, str, str, str], Event] = SlidingWindow(config.window_s)
        self._failures: SlidingWindow[ToolKey, Event] = SlidingWindow(config.failure_window)
        # newest success per tool, so a late failure from before it joins no run; forgotten
        # failure_window after it (a key is queued when it appears and, surfacing before its
        # newest success's deadline, queued again at it)
        self._last_ok: dict[ToolKey, float] = {}
        self._ok_expiry: DeadlineQueue[ToolKey] = DeadlineQueue()
        self._failure_window = config.failure_window  # a property of the config: read once
        self._failing = self._failures.keys()  # tools with failures in a row (most have none)

    def observe(self, event: Event) -> list[Finding]:
        if event.kind is not EventKind.TOOL_CALL:
            return []
        return self._tool_call(event, event.__dict__, event.ts_seconds)

    def handlers(self) -> dict[EventKind, Handler]:
        return {EventKind.TOOL_CALL: self._tool_call}

    def _tool_call(self, event: Event, fields: dict[str, Any], ts: float) -> list[Finding]:
        tool = fields["tool_name"]
        if not tool:
            return NO_FINDINGS
        findings = NO_FINDINGS
        cfg = self.config
        tenant, agent, fingerprint = fields["tenant"], fields["agent_id"], fields["args_fingerprint"]

        # arguments are opt-in in the GenAI conventions: with none recorded, "the same
        # arguments" cannot be told apart from different ones, so only failures count
        if fingerprint:
            call_key = (tenant, agent, tool, fingerprint)
            n = self._calls.add_count(call_key, ts, event)
            if n >= cfg.same_call_threshold:
                same = self._calls.items(call_key)
                # the first finding of an episode carries the whole window as evidence;
                # later ones only the new call (the engine accumulates them)
                evidence = same if n == cfg.same_call_threshold else [event]
                findings = [
                    Finding(
                        detector=self.name,
                        agent_id=agent,
                        tenant=tenant,
                        subject=f"same_call:{tool}:{fingerprint}",
                        episode_start=same[0].ts_seconds,
                        ts=ts,
                        severity=cfg.severity,
                        summary=(
                            f"agent {agent} called {tool} {n} times with the same arguments "
                            f"within {cfg.window_s:g}s"
                        ),
                        evidence=evidence,
                        quiet_after_s=cfg.window_s,
                        labels={"tool": tool, "pattern": "same_call"},
                    )
                ]

        outcome = fields["outcome"]
        if outcome == "ok":
            key = (tenant, agent, tool)
            last = self._last_ok.get(key)
            if last is None:
                self._last_ok[key] = ts
                self._ok_expiry.push(key, ts + self._failure_window)
            elif ts > last:
                self._last_ok[key] = ts
            if key in self._failing:
                self._failures.drop_through(key, ts)
        elif outcome == "error":
            key = (tenant, agent, tool)
            if ts <= self._last_ok.get(key, -1e300):
                return findings  # the tool succeeded after this failure: no run
            n = self._failures.add_count(key, ts, event)
            if n >= cfg.consecutive_failures:
                run = self._failures.items(key)
                evidence = run if n == cfg.consecutive_failures else [event]
                finding = Finding(
                    detector=self.name,
                    agent_id=agent,
                    tenant=tenant,
                    subject=f"failures:{tool}",
                    episode_start=run[0].ts_seconds,
                    ts=ts,
                    severity=cfg.severity,
                    summary=(f"agent {agent}: {tool} failed {n} times in a row "
                             f"within {cfg.failure_window:g}s"),
                    evidence=evidence,
                    quiet_after_s=cfg.failure_window,
                    labels={"tool": tool, "pattern": "consecutive_failures"},
                )
                findings = [*findings, finding]
        return findings

    def on_watermark(self, watermark: float) -> list[Finding]:
        self._calls.expire(watermark)
        self._failures.expire(watermark)
        window = self._failure_window
        for key in self._ok_expiry.pop_due(watermark):
            last = self._last_ok.get(key)
            if last is None:
                continue  # expired through an earlier entry
            if last + window <= watermark:
                del self._last_ok[key]
            else:
                self._ok_expiry.push(key, last + window)
        return []

    def to_state(self, enc: st.Encoder) -> dict[str, Any]:
        return {"calls": self._calls.to_state(enc.event), "failures": self._failures.to_state(enc.event),
                "last_ok": [[k, t] for k, t in self._last_ok.items()]}

    def load_state(self, data: dict[str, Any], dec: st.Decoder) -> None:
        self._calls.load_state(data.get("calls", []), dec.event)
        self._failures.load_state(data.get("failures", []), dec.event)
        for k, t in st.seq(data.get("last_ok", [])):
            key, ts = st.key(k), st.num(t)
            self._last_ok[key] = ts
            self._ok_expiry.push(key, ts + self._failure_window)
