"""Explicit checkpoints on the real broker and chDB, worker as a real process.

A poison record (a timestamp past year 9999, arguments nested deeper than the
JSON encoder allows) goes to the DLQ with the reason while the valid record
next to it in the same batch is stored; rows ClickHouse rejects (a negative
count into a UInt64, one message spanning 150 months of partitions) do not
stall the stream; a store that keeps failing turns /healthz to 503 without
losing anything, and SIGTERM still stops the worker within its bound.
"""

from __future__ import annotations

import json
import signal
import time
import urllib.error
import urllib.request
from datetime import datetime, timedelta, timezone

import orjson
import pytest

from streams.worker import running_worker
from tests.live import LiveWorker

pytestmark = pytest.mark.kafka

T0 = datetime(2026, 1, 15, 11, 0, tzinfo=timezone.utc)


def native(agent: str, i: int, **extra: object) -> dict:
    return {"kind": "tool_call", "agent_id": agent, "ts": (T0 + timedelta(seconds=i)).isoformat(),
            "tool_name": "lookup", "arguments": {"n": i}, "outcome": "ok", **extra}


def nested(depth: int) -> object:
    value: object = "x"
    for _ in range(depth):
        value = {"a": value}
    return value


def health(w: LiveWorker) -> tuple[int, dict]:
    info = running_worker(w.settings)
    assert info is not None, w.log_tail()
    try:
        with urllib.request.urlopen(info.url + "/healthz", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_poison_records_and_rejected_rows_go_to_the_dlq_and_neighbours_are_stored(kafka_bootstrap, tmp_path):
    with LiveWorker(kafka_bootstrap, tmp_path) as w:
        s = w.settings
        far_future = orjson.dumps({**native("poison", 0), "ts": 1e21})
        deep = json.dumps(native("poison", 1, arguments=nested(300))).encode()
        good = orjson.dumps(native("neighbour", 2))
        negative = orjson.dumps({"kind": "llm_call", "agent_id": "tokens", "ts": T0.isoformat(),
                                 "input_tokens": -5, "model": "m"})
        months = orjson.dumps([{**native("months", i), "ts": (T0 - timedelta(days=31 * i)).isoformat()}
                               for i in range(150)])
        after = orjson.dumps(native("after", 3))
        # one produce call: the records arrive together and are taken as one batch
        w.produce(s.topic_events_in, [far_future, deep, good, negative, months, after])

        rows = w.wait_rows("SELECT agent_id, count() FROM agentwatch.events FINAL GROUP BY agent_id ORDER BY agent_id",
                           # the 150-month message is written in bisected blocks, one insert each:
                           # wait for all of them, not for the first block to show
                           lambda r: {"after", "neighbour"} <= {x[0] for x in r} and dict(r).get("months") == 150,
                           timeout=120)
        counts = dict(rows)
        assert counts.get("neighbour") == 1 and counts.get("after") == 1, w.log_tail()
        assert counts.get("months") == 150, counts  # split into blocks the store accepts
        assert "tokens" not in counts  # rejected by the store ...

        dlq = w.wait_rows("SELECT reason, raw FROM agentwatch.dlq", lambda r: len(r) >= 3, timeout=60)
        reasons = [r[0] for r in dlq]
        assert any("decoder raised" in x and "year" in x for x in reasons), reasons
        assert any("decoder raised" in x and "ecursion" in x for x in reasons), reasons
        rejected = [r for r in dlq if "store rejected" in r[0]]
        assert len(rejected) == 1 and "input_tokens" in rejected[0][0] and "tokens" in str(rejected[0][1])
        assert health(w)[0] == 200


def test_failing_store_turns_healthz_unhealthy_and_sigterm_stops_within_bound(kafka_bootstrap, tmp_path):
    env = {"AGENTWATCH_FAULTS": "store@1-100000", "AGENTWATCH_STALL_S": "3", "AGENTWATCH_SHUTDOWN_TIMEOUT_S": "8"}
    with LiveWorker(kafka_bootstrap, tmp_path, env=env) as w:
        w.produce(w.settings.topic_events_in, [orjson.dumps(native("stuck", 0))])
        deadline = time.monotonic() + 90
        status, body = health(w)
        while status == 200 and time.monotonic() < deadline:
            time.sleep(0.5)
            status, body = health(w)
        assert status == 503, w.log_tail()
        assert any("in hand" in p for p in body["problems"]), body
        assert w.proc is not None
        started = time.monotonic()
        w.proc.send_signal(signal.SIGTERM)
        w.proc.wait(timeout=60)
        assert time.monotonic() - started < 8 + 10, "SIGTERM did not stop the worker within its bound"
