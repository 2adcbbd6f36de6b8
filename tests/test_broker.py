"""The local Kafka launcher (deploy/broker.py) against a real broker JVM."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from deploy import broker
from deploy.broker import BrokerInfo
from schemas.errors import BrokerError


def _jvm_running(pid: int) -> bool:
    cmdline = Path(f"/proc/{pid}/cmdline")
    try:
        return b"kafka.Kafka" in cmdline.read_bytes()
    except OSError:
        return False


async def _roundtrip(bootstrap: str, topic: str, payload: bytes) -> bytes:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        # auto-creates the topic; a fixed key keeps every record in one partition,
        # so the first record consumed is the first one ever produced.
        await producer.send_and_wait(topic, payload, key=b"k")
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=f"g-{uuid.uuid4().hex}",
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        record = await consumer.getone()
    finally:
        await consumer.stop()
    return record.value


@pytest.mark.kafka
async def test_message_produced_is_consumed_back(kafka_bootstrap: str) -> None:
    payload = uuid.uuid4().bytes
    assert await _roundtrip(kafka_bootstrap, f"aw-test-{uuid.uuid4().hex}", payload) == payload


@pytest.mark.kafka
def test_status_reports_the_running_broker(local_broker: BrokerInfo) -> None:
    assert broker.status(local_broker.state_dir) == local_broker
    assert _jvm_running(local_broker.pid)


@pytest.mark.kafka
def test_up_twice_returns_the_same_broker(local_broker: BrokerInfo) -> None:
    assert broker.up(local_broker.state_dir) == local_broker


@pytest.mark.kafka
async def test_down_stops_the_jvm_and_restart_keeps_data(tmp_path: Path) -> None:
    info = broker.up(tmp_path)
    topic = f"aw-restart-{uuid.uuid4().hex}"
    assert await _roundtrip(info.bootstrap, topic, b"before") == b"before"

    assert broker.down(tmp_path) is True
    assert not _jvm_running(info.pid)
    assert broker.status(tmp_path) is None
    assert broker.down(tmp_path) is False  # nothing left to stop

    # Same state dir: same address (ports reused) and the record survives restart.
    again = broker.up(tmp_path)
    try:
        assert again.bootstrap == info.bootstrap and again.pid != info.pid
        assert await _roundtrip(again.bootstrap, topic, b"after") == b"before"
    finally:
        broker.down(tmp_path)
    assert not _jvm_running(again.pid)


def test_status_removes_a_stale_record(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    (tmp_path / "broker.json").write_text(
        f'{{"pid": {int(dead.stdout)}, "bootstrap": "127.0.0.1:1"}}')
    assert broker.status(tmp_path) is None
    assert not (tmp_path / "broker.json").exists()


def test_bad_java_home_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "no-jdk"))
    with pytest.raises(BrokerError, match="JAVA_HOME"):
        broker.up(tmp_path / "state")


def test_missing_java_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BrokerError, match="Java is not installed"):
        broker.up(tmp_path / "state")


def test_missing_maven_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BrokerError, match="Maven"):
        broker.ensure_jars(tmp_path / "cache")


def test_maven_failure_quotes_its_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "bin" / "mvn"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho '[ERROR] Could not transfer artifact: network is unreachable'\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(BrokerError, match="network is unreachable"):
        broker.ensure_jars(tmp_path / "cache")
    assert not (tmp_path / "cache" / f"kafka-{broker.KAFKA_VERSION}" / ".complete").exists()


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(BrokerError, match="already in use"):
            broker.up(tmp_path, port=busy.getsockname()[1])


@pytest.mark.kafka
def test_start_timeout_kills_the_jvm_and_quotes_the_log(tmp_path: Path) -> None:
    with pytest.raises(BrokerError, match="did not accept clients") as failed:
        broker.up(tmp_path, timeout=0.5)
    assert "broker.log" in str(failed.value)
    assert not (tmp_path / "broker.json").exists()
    assert not any(_jvm_running(int(p)) for p in os.listdir("/proc") if p.isdigit()
                   and str(tmp_path).encode() in Path(f"/proc/{p}/cmdline").read_bytes())


def test_jar_cache_is_per_user_not_per_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTWATCH_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("AGENTWATCH_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert broker.default_cache_dir() == tmp_path / "xdg" / "agentwatch"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert broker.default_cache_dir() == Path.home() / ".cache" / "agentwatch"
    monkeypatch.setenv("AGENTWATCH_CACHE_DIR", str(tmp_path / "jars"))
    assert broker.default_cache_dir() == tmp_path / "jars"


def test_a_slow_maven_run_reports_progress(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log_path = tmp_path / "mvn.log"
    script = ("for i in 1 2 3; do echo \"Downloaded from central: https://repo/a$i.jar (1 kB at 1 kB/s)\"; done; "
              "sleep 1.5; exit 0")
    with log_path.open("wb") as out:
        rc = broker._run_with_progress(["sh", "-c", script], out, log_path, cwd=tmp_path, timeout_s=60,
                                       every_s=0.3)
    assert rc == 0
    err = capsys.readouterr().err
    assert "still resolving Kafka jars: 3 files downloaded" in err
