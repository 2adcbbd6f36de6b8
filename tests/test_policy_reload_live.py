"""A running worker picks up a changed policy file and keeps the last good one on a bad edit."""

from __future__ import annotations

import time

import pytest

from tests.live import LiveWorker
from tests.test_pipeline_live import native_retry

pytestmark = pytest.mark.kafka


def wait_metric(w: LiveWorker, name: str, value: float, timeout: float = 30) -> float:
    deadline = time.monotonic() + timeout
    got = w.metric(name)
    while got < value and time.monotonic() < deadline:
        time.sleep(0.3)
        got = w.metric(name)
    return got


def test_bad_reload_keeps_old_policy_and_good_reload_takes_effect(kafka_bootstrap, tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: v1\ndetectors:\n  retry_loop:\n    mode: alert\n")
    with LiveWorker(kafka_bootstrap, tmp_path, policy=policy) as w:
        # a typo mid-edit: rejected, and the detectors keep running on v1
        policy.write_text("version: v2\ndetectors:\n  retry_loop:\n    same_call_threshold: five\n")
        assert wait_metric(w, 'agentwatch_policy_reloads_total{result="rejected"}', 1) == 1, w.log_tail()
        w.produce(w.settings.topic_events_in, [native_retry("agent-v1")])
        alerts = w.wait_alerts(lambda a: any(x.agent_id == "agent-v1" for x in a), timeout=60)
        assert [a.policy_version for a in alerts if a.agent_id == "agent-v1"] == ["v1"]
        assert "same_call_threshold" in w.log_tail(50)

        # a good edit: retry_loop goes to shadow mode under v3
        policy.write_text("version: v3\ndetectors:\n  retry_loop:\n    mode: shadow\n")
        assert wait_metric(w, 'agentwatch_policy_reloads_total{result="ok"}', 1) == 1, w.log_tail()
        w.produce(w.settings.topic_events_in, [native_retry("agent-v3")])
        shadow = w.wait_alerts(lambda a: any(x.agent_id == "agent-v3" for x in a), timeout=60, shadow=True)
        v3 = [a for a in shadow if a.agent_id == "agent-v3"]
        assert v3 and v3[0].policy_version == "v3" and v3[0].mode.value == "shadow" and v3[0].action == "record"
        # and it never reached the on-call alerts topic
        on_call = w.wait_alerts(lambda a: False, timeout=3)
        assert not any(a.agent_id == "agent-v3" for a in on_call)
