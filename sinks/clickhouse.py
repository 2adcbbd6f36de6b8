"""The ClickHouse store: canonical events, alerts and the DLQ, for analysts.

DSNs (``AGENTWATCH_CLICKHOUSE_DSN``):

* ``chdb:///abs/path`` - the embedded chDB engine (the real ClickHouse engine
  in-process) on a data directory. ``chdb://rel/path`` is the same path taken
  relative to the working directory (``netloc + path``; clickhouse-connect
  would read the netloc as a location and the path as a database, which is
  never what an agentwatch user means). The directory is created if missing.
* ``http://user:password@host:8123/db`` / ``https://...`` - a ClickHouse
  server. Tables are always addressed as ``agentwatch.<table>``, whatever the
  DSN's database.

chDB constraints, measured with chdb 4.4 / chdb-core 26.9 through
clickhouse-connect 1.12 (the worker, the tests and ``agentwatch query`` are
built around them):

* **One data directory per process.** Opening a second, different directory
  while a client is open fails with "EmbeddedServer already initialized with
  path A, cannot connect with different path B". Several clients on the *same*
  directory in one process are fine, and after ``close()`` another directory
  can be opened. So tests use one store per module (or subprocesses), and a
  process holds at most one embedded store at a time.
* **One process per data directory.** The engine holds an exclusive flock on
  ``<dir>/status``; a second process gets "Cannot lock file <dir>/status.
  Another server instance in same directory is already running" printed on
  its stderr, while the exception raised to Python only says "Error
  initializing EmbeddedServer: ." :func:`open_store` therefore probes the lock
  itself and raises a StoreError saying that another agentwatch process (the
  worker) owns the store and that concurrent use needs a server DSN.
* ``DateTime64(6, 'UTC')`` columns come back as aware UTC datetimes only with
  ``tz_mode="aware"`` (the default returns naive values), so every client is
  opened with it.
* String columns holding non-UTF-8 bytes are returned as a *hex string* by
  default; :meth:`ClickHouseStore.query` takes ``bytes_columns`` to read them
  as ``bytes`` (the DLQ's ``raw``).

Idempotence: every insert carries ``insert_deduplication_token`` (a hash of the
rows' identities and versions); the tables keep a deduplication window, so a
retried batch that did land is dropped. Replays are collapsed by the
ReplacingMergeTree keys (see deploy/clickhouse/schema.sql).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from operator import itemgetter
from datetime import datetime
from importlib.resources import files
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import clickhouse_connect
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import ClickHouseError, DatabaseError, DataError

from schemas.alerts import Alert
from schemas.canary import CanaryVerdict, VersionWindow
from schemas.control import KillSwitchCommand
from schemas.errors import StoreError, StoreRejected, StoreUnavailable
from schemas.events import Event
from schemas.redact import DEFAULT as REDACTOR
from sinks.base import BatchingSink, T

R = TypeVar("R")

DSN_KEY = "AGENTWATCH_CLICKHOUSE_DSN"
DATABASE = "agentwatch"
EVENTS_TABLE = f"{DATABASE}.events"
ALERTS_TABLE = f"{DATABASE}.alerts"
DLQ_TABLE = f"{DATABASE}.dlq"
KILLSWITCH_TABLE = f"{DATABASE}.killswitches"
VERSION_METRICS_TABLE = f"{DATABASE}.version_metrics"
CANARY_VERDICTS_TABLE = f"{DATABASE}.canary_verdicts"

# Columns are the models' fields, in the models' order: the schema mirrors the
# contracts one to one (tests/test_clickhouse_sink.py checks it), so a field
# added to Event without a column fails loudly there rather than silently here.
EVENT_COLUMNS: tuple[str, ...] = tuple(Event.model_fields)
ALERT_COLUMNS: tuple[str, ...] = tuple(Alert.model_fields)
VERSION_METRICS_COLUMNS: tuple[str, ...] = tuple(VersionWindow.model_fields)
CANARY_VERDICT_COLUMNS: tuple[str, ...] = tuple(CanaryVerdict.model_fields)
DLQ_COLUMNS: tuple[str, ...] = ("topic", "partition", "offset", "source", "reason", "raw", "received_at")
# the command's fields, with its target flattened into two columns analysts can filter on
KILLSWITCH_COLUMNS: tuple[str, ...] = (
    "command_id", "action", "target_kind", "target_value", "target_version", "scope", "reason", "alert_id",
    "issued_by", "issued_at", "expires_at", "nonce", "key_id", "signature",
)


@dataclass(frozen=True, slots=True)
class DlqRecord:
    """A record that could not be decoded: its original bytes and why.

    ``partition``/``offset`` are -1 when the record did not come from Kafka
    (a replayed file, an HTTP ingest).
    """

    topic: str
    partition: int
    offset: int
    source: str
    reason: str
    raw: bytes
    received_at: datetime


@dataclass(frozen=True, slots=True)
class QueryResult:
    columns: list[str]
    rows: list[tuple[Any, ...]]


# --- opening -----------------------------------------------------------------


def open_store(dsn: str) -> ClickHouseStore:
    """Open the store a DSN names (see the module doc for the forms)."""
    scheme = urlsplit(dsn).scheme.lower() if "://" in dsn else dsn.partition(":")[0]
    if scheme == "chdb":
        return _open_chdb(dsn)
    if scheme in ("http", "https"):
        return _open_server(dsn)
    raise StoreError(f"{DSN_KEY}: unsupported scheme {scheme!r} (use chdb:///path or http(s)://host:port)")


def _chdb_path(dsn: str) -> str:
    parts = urlsplit(dsn)
    path = parts.netloc + parts.path
    if not path or path in ("memory", ":memory:"):
        # an in-memory store would silently lose every event at exit
        raise StoreError(f"{DSN_KEY}: {dsn!r} names no directory (use chdb:///abs/path or chdb://relative/path)")
    return os.path.realpath(path)  # chdb compares engine paths literally


def _open_chdb(dsn: str) -> ClickHouseStore:
    path = _chdb_path(dsn)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"{DSN_KEY}: cannot create the chDB directory {path}: {exc.strerror}") from exc
    try:
        client = clickhouse_connect.get_client(interface="chdb", path=path, tz_mode="aware")
    except Exception as exc:  # chdb raises ProgrammingError, RuntimeError or ChdbError
        owner = _lock_owner(path)
        if owner is not None:
            raise StoreError(
                f"the embedded ClickHouse store at {path} is owned by another agentwatch process "
                f"(the worker{owner}); chDB opens a directory in one process only, so concurrent "
                f"use needs a ClickHouse server: set {DSN_KEY}=http://host:8123"
            ) from exc
        message = str(exc)
        match = re.search(r"already initialized with path '([^']*)'", message)
        if match:
            raise StoreError(
                f"cannot open the chDB store at {path}: this process already has the embedded store at "
                f"{match.group(1)} open, and chDB allows one directory per process (close it first)"
            ) from exc
        raise StoreError(f"cannot open the chDB store at {path}: {message}") from exc
    return ClickHouseStore(client, location=f"chdb://{path}")


def _lock_owner(path: str) -> str | None:
    """If another process holds the engine's lock on ``<path>/status``, describe it.

    ClickHouse takes ``flock(LOCK_EX | LOCK_NB)`` on the status file and writes
    its PID there. Called only after opening failed, so this process holds no
    engine on ``path`` and a conflicting lock belongs to someone else.
    """
    status = os.path.join(path, "status")
    try:
        fd = os.open(status, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                return None
            with open(status, encoding="utf-8", errors="replace") as fh:
                match = re.search(r"PID:\s*(\d+)", fh.read())
            return f", pid {match.group(1)}" if match else ""
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _open_server(dsn: str) -> ClickHouseStore:
    return ClickHouseStore(server_client(dsn, tz_mode="aware"), location=_redact(dsn))


def server_client(dsn: str, **options: Any) -> Client:
    """A clickhouse-connect HTTP client, or a one-line StoreError saying why there is none."""
    # the driver logs its own warning with a traceback before raising, and urllib3 one for the retry
    # of a refused connection: the error below says it in one line
    loggers = [logging.getLogger(name) for name in ("clickhouse_connect", "urllib3.connectionpool")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        return clickhouse_connect.get_client(dsn=dsn, **options)
    except Exception as exc:  # connection refused, auth, TLS ...
        raise StoreUnavailable(f"cannot connect to ClickHouse at {_redact(dsn)}: {_connect_problem(exc)}") from None
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)


def _connect_problem(exc: BaseException) -> str:
    """The socket-level cause (``Connection refused``) when there is one, else the driver's message."""
    match = re.search(r"\[Errno -?\d+\] ([^\"')\]]+)", str(exc))
    return match.group(1).strip() if match else _one_line(exc)


