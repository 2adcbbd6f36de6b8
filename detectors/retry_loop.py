"""retry_loop: an agent stuck repeating a tool call.

Two shapes of the same failure: the same agent calls the same tool with the
same normalised arguments ``same_call_threshold`` times within ``window_s``
(only when arguments were recorded);
or one tool fails ``consecutive_failures`` times in a row whatever its
arguments. Arguments are fingerprinted by the decoders after normalisation
(key order, whitespace), so cosmetic differences do not hide a loop.
"""

from __future__ import annotations

from detectors.base import Detector, Finding
from detectors.policy import RetryLoopConfig
from detectors.windows import SlidingWindow, Streak
from schemas.events import Event, EventKind


class RetryLoop(Detector):
    name = "retry_loop"
    version = "1.1.0"

    def __init__(self, config: RetryLoopConfig) -> None:
        self.config = config
        self._calls: SlidingWindow[tuple[str, str, str, str], Event] = SlidingWindow(config.window_s)
        self._failures: Streak[tuple[str, str, str]] = Streak()

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

        streak_key = (event.tenant, event.agent_id, tool)
        if event.outcome == "error":
            n = self._failures.hit(streak_key, event)
            if n >= cfg.consecutive_failures:
                members = self._failures.members(streak_key)
                evidence = members if n == cfg.consecutive_failures else [event]
                findings.append(
                    Finding(
                        detector=self.name,
                        agent_id=event.agent_id,
                        tenant=event.tenant,
                        subject=f"failures:{tool}",
                        episode_start=members[0].ts_seconds,  # type: ignore[attr-defined]
                        ts=ts,
                        severity=cfg.severity,
                        summary=f"agent {event.agent_id}: {tool} failed {n} times in a row",
                        evidence=evidence,  # type: ignore[arg-type]
                        quiet_after_s=cfg.window_s,
                        labels={"tool": tool, "pattern": "consecutive_failures"},
                    )
                )
        elif event.outcome == "ok":
            self._failures.reset(streak_key)
        return findings

    def on_watermark(self, watermark: float) -> list[Finding]:
        self._calls.expire(watermark)
        return []
