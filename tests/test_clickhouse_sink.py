"""The ClickHouse store and batching sinks on the real engine (chDB, tmp dirs).

chDB allows one data directory per process (see sinks/clickhouse.py), so this
module opens ONE store for all its tests (module-scoped fixture) and keeps
tests apart by their ids; anything that needs a second engine runs in a
subprocess. Other test modules that open a chDB store must close it at module
teardown, as this one does.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from schemas.alerts import Alert, Evidence, Mode, Severity
from schemas.errors import StoreError
from schemas.events import Event, EventKind, IdentitySource, stable_id
from sinks.base import BatchingSink, SinkBackpressure
from sinks.clickhouse import (
    ALERT_COLUMNS,
    EVENT_COLUMNS,
    AlertSink,
    ClickHouseStore,
    DlqRecord,
    DlqSink,
    EventSink,
    open_store,
)

T0 = datetime(2025, 3, 1, 12, 0, 0, 123456, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("chdb") / "store"


@pytest.fixture(scope="module")
def store(store_dir: Path) -> Iterator[ClickHouseStore]:
    s = open_store(f"chdb://{store_dir}")
    s.apply_schema()
    yield s
    s.close()


def _events(prefix: str, n: int, **overrides: Any) -> list[Event]:
    return [
        Event(
            event_id=stable_id(prefix, i),
            kind=EventKind.TOOL_CALL,
            ts=T0 + timedelta(seconds=i),
            agent_id=f"agent-{prefix}",
            source="native",
            tool_name="shell",
            outcome="ok",
            **overrides,
        )
        for i in range(n)
    ]


def _count(store: ClickHouseStore, sql: str, **params: Any) -> int:
    return int(store.query(sql, params).rows[0][0])


def test_schema_twice_is_harmless_and_mirrors_the_models(store: ClickHouseStore) -> None:
    store.apply_schema()  # the fixture applied it once already
    cols = store.query(
        "SELECT table, name FROM system.columns WHERE database = 'agentwatch' "
        "AND default_kind NOT IN ('MATERIALIZED', 'DEFAULT') ORDER BY table, position"
    ).rows
    by_table: dict[str, list[str]] = {}
    for table, name in cols:
        by_table.setdefault(table, []).append(name)
    assert tuple(by_table["events"]) == EVENT_COLUMNS
    assert tuple(by_table["alerts"]) == ALERT_COLUMNS
    tables = {r[0] for r in store.query("SHOW TABLES FROM agentwatch").rows}
    assert {"events", "alerts", "dlq", "alerts_latest"} <= tables


def test_events_round_trip_with_types_intact(store: ClickHouseStore) -> None:
    full = Event(
        event_id="rt-full",
        kind=EventKind.APPROVAL,
        ts=datetime(2025, 3, 1, 14, 0, 0, 500, tzinfo=timezone(timedelta(hours=2))),
        agent_id="a1",
        tenant="acme",
        source="native",
        duration_ms=12.5,
        identity=IdentitySource.NATIVE,
        is_agent_span=True,
        cost_usd=0.25,
        correlation={"aws.request_id": "r-1"},
        attributes={"k": "v", "ünï": "cödé"},
        expires_at=T0 + timedelta(minutes=5),
        decision="granted",
        partition=3,
        offset=42,
    )
    sparse = Event(event_id="rt-sparse", kind=EventKind.SPAN, ts=T0, source="otlp_json")
    store.insert_events([full, sparse])
    cols = ", ".join(EVENT_COLUMNS)
    rows = store.query(f"SELECT {cols} FROM agentwatch.events WHERE event_id LIKE 'rt-%' ORDER BY event_id").rows
    back = [Event.model_validate(dict(zip(EVENT_COLUMNS, row))) for row in rows]
    assert back == [full, sparse]
    assert back[0].ts.tzinfo == timezone.utc and back[0].ts.hour == 12  # stored in UTC
    assert back[1].duration_ms is None and back[1].expires_at is None and back[1].cost_usd is None


def test_retried_batch_is_dropped_and_replay_collapses(store: ClickHouseStore) -> None:
    batch = _events("replay", 100)
    store.insert_events(batch)
    store.insert_events(batch)  # a retry of the same batch: same deduplication token
    sql = "SELECT count() FROM agentwatch.events WHERE agent_id = 'agent-replay'"
    assert _count(store, sql) == 100  # dropped at insert time, no FINAL needed

    # a replay in other batch boundaries, one event re-resolved to another agent
    replay = batch[50:] + _events("replay", 10)
    replay[0] = replay[0].model_copy(update={"agent_id": "agent-late"})
    store.insert_events(replay)
    ids = [e.event_id for e in batch]
    final = "SELECT count(), uniqExact(event_id) FROM agentwatch.events FINAL WHERE event_id IN {ids:Array(String)}"
    assert store.query(final, {"ids": ids}).rows[0] == (100, 100)
    store.command("OPTIMIZE TABLE agentwatch.events FINAL")
    plain = "SELECT count() FROM agentwatch.events WHERE event_id IN {ids:Array(String)}"
    assert _count(store, plain, ids=ids) == 100
    latest = store.query(
        "SELECT agent_id FROM agentwatch.events FINAL WHERE event_id = {id:String}", {"id": replay[0].event_id}
    )
    assert latest.rows == [("agent-late",)]  # the re-resolved identity wins


def _alert(count: int, last_seen: datetime) -> Alert:
    return Alert(
        alert_id="alert-upd",
        detector="retry_loop",
        detector_version="1",
        policy_version="2025-03-01",
        mode=Mode.ALERT,
        severity=Severity.HIGH,
        agent_id="a1",
        trace_ids=["t1", "t2"],
        first_seen=T0,
        last_seen=last_seen,
        count=count,
        summary=f"shell called {count} times",
        evidence=[Evidence(event_id="e1", ts=T0, topic="in", partition=0, offset=7), Evidence(event_id="e2")],
        labels={"team": "x"},
    )


def test_updated_alert_reads_back_latest(store: ClickHouseStore) -> None:
    first, updated = _alert(1, T0), _alert(3, T0 + timedelta(seconds=30))
    sink = AlertSink(store)
    sink.add(first)
    sink.flush()
    sink.add(updated)
    sink.flush()
    sink.add(first)  # a late replay of the older state must not win
    sink.flush()
    cols = ", ".join(ALERT_COLUMNS)
    rows = store.query(f"SELECT {cols} FROM agentwatch.alerts_latest WHERE alert_id = 'alert-upd'").rows
    assert len(rows) == 1
    record = dict(zip(ALERT_COLUMNS, rows[0]))
    assert Alert.model_validate(record) == updated
    assert sink.stats().rows_written == 3 and sink.stats().batches_written == 3


def test_dlq_keeps_raw_bytes(store: ClickHouseStore) -> None:
    raw = b"\xff\xfe{not json\x00\x80"
    sink = DlqSink(store)
    sink.add(DlqRecord("agentwatch.events.in", 1, 99, "native", "invalid JSON at byte 2", raw, T0))
    assert sink.flush() == 1
    rows = store.query(
        "SELECT raw, reason, received_at FROM agentwatch.dlq WHERE offset = 99", bytes_columns=["raw"]
    ).rows
    assert rows == [(raw, "invalid JSON at byte 2", T0)]


def test_bad_dsn_names_the_key() -> None:
    with pytest.raises(StoreError, match=r"AGENTWATCH_CLICKHOUSE_DSN: unsupported scheme 'postgres'"):
        open_store("postgres://localhost/x")
    with pytest.raises(StoreError, match="AGENTWATCH_CLICKHOUSE_DSN"):
        open_store("chdb://memory")


def test_second_process_gets_a_clear_error(store: ClickHouseStore, store_dir: Path) -> None:
    # this process holds the engine on store_dir, as the worker would
    script = textwrap.dedent(
        f"""
        from schemas.errors import StoreError
        from sinks.clickhouse import open_store
        try:
            open_store("chdb://{store_dir}")
        except StoreError as exc:
            print("STOREERROR", exc)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    out = proc.stdout
    assert "STOREERROR" in out, proc.stderr
    assert "owned by another agentwatch process" in out
    assert str(store_dir) in out and "http://" in out


