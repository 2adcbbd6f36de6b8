"""PostgreSQL logs as a real PostgreSQL 15 + pgaudit 1.7 wrote them (tests/fixtures/audit/pg,
recorded from Debian's packages), decoded the ways shippers deliver them.

The same psql session (a traced INSERT, a traced multi-line UPDATE, an untraced
SELECT with a CTE, a traced SELECT refused with "permission denied") under
PostgreSQL's default prefix in UTC, and under the RDS prefix with
log_timezone America/New_York; each also as jsonlog.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest

from schemas.decoders.audit import AuditDecoder, decode_audit
from schemas.decoders.pgaudit import PgLogConfig, pg_log_records, sql_tables
from schemas.events import Event
from streams.replay import classify
from streams.stages import IngestStage, RawRecord, Routed
from tests.pg_server import one_record_per_message

PG = Path(__file__).parent / "fixtures" / "audit" / "pg"
TOPIC = "audit.in"

# (action, resource, principal, outcome, trace_id) of the session in every fixture
SESSION = [
    ("INSERT", "public.orders", "agent_sql", "allow", "0af7651916cd43dd8448eb211c80319c"),
    ("UPDATE", "public.orders", "agent_sql", "allow", "0af7651916cd43dd8448eb211c80319c"),
    ("SELECT", "public.orders", "agent_sql", "allow", ""),
    ("SELECT", "hr.salaries", "agent_sql", "deny", "4bf92f3577b34da6a3ce929d0e0e4736"),
]
CONFIGS = {
    "postgres_default": PgLogConfig("postgres"),
    "rds_new_york": PgLogConfig("%t:%r:%u@%d:[%p]:", "America/New_York"),
}


def summary(events: list[Event]) -> list[tuple[str, str, str, str, str]]:
    return sorted((e.action, e.resource, e.principal, e.outcome, e.trace_id) for e in events)


def events_of(routed: Routed) -> list[Event]:
    return [e for evs in (*routed.by_trace.values(), *routed.by_agent.values()) for e in evs]


def shipped(name: str, mode: str) -> list[bytes]:
    text = (PG / name).read_text()
    if mode == "file":
        return [text.encode()]
    if mode == "record":
        return one_record_per_message(text)
    return [line.encode() for line in text.splitlines()]  # "line"


def ingest(config: PgLogConfig, messages: list[bytes]) -> tuple[Routed, Routed]:
    stage = IngestStage({TOPIC: AuditDecoder(config)})
    routed = stage.process([RawRecord(TOPIC, 0, i, m) for i, m in enumerate(messages)], wall=0.0)
    return routed, stage.tick(10.0)  # what was still open when the input stopped


@pytest.mark.parametrize("mode", ["file", "record", "line"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_shipping_mode_decodes_the_same_session(name: str, mode: str) -> None:
    routed, flushed = ingest(CONFIGS[name], shipped(f"{name}.log", mode))
    events = events_of(routed) + events_of(flushed)
    assert summary(events) == sorted(SESSION)
    assert not routed.dead and not flushed.dead  # connection/disconnection lines are not errors
    assert routed.skipped[TOPIC] + flushed.skipped[TOPIC] >= 3
    update = next(e for e in events if e.action == "UPDATE")
    # continuation lines lose the TAB the server put in front of them
    assert update.attributes["statement"].startswith("UPDATE orders\n   SET status = 'refunded'\n WHERE id = 2")
    deny = next(e for e in events if e.outcome == "deny")
    assert deny.attributes["error"] == "permission denied for table salaries"
    assert deny.span_id == "a2fb4a1d1a96d312"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_jsonlog_decodes_the_same_session_with_nothing_configured(name: str) -> None:
    result = decode_audit((PG / f"{name}.json").read_bytes(), pg=PgLogConfig(log_timezone=CONFIGS[name].log_timezone))
    assert summary(result.events) == sorted(SESSION)
    assert not result.failures and result.skipped == 3


def test_an_error_completed_by_a_later_message_is_one_deny_and_an_incomplete_one_waits_no_longer_than_the_bound(
) -> None:
    messages = one_record_per_message((PG / "postgres_default.log").read_text())
    error_at = next(i for i, m in enumerate(messages) if b"ERROR:" in m)
    stage = IngestStage({TOPIC: AuditDecoder(PgLogConfig("postgres", stitch_s=2.0))})
    routed = stage.process([RawRecord(TOPIC, 3, i, m) for i, m in enumerate(messages[: error_at + 2])], wall=100.0)
    assert [e.action for e in events_of(routed)] == ["INSERT", "UPDATE", "SELECT"]  # the ERROR may get more
    assert not events_of(stage.tick(101.0))  # within the bound: still open
    [deny] = events_of(stage.tick(102.5))
    assert (deny.outcome, deny.trace_id, deny.offset, deny.partition) == (
        "deny", "4bf92f3577b34da6a3ce929d0e0e4736", error_at, 3)


def test_principal_from_the_connection_record_when_the_prefix_has_no_user() -> None:
    routed, flushed = ingest(PgLogConfig("postgres"), shipped("server_start_and_session.log", "line"))
    events = events_of(routed) + events_of(flushed)
    assert {e.principal for e in events if e.action in ("INSERT", "UPDATE")} == {"agent_sql"}
    assert {e.principal for e in events if e.action == "CREATE TABLE"} == {"postgres"}
    assert not routed.dead and not flushed.dead
    # startup, listening, ready, connection and disconnection records
    assert routed.skipped[TOPIC] + flushed.skipped[TOPIC] == 11


def test_new_york_times_are_the_utc_instants() -> None:
    routed, _ = ingest(CONFIGS["rds_new_york"], shipped("rds_new_york.log", "file"))
    assert {e.ts for e in events_of(routed)} == {datetime(2026, 11, 25, 9, 22, 47, tzinfo=timezone.utc)}
    jsonlog = decode_audit((PG / "rds_new_york.json").read_bytes(), pg=CONFIGS["rds_new_york"]).events
    assert {e.ts.replace(microsecond=0) for e in jsonlog} == {datetime(2026, 11, 25, 9, 22, 47, tzinfo=timezone.utc)}


@pytest.mark.parametrize(
    ("stamp", "zone", "utc"),
    [
        ("2026-07-01 14:00:00.250 CEST", "Europe/Berlin", datetime(2026, 7, 1, 12, 0, 0, 250000)),
        ("2026-11-25 09:43:19.163 CET", "Europe/Berlin", datetime(2026, 11, 25, 8, 43, 19, 163000)),
        ("2026-11-25 03:43:19 EST", "America/New_York", datetime(2026, 11, 25, 8, 43, 19)),
        # the hour that happens twice when DST ends: the abbreviation says which
        ("2026-10-25 02:30:00 CEST", "Europe/Berlin", datetime(2026, 10, 25, 0, 30)),
        ("2026-10-25 02:30:00 CET", "Europe/Berlin", datetime(2026, 10, 25, 1, 30)),
        ("2026-11-25 12:13:19 +04", "", datetime(2026, 11, 25, 8, 13, 19)),
        ("2026-11-25 08:43:19 UTC", "Europe/Berlin", datetime(2026, 11, 25, 8, 43, 19)),
    ],
)
def test_zone_abbreviations_resolve_in_log_timezone(stamp: str, zone: str, utc: datetime) -> None:
    line = f"{stamp} [7] LOG:  AUDIT: SESSION,1,1,READ,SELECT,,,select 1,<not logged>".encode()
    [event] = decode_audit(line, log_line_prefix="postgres", log_timezone=zone).events
    assert event.ts == utc.replace(tzinfo=timezone.utc)


@pytest.mark.parametrize(
    ("stamp", "zone", "reason"),
    [
        ("2026-11-25 09:43:19 CET", "", "set AGENTWATCH_PG_LOG_TIMEZONE"),
        ("2026-07-01 09:43:19 CET", "Europe/Berlin", "is not what log_timezone Europe/Berlin uses"),
        ("2026-11-25 09:43:19 EST", "Europe/Berlin", "is not what log_timezone"),
    ],
)
def test_zone_abbreviations_never_read_as_utc(stamp: str, zone: str, reason: str) -> None:
    line = f"{stamp} [7] LOG:  AUDIT: SESSION,1,1,READ,SELECT,,,select 1,<not logged>".encode()
    result = decode_audit(line, log_line_prefix="postgres", log_timezone=zone)
    assert not result.events and reason in result.failures[0].reason


def test_parameters_are_kept_and_object_names_win_over_the_sql() -> None:
    line = (b"2026-11-25 08:43:19.163 UTC [9] LOG:  AUDIT: OBJECT,4,1,WRITE,UPDATE,TABLE,billing.invoices,"
            b"\"UPDATE invoices SET paid = $1 WHERE id = $2\",\"true,42\"")
    [event] = decode_audit(line).events
    assert (event.resource, event.attributes["pg.parameter"]) == ("billing.invoices", "true,42")


@pytest.mark.parametrize(
    ("sql", "tables"),
    [
        ("UPDATE orders SET x = 1 WHERE id IN (SELECT order_id FROM billing.refunds)",
         ("public.orders", "billing.refunds")),
        ('INSERT INTO "Audit"."Log" (a) SELECT a FROM staging', ("Audit.Log", "public.staging")),
        ("WITH t AS (SELECT * FROM a) DELETE FROM b USING t WHERE b.id = t.id", ("public.b", "public.a")),
        ("SELECT 1", ()),
        ("this is not SQL (", ()),
    ],
)
def test_tables_come_from_a_sql_parser(sql: str, tables: tuple[str, ...]) -> None:
    assert sql_tables(sql)[: len(tables)] == tables and set(sql_tables(sql)) <= set(tables) | {"public.t"}


def test_replay_recognises_and_splits_postgres_logs_by_shape() -> None:
    for name in ("postgres_default.log", "rds_new_york.log", "postgres_default.json"):
        first = (PG / name).read_bytes().splitlines()[0]
        assert classify(first) == "audit", name
    records = pg_log_records((PG / "postgres_default.log").read_text())
    assert len(records) == 7  # the UPDATE with its continuation lines, the ERROR with its STATEMENT
    assert any(r.count("\n") == 2 and "UPDATE orders" in r for r in records)
    assert any("ERROR:" in r and "STATEMENT:" in r for r in records)


def test_continuation_lines_whose_tab_a_shipper_trimmed_still_continue_the_record() -> None:
    lines = [line.lstrip("\t").encode() for line in (PG / "postgres_default.log").read_text().splitlines()]
    routed, flushed = ingest(PgLogConfig("postgres"), lines)
    assert summary(events_of(routed) + events_of(flushed)) == sorted(SESSION)
    assert not routed.dead and not flushed.dead


def test_a_statement_shape_is_parsed_once_whatever_its_values_and_comments() -> None:
    from schemas.decoders.pgaudit import _shape_tables

    _shape_tables.cache_clear()
    for i in range(50):
        sql = (f"UPDATE billing.invoices SET note = 'it''s {i}', paid = {i}.5 WHERE id = {i} "
               f"/*traceparent='00-{i:032x}-{i + 1:016x}-01'*/ -- run {i}")
        assert sql_tables(sql) == ("billing.invoices",)
    assert _shape_tables.cache_info().misses == 1
    assert sql_tables("SELECT * FROM t1 JOIN s2.t3 ON t1.id = t3.id") == ("public.t1", "s2.t3")


@pytest.mark.parametrize(
    ("prefix", "line"),
    [
        ("cloudsql", "2026-11-25 08:43:19.163 UTC [412]: [5-1] db=appdb,user=agent_sql LOG:  AUDIT: "),
        ("pgbadger", "2026-11-25 08:43:19 UTC [412]: user=agent_sql,db=appdb,app=psql,client=10.0.0.7 LOG:  AUDIT: "),
        ("debian", "2026-11-25 08:43:19.163 UTC [412] agent_sql@appdb LOG:  AUDIT: "),
        ("rds", "2026-11-25 08:43:19 UTC:10.0.0.7(51514):agent_sql@appdb:[412]:LOG:  AUDIT: "),
    ],
)
def test_each_preset_prefix_names_the_principal_and_database(prefix: str, line: str) -> None:
    record = (line + "SESSION,1,1,READ,SELECT,,,SELECT 1 FROM hr.salaries,<not logged>").encode()
    for setting in (prefix, "auto"):
        [event] = decode_audit(record, log_line_prefix=setting).events
        assert (event.principal, event.attributes["pg.database"], event.resource) == (
            "agent_sql", "appdb", "hr.salaries"), setting
