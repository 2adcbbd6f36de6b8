"""PostgreSQL server logs holding pgaudit records, as servers really write them.

Two log formats:

* ``jsonlog`` (PostgreSQL 15+, ``log_destination = 'jsonlog'``): one JSON object
  per record, every prefix field a key, the ERROR's statement inside the same
  object, multi-line SQL intact. The recommended format: nothing to configure,
  nothing to stitch.
* ``stderr``/``csvlog``-less text: each record starts with ``log_line_prefix``
  (a setting: PostgreSQL's ``%m [%p] ``, Debian's ``%m [%p] %q%u@%d ``, RDS's
  ``%t:%r:%u@%d:[%p]:``, Cloud SQL's, pgBadger's ...; the default tries each
  known one), continuation lines of a multi-line statement start with a TAB, and
  an ERROR is followed by its DETAIL/HINT/CONTEXT/STATEMENT records.

What becomes an event: an ``AUDIT:`` record (outcome allow: pgaudit logs what
ran), an ERROR (deny for missing privileges, else error; its STATEMENT carries
the trace comment) and a FATAL authentication failure (deny). Every other server
record (connections, checkpoints, startup, reloads ...) is *skipped*: counted in
``DecodeResult.skipped``, never a failure. Connection lines are still read: with
a prefix that has no ``%u`` (PostgreSQL's default) the ``connection authorized:
user=…`` line of a backend is what names the principal of its AUDIT records.

Records that arrive in pieces (a shipper sending one line per Kafka message, or
an ERROR and its STATEMENT as two messages) are put back together by
:class:`PgStitcher`, a small per-stream buffer that holds the one open record of
each stream until the next record starts or a short time bound passes.

Times: ``%m``/``%t`` print the time in ``log_timezone`` with a zone abbreviation
(``CET``, ``EST``). Abbreviations other than UTC/GMT are resolved with the
configured IANA zone (``log_timezone``), checked against the abbreviation that
zone uses at that instant, or the record is rejected with the reason: never
read as UTC.

Tables: under pgaudit's default ``log_relation = off`` the OBJECT_NAME field is
empty for session audit, so the tables come from parsing the statement (sqlglot,
PostgreSQL dialect): ``resource`` is ``schema.table`` (``public`` when the SQL does
not qualify it; the search_path is not in the log), every table in
``attributes["pg.tables"]``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import re
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from typing import Any
from urllib.parse import unquote
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson
import sqlglot
from sqlglot import exp

from schemas.decoders import DecodeResult
from schemas.decoders.audit_base import (
    CORR_PG_PID,
    CORR_PG_SESSION_ID,
    CORR_PG_STATEMENT_ID,
    CORR_TOOL_CALL_ID,
    SOURCE_PGAUDIT,
    _audit_event,
    _compact,
    _Ctx,
    _failure,
    _guarded,
    _str,
    find_traceparent,
)
from schemas.errors import DecodeError
from schemas.events import Event, stable_id

# sqlglot warns on every statement it only partly understands (CREATE ROLE ...): statements are
# input data here, and the fallback (no tables) is handled, so its warnings are noise
logging.getLogger("sqlglot").setLevel(logging.ERROR)

# --------------------------------------------------------------------------- prefixes

# Known log_line_prefix values, by name (AGENTWATCH_PG_LOG_LINE_PREFIX takes a name or the value).
PG_PREFIX_PRESETS: dict[str, str] = {
    "debian": "%m [%p] %q%u@%d ",  # Debian/Ubuntu packages' postgresql.conf
    "rds": "%t:%r:%u@%d:[%p]:",  # Amazon RDS / Aurora PostgreSQL
    "cloudsql": "%m [%p]: [%l-1] db=%d,user=%u ",  # Google Cloud SQL
    "pgbadger": "%t [%p]: user=%u,db=%d,app=%a,client=%h ",  # pgBadger's recommended prefix
    "postgres": "%m [%p] ",  # PostgreSQL's own default
}
AUTO_PREFIX = "auto"  # try every preset, most specific first
DEFAULT_PG_LOG_LINE_PREFIX = PG_PREFIX_PRESETS["debian"]

# log_line_prefix escapes -> regex. Text fields are lazy so the literal text
# around them (" ", "@", "[") decides where they end.
_PG_TS = r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}(?:\.\d+)?(?: [A-Za-z][A-Za-z0-9/_+-]*|[+-]\d{2}(?::?\d{2})?| [+-]\d{2}(?::?\d{2})?)?"
_PG_ESCAPES: dict[str, tuple[str, str]] = {
    "m": ("ts", _PG_TS),
    "t": ("ts", _PG_TS),
    "n": ("epoch", r"\d+(?:\.\d+)?"),
    "p": ("pid", r"\d+"),
    "u": ("user", r".*?"),
    "d": ("db", r".*?"),
    "a": ("app", r".*?"),
    "h": ("host", r".*?"),
    "r": ("remote", r".*?"),
    "c": ("session", r"[0-9a-f]+\.[0-9a-f]+"),
    "l": ("line", r"\d+"),
    "s": ("session_start", _PG_TS),
    "v": ("vxid", r"[-\d/]*"),
    "x": ("xid", r"\d*"),
    "e": ("sqlstate", r"[0-9A-Z]{5}"),
    "i": ("tag", r".*?"),
    "b": ("backend", r".*?"),
    "Q": ("query_id", r"-?\d+"),
    "L": ("local", r".*?"),
    "P": ("leader", r"\d*"),
}
_SEVERITIES = "DEBUG[1-5]?|INFO|NOTICE|WARNING|ERROR|LOG|FATAL|PANIC|STATEMENT|DETAIL|HINT|CONTEXT|QUERY|LOCATION"
_PG_SEVERITY = rf"(?P<severity>{_SEVERITIES}):\s+"
_PG_BARE = re.compile(_PG_SEVERITY + r"(?P<message>.*)\Z", re.S)
# a record head of any prefix: a timestamp early on, then "SEVERITY:  " (two spaces, as the server writes)
_PG_LOOSE = re.compile(r"^\S.{0,200}?\b(?:" + _SEVERITIES + r"):  \S")


@lru_cache(maxsize=32)  # called per record with the same setting
def pg_prefix_regex(log_line_prefix: str = DEFAULT_PG_LOG_LINE_PREFIX) -> re.Pattern[str]:
    """A regex for whole PostgreSQL log records written with ``log_line_prefix``.

    Takes the server's own setting (``SHOW log_line_prefix``) so operators do
    not write regexes; groups: ts/epoch, pid, user, db, app, host, session ...,
    severity and message. ``%q`` only matters for non-session processes, whose
    lines then stop at the ``%q``: what follows it is optional.
    """
    out, seen, i, optional = ["^"], set(), 0, False
    while i < len(log_line_prefix):
        ch = log_line_prefix[i]
        if ch == "%" and i + 1 < len(log_line_prefix):
            i += 1
            esc = log_line_prefix[i]
            while (esc.isdigit() or esc == "-") and i + 1 < len(log_line_prefix):  # padding such as %-10u
                i += 1
                esc = log_line_prefix[i]
            if esc == "%":
                out.append("%")
            elif esc == "q":
                out.append("(?:")
                optional = True
            elif esc in _PG_ESCAPES:
                group, pattern = _PG_ESCAPES[esc]
                out.append(f"(?P<{group}>{pattern})" if group not in seen else f"(?:{pattern})")
                seen.add(group)
        else:
            out.append(re.escape(ch))
        i += 1
    if optional:
        out.append(")?")
    return re.compile("".join(out) + r"\s*" + _PG_SEVERITY + r"(?P<message>.*)\Z", re.S)


def resolve_prefix(setting: str) -> tuple[re.Pattern[str], ...]:
    """The regexes to try for a prefix setting: a preset name, a literal
    log_line_prefix, or ``auto``/empty for every preset."""
    setting = setting if setting.strip() else AUTO_PREFIX
    if setting == AUTO_PREFIX:
        return tuple(pg_prefix_regex(p) for p in PG_PREFIX_PRESETS.values())
    return (pg_prefix_regex(PG_PREFIX_PRESETS.get(setting, setting)),)


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True, slots=True)
class PgLogConfig:
    """How the server writes its log (the server's own settings, told to agentwatch)."""

    log_line_prefix: str = AUTO_PREFIX
    log_timezone: str = ""  # IANA name; "" = only UTC/GMT/numeric offsets are accepted
    stitch_s: float = 2.0  # longest wall-clock wait for the rest of a record sent in pieces

    @property
    def lines(self) -> tuple[re.Pattern[str], ...]:
        return resolve_prefix(self.log_line_prefix)

    @property
    def zone(self) -> ZoneInfo | None:
        return _zone(self.log_timezone)


@lru_cache(maxsize=16)
def _zone(name: str) -> ZoneInfo | None:
    if not name:
        return None
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"{name!r} is not an IANA time zone name (e.g. Europe/Berlin, America/New_York)") from None