class _Flaky(BatchingSink[int]):
    name = "flaky"

    def __init__(self, failures: list[Exception]) -> None:
        super().__init__()
        self.failures = failures
        self.written: list[list[int]] = []

    def write(self, batch: Sequence[int]) -> None:
        if self.failures:
            raise self.failures.pop(0)
        self.written.append(list(batch))


def test_failing_flush_keeps_the_batch_for_retry() -> None:
    sink = _Flaky([RuntimeError("connection reset"), SinkBackpressure("too many parts", retry_after=2)])
    sink.extend([1, 2, 3])
    with pytest.raises(StoreError, match="flaky: writing 3 rows failed: connection reset"):
        sink.flush()
    sink.add(4)
    with pytest.raises(SinkBackpressure) as info:
        sink.flush()
    assert info.value.retry_after == 2
    assert sink.pending == 4
    assert sink.flush() == 4
    # the failed batch is retried unchanged (same dedup token), then the rest
    assert sink.written == [[1, 2, 3], [4]]
    stats = sink.stats()
    assert (stats.rows_written, stats.batches_written, stats.failed_flushes, stats.pending) == (4, 2, 2, 0)
    assert sink.flush() == 0


def test_store_failure_surfaces_as_store_error_and_retry_lands(
    store: ClickHouseStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    from clickhouse_connect.driver.exceptions import OperationalError

    real_insert = store.client.insert
    tokens: list[str] = []

    def failing_insert(*args: Any, **kwargs: Any) -> Any:
        tokens.append(kwargs["settings"]["insert_deduplication_token"])
        if len(tokens) == 1:
            real_insert(*args, **kwargs)  # the write lands, then the connection drops
            raise OperationalError("connection reset by peer")
        return real_insert(*args, **kwargs)

    monkeypatch.setattr(store.client, "insert", failing_insert)
    sink = EventSink(store)
    sink.extend(_events("flaky", 20))
    with pytest.raises(StoreError, match=r"agentwatch\.events.*connection reset"):
        sink.flush()
    assert sink.pending == 20
    assert sink.flush() == 20
    assert tokens[0] == tokens[1]
    assert _count(store, "SELECT count() FROM agentwatch.events WHERE agent_id = 'agent-flaky'") == 20


def test_bad_sql_is_a_store_error(store: ClickHouseStore) -> None:
    with pytest.raises(StoreError, match="UNKNOWN_TABLE|does not exist"):
        store.query("SELECT * FROM agentwatch.nope")
