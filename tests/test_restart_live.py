"""Partition-scoped state survives a worker restart, from its snapshot in Kafka.

A pattern that spans a restart (four calls before it, the fifth after) is
still caught with all five calls as evidence, whether the worker stopped
cleanly (final snapshot on revoke) or was SIGKILLed (last checkpoint's
snapshot plus a replay of the input after it). A timer armed before a crash
(an escalation waiting for an approval that never comes) fires after the
restart with no new traffic. A PostgreSQL ERROR whose STATEMENT line comes in
the next message, after the restart, is still one deny on the statement's table:
the message the ERROR started in is not committed while the record is open.
"""

from __future__ import annotations

import re
import signal
import time
from datetime import datetime, timedelta, timezone

import orjson
import pytest
import yaml

from tests.live import LiveWorker

pytestmark = pytest.mark.kafka


def calls(agent: str, seconds: range) -> bytes:
    t0 = datetime(2026, 2, 1, 9, 0, tzinfo=timezone.utc)
    return orjson.dumps([
        {"kind": "tool_call", "agent_id": agent, "ts": (t0 + timedelta(seconds=s)).isoformat(),
         "tool_name": "restart_service", "arguments": {"service": "billing"}, "outcome": "ok"}
        for s in seconds
    ])


PG = "2026-02-01 09:00:05.000 UTC [4242] "
PG_ERROR = f"{PG}ERROR:  permission denied for table salaries".encode()
PG_REST = [f"{PG}STATEMENT:  SELECT amount FROM hr.salaries WHERE id = 1;".encode(),
           f"{PG}LOG:  disconnection: session time: 0:00:00.011 user=agent_sql database=postgres".encode()]


def stop(w: LiveWorker, how: str) -> None:
    assert w.proc is not None
    if how == "sigterm":
        w.stop()
    else:
        w.proc.send_signal(signal.SIGKILL)
        w.proc.wait()


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_retry_loop_spanning_a_restart(kafka_bootstrap, tmp_path, how):
    # a PostgreSQL record may wait for its next line longer than this test takes to restart
    w = LiveWorker(kafka_bootstrap, tmp_path, env={"AGENTWATCH_PG_STITCH_S": "300"})
    w.start()
    w.produce(w.settings.topic_audit_in, [PG_ERROR], key=b"pg-server-1")  # one line per message
    w.produce(w.settings.topic_events_in, [calls("agent-restarted", range(0, 40, 10))])  # 4 calls: below 5
    w.wait_settled()
    time.sleep(3)  # past state_snapshot_s: the tick's checkpoint snapshots the partition
    stop(w, how)
    with w:  # same consumer group, same store: a restart
        w.produce(w.settings.topic_audit_in, PG_REST, key=b"pg-server-1")
        w.produce(w.settings.topic_events_in, [calls("agent-restarted", range(40, 41))])  # the 5th call
        alerts = w.wait_alerts(lambda a: any(x.agent_id == "agent-restarted" for x in a), timeout=90)
        sql = "SELECT resource, outcome FROM agentwatch.events WHERE source = 'pgaudit'"
        denies = w.wait_rows(sql, lambda rows: bool(rows), timeout=60)
        log = w.log_path.read_text()
    # the ERROR read before the restart and its STATEMENT after it: one record, the table from the SQL
    assert set(denies) == {("hr.salaries", "deny")}, (denies, w.log_tail(40))
    got = [a for a in alerts if a.agent_id == "agent-restarted" and a.detector == "retry_loop"]
    assert len(got) == 1 and len(got[0].evidence) == 5, w.log_tail(40)  # all five calls, across the restart
    restored = [int(b) for b in re.findall(r'"stage":"detect","partitions":\[[\d,]+\],"bytes":(\d+)', log)]
    assert restored and max(restored) > 0, "the detect state was not restored from a snapshot"


def test_escalation_timer_fires_after_a_crash_with_no_new_traffic(kafka_bootstrap, tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump({"allowed_lateness_s": 5, "high_risk": {"tools": ["delete_database"]}}))
    w = LiveWorker(kafka_bootstrap, tmp_path, policy=policy)
    w.start()
    action = {"kind": "tool_call", "agent_id": "agent-dba", "tool_name": "delete_database",
              "ts": datetime(2026, 2, 1, 9, 0, tzinfo=timezone.utc).isoformat(),
              "arguments": {"db": "billing"}, "outcome": "ok"}
    w.produce(w.settings.topic_events_in, [orjson.dumps(action)])
    w.wait_rows("SELECT count() FROM agentwatch.events", lambda r: r[0][0] >= 1, timeout=90)
    stop(w, "sigkill")  # before the approval could have arrived: the timer has not fired yet
    early = w.wait_alerts(lambda a: False, timeout=2)
    with w:  # no new input at all
        alerts = w.wait_alerts(lambda a: any(x.detector == "escalation_bypass" for x in a), timeout=90)
    assert not [a for a in early if a.detector == "escalation_bypass"], "fired before the crash; test proves nothing"
    assert [a for a in alerts if a.detector == "escalation_bypass" and a.agent_id == "agent-dba"], w.log_tail(40)