def check_timezone(name: str) -> str:
    """Validate a log_timezone setting (raises ValueError naming the problem)."""
    _zone(name)
    return name


# --------------------------------------------------------------------------- records

_PG_AUDIT_FIELDS = ("audit_type", "statement_id", "substatement_id", "class", "command", "object_type", "object_name")
_PG_ERROR_SEVERITIES = frozenset({"ERROR", "FATAL", "PANIC"})
_PG_FOLLOWERS = frozenset({"STATEMENT", "DETAIL", "HINT", "CONTEXT", "QUERY", "LOCATION"})
_PG_DENIED = re.compile(
    r"permission denied for (?:table|relation|view|sequence|schema|database|function|column|materialized view) (\S+)"
)
# FATAL records that are access decisions (a login refused), not server trouble
_PG_AUTH_FAILURES = ("password authentication failed", "no pg_hba.conf entry", "permission denied for database",
                     "role \"", "pg_hba.conf rejects connection", "certificate authentication failed")
_PG_CURSOR = re.compile(r"\s+at character \d+\Z")  # stderr appends the error position to the message
_SQL_COMMENT = re.compile(r"/\*(.*?)\*/", re.S)
_SQLCOMMENTER_PAIR = re.compile(r"([\w.-]+)\s*=\s*'([^']*)'")
_SQL_VERB = re.compile(r"^\s*(?:/\*.*?\*/\s*)*([A-Za-z]+(?: TABLE| INDEX| VIEW| ROLE| SCHEMA| FUNCTION)?)", re.S)
_CONN_AUTHORIZED = re.compile(r"connection authorized: user=(\S+)(?: database=(\S+))?(?: application_name=(.*))?")


