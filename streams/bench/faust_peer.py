"""The faust-streaming peer: retry_loop alone, written the way faust's documentation shows.

An agent iterates the topic's events; a tumbling windowed Table (in memory,
backed by its changelog topic) counts calls per (agent, tool, arguments); a
key reaching the threshold within its window is a loop. Run by the bench as
``python -m streams.bench.faust_peer`` with its settings in BENCH_* variables.
"""

from __future__ import annotations

import os
import sys

import faust

from streams.bench.retry import Reporter
from streams.bench.workload import LOOP_THRESHOLD, WINDOW_S, tool_calls

app = faust.App(
    os.environ.get("BENCH_APP_ID", "bench-faust"),
    broker=f"kafka://{os.environ.get('BENCH_BOOTSTRAP', 'localhost:9092')}",
    store="memory://",
    datadir=os.environ.get("BENCH_DATADIR", "/tmp/agentwatch-bench-faust"),
    topic_partitions=1,
    consumer_auto_offset_reset="earliest",
    web_enabled=False,
)
spans_topic = app.topic(os.environ.get("BENCH_TOPIC", "bench"), value_type=bytes, value_serializer="raw")
calls = app.Table("calls", default=int, partitions=1).tumbling(WINDOW_S, expires=2 * WINDOW_S).relative_to_stream()
report = Reporter(int(os.environ.get("BENCH_TOOL_CALLS", "0")))


@app.agent(spans_topic)
async def retry_loop(stream: faust.StreamT[bytes]) -> None:
    async for payload in stream:
        n = 0
        for agent, tool, args, _ts in tool_calls(payload):
            key = f"{agent}|{tool}|{args}"
            calls[key] += 1
            if calls[key].current() >= LOOP_THRESHOLD:
                report.loops.add(key)
            n += 1
        report.seen(n)
        if report.done:
            report.finish()
            os._exit(0)  # the measurement is over; faust's orderly shutdown takes seconds


if __name__ == "__main__":
    sys.argv = [sys.argv[0], "worker", "--loglevel", "warn"]
    app.main()
