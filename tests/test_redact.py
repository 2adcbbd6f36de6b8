"""Secret redaction (schemas/redact.py) and credentials masked wherever settings are printed."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from schemas.redact import DEFAULT, MASK, Redactor, mask_secrets
from streams.settings import describe_settings, load_settings
from tests.live import REPO

# (text carrying a secret, the secret, what must survive the redaction)
CASES = [
    ("https://api.openai.example/v1/chat?api_key=sk-proj-Ab3dEf6hIj9kLm2nOp5q&model=x",
     "sk-proj-Ab3dEf6hIj9kLm2nOp5q", "https://api.openai.example/v1/chat?api_key="),
    ("https://svc.example/data?token=s3cr3tvalue123&page=2", "s3cr3tvalue123", "&page=2"),
    ("postgres://admin:Hunter2pw@db.internal:5432/payroll", "Hunter2pw", "db.internal:5432/payroll"),
    ("SELECT * FROM dblink('host=db user=app password=Sup3rS3cret', 'select 1')", "Sup3rS3cret", "host=db user=app"),
    ("Server=tcp:db,1433;Database=hr;User ID=sa;Password=P@ssw0rd!;", "P@ssw0rd!", "Database=hr"),
    ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhZ2VudCJ9.c2lnbmF0dXJl", "c2lnbmF0dXJl",
     "Authorization: Bearer"),
    ("Authorization: Basic YWRtaW46aHVudGVyMg==", "YWRtaW46aHVudGVyMg==", "Authorization: Basic"),
    ("aws s3 cp --key AKIAIOSFODNN7EXAMPLE s3://bucket/key", "AKIAIOSFODNN7EXAMPLE", "s3://bucket/key"),
    ("git clone with ghp_0123456789abcdefghijABCDEFGHIJ012345", "ghp_0123456789abcdefghijABCDEFGHIJ012345", "git clone"),
    ("slack xoxb-123456789012-abcdefghijkl posted", "xoxb-123456789012-abcdefghijkl", "posted"),
    ("jwt=eyJhbGciOiJSUzI1NiJ9.eyJpc3MiOiJ4In0.sIgNaTuRe_-x", "eyJpc3MiOiJ4In0", ""),
    ("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAA\n-----END OPENSSH PRIVATE KEY-----",
     "b3BlbnNzaC1rZXktdjEAAAA", "BEGIN OPENSSH PRIVATE KEY"),
    ('{"user": "bob", "password": "correct-horse"}', "correct-horse", '"user": "bob"'),
    ("export AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCY", "export"),
    ("https://svc.example/x?secret=Sh0wMeNot&x=1", "Sh0wMeNot", "&x=1"),
    ("https://svc.example/cb?authorization=Bearer%20opaqueTok3nValue", "opaqueTok3nValue", "https://svc.example/cb"),
    # SQL password literals, as pgaudit and log_statement keep them
    ("ALTER ROLE app WITH LOGIN PASSWORD 'Rol3Passw0rd' VALID UNTIL 'infinity'", "Rol3Passw0rd", "VALID UNTIL"),
    ("ALTER ROLE app PASSWORD 'it''s Rol3Passw0rd'", "Rol3Passw0rd", "ALTER ROLE app PASSWORD"),
    ("CREATE USER bob IDENTIFIED WITH sha256_password BY 'Us3rPassw0rd'", "Us3rPassw0rd", "CREATE USER bob"),
    ("SET PASSWORD FOR bob = PASSWORD('Us3rPassw0rd')", "Us3rPassw0rd", "SET PASSWORD FOR bob"),
    ("ALTER ROLE app PASSWORD 'cut off Rol3Passw0rd", "Rol3Passw0rd", "ALTER ROLE app"),
    ("mysql -h db --password Cl1Passw0rd -e 'select 1'", "Cl1Passw0rd", "-e 'select 1'"),
]


@pytest.mark.parametrize(("text", "secret", "kept"), CASES)
def test_each_kind_of_secret_is_masked_and_the_rest_kept(text: str, secret: str, kept: str):
    out = DEFAULT.text(text)
    assert secret not in out, out
    assert MASK in out
    assert kept in out


@pytest.mark.parametrize("text", [
    "SELECT * FROM payroll.salaries WHERE employee_id = 42",
    "http://127.0.0.1:9093/api/v2/alerts",
    "chdb:///var/lib/agentwatch/clickhouse",
    "gen_ai.usage.input_tokens=512 max_tokens=1024",
    "s3://finance-reports/2026/q1.csv",
    "kubectl delete deployment agent-b -n prod",
    "SELECT user, password_last_changed FROM mysql.user",
    "ALTER ROLE app PASSWORD NULL",
    "ls --tokens-file x -- y",
])
def test_ordinary_text_is_untouched(text: str):
    assert DEFAULT.text(text) == text


def test_attribute_named_as_a_credential_is_masked_whole():
    attrs = {"http.request.header.authorization": "opaque-value", "http.request.header.x-api-key": "k1",
             "http.request.header.cookie": "session=abc", "gen_ai.usage.input_tokens": "12",
             "db.statement": "select 1"}
    out = DEFAULT.mapping(attrs)
    assert out["http.request.header.authorization"] == MASK
    assert out["http.request.header.x-api-key"] == MASK
    assert out["http.request.header.cookie"] == MASK
    assert out["gen_ai.usage.input_tokens"] == "12" and out["db.statement"] == "select 1"


def test_a_record_redacts_exactly_what_each_event_alone_would():
    """Redactor.events tests a record's text once: a secret anywhere in it still sends every
    event through the per-event rules, and the clean ones come out unchanged."""
    from datetime import datetime, timezone

    from schemas.events import Event, EventKind

    def record() -> list[Event]:
        ts = datetime(2026, 1, 1, tzinfo=timezone.utc)
        return [Event(event_id=f"e{i}", kind=EventKind.TOOL_CALL, ts=ts, source="otlp_proto", name=f"call {i}",
                      attributes=attrs)
                for i, attrs in enumerate([{"q": "weather"}, {"db.statement": "ALTER ROLE r PASSWORD 'hunter22'"},
                                           {"http.request.header.authorization": "opaque-value"}, {"q": "ok"}])]

    one_by_one = record()
    for ev in one_by_one:
        DEFAULT.event(ev)
    batch = record()
    DEFAULT.events(batch)
    assert [e.attributes for e in batch] == [e.attributes for e in one_by_one]
    assert "hunter22" not in str(batch[1].attributes) and batch[2].attributes == {
        "http.request.header.authorization": MASK}
    clean = record()[::3]
    DEFAULT.events(clean)
    assert [e.attributes for e in clean] == [{"q": "weather"}, {"q": "ok"}]


def test_policy_patterns_extend_the_rules():
    r = Redactor([r"EMP-\d{6}", r"ssn:(\d{3}-\d{2}-\d{4})"])
    assert r.text("employee EMP-123456 ssn:123-45-6789") == f"employee {MASK} ssn:{MASK}"


def test_cost_per_string_is_small():
    clean = "SELECT name, amount FROM payroll.salaries WHERE employee_id = 42"
    dirty = "https://api.example/v1?api_key=sk-proj-Ab3dEf6hIj9kLm2nOp5q"
    n = 20_000
    for label, s in (("clean", clean), ("secret", dirty)):
        t = time.perf_counter()
        for _ in range(n):
            DEFAULT.text(s)
        us = (time.perf_counter() - t) / n * 1e6
        print(f"redaction: {us:.1f} us per {label} string")
        assert us < 500  # a loose bound for a loaded 2-core machine; the figure is what matters


def test_settings_never_show_credentials(tmp_path):
    s = load_settings(home=tmp_path, clickhouse_dsn="http://analyst:Pw0rdX@ch.internal:8123/db",
                      alertmanager_url="https://am:AmSecret9@am.internal:9093",
                      webhook_url="https://hooks.example/in?token=HookTok3n", query_token="QueryTok3nValue")
    printed = "\n".join(f"{k}={v}" for k, v, _ in describe_settings(s))
    for secret in ("Pw0rdX", "AmSecret9", "HookTok3n", "QueryTok3nValue"):
        assert secret not in printed
    assert "http://analyst:****@ch.internal:8123/db" in printed
    assert mask_secrets("https://u:p4ss@h/x") == "https://u:****@h/x"


def test_settings_command_masks(tmp_path):
    env = {"AGENTWATCH_HOME": str(tmp_path), "AGENTWATCH_CLICKHOUSE_DSN": "https://u:Pw0rdX@ch:8443/",
           "AGENTWATCH_WEBHOOK_URL": "https://hooks.example/in?token=HookTok3n", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", "streams.cli", "settings"], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "Pw0rdX" not in done.stdout and "HookTok3n" not in done.stdout
    assert "https://u:****@ch:8443/" in done.stdout


def test_policy_redaction_patterns_apply_at_ingest_and_on_hot_reload(tmp_path):
    import os

    from streams.policy_file import PolicyWatcher
    from streams.app import Pipeline

    policy = tmp_path / "policy.yaml"
    policy.write_text("version: r1\n")
    watcher = PolicyWatcher(policy)
    s = load_settings(home=tmp_path, policy_file=policy, clickhouse_dsn=f"chdb://{tmp_path}/ch", web_port=6999)
    pipeline = Pipeline(s, watcher.current, "127.0.0.1:9", {}, watcher)  # nothing connects until it runs
    assert pipeline.ingest.redactor.text("employee EMP-123456") == "employee EMP-123456"
    policy.write_text("version: r2\nredaction:\n  patterns: ['EMP-[0-9]{6}']\n")
    later = time.time() + 5
    os.utime(policy, (later, later))
    pipeline._check_policy()
    assert pipeline.ingest.redactor.text("employee EMP-123456") == f"employee {MASK}"


def test_log_lines_mask_credentials_in_messages_fields_and_tracebacks():
    import logging

    from streams.logs import JsonFormatter, MaskingFormatter

    try:
        raise ConnectionError("POST https://hooks.example/in?token=HookTok3n failed")
    except ConnectionError:
        exc_info = sys.exc_info()
    record = logging.LogRecord("agentwatch.test", logging.WARNING, __file__, 1,
                               "cannot reach %s", ("http://u:Pw0rdX@ch.internal:8123",), exc_info)
    record.endpoint = "https://am:AmSecret9@am.internal:9093"  # an extra={...} field
    for formatter in (JsonFormatter(), MaskingFormatter("%(message)s %(endpoint)s")):
        line = formatter.format(record)
        for secret in ("Pw0rdX", "AmSecret9", "HookTok3n"):
            assert secret not in line, line
        assert "u:****@ch.internal" in line


def test_health_shows_the_dsn_masked(tmp_path):
    from streams.query_api import health

    s = load_settings(home=tmp_path, clickhouse_dsn="https://analyst:Pw0rdX@ch.internal:8443/")
    assert health(s)["dsn"] == "https://analyst:****@ch.internal:8443/"