@dataclass(slots=True)
class _PgRecord:
    """One log record: its fields from the prefix, severity, message, and follower records."""

    raw: str
    fields: dict[str, str]
    severity: str
    message: str
    statement: str = ""  # the STATEMENT record that followed an ERROR
    detail: str = ""

    @property
    def is_audit(self) -> bool:
        return self.message.startswith("AUDIT:")


def _parse_head(text: str, lines: tuple[re.Pattern[str], ...]) -> _PgRecord | None:
    """The record a physical line starts, or None when it starts none (a continuation)."""
    for line in lines:
        m = line.match(text)
        if m:
            groups = {k: v for k, v in m.groupdict().items() if v is not None and k not in ("severity", "message")}
            return _PgRecord(text, groups, m.group("severity"), m.group("message"))
    if text.startswith("AUDIT:"):  # prefixless, as pgaudit's README shows it
        return _PgRecord(text, {}, "LOG", text)
    m = _PG_BARE.match(text)
    return _PgRecord(text, {}, m.group("severity"), m.group("message")) if m else None


def _continue(rec: _PgRecord, physical: str) -> None:
    # the server writes continuation lines of a multi-line message with a leading TAB
    rec.raw += "\n" + physical
    rec.message += "\n" + physical.removeprefix("\t")


def _is_follower_of(rec: _PgRecord, prev: _PgRecord | None) -> bool:
    return (
        prev is not None
        and rec.severity in _PG_FOLLOWERS
        and prev.severity in _PG_ERROR_SEVERITIES
        and prev.fields.get("pid") == rec.fields.get("pid")
    )


def _follow(prev: _PgRecord, rec: _PgRecord) -> None:
    """Fold a STATEMENT/DETAIL/... record into the ERROR it explains."""
    if rec.severity == "STATEMENT":
        prev.statement = rec.message
    elif rec.severity == "DETAIL":
        prev.detail = rec.message
    prev.raw += "\n" + rec.raw


def _audit_complete(rec: _PgRecord) -> bool:
    """An AUDIT record is complete once its CSV is: every quoted field closed and
    the PARAMETER field present (pgaudit always writes it, ``<not logged>`` at least)."""
    text = rec.message[len("AUDIT:") :]
    if text.count('"') % 2:
        return False
    row = next(csv.reader(io.StringIO(text.lstrip(), newline="")), [])
    return len(row) >= len(_PG_AUDIT_FIELDS) + 2 or (len(row) > len(_PG_AUDIT_FIELDS) and "<previously logged>" in row)


# --------------------------------------------------------------------------- sessions


class PgSessions:
    """pid -> (user, database, application) of the server's backends, from their
    ``connection authorized`` records, for prefixes without ``%u``/``%d``.

    Bounded (oldest forgotten first); a ``disconnection`` record ends a session.
    """

    def __init__(self, max_sessions: int = 10_000) -> None:
        self.max_sessions = max_sessions
        self._by_pid: OrderedDict[str, tuple[str, str, str]] = OrderedDict()

    def observe(self, rec: _PgRecord) -> None:
        pid = rec.fields.get("pid")
        if not pid or rec.severity != "LOG":
            return
        m = _CONN_AUTHORIZED.match(rec.message)
        if m:
            self._by_pid[pid] = (m.group(1), m.group(2) or "", (m.group(3) or "").strip())
            self._by_pid.move_to_end(pid)
            while len(self._by_pid) > self.max_sessions:
                self._by_pid.popitem(last=False)
        elif rec.message.startswith("disconnection:"):
            self._by_pid.pop(pid, None)

    def fill(self, rec: _PgRecord) -> None:
        pid = rec.fields.get("pid")
        known = self._by_pid.get(pid) if pid else None
        if known is None:
            return
        for key, value in zip(("user", "db", "app"), known):
            if value and not rec.fields.get(key):
                rec.fields[key] = value

    def __len__(self) -> int:
        return len(self._by_pid)


