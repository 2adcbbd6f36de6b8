"""The CLI as a user meets it: version, output formats, and one-line errors for the
mistakes people make (a busy port, an unreachable ClickHouse, a misspelt topic)."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from streams.kafka import missing_topics
from tests.live import LiveWorker

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "otel" / "retry_loop_genai.jsonl"


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "streams.cli", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout, check=False)


def one_line_error(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    return lines[0]


def test_version() -> None:
    out = cli("--version")
    assert out.returncode == 0 and out.stdout.startswith("agentwatch ") and out.stdout.split()[1][0].isdigit()


@pytest.fixture(scope="module")
def store_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("cli-home")
    return {"AGENTWATCH_HOME": str(home), "AGENTWATCH_CLICKHOUSE_DSN": f"chdb://{home / 'clickhouse'}"}


def test_query_formats(store_env: dict[str, str]) -> None:
    sql = "SELECT number AS n, concat('a,', toString(number)) AS s, toDateTime64('2026-01-01 00:00:00', 6, 'UTC') AS t FROM numbers(2)"
    table = cli("query", sql, env=store_env)
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[0].split() == ["n", "s", "t"] and "(2 rows)" in table.stdout
    as_csv = list(csv.reader(io.StringIO(cli("query", "--format", "csv", sql, env=store_env).stdout)))
    assert as_csv[0] == ["n", "s", "t"] and [r[:2] for r in as_csv[1:]] == [["0", "a,0"], ["1", "a,1"]]
    assert all(_instant(r[2]) == JAN_1 for r in as_csv[1:])
    as_json = [json.loads(line) for line in cli("query", "--format", "json", sql, env=store_env).stdout.splitlines()]
    assert [(r["n"], r["s"]) for r in as_json] == [(0, "a,0"), (1, "a,1")]
    assert all(_instant(r["t"]) == JAN_1 for r in as_json)


JAN_1 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def _instant(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def test_query_with_no_rows_still_prints_the_header(store_env: dict[str, str]) -> None:
    sql = "SELECT number AS n, toString(number) AS s FROM numbers(3) WHERE n > 10"
    assert cli("query", "--format", "csv", sql, env=store_env).stdout == "n,s\n"
    table = cli("query", sql, env=store_env).stdout.splitlines()
    assert table[0].split() == ["n", "s"] and table[-1] == "(0 rows)"
    assert cli("query", "--format", "json", sql, env=store_env).stdout == ""


def test_replay_formats() -> None:
    as_json = cli("replay", str(FIXTURE))
    alerts = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert as_json.returncode == 0 and alerts and all(a["detector"] == "retry_loop" for a in alerts)
    table = cli("replay", "--format", "table", str(FIXTURE))
    lines = table.stdout.splitlines()
    assert table.returncode == 0 and lines[0].split()[:3] == ["first_seen", "detector", "severity"]
    assert sum("retry_loop" in line for line in lines) == len(alerts)
    assert lines[-1] == f"({len(alerts)} row{'s' if len(alerts) != 1 else ''})"


def test_port_in_use_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = cli("worker", env={"AGENTWATCH_HOME": str(tmp_path), "AGENTWATCH_WEB_PORT": str(port)})
    line = one_line_error(out)
    assert f"port {port}" in line and "AGENTWATCH_WEB_PORT" in line


def test_unreachable_clickhouse_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = cli("query", "SELECT 1", env={"AGENTWATCH_HOME": str(tmp_path),
                                        "AGENTWATCH_CLICKHOUSE_DSN": f"http://u:hunter2@127.0.0.1:{port}"})
    line = one_line_error(out)
    assert "cannot connect to ClickHouse" in line and "Connection refused" in line
    assert "hunter2" not in out.stderr  # the password never shows


def test_unreachable_clickhouse_logs_nothing_else_once_logging_is_on(capfd: pytest.CaptureFixture[str]) -> None:
    """The worker sets up logging before it opens the store: then the driver's and urllib3's
    warnings about the refused connection (a retry, a traceback) printed lines besides the error."""
    import logging

    from sinks.clickhouse import StoreUnavailable, open_store
    from streams.logs import setup_logging

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    setup_logging("info")
    try:
        with pytest.raises(StoreUnavailable, match="cannot connect to ClickHouse"):
            open_store(f"http://u:hunter2@127.0.0.1:{port}")
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
    captured = capfd.readouterr()
    assert captured.err == "" and "hunter2" not in captured.out, captured.err


BROKER_DEFAULT_PARTITIONS = 4  # num.partitions of the local broker (deploy/broker.py)


async def partition_count(bootstrap: str, topic: str) -> int | None:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics([topic])
    finally:
        await admin.close()
    return len(described[0]["partitions"]) if described and not described[0]["error_code"] else None


@pytest.mark.kafka
def test_a_missing_input_topic_is_reported_not_created(kafka_bootstrap: str, tmp_path: Path) -> None:
    misspelt = f"otlp_spanz_{int(time.time() * 1000)}"
    # the broker must not create it behind our back either (the local one auto-creates on produce)
    with LiveWorker(kafka_bootstrap, tmp_path, env={"AGENTWATCH_TOPIC_OTLP": misspelt}) as w:
        log = w.log_path.read_text()
        warning = [line for line in log.splitlines() if "does not exist" in line and misspelt in line]
        assert warning and "AGENTWATCH_TOPIC_OTLP" in warning[0], log[-2000:]
        # the worker creates no input topic; but its consumer, subscribed to the name, asks
        # for the topic's metadata, and a broker with auto.create.topics.enable (the local
        # one; managed Kafka turns it off) then creates it with the broker's defaults
        assert asyncio.run(partition_count(kafka_bootstrap, misspelt)) in (None, BROKER_DEFAULT_PARTITIONS)
        assert w.settings.partitions != BROKER_DEFAULT_PARTITIONS
        # its own topics it does create
        assert asyncio.run(missing_topics(kafka_bootstrap, [w.settings.topic_by_trace, w.settings.topic_dlq])) == []


def test_keygen_writes_the_key_the_compose_secret_mounts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """`agentwatch killswitch keygen DIR` (README, docker-compose.yml): a 0600 private key and its
    public half; the worker reads the key from that path (AGENTWATCH_CONTROL_PRIVATE_KEY, as the
    compose secret is mounted), and a second run refuses to replace a key agents trust."""
    from streams.cli import main

    monkeypatch.setenv("AGENTWATCH_HOME", str(tmp_path / "home"))
    keys = tmp_path / "secrets"
    assert main(["killswitch", "keygen", str(keys)]) == 0
    key, pub = keys / "control.key", keys / "control.pub"
    assert key.stat().st_mode & 0o777 == 0o600
    capsys.readouterr()
    monkeypatch.setenv("AGENTWATCH_CONTROL_PRIVATE_KEY", str(key))
    assert main(["killswitch", "pubkey"]) == 0
    assert capsys.readouterr().out.strip() == pub.read_text().strip()
    assert not (tmp_path / "home" / "keys").exists()  # no development key was made instead
    before = key.read_bytes()
    assert main(["killswitch", "keygen", str(keys)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists" in err[0] and key.read_bytes() == before
