"""The library log limit: a flood of one message is cut to a few lines, and the next
line after the quiet spell says how many were held back; our own lines all pass."""

from __future__ import annotations

import logging

from streams.logs import RepeatLimit


def record(name: str, msg: str, *args: object) -> logging.LogRecord:
    return logging.makeLogRecord({"name": name, "levelno": logging.ERROR, "levelname": "ERROR",
                                  "msg": msg, "args": args})


def test_a_flood_of_one_library_message_is_cut_and_counted():
    now = [0.0]
    limit = RepeatLimit(("aiokafka",), burst=3, window_s=60, clock=lambda: now[0])
    passed = [limit.filter(record("aiokafka.conn", "Unable to connect to node %s", i)) for i in range(20_000)]
    assert sum(passed) == 3  # the template, not the formatted text, is what repeats
    assert limit.filter(record("aiokafka.conn", "another message"))  # other templates pass
    assert all(limit.filter(record("agentwatch.worker", "stage crashed")) for _ in range(100))
    now[0] = 61.0
    after = record("aiokafka.conn", "Unable to connect to node %s", 1)
    assert limit.filter(after)
    assert after.repeated_times_held_back == 20_000 - 3