# --------------------------------------------------------------------------- time


_ZONE = re.compile(r"(\S+ [\d:.]+)\s*(.*)$")
_OFFSET = re.compile(r"([+-])(\d{2}):?(\d{2})?")
_UTC_NAMES = frozenset({"", "UTC", "GMT", "Z", "UCT"})


def _pg_ts(fields: Mapping[str, str], zone: ZoneInfo | None) -> datetime | None:
    """Time from %m/%t (resolved in log_timezone) or %n; None when the prefix has none."""
    if fields.get("epoch"):
        return datetime.fromtimestamp(float(fields["epoch"]), tz=timezone.utc)
    text = fields.get("ts") or ""
    if not text:
        return None
    m = _ZONE.match(text)
    if not m:
        raise DecodeError(f"pgaudit: timestamp {text!r} is not 'YYYY-MM-DD HH:MM:SS[.fff] ZONE'")
    naive = datetime.fromisoformat(m.group(1))
    abbrev = m.group(2)
    offset = _OFFSET.fullmatch(abbrev)
    if offset:  # zones without an abbreviation print their offset (+04, -0330)
        sign = -1 if offset.group(1) == "-" else 1
        delta = timedelta(hours=int(offset.group(2)), minutes=int(offset.group(3) or 0))
        return naive.replace(tzinfo=timezone.utc) - sign * delta
    if abbrev in _UTC_NAMES:
        return naive.replace(tzinfo=timezone.utc)
    if zone is None:
        raise DecodeError(
            f"pgaudit: timestamp {text!r} is in zone {abbrev!r}; set AGENTWATCH_PG_LOG_TIMEZONE to the server's "
            "log_timezone (an IANA name such as Europe/Berlin) so it is not misread as UTC"
        )
    # an abbreviation names the side of a DST change: it picks the fold of an ambiguous hour
    for fold in (0, 1):
        local = naive.replace(tzinfo=zone, fold=fold)
        if local.tzname() == abbrev:
            return local.astimezone(timezone.utc)
    raise DecodeError(
        f"pgaudit: timestamp {text!r}: zone {abbrev!r} is not what log_timezone {zone.key} uses at that time "
        f"({naive.replace(tzinfo=zone).tzname()}); is AGENTWATCH_PG_LOG_TIMEZONE the server's log_timezone?"
    )


# --------------------------------------------------------------------------- SQL


def _sqlcommenter(statement: str) -> dict[str, str]:
    """key='value' pairs of SQL comments (sqlcommenter style, values URL-encoded)."""
    pairs: dict[str, str] = {}
    for comment in _SQL_COMMENT.findall(statement):
        for key, value in _SQLCOMMENTER_PAIR.findall(comment):
            pairs[key] = unquote(value)
    return pairs


def _pg_statement_context(statement: str) -> tuple[str, str, str, dict[str, str]]:
    """(trace_id, span_id, tool_call_id, sqlcommenter attributes) carried by a statement."""
    comment = _sqlcommenter(statement)
    trace = find_traceparent(comment.get("traceparent", "")) or find_traceparent(
        " ".join(_SQL_COMMENT.findall(statement))
    )
    tool_call_id = comment.get(CORR_TOOL_CALL_ID) or comment.get("tool_call_id", "")
    attrs = {f"sqlcommenter.{k}": v for k, v in comment.items() if k not in ("traceparent", "tracestate")}
    return (*(trace or ("", "")), tool_call_id, attrs)


_WRITES = (exp.Insert, exp.Update, exp.Delete, exp.Merge)


# comments, string literals and numbers: what differs between runs of one statement shape
_SQL_VARIABLE = re.compile(r"/\*.*?\*/|--[^\n]*|'(?:[^']|'')*'|(?<![\w$])\d+(?:\.\d+)?(?![\w.])", re.S)


def _shape(statement: str) -> str:
    def blank(m: re.Match[str]) -> str:
        text = m.group(0)
        return " " if text.startswith(("/*", "--")) else "''" if text.startswith("'") else "0"

    return " ".join(_SQL_VARIABLE.sub(blank, statement).split())