def _redact(dsn: str) -> str:
    """The DSN without its password, for error messages and logs."""
    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


@dataclass(frozen=True)
class Retention:
    """Days each kind of data is kept (0 = forever): AGENTWATCH_RETENTION_*_DAYS."""

    events_days: int = 90
    alerts_days: int = 365
    dlq_days: int = 30

    def rules(self) -> list[tuple[str, str, int]]:
        """(table, time column, days).

        Rows age from when they were stored, not from their event time: replaying last
        year's recordings into the store keeps them for the retention period instead of
        dropping them on arrival. The per-minute rollups carry only the minute.
        """
        return [
            ("events", "inserted_at", self.events_days),
            ("events_per_minute", "minute", self.events_days),
            ("alerts", "inserted_at", self.alerts_days),
            ("dlq", "received_at", self.dlq_days),
            ("dlq_per_minute", "minute", self.dlq_days),
        ]


def split_statements(sql: str) -> list[str]:
    """Split a DDL script on ';' after dropping ``--`` comment lines (the
    schema's convention: no ';' inside statements or comments)."""
    code = "\n".join(line for line in sql.splitlines() if not line.lstrip().startswith("--"))
    return [stmt.strip() for stmt in code.split(";") if stmt.strip()]


_DISTRIBUTED = re.compile(r"^Distributed\(\s*'([^']+)'\s*,\s*'?agentwatch'?\s*,\s*'?(\w+)'?")


