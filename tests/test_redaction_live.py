"""Secrets in spans, native events and audit records never leave ingest.

A real worker on the real broker gets every kind of secret schemas/redact.py
knows, in OTLP span attributes, native event attributes and resources, an audit
record's resource and a malformed record. The detections that depend on those
resources (protected resource ``*payroll*``) still fire, and no secret shows up
in any ClickHouse table, on the alerts topics, at Alertmanager, at the webhook
or in the worker's log. The Kafka DLQ keeps the original bytes (reprocessing).
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import orjson
import pytest

from schemas.alerts import Alert
from streams.query import run_query
from tests.alertmanager_server import AlertmanagerServer, require_alertmanager
from tests.http_recorder import Recorder, recording_server
from tests.live import LiveWorker

pytestmark = [pytest.mark.kafka, pytest.mark.alertmanager]

JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhZ2VudCJ9.c2lnbmF0dXJlX3NlY3JldA"
SECRETS = [
    "sk-proj-Ab3dEf6hIj9kLm2nOp5qRs", "T0kenValue99", "Hunter2pw", "c2lnbmF0dXJlX3NlY3JldA",
    "eyJzdWIiOiJhZ2VudCJ9", "AKIAIOSFODNN7EXAMPLE", "ghp_0123456789abcdefghijABCDEFGHIJ012345",
    "xoxb-123456789012-abcdefghijkl", "MIIEvQIBADANBgkqhkiG9w0BAQEFAASC", "Aud1tPassw0rd", "DlqPassw0rd",
    "YWRtaW46aHVudGVyMg==", "HookTok3n", "OtlpApiK3yValue", "C0nnStrPw", "S3cretParamV", "CliPassw0rd",
    "SqlLit3ralPw", "PgRol3Passw0rd", "DsnQueryPw0rd", "AmPassw0rd",
]
POLICY = """
version: redaction-1
protected_resources: ["*payroll*"]
identity_map:
  - {principal: "svc-reporter", agent_id: "agent-audit-sec"}
