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
from detectors.base import Detector, Finding
from detectors.policy import RetryLoopConfig
from detectors.windows import ExpiryQueue, SlidingWindow
from schemas.events import Event, EventKind

ToolKey = tuple[str, str, str]  # (tenant, agent, tool)


class RetryLoop(Detector):
    name = "retry_loop"
    version = "1.2.0"

    def __init__(self, config: RetryLoopConfig) -> None:
        self.config = config
        self._calls: SlidingWindow[tuple[str, str, str, str], Event] = SlidingWindow(config.window_s)
        self._failures: SlidingWindow[ToolKey, Event] = SlidingWindow(config.failure_window)
        # newest success per tool, so a late failure from before it joins no run
        self._last_ok: dict[ToolKey, float] = {}
        self._ok_expiry: ExpiryQueue[ToolKey] = ExpiryQueue()

    def observe(self, event: Event) -> list[Finding]:
        if event.kind is not EventKind.TOOL_CALL or not event.tool_name:
            return []
        findings: list[Finding] = []
        cfg = self.config
        tool = event.tool_name
        ts = event.ts_seconds

        # arguments are opt-in in the GenAI conventions: with none recorded, "the same
        # arguments" cannot be told apart from different ones, so only failures count
        same = self._calls.add((event.tenant, event.agent_id, tool, event.args_fingerprint), ts, event) \
            if event.args_fingerprint else []
        if len(same) >= cfg.same_call_threshold:
            # the first finding of an episode carries the whole window as evidence;
            # later ones only the new call (the engine accumulates them)
            evidence = same if len(same) == cfg.same_call_threshold else [event]
            findings.append(
                Finding(
                    detector=self.name,
                    agent_id=event.agent_id,
                    tenant=event.tenant,
                    subject=f"same_call:{tool}:{event.args_fingerprint}",
                    episode_start=same[0].ts_seconds,
                    ts=ts,
                    severity=cfg.severity,
                    summary=(
                        f"agent {event.agent_id} called {tool} {len(same)} times with the same arguments "
                        f"within {cfg.window_s:g}s"
                    ),
                    evidence=evidence,
                    quiet_after_s=cfg.window_s,
                    labels={"tool": tool, "pattern": "same_call"},
                )
            )

        key = (event.tenant, event.agent_id, tool)
        if event.outcome == "error":
            if ts <= self._last_ok.get(key, -1e300):
                return findings  # the tool succeeded after this failure: no run
            run = self._failures.add(key, ts, event)
            n = len(run)
            if n >= cfg.consecutive_failures:
                evidence = run if n == cfg.consecutive_failures else [event]
                findings.append(
                    Finding(
                        detector=self.name,
                        agent_id=event.agent_id,
                        tenant=event.tenant,
                        subject=f"failures:{tool}",
                        episode_start=run[0].ts_seconds,
                        ts=ts,
                        severity=cfg.severity,
                        summary=(f"agent {event.agent_id}: {tool} failed {n} times in a row "
                                 f"within {cfg.failure_window:g}s"),
                        evidence=evidence,
                        quiet_after_s=cfg.failure_window,
                        labels={"tool": tool, "pattern": "consecutive_failures"},
                    )
                )
        elif event.outcome == "ok":
            if ts > self._last_ok.get(key, -1e300):
                self._last_ok[key] = ts
                self._ok_expiry.touch(key, ts + cfg.failure_window)
            self._failures.drop_through(key, ts)
        return findings

    def on_watermark(self, watermark: float) -> list[Finding]:
        self._calls.expire(watermark)
        self._failures.expire(watermark)
        for key in self._ok_expiry.due(watermark):
            del self._last_ok[key]
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
            self._ok_expiry.touch(key, ts + self.config.failure_window)
