"""End to end on the real broker and the real ClickHouse engine (chDB).

OTLP traces (JSON and protobuf, made by the real OTel SDK) and native events go
in; retry-loop alerts come out on the alerts topic and rows land in ClickHouse;
malformed input lands in the DLQ with its reason while the pipeline goes on.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import orjson
import pytest

from schemas.otlp_json import request_to_otlp_json
from tests.live import LiveWorker
from tests.otel_traces import GENAI, OPENINFERENCE, Clock, make_sdk, retry_loop_run, run_agent, to_records

pytestmark = pytest.mark.kafka


def retry_trace(agent_id: str, conv: str, seed: int) -> list:
    """A retry loop by ``agent_id`` as the SDK exports it: children first, agent span last."""
    sdk = make_sdk(f"{agent_id}-svc", instance_id=f"{agent_id}-svc-0", seed=seed)
    spans = run_agent(sdk, conv, retry_loop_run(agent_id=agent_id, agent_name=agent_id), Clock())
    return to_records(spans, per_record=3)


def native_retry(agent_id: str) -> bytes:
    t0 = datetime(2026, 1, 15, 11, 0, tzinfo=timezone.utc)
    return orjson.dumps([
        {"kind": "tool_call", "agent_id": agent_id, "ts": (t0 + timedelta(seconds=5 * i)).isoformat(),
         "tool_name": "lookup_invoice", "arguments": {"invoice": "INV-9", "page": 1}, "outcome": "ok"}
        for i in range(6)
    ])


@pytest.fixture(scope="module")
def worker(kafka_bootstrap, tmp_path_factory):
    with LiveWorker(kafka_bootstrap, tmp_path_factory.mktemp("live")) as w:
        yield w


def test_otlp_json_proto_and_native_in_alerts_and_rows_out(worker: LiveWorker):
    s = worker.settings
    worker.produce(s.topic_otlp, [request_to_otlp_json(r) for r in retry_trace("agent-json", GENAI, 101)])
    worker.produce(s.topic_otlp, [r.SerializeToString() for r in retry_trace("agent-proto", OPENINFERENCE, 202)])
    worker.produce(s.topic_events_in, [native_retry("agent-native")])

    want = {"agent-json", "agent-proto", "agent-native"}
    alerts = worker.wait_alerts(lambda a: want <= {x.agent_id for x in a}, timeout=90)
    by_agent = {a.agent_id: a for a in alerts}
    assert want <= set(by_agent), worker.log_tail()
    for agent in want:
        a = by_agent[agent]
        assert a.detector == "retry_loop" and a.mode.value == "alert"
        # evidence points back to the Kafka records the events came from
        assert all(e.topic in (s.topic_otlp, s.topic_events_in) and e.offset >= 0 for e in a.evidence)
    # spans of the OTLP traces took the identity of their agent span, exported after them
    rows = worker.wait_rows(
        "SELECT agent_id, source, identity, count() FROM agentwatch.events FINAL "
        "WHERE kind = 'tool_call' GROUP BY agent_id, source, identity ORDER BY agent_id",
        lambda r: len(r) >= 3,
    )
    assert ("agent-json", "otlp_json", "ancestor", 6) in rows
    assert ("agent-proto", "otlp_proto", "ancestor", 6) in rows
    assert ("agent-native", "native", "native", 6) in rows
    stored = worker.wait_rows(
        "SELECT agent_id, detector FROM agentwatch.alerts_latest ORDER BY agent_id", lambda r: len(r) >= 3
    )
    assert {r[0] for r in stored} >= want


def test_malformed_input_goes_to_dlq_with_reason_and_pipeline_keeps_going(worker: LiveWorker):
    s = worker.settings
    bad_otlp = b"\x0a\xffnot protobuf at all"
    bad_native = b'{"kind": "tool_call", "agent_id": "x", "ts": '
    mixed = orjson.dumps([
        {"kind": "tool_call", "agent_id": "agent-after-bad", "ts": "2026-01-15T12:00:00Z", "tool_name": "t"},
        {"kind": "tool_call", "agent_id": "agent-after-bad"},  # no ts
    ])
    worker.produce(s.topic_otlp, [bad_otlp])
    worker.produce(s.topic_events_in, [bad_native, mixed])
    # the pipeline keeps going: a loop published after the bad records is still detected
    worker.produce(s.topic_events_in, [native_retry("agent-after-bad")])

    dead = worker.consume(s.topic_dlq, lambda recs: len(recs) >= 3, timeout=60)
    reasons = {r.value: dict(r.headers)["agentwatch.dlq.reason"].decode() for r in dead}
    assert bad_otlp in reasons and "otlp_proto" in reasons[bad_otlp]
    assert bad_native in reasons and "not JSON" in reasons[bad_native]
    missing_ts = [v for v in reasons if b"agent-after-bad" in v]
    assert missing_ts and "ts" in reasons[missing_ts[0]]
    assert all(dict(r.headers)["agentwatch.dlq.topic"] for r in dead)

    alerts = worker.wait_alerts(lambda a: any(x.agent_id == "agent-after-bad" for x in a), timeout=60)
    assert any(a.agent_id == "agent-after-bad" for a in alerts), worker.log_tail()
    rows = worker.wait_rows("SELECT topic, reason FROM agentwatch.dlq", lambda r: len(r) >= 3)
    assert {r[0] for r in rows} == {s.topic_otlp, s.topic_events_in}


def test_metrics_endpoint_reports_pipeline_counters(worker: LiveWorker):
    import urllib.request

    from streams.worker import running_worker

    info = running_worker(worker.settings)
    assert info is not None
    text = urllib.request.urlopen(info.url + "/metrics", timeout=5).read().decode()
    for name in ("agentwatch_events_in_total", "agentwatch_decode_failures_total", "agentwatch_alerts_total",
                 "agentwatch_sink_batch_rows_bucket", "agentwatch_sink_write_seconds_bucket",
                 "agentwatch_consumer_lag_messages"):
        assert name in text, name
    assert 'agentwatch_events_in_total{kind="tool_call",source="otlp_proto"}' in text


def test_second_worker_on_the_same_embedded_store_refuses_to_start(worker: LiveWorker, tmp_path):
    import subprocess
    import sys

    env = dict(worker.env)
    env["AGENTWATCH_APP_ID"] = "another"
    out = subprocess.run([sys.executable, "-m", "streams.cli", "worker"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "ClickHouse server" in out.stderr, out.stderr
