"""Analyst SQL cannot turn the monitor against itself.

Every attack of issue #8, and variants (comments, case, whitespace, FORMAT,
SETTINGS), is sent to a running worker's ``/query``, through ``agentwatch
query`` while that worker runs, and through ``agentwatch query`` with no worker
(the embedded store opened by the command itself). Each is refused with one
line; afterwards the tables are all there, no file was written, the local HTTP
server saw no request and the kill-switch private key never came back.

A query of the issue's kind (a count over numbers(1e13)) is started first and runs for its
60 s time limit while the attacks and authentication tests run and retry loops keep being
sent, detected and stored.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from schemas.errors import StoreError
from streams.query import run_query
from streams.query_api import query_token
from streams.worker import WorkerInfo, running_worker
from tests.http_recorder import Recorder, recording_server
from tests.live import REPO, LiveWorker
from tests.test_pipeline_live import native_retry

pytestmark = pytest.mark.kafka


@pytest.fixture(scope="module")
def http_probe() -> Iterator[Recorder]:
    """A local HTTP server: any request it records is a URL the store fetched."""
    with recording_server() as rec:
        yield rec


def attacks(key: Path, out: Path, url: str) -> list[str]:
    port = url.rsplit(":", 1)[1]
    return [
        # more than one statement
        "SELECT 1; DROP TABLE agentwatch.dlq",
        "select 1 ;\n\n  drop table agentwatch.dlq",
        "SELECT 1; /* hidden */ DROP TABLE agentwatch.dlq -- trailing",
        "SELECT 1 -- comment\n; DROP TABLE agentwatch.events",
        f"SELECT 1; INSERT INTO FUNCTION file('{out}/a.csv') SELECT 1",
        # writes
        "DROP TABLE agentwatch.dlq",
        "  drop   TABLE   agentwatch.dlq  ",
        "TRUNCATE TABLE agentwatch.events",
        "ALTER TABLE agentwatch.events DELETE WHERE 1",
        "INSERT INTO agentwatch.dlq (topic) VALUES ('x')",
        "CREATE DATABASE probe_rw",
        "create database /* c */ probe_rw",
        "SYSTEM DROP MARK CACHE",
        "KILL QUERY WHERE 1",
        f"INSERT INTO FUNCTION file('{out}/b.csv') SELECT 1",
        f"SELECT 1 INTO OUTFILE '{out}/c.txt'",
        f"select 1 into outfile '{out}/d.txt' FORMAT CSV",
        f"SELECT 1 /* x */ INTO\n   OUTFILE '{out}/e.txt' TRUNCATE",
        # files, URLs, other servers, processes
        f"SELECT * FROM file('{key}', 'LineAsString')",
        f"select * from FILE('{key}','LineAsString')",
        f"SELECT file('{key}')",
        f"SELECT * FROM (SELECT FiLe('{key}') AS k)",
        f"WITH file('{key}') AS k SELECT k",
        f"SELECT * FROM url('{url}/x', 'LineAsString')",
        f"select * FROM URL('{url}/y','LineAsString') FORMAT JSON",
        f"SELECT * FROM s3('{url}/bucket/z.csv', 'CSV', 'x String')",
        f"SELECT * FROM remote('127.0.0.1:{port}', system.one)",
        "SELECT * FROM executable('id', 'TSV', 'x String')",
        f"SELECT * FROM mysql('127.0.0.1:{port}', 'd', 't', 'u', 'p')",
        f"SELECT * FROM postgresql('127.0.0.1:{port}', 'd', 't', 'u', 'p')",
        f"SELECT * FROM sqlite('{key}', 't')",
        f"SELECT * FROM iceberg('{url}/bucket/table/')",
        f"SELECT * FROM deltaLake('{url}/bucket/table/')",
        f"SELECT * FROM gcs('{url}/bucket/g.csv', 'LineAsString')",
        f"SELECT * FROM hdfs('hdfs://127.0.0.1:{port}/h', 'TSV', 'x String')",
        # chDB's Python() table function reads objects of the worker's own process
        "SELECT * FROM Python('settings')",
        "select * from python('os')",
        # settings
        "SELECT 1 SETTINGS readonly=0",
        "SELECT getSetting('readonly') SETTINGS readonly = 0, max_execution_time = 1000",
        f"SELECT * FROM url('{url}/w', 'LineAsString') SETTINGS readonly=0",
        "SET readonly = 0",
        "SELECT count() FROM numbers(1e9) SETTINGS max_threads = 64, max_execution_time = 0",
        "SELECT 1 FORMAT JSON",
    ]


def _refused_one_line(message: str) -> None:
    assert message and "\n" not in message.strip(), message
    assert message.startswith(("refused", "query through the worker")) or "refused" in message, message


def _post(url: str, body: bytes, headers: dict[str, str], timeout: float = 60) -> tuple[int, dict]:
    req = urllib.request.Request(url + "/query", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def _agentwatch(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "streams.cli", *args], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=timeout)


def _info(w: LiveWorker) -> WorkerInfo:
    info = running_worker(w.settings)
    assert info is not None, w.log_tail()
    return info


def _tables(w: LiveWorker) -> set[str]:
    return {r[0] for r in run_query(w.settings, "SELECT name FROM system.tables WHERE database = 'agentwatch'").rows}


def _contents(w: LiveWorker) -> tuple:
    """What the data tables hold (distinct ids: stable while merges drop replaced rows)."""
    sql = ("SELECT (SELECT uniqExact(event_id) FROM agentwatch.events), "
           "(SELECT uniqExact(alert_id) FROM agentwatch.alerts)")
    return tuple(run_query(w.settings, sql).rows[0])


def _databases(w: LiveWorker) -> set[str]:
    return {r[0] for r in run_query(w.settings, "SELECT name FROM system.databases").rows}


@pytest.fixture(scope="module")
def worker(kafka_bootstrap, tmp_path_factory) -> Iterator[LiveWorker]:
    home = tmp_path_factory.mktemp("qsec")
    with LiveWorker(kafka_bootstrap, home, env={"AGENTWATCH_QUERY_MAX_SECONDS": str(LONG_QUERY_S)}) as w:
        yield w


LONG_QUERY_S = 60  # the analyst time limit, and how long the long query below runs


@dataclass
class LongQuery:
    started: float
    thread: threading.Thread
    result: dict[str, object]


@pytest.fixture(scope="module")
def long_query(worker: LiveWorker) -> LongQuery:
    """The issue's query (a count over numbers(1e12) stalled event processing for 90 s), sent to
    /query before the other tests of the module, which run while it does. It runs until ClickHouse
    stops it at the analyst time limit, LONG_QUERY_S."""
    info = _info(worker)
    token = query_token(worker.settings)
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    result: dict[str, object] = {}
    body = json.dumps({"sql": "SELECT count() AS long_probe_1 FROM numbers(1e13)"}).encode()

    def run() -> None:
        result["answer"] = _post(info.url, body, headers, timeout=LONG_QUERY_S + 60)
        result["seconds"] = time.monotonic() - started

    started = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while _count_running(worker, "long_probe_1") == 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert thread.is_alive(), result
    return LongQuery(started, thread, result)


def _detected_during(worker: LiveWorker, q: LongQuery, agent: str) -> float:
    """Send a retry loop of ``agent``; the seconds into the long query when its alert was out
    and it and its events were stored, asserting the query was still running then."""
    worker.produce(worker.settings.topic_events_in, [native_retry(agent)])
    alerts = worker.wait_alerts(lambda a: any(x.agent_id == agent for x in a), timeout=60)
    assert any(a.agent_id == agent for a in alerts), worker.log_tail()
    rows = worker.wait_rows(f"SELECT (SELECT count() FROM agentwatch.events WHERE agent_id = '{agent}'), "
                            f"(SELECT count() FROM agentwatch.alerts WHERE agent_id = '{agent}')",
                            lambda r: r[0][0] >= 6 and r[0][1] >= 1, timeout=30)
    assert rows[0][0] >= 6 and rows[0][1] >= 1, rows
    at = time.monotonic() - q.started
    assert q.thread.is_alive(), f"the long query ended before {agent} was detected ({at:.0f} s): {q.result}"
    return at


def test_detection_goes_on_while_a_long_query_starts(worker: LiveWorker, long_query: LongQuery):
    _detected_during(worker, long_query, "agent-during-query-0")


def test_keys_and_token_are_private(worker: LiveWorker):
    keys = worker.home / "keys"
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    for f in ("control_ed25519.key", "query_token"):
        assert stat.S_IMODE((keys / f).stat().st_mode) == 0o600
    # generated once by the worker; `agentwatch query-token` prints that one, and it is what /query takes
    printed = _agentwatch(worker.env, "query-token")
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout.strip() == (keys / "query_token").read_text().strip() == query_token(worker.settings)
    assert len(printed.stdout.strip()) >= 32


def test_every_attack_is_refused_through_the_worker(worker: LiveWorker, http_probe: Recorder, tmp_path: Path):
    info = _info(worker)
    key = worker.home / "keys" / "control_ed25519.key"
    secret = key.read_text().strip()
    before = _tables(worker)
    assert {"events", "alerts", "dlq"} <= before
    held = _contents(worker)
    assert held[0] >= 6, held  # the long query's first retry loop is stored
    token = query_token(worker.settings)
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    for sql in attacks(key, tmp_path, http_probe.url):
        status, body = _post(info.url, json.dumps({"sql": sql}).encode(), headers)
        assert status == 400, (sql, status, body)
        _refused_one_line(body["error"])
        assert secret not in json.dumps(body)
        # the same through `agentwatch query`'s code path (it finds the running worker)
        with pytest.raises(StoreError) as exc:
            run_query(worker.settings, sql)
        _refused_one_line(str(exc.value))
    assert _tables(worker) == before
    assert _contents(worker) == held
    assert not {"probe_rw"} & _databases(worker)
    assert list(tmp_path.iterdir()) == []
    assert http_probe.requests == []
    # a plain SELECT still works, read-only and on half the cores (the pipeline keeps the rest)
    sql = "SELECT count() AS n, getSetting('readonly') AS ro, getSetting('max_threads') AS t FROM agentwatch.events"
    status, body = _post(info.url, json.dumps({"sql": sql}).encode(), headers)
    assert status == 200 and body["columns"] == ["n", "ro", "t"], body
    assert body["rows"][0][1:] == [1, max(1, (os.cpu_count() or 2) // 2)], body


def test_query_endpoint_authentication(worker: LiveWorker):
    info = _info(worker)
    body = json.dumps({"sql": "SELECT 1"}).encode()
    token = query_token(worker.settings)
    ok = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    assert _post(info.url, body, ok)[0] == 200
    assert _post(info.url, body, {"Content-Type": "application/json"})[0] == 401
    assert _post(info.url, body, {**ok, "Authorization": "Bearer wrong"})[0] == 401
    assert _post(info.url, body, {**ok, "Authorization": f"Basic {token}"})[0] == 401
    # what a web page can send without a preflight: text/plain, and from a foreign origin
    assert _post(info.url, body, {**ok, "Content-Type": "text/plain"})[0] == 415
    assert _post(info.url, body, {**ok, "Content-Type": "text/plain", "Origin": "https://evil.example"})[0] == 403
    assert _post(info.url, body, {**ok, "Origin": "https://evil.example"})[0] == 403
    # DNS rebinding: the page's own host name in the Host header
    assert _post(info.url, body, {**ok, "Host": f"evil.example:{info.url.rsplit(':', 1)[1]}"})[0] == 421
    assert _post(info.url, b"SELECT 1", ok)[0] == 400


def test_health_does_not_need_a_token_and_shows_no_credential(worker: LiveWorker):
    info = _info(worker)
    with urllib.request.urlopen(info.url + "/healthz", timeout=10) as r:
        assert json.loads(r.read())["ok"] is True


def _count_running(w: LiveWorker, marker: str) -> int:
    # the pattern is split so this query's own text does not match it
    a, b = marker[: len(marker) // 2], marker[len(marker) // 2:]
    sql = f"SELECT count() FROM system.processes WHERE query LIKE concat('%', '{a}', '{b}', '%')"
    return int(run_query(w.settings, sql).rows[0][0])


def test_a_60_s_query_runs_while_events_keep_being_detected(worker: LiveWorker, long_query: LongQuery):
    """The long query started before the tests above (attacks, authentication) ran, and
    still runs: retry loops sent one after another are each detected and stored while it
    does, until late in its 60 s. ClickHouse then stops it with a one-line error (below)."""
    detected: list[float] = []
    while not detected or detected[-1] < LONG_QUERY_S - 25:
        detected.append(_detected_during(worker, long_query, f"agent-during-query-{len(detected) + 1}"))
        time.sleep(1)
    print(f"detected {len(detected)} retry loops while the long query ran, at {[round(t) for t in detected]} s")


def test_cli_query_refuses_and_prints_one_line(worker: LiveWorker, tmp_path: Path, http_probe: Recorder):
    key = worker.home / "keys" / "control_ed25519.key"
    for sql in (f"SELECT * FROM file('{key}', 'LineAsString')", "SELECT 1; DROP TABLE agentwatch.dlq",
                f"SELECT 1 INTO OUTFILE '{tmp_path}/f.txt'"):
        done = _agentwatch(worker.env, "query", sql)
        assert done.returncode == 2, done
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "refused" in lines[0], done.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_long_query_is_stopped_at_its_time_limit(long_query: LongQuery):
    """(After the CLI test, which runs while the long query still does.)"""
    long_query.thread.join(timeout=LONG_QUERY_S + 60)
    status, body = long_query.result["answer"]  # type: ignore[misc]
    assert status == 422 and "time limit" in body["error"] and "\n" not in body["error"], body
    assert LONG_QUERY_S <= float(long_query.result["seconds"]) < LONG_QUERY_S + 30, long_query.result  # type: ignore[arg-type]


def test_a_query_whose_client_goes_away_is_killed(worker: LiveWorker):
    info = _info(worker)
    token = query_token(worker.settings)
    sql = "SELECT count() AS long_probe_2 FROM numbers(2e12)"
    req = urllib.request.Request(
        info.url + "/query", data=json.dumps({"sql": sql}).encode(), method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    with pytest.raises((TimeoutError, urllib.error.URLError, socket.timeout)):
        urllib.request.urlopen(req, timeout=3)
    # gone well before its time limit would have stopped it
    deadline = time.monotonic() + 6
    while _count_running(worker, "long_probe_2") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _count_running(worker, "long_probe_2") == 0


def test_without_a_worker_the_command_is_read_only_too(worker: LiveWorker, http_probe: Recorder, tmp_path: Path):
    """`agentwatch query` opening the embedded store itself (no worker running).

    First the worker is stopped while a query runs: it does not wait for the query."""
    info = _info(worker)
    token = query_token(worker.settings)
    running = threading.Thread(target=_post, daemon=True, args=(
        info.url, json.dumps({"sql": "SELECT count() AS long_probe_3 FROM numbers(3e12)"}).encode(),
        {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}, 60))
    running.start()
    deadline = time.monotonic() + 30
    while _count_running(worker, "long_probe_3") == 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    started = time.monotonic()
    worker.stop()
    assert worker.proc is not None and worker.proc.returncode == 0, worker.log_tail()
    assert time.monotonic() - started < 10, "SIGTERM waited for the analyst query"
    key = worker.home / "keys" / "control_ed25519.key"
    script = (
        "import json, sys\n"
        "from streams.query import run_query\n"
        "from streams.settings import load_settings\n"
        "out = []\n"
        "for sql in json.load(sys.stdin):\n"
        "    try:\n"
        "        run_query(load_settings(), sql); out.append(None)\n"
        "    except Exception as exc:\n"
        "        out.append(str(exc))\n"
        "bounds = []\n"  # the result bounds: rows, then bytes
        "for over, sql in (({'query_max_rows': 1000}, 'SELECT number FROM numbers(2000)'),\n"
        "                  ({'query_max_bytes': 65536}, 'SELECT repeat(toString(number), 1000) FROM numbers(1000)')):\n"
        "    try:\n"
        "        run_query(load_settings(**over), sql); bounds.append(None)\n"
        "    except Exception as exc:\n"
        "        bounds.append(str(exc))\n"
        "out.append(bounds)\n"
        "out.append(run_query(load_settings(), \"SELECT name FROM system.tables WHERE database = 'agentwatch' "
        "ORDER BY name\").rows)\n"
        "print(json.dumps(out))\n"
    )
    payloads = attacks(key, tmp_path, http_probe.url)
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=worker.env, input=json.dumps(payloads),
                          text=True, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr
    *errors, bounds, tables = json.loads(done.stdout)
    for sql, err in zip(payloads, errors):
        assert err is not None, f"accepted: {sql}"
        _refused_one_line(err)
    # more rows or bytes than the analyst limits: stopped by ClickHouse, one line
    for err, what in zip(bounds, ("rows", "bytes")):
        assert err is not None and "\n" not in err and "larger than the analyst limits" in err, err
        assert f"max {what}" in err, err
    assert {"events", "alerts", "dlq"} <= {t[0] for t in tables}
    one = _agentwatch(worker.env, "query", "CREATE DATABASE probe_rw")
    assert one.returncode == 2 and len(one.stderr.strip().splitlines()) == 1, one
    check = _agentwatch(worker.env, "query", "SELECT count() FROM system.databases WHERE name = 'probe_rw'")
    assert check.returncode == 0 and check.stdout.splitlines()[2].strip() == "0", check
    assert list(tmp_path.iterdir()) == []
    assert http_probe.requests == []
    assert os.path.exists(key)