def _distributed_over(engine_full: str) -> tuple[str, str] | None:
    """(cluster, local table) of a ``Distributed('{cluster}', agentwatch, X_local, ...)`` engine."""
    m = _DISTRIBUTED.match(engine_full)
    return (m.group(1), m.group(2)) if m else None


def default_schema() -> str:
    return files("deploy").joinpath("clickhouse/schema.sql").read_text(encoding="utf-8")


# --- the store -----------------------------------------------------------------


def _token(table: str, keys: Iterable[object]) -> str:
    """insert_deduplication_token for a batch: its rows' identities and versions.

    The table is part of it because the deduplication window is per table, and
    the token must differ whenever a row's content that matters differs (an
    alert with a higher count is an update, not a retry)."""
    h = hashlib.blake2b(table.encode(), digest_size=16)
    for key in keys:
        h.update(str(key).encode())
        h.update(b"\x1e")
    return h.hexdigest()


def _columns(records: Sequence[Any], names: Sequence[str]) -> list[list[Any]]:
    """Column-oriented data without a ``model_dump`` per row; StrEnum members insert as
    their strings. Records whose ``__dict__`` holds every column (the pydantic models)
    are transposed in C: one itemgetter call per row, then zip, instead of a getattr
    per value (the events table has ~45 columns, and a checkpoint thousands of rows)."""
    if records and all(name in getattr(records[0], "__dict__", ()) for name in names):
        get = itemgetter(*names)
        if len(names) == 1:
            return [[get(r.__dict__) for r in records]]
        return [list(col) for col in zip(*[get(r.__dict__) for r in records])]
    return [[getattr(r, name) for r in records] for name in names]


def _evidence(alert: Alert) -> list[tuple[Any, ...]]:
    return [(e.event_id, e.ts, e.trace_id, e.topic, e.partition, e.offset) for e in alert.evidence]


