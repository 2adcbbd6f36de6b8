"""Detector state survives a worker restart: a pattern that spans it is still caught."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import orjson
import pytest

from tests.live import LiveWorker

pytestmark = pytest.mark.kafka


def calls(agent: str, seconds: range) -> bytes:
    t0 = datetime(2026, 2, 1, 9, 0, tzinfo=timezone.utc)
    return orjson.dumps([
        {"kind": "tool_call", "agent_id": agent, "ts": (t0 + timedelta(seconds=s)).isoformat(),
         "tool_name": "restart_service", "arguments": {"service": "billing"}, "outcome": "ok"}
        for s in seconds
    ])


@pytest.mark.parametrize("rebuild_s, alerted", [("3600", True), ("0", False)])
def test_retry_loop_spanning_a_restart(kafka_bootstrap, tmp_path, rebuild_s, alerted):
    w = LiveWorker(kafka_bootstrap, tmp_path, env={"AGENTWATCH_STATE_REBUILD_S": rebuild_s})
    with w:
        w.produce(w.settings.topic_events_in, [calls("agent-restarted", range(0, 40, 10))])  # 4 calls: below 5
        w.wait_settled()
    with w:  # same consumer group, same store: a restart
        w.produce(w.settings.topic_events_in, [calls("agent-restarted", range(40, 41))])  # the 5th call
        w.wait_settled()
        alerts = w.wait_alerts(lambda a: bool(a), timeout=10 if not alerted else 30)
    got = [a for a in alerts if a.agent_id == "agent-restarted" and a.detector == "retry_loop"]
    assert bool(got) is alerted, w.log_tail(40)
    if alerted:
        assert len(got) == 1 and len(got[0].evidence) == 5  # all five calls, across the restart
        assert "detector state rebuilt" in w.log_tail(200)