def sql_tables(statement: str) -> tuple[str, ...]:
    """``schema.table`` of every table a statement touches, the written one first.

    CTE names are not tables; an unqualified name is taken as ``public`` (the log
    does not say the session's search_path). Empty when the SQL does not parse.
    Parsed once per statement shape (literals and comments left out): an agent's
    statements differ in their values and trace comments, not in their tables.
    """
    return _shape_tables(_shape(statement))


@lru_cache(maxsize=4096)
def _shape_tables(statement: str) -> tuple[str, ...]:
    try:
        trees = [t for t in sqlglot.parse(statement, read="postgres") if t is not None]
    except (sqlglot.errors.SqlglotError, RecursionError, ValueError):
        return ()
    ctes = {cte.alias_or_name for tree in trees for cte in tree.find_all(exp.CTE)}
    first: list[str] = []
    rest: list[str] = []
    for tree in trees:
        targets = {id(w.find(exp.Table)) for w in tree.find_all(*_WRITES)}
        for table in tree.find_all(exp.Table):
            name = table.name
            if not name or (not table.db and name in ctes):
                continue
            qualified = f"{table.db or 'public'}.{name}"
            (first if id(table) in targets else rest).append(qualified)
    return tuple(dict.fromkeys(first + rest))


def _parse_pgaudit_csv(text: str) -> dict[str, str]:
    """The AUDIT CSV: 7 fixed fields, then STATEMENT, PARAMETER and (log_rows) ROWS.

    pgaudit quotes a field only when it holds a comma, quote or newline, doubling
    inner quotes: exactly what the csv module reads, embedded newlines included.
    """
    if text.count('"') % 2:
        raise DecodeError("pgaudit: AUDIT record ends inside a quoted field (the rest of a multi-line record is missing)")
    row = next(csv.reader(io.StringIO(text, newline="")), [])
    if len(row) < len(_PG_AUDIT_FIELDS):
        raise DecodeError(
            f"pgaudit: AUDIT record has {len(row)} fields, expected at least 7 "
            "(AUDIT_TYPE,STATEMENT_ID,SUBSTATEMENT_ID,CLASS,COMMAND,OBJECT_TYPE,OBJECT_NAME)"
        )
    fields = dict(zip(_PG_AUDIT_FIELDS, row))
    if fields["audit_type"] not in ("SESSION", "OBJECT"):
        raise DecodeError(f"pgaudit: AUDIT_TYPE is {fields['audit_type']!r}, expected SESSION or OBJECT")
    for key in ("statement_id", "substatement_id"):
        if not fields[key].isdigit():
            raise DecodeError(f"pgaudit: {key.upper()} is {fields[key]!r}, expected an integer")
    if not fields["command"]:
        raise DecodeError("pgaudit: COMMAND field is empty")
    rest = row[len(_PG_AUDIT_FIELDS) :]
    fields["statement"] = rest[0] if rest else ""
    fields["parameter"] = rest[1] if len(rest) > 1 else ""
    fields["rows"] = rest[2] if len(rest) > 2 else ""
    return fields


# --------------------------------------------------------------------------- events


def _pg_common(rec: _PgRecord, zone: ZoneInfo | None, received_at: datetime | None) -> dict[str, Any]:
    """Event fields every pg record shares: principal, time, correlation from the prefix."""
    ts = _pg_ts(rec.fields, zone)
    if ts is None:
        if received_at is None:
            raise DecodeError("pgaudit: record has no timestamp (log_line_prefix without %m/%t/%n) and no receive time")
        ts = received_at
    user = rec.fields.get("user", "")
    return {
        "ts": ts,
        "principal": "" if user == "[unknown]" else user,
        "correlation": _compact(
            [(CORR_PG_PID, rec.fields.get("pid")), (CORR_PG_SESSION_ID, rec.fields.get("session"))]
        ),
        "attributes": _compact(
            [
                ("pg.database", rec.fields.get("db")),
                ("pg.application", rec.fields.get("app")),
                ("pg.client", rec.fields.get("host") or rec.fields.get("remote")),
                ("pg.severity", rec.severity),
                ("ts_source", "received" if not (rec.fields.get("ts") or rec.fields.get("epoch")) else ""),
            ]
        ),
    }


