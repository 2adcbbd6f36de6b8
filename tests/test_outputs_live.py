"""The worker delivers alerts to a real Alertmanager, routed by severity."""

from __future__ import annotations

import json
import time
import urllib.request

import pytest

from tests.alertmanager_server import AlertmanagerServer, require_alertmanager
from tests.live import LiveWorker
from tests.test_pipeline_live import native_retry

pytestmark = [pytest.mark.kafka, pytest.mark.alertmanager]


def test_worker_alerts_reach_alertmanager_with_labels(kafka_bootstrap, tmp_path):
    require_alertmanager()
    with AlertmanagerServer(tmp_path / "am") as am:
        with LiveWorker(kafka_bootstrap, tmp_path, env={"AGENTWATCH_ALERTMANAGER_URL": am.url}) as w:
            w.produce(w.settings.topic_events_in, [native_retry("agent-paged")])
            deadline = time.monotonic() + 60
            found: list[dict] = []
            while time.monotonic() < deadline and not found:
                with urllib.request.urlopen(am.url + "/api/v2/alerts?active=true", timeout=5) as r:
                    found = [a for a in json.load(r) if a["labels"].get("agent_id") == "agent-paged"]
                time.sleep(0.5)
            assert found, w.log_tail()
            labels = found[0]["labels"]
            assert labels["alertname"] == "retry_loop" and labels["severity"] == "high"
            assert labels["mode"] == "alert" and labels["alert_id"]
            assert "retry_loop" in found[0]["annotations"]["runbook_url"]
