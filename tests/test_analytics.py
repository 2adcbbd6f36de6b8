"""ClickHouse for analysts on the real engine (chDB): retention by TTL, the materialized
views that feed the dashboards, the cluster variant of the DDL, and every dashboard
panel's SQL."""

from __future__ import annotations

import json
import math
import random
import re
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import orjson
import pytest
import yaml

from deploy.grafana.dashboards import DASHBOARDS, render
from deploy.grafana.dashboards import OUT as DASHBOARD_DIR
from streams.policy_file import load_policy
from schemas.control import KillSwitchCommand, Target, generate_keypair, load_private_key, sign
from schemas.events import Event, EventKind, stable_id
from sinks.clickhouse import ClickHouseStore, DlqRecord, Retention, default_schema, open_store, split_statements
from streams.demo import DEMO_POLICY
from streams.fleet import SimAgent, default_fleet, incident_script, native_turn
from streams.replay import _ReplayDecoder, records_in_event_time, replay
from streams.stages import CorrelateStage, DetectStage, IngestStage

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
    add_columns = sum(s.startswith("ALTER") and " ADD COLUMN " in s for s in single)
    assert len(statements) == len(single) + len(tables) + add_columns
    for stmt in statements:
        assert "ON CLUSTER" in stmt, stmt[:80]
        # ClickHouse's own parser (formatQuery parses without executing)
        store.query("SELECT formatQuery({q:String})", {"q": stmt})
    assert sum("ENGINE = Distributed(" in s for s in statements) == len(tables)
    assert all("Replicated" in s for s in statements if s.startswith("CREATE TABLE") and "_local ON" in s)


# A worker against a cluster store built from cluster.sql, on chDB configured as a one-shard
# cluster: its Distributed tables read and write this process's local tables (tcp_port names
# the replica as local). chDB has no Keeper and runs no ON CLUSTER queue, so the Replicated
# engines become their plain ones and ON CLUSTER is run here on the one replica; everything
# else (the Distributed tables, views, materialized views, the worker's start) is the real engine.
CLUSTER_STORE = r"""
import re, sys
from datetime import datetime, timezone
from pathlib import Path
import clickhouse_connect
from schemas.alerts import Severity
from schemas.events import Event, EventKind
from sinks.clickhouse import ClickHouseStore, Retention, split_statements
from tests.test_alert_outputs import make_alert

tmp = Path(sys.argv[1])
(tmp / "config.xml").write_text(
    "<clickhouse><tcp_port>9000</tcp_port><remote_servers><aw><shard><replica><host>localhost</host>"
    "<port>9000</port></replica></shard></aw></remote_servers>"
    "<macros><cluster>aw</cluster><shard>01</shard><replica>r1</replica></macros></clickhouse>")
client = clickhouse_connect.get_client(interface="chdb", path=f"{tmp / 'store'}?config-file={tmp / 'config.xml'}",
                                       tz_mode="aware")
real = client.command
on_cluster = []

def command(sql, *args, **kwargs):
    if " ON CLUSTER " in sql:
        on_cluster.append(sql)
    sql = re.sub(r"Replicated(\w*MergeTree)\('[^']*', '\{replica\}'(, )?", r"\1(", sql)
    return real(re.sub(r" ON CLUSTER '[^']*'", "", sql), *args, **kwargs)

client.command = command
for stmt in split_statements(Path("deploy/clickhouse/cluster.sql").read_text()):
    client.command(stmt)
on_cluster.clear()
store = ClickHouseStore(client, location="cluster")
# what a worker does at start
store.apply_schema()
assert on_cluster == [], on_cluster
store.apply_retention(Retention(events_days=7, alerts_days=0, dlq_days=30))
assert on_cluster and all(re.match(r"ALTER TABLE agentwatch\.\w+_local ON CLUSTER '\{cluster\}' MODIFY TTL ", s)
                          for s in on_cluster), on_cluster
ttl = dict(client.query("SELECT name, engine_full FROM system.tables WHERE database = 'agentwatch'").result_rows)
assert "toIntervalDay(7)" in ttl["events_local"] and "toIntervalDay(30)" in ttl["dlq_local"], ttl
assert " TTL " not in ttl["alerts_local"] and ttl["events"].startswith("Distributed(")
on_cluster.clear()
store.apply_retention(Retention(events_days=7, alerts_days=0, dlq_days=30))
assert on_cluster == [], on_cluster  # unchanged: nothing altered
store.warm_up()
# writes and reads through the Distributed tables, the rollup fed by the local materialized view
now = datetime.now(timezone.utc)
store.insert_events([Event(event_id=f"c{i}", kind=EventKind.LLM_CALL, ts=now, agent_id="cl-agent", source="native",
                           model="m", input_tokens=10, output_tokens=1, outcome="ok") for i in range(3)])
store.insert_alerts([make_alert(Severity.HIGH, detector="retry_loop")])
assert store.query("SELECT count() FROM agentwatch.events WHERE agent_id = 'cl-agent'").rows == [(3,)]
assert store.query("SELECT sum(input_tokens) FROM agentwatch.events_per_minute WHERE agent_id = 'cl-agent'").rows == [(30,)]
assert store.query("SELECT detector FROM agentwatch.alerts_latest").rows == [("retry_loop",)]
print("cluster store ok")
"""


