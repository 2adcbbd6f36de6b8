"""retry_loop as the peers implement it: a count per (agent, tool, arguments) within 60 s.

Stdlib only, so every peer (including the Quix Streams one in its own
virtualenv) shares the same definition of "a loop" and the same report line.
"""

from __future__ import annotations

import json
import os
import time
from collections import deque

from streams.bench.workload import LOOP_THRESHOLD, WINDOW_S

WINDOW_MS = int(WINDOW_S * 1000)


class LoopCounter:
    """The plain-loop ceiling's detector: a dict of deques of call times, no durability."""

    def __init__(self) -> None:
        self.calls: dict[tuple[str, str, str], deque[int]] = {}
        self.loops: set[tuple[str, str, str]] = set()

    def add(self, key: tuple[str, str, str], ts_ms: int) -> None:
        q = self.calls.get(key)
        if q is None:
            q = self.calls[key] = deque()
        q.append(ts_ms)
        while q[0] <= ts_ms - WINDOW_MS:
            q.popleft()
        if len(q) >= LOOP_THRESHOLD:
            self.loops.add(key)


class Reporter:
    """A peer process's progress and result, one JSON object per line on stdout."""

    def __init__(self, expected_calls: int) -> None:
        self.expected = expected_calls
        self.calls = 0
        self.loops: set[str] = set()
        self.first: float | None = None
        self.last_print = 0.0

    def seen(self, calls: int) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        self.calls += calls
        if now - self.last_print > 1.0:
            self.last_print = now
            _say({"tool_calls": self.calls})

    @property
    def done(self) -> bool:
        return self.calls >= self.expected

    def finish(self) -> None:
        seconds = time.perf_counter() - (self.first or time.perf_counter())
        _say({"done": True, "tool_calls": self.calls, "loops": len(self.loops), "seconds": seconds})


def _say(msg: dict[str, object]) -> None:
    # straight to the file descriptor: faust's worker redirects sys.stdout into its logging
    os.write(1, json.dumps(msg).encode() + b"\n")