class ClickHouseStore:
    """Typed writes and plain SQL reads over one clickhouse-connect client.

    Every driver exception becomes a StoreError naming the table (or the
    query) and the problem.
    """

    def __init__(self, client: Client, *, location: str) -> None:
        self.client = client
        self.location = location

    def __repr__(self) -> str:
        return f"ClickHouseStore({self.location})"

    def apply_schema(self, sql: str | None = None) -> None:
        """Create the database, tables and views if missing (idempotent).

        Not on a cluster store (``agentwatch.events`` a Distributed table): its schema
        is deploy/clickhouse/cluster.sql, applied ON CLUSTER by its operator, and the
        single-node DDL would alter the Distributed tables, which refuse it (ADD INDEX)."""
        if sql is None and self._distributed("events") is not None:
            return
        for stmt in split_statements(default_schema() if sql is None else sql):
            head = " ".join(stmt.split()[:6])
            self._run(f"applying schema ({head} ...)", lambda: self.client.command(stmt))

    def warm_up(self) -> None:
        """Initialise the engine's insert path before the first real batch needs it.

        chDB's first client insert costs ~0.4 s (0.8 s on a loaded machine), whatever
        the table; paid by a fresh worker's first batch it delayed its first alert.
        One row into a table of the Null engine (which keeps nothing) pays it at start."""
        self._run("warming up inserts", lambda: self.client.command(
            "CREATE TABLE IF NOT EXISTS agentwatch.insert_warm_up (x UInt8) ENGINE = Null "
            "COMMENT 'keeps nothing: the worker inserts one row at start to initialise the insert path'"))
        self._run("warming up inserts", lambda: self.client.insert("insert_warm_up", [[1]], database="agentwatch",
                                                                   column_names=["x"]))

    def apply_retention(self, retention: Retention) -> None:
        """Set each table's TTL to the configured retention (0 days = keep forever).

        Only a changed TTL is altered, with materialize_ttl_after_modify off: a
        restart must not rewrite every part of a large table; old parts age out
        as they merge (``ALTER TABLE ... MATERIALIZE TTL`` forces it).
        """
        for table, column, days in retention.rules():
            engine = self._engine(table)
            if engine is None:
                continue
            target = f"agentwatch.{table}"
            if (dist := _distributed_over(engine)) is not None:
                # a cluster store: the rows and their TTL live in the local tables on every
                # shard (a Distributed table refuses a TTL), so the ALTER goes ON CLUSTER
                cluster, local = dist
                engine = self._engine(local)
                if engine is None:
                    continue
                target = f"agentwatch.{local} ON CLUSTER '{cluster}'"
            current = re.search(r"\bTTL\s+(.*?)(?:\s+SETTINGS\s|$)", engine)
            if days <= 0:
                if current:
                    self._run(f"removing the TTL of {table}",
                              lambda: self.client.command(f"ALTER TABLE {target} REMOVE TTL"))
                continue
            if current and f"toIntervalDay({days})" in current.group(1) and column in current.group(1):
                continue
            sql = f"ALTER TABLE {target} MODIFY TTL toDateTime({column}) + INTERVAL {days} DAY"
            self._run(f"setting the TTL of {table}", lambda: self.client.command(
                sql, settings={"materialize_ttl_after_modify": 0}))

    def _engine(self, table: str) -> str | None:
        """``engine_full`` of ``agentwatch.<table>``, None when there is no such table."""
        rows = self._run("reading table engines", lambda: self.client.query(
            "SELECT engine_full FROM system.tables WHERE database = 'agentwatch' AND name = {t:String}",
            parameters={"t": table})).result_rows
        return str(rows[0][0]) if rows else None

    def _distributed(self, table: str) -> tuple[str, str] | None:
        engine = self._engine(table)
        return None if engine is None else _distributed_over(engine)

    def insert_events(self, events: Sequence[Event]) -> None:
        if not events:
            return
        data = _columns(events, EVENT_COLUMNS)
        token = _token(EVENTS_TABLE, ((e.event_id, e.agent_id, e.tenant) for e in events))
        self._insert(EVENTS_TABLE, data, EVENT_COLUMNS, token, len(events))

    def insert_alerts(self, alerts: Sequence[Alert]) -> None:
        if not alerts:
            return
        data = _columns(alerts, ALERT_COLUMNS)
        data[ALERT_COLUMNS.index("evidence")] = [_evidence(a) for a in alerts]
        token = _token(ALERTS_TABLE, ((a.alert_id, a.last_seen.isoformat(), a.count) for a in alerts))
        self._insert(ALERTS_TABLE, data, ALERT_COLUMNS, token, len(alerts))

    def insert_dlq(self, rows: Sequence[DlqRecord]) -> None:
        if not rows:
            return
        data = _columns(rows, DLQ_COLUMNS)
        # the table is for people: its copy is redacted (the Kafka DLQ keeps the original bytes
        # for reprocessing); the dedup token below still hashes the original
        data[DLQ_COLUMNS.index("raw")] = [REDACTOR.raw(r.raw) for r in rows]
        data[DLQ_COLUMNS.index("reason")] = [REDACTOR.text(r.reason) for r in rows]
        token = _token(
            DLQ_TABLE,
            ((r.topic, r.partition, r.offset, r.reason, hashlib.blake2b(r.raw, digest_size=8).hexdigest()) for r in rows),
        )
        self._insert(DLQ_TABLE, data, DLQ_COLUMNS, token, len(rows))

    def insert_killswitches(self, commands: Sequence[KillSwitchCommand]) -> None:
        if not commands:
            return
        rows = [
            (c.command_id, c.action.value, c.target.kind.value, c.target.value, c.target.version, list(c.scope),
             c.reason,
             c.alert_id, c.issued_by, c.issued_at, c.expires_at, c.nonce, c.key_id, c.signature)
            for c in commands
        ]
        data = [list(col) for col in zip(*rows)]
        token = _token(KILLSWITCH_TABLE, (c.command_id for c in commands))
        self._insert(KILLSWITCH_TABLE, data, KILLSWITCH_COLUMNS, token, len(commands))

    def insert_version_metrics(self, windows: Sequence[VersionWindow]) -> None:
        if not windows:
            return
        data = _columns(windows, VERSION_METRICS_COLUMNS)
        token = _token(VERSION_METRICS_TABLE, ((w.tenant, w.agent_id, w.agent_version, w.window_start.isoformat(),
                                                w.actions, w.violations, w.tasks) for w in windows))
        self._insert(VERSION_METRICS_TABLE, data, VERSION_METRICS_COLUMNS, token, len(windows))

    def insert_canary_verdicts(self, verdicts: Sequence[CanaryVerdict]) -> None:
        if not verdicts:
            return
        data = _columns(verdicts, CANARY_VERDICT_COLUMNS)
        data[CANARY_VERDICT_COLUMNS.index("metrics")] = [
            [(m.metric, m.outcome, m.baseline, m.candidate, m.threshold, m.p_value, m.ci_low, m.ci_high)
             for m in v.metrics] for v in verdicts]
        token = _token(CANARY_VERDICTS_TABLE, (v.verdict_id for v in verdicts))
        self._insert(CANARY_VERDICTS_TABLE, data, CANARY_VERDICT_COLUMNS, token, len(verdicts))

    def query(
        self,
        sql: str,
        parameters: Mapping[str, Any] | None = None,
        *,
        bytes_columns: Sequence[str] = (),
    ) -> QueryResult:
        """Run a SELECT; ``bytes_columns`` are returned as bytes, not text."""
        formats = {name: "bytes" for name in bytes_columns} or None
        result = self._run(
            f"query failed ({' '.join(sql.split())[:120]})",
            lambda: self.client.query(sql, parameters=dict(parameters or {}), column_formats=formats),
        )
        columns = list(result.column_names)
        if not columns and not result.result_rows:
            columns = self._describe(sql, parameters)
        return QueryResult(columns=columns, rows=[tuple(row) for row in result.result_rows])

    def _describe(self, sql: str, parameters: Mapping[str, Any] | None) -> list[str]:
        """Column names of a query that returned no rows: chDB's driver reports none then,
        and a header-less empty result reads as "the query printed nothing"."""
        try:
            described = self._run("describe failed", lambda: self.client.query(
                f"DESCRIBE ({sql})", parameters=dict(parameters or {})))
        except StoreError:  # not a SELECT (SHOW, EXPLAIN ...): no header then
            return []
        return [str(row[0]) for row in described.result_rows]

    def command(self, sql: str, parameters: Mapping[str, Any] | None = None) -> None:
        """Run a statement that returns no rows (OPTIMIZE, ALTER, SYSTEM ...)."""
        self._run(
            f"command failed ({' '.join(sql.split())[:120]})",
            lambda: self.client.command(sql, parameters=dict(parameters or {})),
        )

    def close(self) -> None:
        """Release the client (for chDB: the engine and its directory lock)."""
        self._run("closing the store", self.client.close)

    def __enter__(self) -> ClickHouseStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _insert(self, table: str, data: list[list[Any]], columns: Sequence[str], token: str, rows: int) -> None:
        self._run(
            f"inserting {rows} rows into {table}",
            lambda: self.client.insert(
                table,
                data,
                column_names=list(columns),
                column_oriented=True,
                settings={"insert_deduplication_token": token},
            ),
        )

    def _run(self, what: str, call: Callable[[], R]) -> R:
        try:
            return call()
        except StoreError:
            raise
        except (ClickHouseError, RuntimeError, OSError, ValueError, TypeError, OverflowError) as exc:
            # RuntimeError: chdb's own errors; ValueError/TypeError: a value
            # the driver could not serialise into the column type
            kind = StoreRejected if rejects_data(exc) else StoreUnavailable
            raise kind(f"ClickHouse at {self.location}: {what}: {_one_line(exc)}") from exc


