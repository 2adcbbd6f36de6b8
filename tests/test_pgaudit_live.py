"""pgaudit end to end: a real PostgreSQL 15 + pgaudit, an agent using psycopg with
OpenTelemetry SDK spans and sqlcommenter ``traceparent`` comments, the server log
shipped to the real broker as log shippers send it, and live workers.

One server for the module, several shipping modes through it, one worker per
prefix configuration (the first also maps the Kafka header x-tenant-id to the tenant):

* PostgreSQL's default prefix ``%m [%p] `` in UTC: one record per message, one line
  per message, and the jsonlog written beside it (worker configured ``postgres``);
* the RDS prefix ``%t:%r:%u@%d:[%p]:`` with ``log_timezone = America/New_York``:
  one record per message and one line per message (worker configured ``rds``).

Each mode is one agent (its own database role) doing the same things: a traced
multi-line UPDATE and a traced SELECT (joined to their tool calls), a traced
SELECT PostgreSQL refuses (a deny joined to its trace), then with the same
credentials and no span an untraced DELETE (``unattributed_side_effect``) and an
untraced SELECT of the protected table hr.salaries (``disallowed_access``).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from opentelemetry.trace import SpanKind, Status, StatusCode

from schemas.otlp_json import request_to_otlp_json
from tests.live import LiveWorker
from tests.otel_traces import make_sdk, to_records
from tests.pg_server import PgServer, missing, one_record_per_message, running_pg

pytestmark = [pytest.mark.kafka, pytest.mark.skipif(bool(missing()), reason=missing() or "-")]

DEFAULT_MODES = ("record", "line", "jsonlog")
RDS_MODES = ("rds_record", "rds_line")
MODES = DEFAULT_MODES + RDS_MODES
SHIPPER_KEY = b"pg-primary-1"  # shippers key by host/file: one server's lines stay in order


def role(mode: str) -> str:
    return f"agent_{mode}"


def agent(mode: str) -> str:
    return f"sql-agent-{mode.replace('_', '-')}"


@dataclass
class Session:
    """What one agent did, as its spans and its slice of the server log."""

    mode: str
    spans: list[Any]
    traced: dict[str, tuple[str, str, int, int]]  # what -> (trace id, tool call id, start ns, end ns)
    stderr: str
    jsonlog: str


@pytest.fixture(scope="module")
def pg() -> Any:
    with running_pg(log_line_prefix="%m [%p] ", log_timezone="UTC") as server:
        server.sql(
            "CREATE SCHEMA hr",
            "CREATE TABLE public.orders (id int PRIMARY KEY, status text)",
            "INSERT INTO public.orders SELECT g, 'new' FROM generate_series(1, 100) g",
            "CREATE TABLE hr.salaries (id int, amount int)",
            "INSERT INTO hr.salaries VALUES (1, 100000)",
            "CREATE TABLE hr.bonuses (id int, amount int)",
        )
        for mode in MODES:
            r = role(mode)
            server.sql(f"CREATE ROLE {r} LOGIN", f"GRANT USAGE ON SCHEMA hr TO {r}",
                       f"GRANT SELECT, UPDATE, DELETE ON public.orders TO {r}", f"GRANT SELECT ON hr.salaries TO {r}",
                       f"ALTER ROLE {r} SET pgaudit.log = 'read, write'")
        yield server


def _policy(home: Path) -> Path:
    path = home / "policy.yaml"
    path.write_text(yaml.safe_dump({
        "version": "pg-live-1",
        "allowed_lateness_s": 5,
        "join": {"window_s": 10},
        "identity_map": [{"principal": role(m), "agent_id": agent(m)} for m in MODES],
        "protected_resources": ["hr.salaries"],
    }))
    return path


@pytest.fixture(scope="module")
def workers(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Any:
    home = tmp_path_factory.mktemp("pg-live")
    policy = _policy(home)
    default = LiveWorker(kafka_bootstrap, home, policy=policy, env={
        "AGENTWATCH_PG_LOG_LINE_PREFIX": "postgres",
        # the Collector's kafka exporter with include_metadata_keys: [x-tenant-id]
        "AGENTWATCH_HEADER_IDENTITY": '{"x-tenant-id": "tenant"}'})
    rds = LiveWorker(kafka_bootstrap, home, policy=policy, env={
        "AGENTWATCH_PG_LOG_LINE_PREFIX": "rds", "AGENTWATCH_PG_LOG_TIMEZONE": "America/New_York"})
    with ThreadPoolExecutor(2) as pool:  # two worker start-ups overlap
        started = list(pool.map(lambda w: w.start(), (default, rds)))
    try:
        yield {"default": started[0], "rds": started[1]}
    finally:
        default.stop()
        rds.stop()


def _tail(path: Path, start: int) -> str:
    with path.open("rb") as f:
        f.seek(start)
        return f.read().decode()


def run_agent(pg: PgServer, mode: str, seed: int, order_id: int) -> Session:
    """The agent's session through psycopg, traced by the OpenTelemetry SDK."""
    import psycopg

    sdk = make_sdk(f"{agent(mode)}-svc", instance_id=f"{agent(mode)}-0", seed=seed)
    tracer = sdk.tracer
    starts = (pg.stderr_log.stat().st_size, pg.json_log.stat().st_size)
    traced: dict[str, tuple[str, str, int, int]] = {}
    steps = [
        ("write", "refund_order", "UPDATE", "UPDATE orders\n   SET status = 'refunded'\n WHERE id = %s"),
        ("read", "lookup_order", "SELECT", "SELECT id, status FROM orders WHERE id = %s"),
        ("denied", "read_bonus", "SELECT", "SELECT amount FROM hr.bonuses WHERE id = %s"),
    ]
    with psycopg.connect(pg.conninfo(user=role(mode), application_name=agent(mode)), autocommit=True) as conn:
        pid = conn.info.backend_pid
        with tracer.start_as_current_span(f"invoke_agent {agent(mode)}", attributes={
                "gen_ai.operation.name": "invoke_agent", "gen_ai.agent.id": agent(mode),
                "gen_ai.agent.name": agent(mode)}):
            for what, tool, verb, sql in steps:
                call_id = f"{mode}-{what}"
                with tracer.start_as_current_span(f"execute_tool {tool}", attributes={
                        "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": tool,
                        "gen_ai.tool.call.id": call_id}) as tool_span:
                    with tracer.start_as_current_span(verb, kind=SpanKind.CLIENT, attributes={
                            "db.system": "postgresql", "db.namespace": "appdb", "db.query.text": sql}) as db:
                        ctx = db.get_span_context()
                        traceparent = f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-01"
                        start = time.time_ns()
                        try:  # sqlcommenter: the comment after the statement
                            conn.execute(f"{sql} /*traceparent='{traceparent}'*/", (order_id,))  # type: ignore[arg-type]
                        except psycopg.errors.InsufficientPrivilege as exc:
                            db.set_status(Status(StatusCode.ERROR, str(exc)))
                            tool_span.set_status(Status(StatusCode.ERROR, str(exc)))
                            tool_span.set_attribute("error.type", "InsufficientPrivilege")
                        traced[what] = (f"{ctx.trace_id:032x}", call_id, start, time.time_ns())
        # the same credentials with no span and no comment: a stray script, or an agent off the books
        conn.execute("DELETE FROM orders WHERE id = %s", (order_id + 1,))
        conn.execute("SELECT amount FROM hr.salaries WHERE id = 1")
    # the server writes the backend's disconnection record last: the session's log is complete
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        stderr, jsonlog = _tail(pg.stderr_log, starts[0]), _tail(pg.json_log, starts[1])
        if f"[{pid}]" in stderr and "disconnection:" in stderr and f'"pid":{pid},' in jsonlog \
                and "disconnection:" in jsonlog:
            return Session(mode, sdk.finished(), traced, stderr, jsonlog)
        time.sleep(0.1)
    raise TimeoutError(f"no disconnection record for backend {pid} in the server log")