def test_a_worker_starts_on_the_cluster_schema(tmp_path: Path) -> None:
    """The single-node DDL is not applied over the cluster's Distributed tables (they refuse
    ADD INDEX), and retention alters the local tables ON CLUSTER (a Distributed table has no TTL)."""
    out = subprocess.run([sys.executable, "-c", CLUSTER_STORE, str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True, check=False, timeout=300)
    assert out.returncode == 0 and "cluster store ok" in out.stdout, out.stderr[-3000:]


# --- dashboards ------------------------------------------------------------------------------------

DEMO_AGENT = "docs-writer"  # has LLM calls, tool calls, an audit record and an alert in the traffic below


def _expand(sql: str) -> str:
    """The grafana-clickhouse-datasource macros and the dashboard variable, as Grafana fills them in."""
    sql = re.sub(r"\$__timeFilter\((\w+)\)", r"(\1 >= now() - INTERVAL 8 DAY AND \1 <= now() + INTERVAL 1 DAY)", sql)
    sql = re.sub(r"\$__timeInterval\((\w+)\)", r"toStartOfInterval(\1, INTERVAL 60 second)", sql)
    return sql.replace("${agent}", DEMO_AGENT)


@pytest.fixture(scope="module")
def demo_traffic(store: ClickHouseStore, tmp_path_factory: pytest.TempPathFactory) -> None:
    """The demo's traffic, through the real decoders, correlate and detect stages, into the store."""
    tmp = tmp_path_factory.mktemp("demo-traffic")
    start = datetime.now(timezone.utc) - timedelta(minutes=3)
    native, audit = tmp / "native.jsonl", tmp / "audit.jsonl"
    with native.open("wb") as nv, audit.open("wb") as au:
        for step in incident_script(start):
            for record in step.records:
                (nv if step.topic == "events" else au).write(orjson.dumps(record) + b"\n")
        fleet = [a for a in default_fleet() if a.agent_id in (DEMO_AGENT, "research-agent-3")]
        fleet.append(SimAgent("ops-bot-9", "ops-svc", "native", "retry_loop", 1.0, rng=random.Random(3)))
        for _ in range(8):
            for agent in fleet:
                for record in orjson.loads(native_turn(agent)):
                    nv.write(orjson.dumps(record) + b"\n")
    policy = load_policy(DEMO_POLICY)
    ingest, correlate, detect = IngestStage({}, default=_ReplayDecoder()), CorrelateStage(policy), DetectStage(policy)
    events: list[Event] = []
    for rec in [*records_in_event_time([native, audit]), None]:
        routed = ingest.process([rec]) if rec is not None else ingest.tick(math.inf)
        attributed = correlate.process_local([ev for evs in routed.by_trace.values() for ev in evs])
        attributed += [ev for evs in routed.by_agent.values() for ev in evs]
        events += attributed
        detect.process(attributed)
    tail = correlate.finish_local()
    events += tail
    detect.process(tail)
    store.insert_events(events)
    store.insert_alerts(replay([native, audit], policy).alerts)
    store.insert_dlq([DlqRecord("otlp_spans", 0, 1, "otlp_proto", "otlp_proto: not an ExportTraceServiceRequest",
                                b"\x0a\xff", datetime.now(timezone.utc))])
    private, _ = generate_keypair()
    halt = KillSwitchCommand(command_id="demo-halt", action="halt", target=Target(kind="agent", value="ops-bot-7"),
                             reason="retry_loop", issued_by="agentwatch", issued_at=datetime.now(timezone.utc),
                             expires_at=datetime.now(timezone.utc) + timedelta(hours=1))
    store.insert_killswitches([sign(halt, load_private_key(private))])


def test_dashboards_are_generated_from_their_description() -> None:
    for name in DASHBOARDS:
        assert (DASHBOARD_DIR / f"{name}.json").read_text() == render(name), (
            f"{name}.json is stale: python -m deploy.grafana.dashboards")
    assert {p.stem for p in DASHBOARD_DIR.glob("*.json")} == set(DASHBOARDS)


def test_every_panel_query_runs_on_the_store_and_returns_rows(store: ClickHouseStore, demo_traffic: None) -> None:
    queries = []
    for name in DASHBOARDS:
        board = json.loads((DASHBOARD_DIR / f"{name}.json").read_text())
        for var in board["templating"]["list"]:
            queries.append((f"{name}: variable {var['name']}", var["query"]))
        for panel in board["panels"]:
            for target in panel["targets"]:
                if "rawSql" in target:
                    assert target["datasource"]["uid"] == "agentwatch-clickhouse"
                    queries.append((f"{name}: {panel['title']}", target["rawSql"]))
    assert len(queries) >= 18
    empty = []
    for label, sql in queries:
        rows = store.query(_expand(sql)).rows  # raises StoreError on any SQL error
        if not rows:
            empty.append(label)
    assert not empty, f"panels with no rows after the demo's traffic: {empty}"


def test_every_prometheus_panel_parses(tmp_path: Path) -> None:
    """promtool parses the PromQL of the Prometheus panels (as recording rules)."""
    exprs = [t["expr"] for name in DASHBOARDS
             for p in json.loads((DASHBOARD_DIR / f"{name}.json").read_text())["panels"]
             for t in p["targets"] if "expr" in t]
    assert exprs
    rules = {"groups": [{"name": "dashboards", "rules": [
        {"record": f"agentwatch:panel_{i}", "expr": e} for i, e in enumerate(exprs)]}]}
    path = tmp_path / "panels.yml"
    path.write_text(yaml.safe_dump(rules))
    out = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
