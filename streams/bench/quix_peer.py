"""The Quix Streams peer: retry_loop alone, as a StreamingDataFrame.

``app.dataframe(topic)`` -> one row per tool-call span -> ``group_by`` the call
(agent, tool, arguments), which repartitions through Kafka -> a 60 s sliding
window count (RocksDB state with its changelog topic). Runs in a virtualenv of
its own (see streams/bench/peers.py), with BENCH_* variables for its settings.
"""

from __future__ import annotations

import os
from typing import Any

from quixstreams import Application

from streams.bench.retry import Reporter
from streams.bench.workload import LOOP_THRESHOLD, WINDOW_S, tool_calls

report = Reporter(int(os.environ["BENCH_TOOL_CALLS"]))


def rows(payload: bytes) -> list[dict[str, str]]:
    return [{"agent": a, "tool": t, "args": x} for a, t, x, _ in tool_calls(payload)]


def counted(row: dict[str, str]) -> None:
    report.seen(1)


def judged(value: dict[str, Any], key: Any, _ts: int, _headers: Any) -> None:
    if value["value"] >= LOOP_THRESHOLD:
        report.loops.add(key)
    if report.done and report.first is not None:
        report.finish()
        os._exit(0)  # the measurement is over


def main() -> None:
    app = Application(
        broker_address=os.environ["BENCH_BOOTSTRAP"],
        consumer_group=os.environ["BENCH_APP_ID"],
        auto_offset_reset="earliest",
        state_dir=os.environ["BENCH_DATADIR"],
        loglevel="WARNING",
    )
    topic = app.topic(os.environ["BENCH_TOPIC"], value_deserializer="bytes")
    sdf = app.dataframe(topic)
    sdf = sdf.apply(rows, expand=True)
    sdf = sdf.group_by(lambda r: f"{r['agent']}|{r['tool']}|{r['args']}", name="call")
    sdf = sdf.update(counted)
    sdf = sdf.sliding_window(duration_ms=int(WINDOW_S * 1000)).count().current()
    sdf = sdf.update(judged, metadata=True)
    app.run()


if __name__ == "__main__":
    main()