def tenant(mode: str) -> str:
    return f"tenant-{mode}"


def ship(worker: LiveWorker, session: Session, *, audit_first: bool) -> int:
    """Spans as the Collector's kafka exporter sends them (the client's tenant in a
    header: the SDK's spans name none); the log as a shipper would."""
    if session.mode.endswith("jsonlog"):
        messages = [line.encode() for line in session.jsonlog.splitlines() if line.strip()]
    elif session.mode.endswith("record"):
        messages = one_record_per_message(session.stderr)
    else:
        messages = [line.encode() for line in session.stderr.splitlines()]
    spans = [request_to_otlp_json(r) for r in to_records(session.spans, 2)]
    s = worker.settings
    headers = [("x-tenant-id", tenant(session.mode).encode())]
    for topic, values, key, hdrs in [(s.topic_audit_in, messages, SHIPPER_KEY, None),
                                     (s.topic_otlp, spans, None, headers)][:: 1 if audit_first else -1]:
        worker.produce(topic, values, key=key, headers=hdrs)
    return len(messages)


AUDIT_SQL = (
    "SELECT principal, action, resource, outcome, join_status, tool_name, tool_call_id, trace_id, agent_id, "
    "toUnixTimestamp64Nano(ts), tenant FROM agentwatch.audit_attribution WHERE audit_source = 'pgaudit'"
)