def _line_hash(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def _pg_audit_event(rec: _PgRecord, ctx: _Ctx, zone: ZoneInfo | None, received_at: datetime | None) -> Event:
    audit = _parse_pgaudit_csv(rec.message[len("AUDIT:") :].lstrip())
    common = _pg_common(rec, zone, received_at)
    trace_id, span_id, tool_call_id, comment_attrs = _pg_statement_context(audit["statement"])
    # OBJECT_NAME when pgaudit names the relation (object audit, log_relation=on); else the SQL's tables
    tables = sql_tables(audit["statement"]) if audit["statement"] and not audit["object_name"] else ()
    resource = audit["object_name"] or (tables[0] if tables else "") or audit["object_type"] or audit["class"]
    correlation = common["correlation"] | _compact(
        [(CORR_PG_STATEMENT_ID, f"{audit['statement_id']}.{audit['substatement_id']}"), (CORR_TOOL_CALL_ID, tool_call_id)]
    )
    attributes = common["attributes"] | comment_attrs | _compact(
        [
            ("pg.audit_type", audit["audit_type"]),
            ("pg.class", audit["class"]),
            ("pg.object_type", audit["object_type"]),
            ("pg.tables", ",".join(tables)),
            ("pg.rows", audit["rows"]),
            ("pg.parameter", audit["parameter"] if audit["parameter"] not in ("<not logged>", "<none>") else ""),
            ("statement", audit["statement"][:2048]),
        ]
    )
    return _audit_event(
        ctx,
        SOURCE_PGAUDIT,
        event_id=stable_pg_id(audit["statement_id"], audit["substatement_id"], rec.raw),
        ts=common["ts"],
        name=audit["command"],
        principal=common["principal"],
        action=audit["command"],
        resource=resource,
        # pgaudit logs statements it let run; a record at error severity is the exception
        outcome="error" if rec.severity in _PG_ERROR_SEVERITIES else "allow",
        trace_id=trace_id,
        span_id=span_id,
        tool_call_id=tool_call_id,
        correlation=correlation,
        attributes=attributes,
    )


def stable_pg_id(*parts: str) -> str:
    """Statement ids are per backend: the hash of the record's text (time, pid, message) makes them global."""
    return stable_id(SOURCE_PGAUDIT, *parts[:-1], _line_hash(parts[-1]))


def _pg_error_event(rec: _PgRecord, ctx: _Ctx, zone: ZoneInfo | None, received_at: datetime | None) -> Event:
    """A statement PostgreSQL refused (ERROR + its STATEMENT): deny for missing privilege."""
    common = _pg_common(rec, zone, received_at)
    message = _PG_CURSOR.sub("", rec.message)
    denied = _PG_DENIED.search(message)
    verb = _SQL_VERB.match(rec.statement)
    trace_id, span_id, tool_call_id, comment_attrs = _pg_statement_context(rec.statement)
    denial = bool(denied) or message.startswith(("permission denied", "must be owner")) or (
        rec.severity == "FATAL" and message.startswith(_PG_AUTH_FAILURES))
    tables = sql_tables(rec.statement) if rec.statement else ()
    named = denied.group(1).strip('"') if denied else ""
    # the statement's table the denial names (it names the bare table, or only its schema)
    resource = next((t for t in tables if named and named in (t, t.split(".", 1)[1], t.split(".", 1)[0])), "")
    resource = resource or (tables[0] if tables else named)
    action = verb.group(1).upper() if verb else ("CONNECT" if rec.severity == "FATAL" else rec.severity)
    return _audit_event(
        ctx,
        SOURCE_PGAUDIT,
        event_id=stable_pg_id("error", rec.raw),
        ts=common["ts"],
        name=message[:200],
        principal=common["principal"],
        action=action,
        resource=resource or common["attributes"].get("pg.database", ""),
        outcome="deny" if denial else "error",
        error_type=rec.fields.get("sqlstate", ""),
        trace_id=trace_id,
        span_id=span_id,
        tool_call_id=tool_call_id,
        correlation=common["correlation"] | _compact([(CORR_TOOL_CALL_ID, tool_call_id)]),
        attributes=common["attributes"] | comment_attrs | _compact(
            [("error", message), ("pg.detail", rec.detail), ("pg.tables", ",".join(tables)),
             ("statement", rec.statement[:2048])]),
    )


def _wanted(rec: _PgRecord) -> bool:
    """Does this record become an event (else it is a skipped server record)?"""
    if rec.is_audit:
        return True
    if rec.severity == "ERROR":
        # background processes' errors (autovacuum, replication) name no statement and no user
        return bool(rec.statement or rec.fields.get("user"))
    return rec.severity == "FATAL" and rec.message.startswith(_PG_AUTH_FAILURES)


def _decode_record(rec: _PgRecord | str, ctx: _Ctx, cfg: PgLogConfig, received_at: datetime | None) -> DecodeResult:
    if isinstance(rec, str):
        return _failure(
            rec.encode(), "pgaudit: text that starts no PostgreSQL log record (does AGENTWATCH_PG_LOG_LINE_PREFIX "
            "match the server's log_line_prefix?) and continues none", SOURCE_PGAUDIT)
    if not _wanted(rec):
        return DecodeResult(skipped=1)
    raw = rec.raw.encode()
    build = _pg_audit_event if rec.is_audit else _pg_error_event
    return _guarded(raw, SOURCE_PGAUDIT, lambda: [build(rec, ctx, cfg.zone, received_at)])


# --------------------------------------------------------------------------- stitching


# a Kafka message's headers, carried opaque with the record it started (identity headers)
Headers = tuple[tuple[str, bytes], ...]


@dataclass(slots=True)
class _Stream:
    open: _PgRecord | None = None  # the record that may still get continuation or follower lines
    open_offset: int = -1
    open_ctx: _Ctx | None = None
    open_received_at: datetime | None = None
    open_headers: Headers = ()
    deadline: float = 0.0
    # the last record was finished or skipped: stray continuation lines belong to it
    absorbing: bool = False


@dataclass(slots=True)
class Stitched:
    """A decoded record, and the offset and Kafka headers of the message it started in."""

    result: DecodeResult
    offset: int
    headers: Headers = ()


class PgStitcher:
    """Puts PostgreSQL text records sent in pieces back together, per stream.

    A stream is one sequence of log lines (a Kafka partition, and the message
    key the shipper uses for a server or file). Each stream holds at most one
    open record: it is decoded when the next record starts, when its shape says
    it is complete (an AUDIT record whose CSV is closed), or when ``flush`` finds
    it older than ``stitch_s``. The pid -> user map of connection records lives
    here too. State is this small on purpose: ``open_offsets`` tells the caller
    which messages an open record still needs, so it keeps them uncommitted and a
    restarted worker reads them again; only the session map is lost at a restart,
    and it refills as backends connect.
    """

    def __init__(self, cfg: PgLogConfig, *, max_streams: int = 4096) -> None:
        self.cfg = cfg
        self.lines = cfg.lines
        self.max_streams = max_streams
        self._streams: OrderedDict[Hashable, _Stream] = OrderedDict()
        self.sessions = PgSessions()

    def feed(self, stream: Hashable, text: str, *, offset: int, origin: str, tenant: str, wall: float,
             received_at: datetime | None = None, headers: Headers = ()) -> list[Stitched]:
        st = self._streams.get(stream)
        if st is None:
            st = self._streams[stream] = _Stream()
            while len(self._streams) > self.max_streams:
                _, old = self._streams.popitem(last=False)
                old.open = None  # an evicted stream's open record is decoded by nobody: rare, bounded
        self._streams.move_to_end(stream)
        ctx = _Ctx(origin, tenant)
        out: list[Stitched] = []
        stray: list[str] = []
        for physical in text.splitlines():
            rec = _parse_head(physical, self.lines)
            if rec is None:
                if st.open is not None:
                    _continue(st.open, physical)
                elif not st.absorbing and physical.strip():
                    stray.append(physical)
                continue
            if st.open is not None and _is_follower_of(rec, st.open):
                _follow(st.open, rec)
                continue
            if rec.severity in _PG_FOLLOWERS and st.open is None:
                # a follower of a record already decoded (or skipped): nothing to attach to
                st.absorbing = True
                out.append(Stitched(DecodeResult(skipped=1), offset))
                continue
            out.extend(self._close(st))
            self.sessions.observe(rec)  # after closing the previous record: a disconnection ends its session
            st.open, st.open_offset, st.deadline, st.absorbing = rec, offset, wall + self.cfg.stitch_s, False
            st.open_ctx, st.open_received_at, st.open_headers = ctx, received_at, headers
        if stray:
            out.append(Stitched(_decode_record("\n".join(stray), ctx, self.cfg, received_at), offset, headers))
        # decode now what can get nothing more: a closed AUDIT record, a skipped server record
        if st.open is not None and (
            (st.open.is_audit and _audit_complete(st.open))
            or (not st.open.is_audit and st.open.severity not in _PG_ERROR_SEVERITIES)
        ):
            out.extend(self._close(st))
        return out

    def is_open(self, stream: Hashable) -> bool:
        """Does this stream hold a record that text without a prefix would continue?"""
        st = self._streams.get(stream)
        return st is not None and st.open is not None

    def _close(self, st: _Stream) -> list[Stitched]:
        rec, st.open = st.open, None
        if rec is None or st.open_ctx is None:
            return []
        st.absorbing = True
        self.sessions.fill(rec)
        return [Stitched(_decode_record(rec, st.open_ctx, self.cfg, st.open_received_at), st.open_offset,
                         st.open_headers)]

    def flush(self, wall: float, *, force: bool = False) -> list[tuple[Hashable, Stitched]]:
        """Decode the open records older than the bound (all of them with ``force``)."""
        out: list[tuple[Hashable, Stitched]] = []
        for key, st in self._streams.items():
            if st.open is not None and (force or wall >= st.deadline):
                out.extend((key, s) for s in self._close(st))
        return out

    def open_offsets(self) -> dict[Hashable, int]:
        """Stream -> offset of the message its open record started in: what a restart
        has to read again to assemble that record whole."""
        return {key: st.open_offset for key, st in self._streams.items() if st.open is not None}

    def forget(self, streams: Callable[[Hashable], bool]) -> None:
        """Drop the streams ``streams`` selects, open records included (their partition
        moved to another worker, which reads them again from the committed offset)."""
        for key in [k for k in self._streams if streams(k)]:
            del self._streams[key]


# --------------------------------------------------------------------------- one-shot decoding


def pg_log_records(text: str, cfg: PgLogConfig = PgLogConfig()) -> list[str]:
    """Split a PostgreSQL text log into its records (continuation and follower
    lines with their record), for readers of whole files (``agentwatch replay``)."""
    out: list[str] = []
    prev: _PgRecord | None = None
    lines = cfg.lines
    for physical in text.splitlines():
        rec = _parse_head(physical, lines)
        if rec is None or (prev is not None and _is_follower_of(rec, prev)):
            if out:
                out[-1] += "\n" + physical
            elif physical.strip():
                out.append(physical)
            continue
        out.append(physical)
        prev = rec
    return out


def decode_pgaudit(
    payload: bytes | str,
    *,
    origin: str = "",
    tenant: str = "default",
    log_line_prefix: str = AUTO_PREFIX,
    log_timezone: str = "",
    received_at: datetime | None = None,
    config: PgLogConfig | None = None,
) -> DecodeResult:
    """PostgreSQL log text holding pgaudit records (one record, or a chunk of a log).

    ``log_line_prefix`` is the server setting, a preset name or ``auto``;
    ``log_timezone`` the server's IANA zone. Records with no time in their
    prefix take ``received_at`` (the Kafka timestamp, say). Stateless: a record
    split over several calls needs :class:`PgStitcher`.
    """
    cfg = config or PgLogConfig(log_line_prefix, log_timezone)
    text = payload.decode("utf-8", errors="replace") if isinstance(payload, bytes) else payload
    stitcher = PgStitcher(cfg)
    result = DecodeResult()
    for part in stitcher.feed(None, text, offset=0, origin=origin, tenant=tenant, wall=0.0, received_at=received_at):
        result.extend(part.result)
    for _, part in stitcher.flush(0.0, force=True):
        result.extend(part.result)
    if not result.events and not result.failures and not result.skipped:
        return _failure(text.encode(), "pgaudit: empty record", SOURCE_PGAUDIT)
    return result


def looks_like_pg_text(text: str, cfg: PgLogConfig = PgLogConfig()) -> bool:
    """Is this the text of a PostgreSQL server log (by its shape, whatever the prefix)?"""
    first = text.lstrip().split("\n", 1)[0]
    return "AUDIT:" in text or _parse_head(first, cfg.lines) is not None or bool(_PG_LOOSE.search(first))



# --------------------------------------------------------------------------- jsonlog


def pg_jsonlog_event(doc: Mapping[str, Any], ctx: _Ctx, cfg: PgLogConfig = PgLogConfig()) -> Event | None:
    """PostgreSQL 15+ ``log_destination = jsonlog``: the prefix fields are JSON keys.
    None for server records that are not audit events (skipped)."""
    fields = _compact(
        [
            ("ts", _str(doc, "timestamp")),
            ("pid", _str(doc, "pid")),
            ("user", _str(doc, "user")),
            ("db", _str(doc, "dbname")),
            ("app", _str(doc, "application_name")),
            ("host", _str(doc, "remote_host")),
            ("session", _str(doc, "session_id")),
            ("sqlstate", _str(doc, "state_code")),
        ]
    )
    rec = _PgRecord(
        raw=orjson.dumps(doc, option=orjson.OPT_SORT_KEYS).decode(),
        fields=fields,
        severity=_str(doc, "error_severity"),
        message=_str(doc, "message"),
        statement=_str(doc, "statement"),
        detail=_str(doc, "detail"),
    )
    if not _wanted(rec):
        return None
    if rec.is_audit:
        return _pg_audit_event(rec, ctx, cfg.zone, None)
    return _pg_error_event(rec, ctx, cfg.zone, None)


__all__ = [
    "AUTO_PREFIX",
    "DEFAULT_PG_LOG_LINE_PREFIX",
    "Headers",
    "PG_PREFIX_PRESETS",
    "PgLogConfig",
    "PgSessions",
    "PgStitcher",
    "Stitched",
    "check_timezone",
    "decode_pgaudit",
    "looks_like_pg_text",
    "pg_jsonlog_event",
    "pg_log_records",
    "pg_prefix_regex",
    "resolve_prefix",
    "sql_tables",
]