"""


def _attr(k: str, v: str) -> dict:
    return {"key": k, "value": {"stringValue": v}}


def otlp_with_secrets() -> bytes:
    """One trace as the Collector's otlp_json encoding writes it: an agent span and two tool calls."""
    t0 = int(time.time() * 1e9)

    def span(n: int, name: str, attrs: dict[str, str]) -> dict:
        return {"traceId": "5b8efff798038103d269b633813fc60c", "spanId": f"eee19b7ec3c1b17{n}", "name": name,
                "kind": 1, **({"parentSpanId": "eee19b7ec3c1b174"} if n != 4 else {}),
                "startTimeUnixNano": str(t0 + n * 1_000_000), "endTimeUnixNano": str(t0 + n * 2_000_000),
                "attributes": [_attr(k, v) for k, v in attrs.items()]}

    agent = span(4, "invoke_agent agent-otlp-sec",
                 {"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "agent-otlp-sec"})
    http_call = span(5, "execute_tool http_get", {
        "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "http_get",
        "http.url": "https://payroll.example/api/export?api_key=sk-proj-Ab3dEf6hIj9kLm2nOp5qRs&token=T0kenValue99"})
    sql_call = span(6, "execute_tool sql_query", {
        "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "sql_query",
        "db.statement": "SELECT * FROM payroll.salaries /* via postgres://admin:Hunter2pw@db.internal:5432/payroll */",
        # attributes the decoder keeps (so they reach the store unless redacted)
        "db.query.text": "ALTER ROLE payroll_ro PASSWORD 'SqlLit3ralPw'",
        "aws.rds.connection": "Server=db;Database=payroll;Password=C0nnStrPw;",
        "aws.api_key": "OtlpApiK3yValue"})
    return orjson.dumps({"resourceSpans": [{
        "resource": {"attributes": [_attr("service.name", "agent-otlp-sec-svc")]},
        "scopeSpans": [{"scope": {"name": "test"}, "spans": [agent, http_call, sql_call]}],
    }]})


def native_with_secrets() -> bytes:
    now = time.time()
    return orjson.dumps([{
        "kind": "tool_call", "agent_id": "agent-native-sec", "ts": now, "tool_name": "fetch_report",
        "resource": "postgres://admin:Hunter2pw@db.internal/payroll",
        "attributes": {
            "http.url": "https://payroll.example/q?password=Hunter2pw",
            "http.request.header.authorization": f"Bearer {JWT}",
            "note": "aws AKIAIOSFODNN7EXAMPLE gh ghp_0123456789abcdefghijABCDEFGHIJ012345 "
                    "slack xoxb-123456789012-abcdefghijkl basic: Authorization: Basic YWRtaW46aHVudGVyMg==",
            "key_material": "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----",
            "command": "psql --password CliPassw0rd -h db.internal payroll",
            "callback": "https://hooks.example/cb?secret=S3cretParamV&x=1",
        },
    }])


def audit_with_secrets() -> bytes:
    return orjson.dumps({
        "kind": "audit", "ts": time.time(), "principal": "svc-reporter", "action": "select", "outcome": "allow",
        "resource": "postgresql://reporter:Aud1tPassw0rd@db.internal:5432/payroll?password=Aud1tPassw0rd",
        "origin": "native-audit",
    })


def pgaudit_with_secret() -> bytes:
    """A PostgreSQL log line (Debian's log_line_prefix) as pgaudit writes a password change."""
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    return (f"{now} UTC [4242] svc-reporter@payroll LOG:  AUDIT: SESSION,1,1,ROLE,ALTER ROLE,,,"
            f"\"ALTER ROLE payroll_ro WITH LOGIN PASSWORD 'PgRol3Passw0rd'\",<not logged>").encode()


@pytest.fixture(scope="module")
def webhook() -> Iterator[Recorder]:
    with recording_server() as rec:
        rec.url += "/hook?token=HookTok3n"
        yield rec


def _clean(where: str, text: str) -> None:
    leaked = [s for s in SECRETS if s in text]
    assert not leaked, f"{where} carries {leaked}"


def test_secrets_never_stored_delivered_or_logged(kafka_bootstrap, tmp_path: Path, webhook: Recorder):
    require_alertmanager()
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    with AlertmanagerServer(tmp_path / "am") as am:
        # credentials in the worker's own URLs (Alertmanager ignores the basic auth; the embedded
        # store ignores a DSN's query string): the worker record, /healthz and the log mask them
        am_url = am.url.replace("http://", "http://pager:AmPassw0rd@")
        w = LiveWorker(kafka_bootstrap, tmp_path, policy=policy,
                       env={"AGENTWATCH_ALERTMANAGER_URL": am_url, "AGENTWATCH_WEBHOOK_URL": webhook.url})
        dsn = w.settings.dsn + "?password=DsnQueryPw0rd"
        w.env["AGENTWATCH_CLICKHOUSE_DSN"] = dsn
        w.settings = w.settings.with_overrides(clickhouse_dsn=dsn)
        with w:
            _run_and_check(w, am, webhook)
    _clean("worker log", w.log_path.read_text(errors="replace"))


def _run_and_check(w: LiveWorker, am: AlertmanagerServer, webhook: Recorder) -> None:
    s = w.settings
    record = w.settings.worker_file.read_text()
    _clean("worker record", record)
    assert "?password=****" in record, record
    info = json.loads(record)
    with urllib.request.urlopen(info["url"] + "/healthz", timeout=10) as r:
        health = r.read().decode()
    _clean("/healthz", health)
    assert "?password=****" in health, health
    w.produce(s.topic_otlp, [otlp_with_secrets()])
    w.produce(s.topic_events_in, [native_with_secrets(), b'{"kind": "tool_call", "password": "DlqPassw0rd", '])
    w.produce(s.topic_audit_in, [audit_with_secrets()])
    w.produce(s.topic_audit_in, [pgaudit_with_secret()], key=b"pg-shipper")

    want = {"agent-otlp-sec", "agent-native-sec", "agent-audit-sec"}

    def fired(alerts: list[Alert]) -> bool:
        return want <= {a.agent_id for a in alerts if a.detector == "disallowed_access"}

    alerts = w.wait_alerts(fired, timeout=120)
    assert fired(alerts), w.log_tail()
    for a in alerts:
        # the resource-matching detection, on redacted text; other alerts (the pgaudit line's
        # unattributed ALTER ROLE, once its join wait ends) may or may not have come by now, and
        # every stored alert is searched for the secrets below
        if a.agent_id in want and a.detector == "disallowed_access":
            assert "payroll" in a.summary and "****" in a.summary, a.summary

    # every table, every row
    w.wait_rows("SELECT count() FROM agentwatch.dlq", lambda r: r[0][0] >= 1, timeout=60)
    w.wait_rows("SELECT count() FROM agentwatch.alerts", lambda r: r[0][0] >= 3, timeout=60)
    w.wait_rows("SELECT count() FROM agentwatch.events WHERE source = 'pgaudit' AND action = 'ALTER ROLE'",
                lambda r: r[0][0] >= 1, timeout=60)
    # every table that holds data (views only show what these hold; some take parameters)
    tables = [r[0] for r in run_query(s, "SELECT name FROM system.tables WHERE database = 'agentwatch' "
                                         "AND engine NOT LIKE '%View'").rows]
    assert {"events", "alerts", "dlq"} <= set(tables)
    for t in tables:
        _clean(f"table {t}", json.dumps(run_query(s, f"SELECT * FROM agentwatch.`{t}`").rows))
    dlq = run_query(s, "SELECT raw FROM agentwatch.dlq").rows
    assert any("password" in str(r[0]) and "****" in str(r[0]) for r in dlq), dlq

    # delivered: alerts topics, Alertmanager, webhook
    for topic in (s.topic_alerts, s.topic_shadow_alerts):
        records = w.consume(topic, lambda rs: False, timeout=5)
        _clean(topic, b"\n".join(r.value for r in records).decode(errors="replace"))
    deadline = time.monotonic() + 60
    paged: list[dict] = []
    while time.monotonic() < deadline:
        with urllib.request.urlopen(am.url + "/api/v2/alerts", timeout=5) as r:
            paged = [a for a in json.load(r) if a["labels"].get("agent_id") in want]
        if len(paged) >= 3 and len(webhook.bodies) >= 1:
            break
        time.sleep(0.5)
    assert len(paged) >= 3, w.log_tail()
    _clean("Alertmanager", json.dumps(paged))
    assert webhook.bodies, w.log_tail()
    _clean("webhook", b"\n".join(webhook.bodies).decode(errors="replace"))

    # the Kafka DLQ is the reprocessing copy: original bytes
    kept = w.consume(s.topic_dlq, lambda rs: any(b"DlqPassw0rd" in r.value for r in rs), timeout=30)
    assert any(b"DlqPassw0rd" in r.value for r in kept)