# Server error codes that mean "these rows can never be inserted as they are"
# (ClickHouse src/Common/ErrorCodes.cpp): parse and conversion failures, values
# out of a type's range. Anything else (network, memory, too many parts, a
# timeout) may succeed later and is retried.
_DATA_ERROR_CODES = frozenset({
    6,    # CANNOT_PARSE_TEXT
    27,   # CANNOT_PARSE_INPUT_ASSERTION_FAILED
    38,   # CANNOT_PARSE_DATE
    41,   # CANNOT_PARSE_DATETIME
    53,   # TYPE_MISMATCH
    69,   # ARGUMENT_OUT_OF_BOUND
    70,   # CANNOT_CONVERT_TYPE
    72,   # CANNOT_PARSE_NUMBER
    117,  # INCORRECT_DATA
    131,  # TOO_LARGE_STRING_SIZE
    321,  # VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE
    407,  # DECIMAL_OVERFLOW
})
_TOO_MANY_PARTS = 252  # both "too many parts" (back off) and "too many partitions for one block" (bad data)


def rejects_data(exc: BaseException) -> bool:
    """Whether a driver error says the rows themselves are unacceptable (permanent)
    rather than the store being unavailable (transient). A rejected batch is split
    to find the offending rows; an unavailable store is retried with backoff."""
    if isinstance(exc, (DataError, ValueError, TypeError, OverflowError)):
        # client side: a value the driver could not serialise into the column type
        return True
    code = getattr(exc, "code", None)
    if code is None and isinstance(exc, (DatabaseError, RuntimeError)):
        match = re.search(r"Code: (\d+)\.", str(exc))
        code = int(match.group(1)) if match else None
    if code == _TOO_MANY_PARTS:
        return "partitions for single INSERT block" in str(exc)
    return code in _DATA_ERROR_CODES


