"""ClickHouse for analysts on the real engine (chDB): retention by TTL, the materialized
views that feed the dashboards, the cluster variant of the DDL, and every dashboard
panel's SQL."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from schemas.events import Event, EventKind, stable_id
from sinks.clickhouse import ClickHouseStore, Retention, default_schema, open_store, split_statements

ROOT = Path(__file__).resolve().parents[1]
NOW = datetime.now(timezone.utc).replace(second=0, microsecond=0) - timedelta(minutes=5)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClickHouseStore]:
    s = open_store(f"chdb://{tmp_path_factory.mktemp('chdb') / 'store'}")
    s.apply_schema()
    yield s
    s.close()


def _ttl(store: ClickHouseStore, table: str) -> str:
    rows = store.query("SELECT engine_full FROM system.tables WHERE database = 'agentwatch' AND name = {t:String}",
                       {"t": table}).rows
    engine = str(rows[0][0])
    return engine.split(" TTL ", 1)[1] if " TTL " in engine else ""


def test_retention_is_configurable_and_removable(store: ClickHouseStore) -> None:
    store.apply_retention(Retention(events_days=90, alerts_days=365, dlq_days=30))
    assert "toIntervalDay(90)" in _ttl(store, "events") and "inserted_at" in _ttl(store, "events")
    assert "toIntervalDay(365)" in _ttl(store, "alerts")
    assert "toIntervalDay(30)" in _ttl(store, "dlq") and "received_at" in _ttl(store, "dlq")
    assert "toIntervalDay(90)" in _ttl(store, "events_per_minute") and "minute" in _ttl(store, "events_per_minute")
    store.apply_retention(Retention(events_days=7, alerts_days=0, dlq_days=30))  # changed, removed, unchanged
    assert "toIntervalDay(7)" in _ttl(store, "events")
    assert _ttl(store, "alerts") == ""
    store.apply_retention(Retention(events_days=7, alerts_days=0, dlq_days=30))  # idempotent
    assert "toIntervalDay(7)" in _ttl(store, "events")


def test_rows_age_from_when_they_were_stored(store: ClickHouseStore) -> None:
    """A replay of old events keeps them (stored now); the minute rollup of old minutes ages out."""
    store.apply_retention(Retention(events_days=1))
    old = Event(event_id=stable_id("ttl", "old"), kind=EventKind.TOOL_CALL, ts=NOW - timedelta(days=3),
                agent_id="ttl-agent", source="native", tool_name="x", outcome="ok")
    new = old.model_copy(update={"event_id": stable_id("ttl", "new"), "ts": NOW})
    store.insert_events([old, new])
    for table in ("events", "events_per_minute"):
        store.command(f"OPTIMIZE TABLE agentwatch.{table} FINAL")
    ids = {r[0] for r in store.query("SELECT event_id FROM agentwatch.events WHERE agent_id = 'ttl-agent'").rows}
    assert ids == {old.event_id, new.event_id}
    minutes = store.query("SELECT minute FROM agentwatch.events_per_minute WHERE agent_id = 'ttl-agent'").rows
    assert [m[0].replace(tzinfo=timezone.utc) if m[0].tzinfo is None else m[0] for m in minutes] == [NOW]
    store.apply_retention(Retention())


def test_per_minute_rollup_follows_inserts(store: ClickHouseStore) -> None:
    events = [Event(event_id=stable_id("mv", i), kind=EventKind.LLM_CALL, ts=NOW + timedelta(seconds=i),
                    agent_id="mv-agent", source="native", model="m", input_tokens=100, output_tokens=10,
                    cost_usd=0.5, outcome="ok") for i in range(30)]
    store.insert_events(events)
    rows = store.query("SELECT sum(events), sum(input_tokens), sum(output_tokens), round(sum(cost_usd), 2) "
                       "FROM agentwatch.events_per_minute WHERE agent_id = 'mv-agent'").rows
    assert rows == [(30, 3000, 300, 15.0)]


def test_cluster_ddl_is_generated_from_the_schema_and_parses(store: ClickHouseStore) -> None:
    out = subprocess.run([sys.executable, "-m", "deploy.clickhouse.cluster"], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    assert out.stdout == (ROOT / "deploy" / "clickhouse" / "cluster.sql").read_text(), (
        "deploy/clickhouse/cluster.sql is stale: python -m deploy.clickhouse.cluster > it")
    statements = split_statements(out.stdout)
    single = split_statements(default_schema())
    tables = [s for s in single if s.startswith("CREATE TABLE")]
    assert len(statements) == len(single) + len(tables) + sum(s.startswith("ALTER") for s in single)
    for stmt in statements:
        assert "ON CLUSTER" in stmt, stmt[:80]
        # ClickHouse's own parser (formatQuery parses without executing)
        store.query("SELECT formatQuery({q:String})", {"q": stmt})
    assert sum("ENGINE = Distributed(" in s for s in statements) == len(tables)
    assert all("Replicated" in s for s in statements if s.startswith("CREATE TABLE") and "_local ON" in s)
