"""Structured logging: one JSON object per line, quiet (warnings) by default."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone

import orjson

from schemas.redact import mask_secrets

# attributes every LogRecord has; anything else was passed with extra={...}
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in vars(record).items():
            if k not in _STANDARD and not k.startswith("_"):
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return mask_secrets(orjson.dumps(out, default=str).decode())


class MaskingFormatter(logging.Formatter):
    """The text format, with passwords and tokens masked like the JSON one."""

    def format(self, record: logging.LogRecord) -> str:
        return mask_secrets(super().format(record))


class RepeatLimit(logging.Filter):
    """At most ``burst`` records of one message template per logger and level every
    ``window_s``; the first one after a quiet spell says how many were held back.

    A broker outage makes aiokafka log each failed connect and fetch (tens of
    thousands of lines in a minute), which buries the one line an operator needs.
    Only the libraries' loggers are limited: agentwatch's own lines are all kept.
    """

    def __init__(self, prefixes: tuple[str, ...], *, burst: int = 3, window_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.prefixes = prefixes
        self.burst, self.window_s, self.clock = burst, window_s, clock
        # (logger, level, template) -> [window start, records in window, held back]
        self._seen: dict[tuple[str, int, str], list[float]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self.prefixes):
            return True
        key = (record.name, record.levelno, str(record.msg))
        now = self.clock()
        entry = self._seen.get(key)
        if entry is None or now - entry[0] >= self.window_s:
            held = int(entry[2]) if entry is not None else 0
            if held:
                record.repeated_times_held_back = held
            if len(self._seen) > 10_000:  # templates are few; bound it anyway
                self._seen.clear()
            self._seen[key] = [now, 1, 0]
            return True
        entry[1] += 1
        if entry[1] <= self.burst:
            return True
        entry[2] += 1
        return False


_LIBRARIES = ("faust", "aiokafka", "mode", "kafka")


def setup_logging(level: str = "warning", fmt: str = "json") -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RepeatLimit(_LIBRARIES))
    handler.setFormatter(JsonFormatter() if fmt == "json" else MaskingFormatter(
        "%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # faust and aiokafka are chatty at info; their warnings still show
    for noisy in _LIBRARIES:
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    return handler