def check(worker: LiveWorker, sessions: list[Session], *, header_tenants: bool) -> None:
    roles = {role(s.mode): s for s in sessions}
    rows = worker.wait_rows(AUDIT_SQL, lambda r: sum(1 for x in r if x[0] in roles and x[4]) >= 5 * len(roles),
                            timeout=120)
    for r, session in roles.items():
        mine = {(x[1], x[2], x[3]): x for x in rows if x[0] == r}
        assert len(mine) == 5, (session.mode, rows, worker.log_tail())
        for what, key in [("write", ("UPDATE", "public.orders", "allow")), ("read", ("SELECT", "public.orders", "allow")),
                          ("denied", ("SELECT", "hr.bonuses", "deny"))]:
            trace_id, call_id, start, end = session.traced[what]
            row = mine[key]
            # joined to the tool call that ran it, in whichever order the inputs came
            assert row[4:9] == ("matched", {"write": "refund_order", "read": "lookup_order",
                                            "denied": "read_bonus"}[what], call_id, trace_id, agent(session.mode)), row
            # the server's time for the statement is the span's time (UTC, whatever log_timezone says)
            assert start - 1_500_000_000 <= row[9] <= end + 1_000_000_000, (session.mode, what, row[9] - start)
            # the tenant the Kafka header gave its spans (the join hands it to the audit record)
            assert row[10] == (tenant(session.mode) if header_tenants else "default"), row
        for key in [("DELETE", "public.orders", "allow"), ("SELECT", "hr.salaries", "allow")]:
            assert mine[key][4] == "unattributed" and mine[key][8] == agent(session.mode), mine[key]
    alerts = worker.wait_alerts(lambda a: all(
        {(x.detector, x.labels.get("pattern", "")) for x in a if x.agent_id == agent(s.mode)}
        >= {("unattributed_side_effect", ""), ("disallowed_access", "protected"), ("disallowed_access", "deny")}
        for s in sessions), timeout=90)
    for s in sessions:
        mine = [a for a in alerts if a.agent_id == agent(s.mode)]
        side_effect = next(a for a in mine if a.detector == "unattributed_side_effect")
        assert "DELETE public.orders" in side_effect.summary, side_effect.summary
        protected = next(a for a in mine if a.labels.get("pattern") == "protected")
        assert protected.labels["resource"] == "hr.salaries"
    # every server line was decoded or skipped: none is an error
    assert worker.metric("agentwatch_decode_failures_total") == 0, worker.query(
        "SELECT reason, raw FROM agentwatch.dlq").rows
    assert worker.metric("agentwatch_records_skipped_total") >= 2 * len(sessions)  # connection records at least
    resources = {r[0] for r in worker.query(
        "SELECT DISTINCT resource FROM agentwatch.events WHERE source = 'pgaudit'").rows}
    assert resources == {"public.orders", "hr.salaries", "hr.bonuses"}


def test_default_prefix_shipped_per_record_per_line_and_as_jsonlog(pg: PgServer, workers: dict[str, LiveWorker]):
    sessions = [run_agent(pg, mode, seed=700 + i, order_id=10 * (i + 1)) for i, mode in enumerate(DEFAULT_MODES)]
    assert "\n\t" in sessions[0].stderr  # the multi-line UPDATE really is several lines in the log
    assert "STATEMENT:" in sessions[0].stderr  # and the denied SELECT an ERROR plus a STATEMENT record
    for i, session in enumerate(sessions):
        ship(workers["default"], session, audit_first=i % 2 == 0)
    check(workers["default"], sessions, header_tenants=True)


def test_rds_prefix_with_a_new_york_log_timezone(pg: PgServer, workers: dict[str, LiveWorker]):
    pg.reconfigure(log_line_prefix="%t:%r:%u@%d:[%p]:", log_timezone="America/New_York")
    try:
        sessions = [run_agent(pg, mode, seed=800 + i, order_id=60 + 10 * i) for i, mode in enumerate(RDS_MODES)]
    finally:
        pg.reconfigure(log_line_prefix="%m [%p] ", log_timezone="UTC")
    # New York local time with its abbreviation, as RDS writes it
    assert " EST:" in sessions[0].stderr or " EDT:" in sessions[0].stderr, sessions[0].stderr[:300]
    for i, session in enumerate(sessions):
        ship(workers["rds"], session, audit_first=i % 2 == 1)
    check(workers["rds"], sessions, header_tenants=False)