def _one_line(exc: BaseException) -> str:
    """The driver's message on one line (server errors span several), bounded."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 600 else text[:600] + " ..."


# --- sinks ---------------------------------------------------------------------


class _StoreSink(BatchingSink[T]):
    """A BatchingSink whose ``write`` is one insert into the store."""

    def __init__(self, store: ClickHouseStore, *, max_batch: int = 50_000) -> None:
        super().__init__(max_batch=max_batch)
        self.store = store


class EventSink(_StoreSink[Event]):
    name = EVENTS_TABLE

    def write(self, batch: Sequence[Event]) -> None:
        self.store.insert_events(batch)


class AlertSink(_StoreSink[Alert]):
    name = ALERTS_TABLE

    def write(self, batch: Sequence[Alert]) -> None:
        self.store.insert_alerts(batch)


class DlqSink(_StoreSink[DlqRecord]):
    name = DLQ_TABLE

    def write(self, batch: Sequence[DlqRecord]) -> None:
        self.store.insert_dlq(batch)


class KillSwitchSink(_StoreSink[KillSwitchCommand]):
    name = KILLSWITCH_TABLE

    def write(self, batch: Sequence[KillSwitchCommand]) -> None:
        self.store.insert_killswitches(batch)


class VersionMetricsSink(_StoreSink[VersionWindow]):
    name = VERSION_METRICS_TABLE

    def write(self, batch: Sequence[VersionWindow]) -> None:
        self.store.insert_version_metrics(batch)


class CanaryVerdictSink(_StoreSink[CanaryVerdict]):
    name = CANARY_VERDICTS_TABLE

    def write(self, batch: Sequence[CanaryVerdict]) -> None:
        self.store.insert_canary_verdicts(batch)
