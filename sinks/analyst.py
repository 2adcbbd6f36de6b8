"""Analyst SQL: read-only by ClickHouse's own enforcement, bounded, cancellable.

``agentwatch query`` and the worker's ``/query`` run people's SQL through
:class:`AnalystEngine`, never through the store's writing client. What makes a
query harmless is decided by ClickHouse, not by looking at the text:

1. **Exactly one statement.** The SQL reaches ClickHouse as a bound parameter
   (hex, so no escaping question) of ``formatQuerySingleLine``: ClickHouse's
   parser refuses a second statement ("Multi-statements are not allowed") and
   returns its own rendering of the one statement, without comments.
2. **Only a SELECT.** That rendering runs as ``SELECT * FROM (<it>)``: the
   grammar of a subquery admits a SELECT (or WITH ... SELECT, UNION ...) and
   nothing else, so DDL, INSERT, SET, SYSTEM, ``INTO OUTFILE`` and ``FORMAT``
   are syntax errors. (``INTO OUTFILE`` matters: in the embedded engine it is a
   client-side feature of clickhouse-local that ``readonly`` does not stop;
   measured with chdb 4.4 it wrote the file under ``readonly=1``.)
3. **readonly=1 on a connection of its own.** Limits (execution time, result
   rows and bytes, ``result_overflow_mode='throw'``) are set first, then
   ``readonly=1``, after which ClickHouse refuses to change any setting
   (``SETTINGS readonly=0`` or ``max_execution_time=...`` in the query fail).
   readonly=1 also refuses table functions (they need CREATE TEMPORARY TABLE):
   ``file``, ``url``, ``s3``, ``remote``, ``mysql``, ``postgresql``,
   ``executable``, ``azureBlobStorage`` ... all measured refused.
4. **Two holes of the embedded engine closed on ClickHouse's parse tree.** In
   chDB (clickhouse-local) the ``file()`` *function* (not the table function)
   reads any path the process can read, ignoring ``user_files_path`` and
   ``readonly`` (measured: it returned the kill-switch private key), and chDB's
   ``Python()`` table function looks up objects of the host process. Neither
   can be switched off by a setting, so the statement's AST, as ClickHouse's
   ``EXPLAIN AST`` prints it, is refused when it calls either. This is the one
   check on structure we make, and it reads ClickHouse's parse, not the text.
   The same tree refuses a ``SETTINGS`` clause: inside the subquery ClickHouse
   would silently ignore it under readonly=1, and a refusal says more.

With a ClickHouse server DSN the server adds its own guarantees (HTTP accepts
one statement and refuses ``INTO OUTFILE``; ``file()`` is confined to
``user_files_path``); analysts should still get a read-only user (see
docs/security.md).

Isolation from the pipeline: every query opens its own chDB connection on the
store directory (chDB runs connections of one process concurrently: a 20 s
query measured no slowdown of inserts on the writer's connection), so a long
query never waits behind, or holds up, the sinks' single writer thread.
:meth:`AnalystEngine.cancel` kills a running query (``KILL QUERY`` from a
separate connection) when its client goes away.
"""

from __future__ import annotations

import os
import re
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol
from urllib.parse import urlsplit

import orjson

from schemas.errors import StoreError
from sinks.clickhouse import DSN_KEY, QueryResult, _chdb_path, _lock_owner, _one_line, server_client

# functions that reach outside ClickHouse's access control in the embedded engine (see 4. above)
FORBIDDEN_FUNCTIONS = frozenset({"file", "python"})
_MARKER = "agentwatch-analyst"
_AST_FUNCTION = re.compile(r"^\s*Function (\S+)", re.MULTILINE)
_AST_SETTINGS = re.compile(r"^\s*Set$", re.MULTILINE)  # a SETTINGS clause


class QueryRefused(StoreError):
    """The statement is not a single read-only SELECT; the message says why, on one line."""


@dataclass(frozen=True, slots=True)
class AnalystLimits:
    """Bounds of one analyst query, enforced by ClickHouse."""

    max_execution_time_s: float = 30.0
    max_result_rows: int = 100_000
    max_result_bytes: int = 64 * 1024 * 1024
    max_threads: int = 0  # 0: ClickHouse's default (every core)

    def settings(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "max_execution_time": self.max_execution_time_s,
            "max_result_rows": self.max_result_rows,
            "max_result_bytes": self.max_result_bytes,
            "result_overflow_mode": "throw",
            "output_format_json_quote_64bit_integers": 0,
            "date_time_output_format": "iso",
        }
        if self.max_threads > 0:
            out["max_threads"] = self.max_threads
        return out


def embedded_threads() -> int:
    """An analyst query's share of this machine with the embedded store: half the cores.

    The embedded store runs in the worker's process, and ClickHouse gives a query every core
    by default: a long count would leave the pipeline's stages, on the same machine, waiting
    for CPU. (readonly=1 keeps the query from raising it.)"""
    return max(1, (os.cpu_count() or 2) // 2)


class _Connection(Protocol):
    def text(self, sql: str, params: dict[str, str] | None = None, fmt: str = "TSVRaw") -> str: ...
    def close(self) -> None: ...


class _ChdbConnection:
    """One chDB connection handle on the store directory."""

    def __init__(self, path: str, settings: dict[str, Any] | None) -> None:
        import chdb

        try:
            self._conn = chdb.connect(path)
        except Exception as exc:
            owner = _lock_owner(path)
            if owner is not None:
                raise StoreError(
                    f"the embedded ClickHouse store at {path} is owned by another agentwatch process "
                    f"(the worker{owner}) whose /query endpoint did not answer; concurrent use needs a "
                    f"ClickHouse server: set {DSN_KEY}=http://host:8123"
                ) from exc
            raise StoreError(f"cannot open the chDB store at {path}: {_one_line(exc)}") from exc
        try:
            # the limits first: once readonly=1 is set, no setting can change on this connection
            for name, value in (settings or {}).items():
                self._conn.query(f"SET {name} = {_literal(value)}")
            if settings is not None:
                self._conn.query("SET readonly = 1")
        except Exception:
            self._conn.close()
            raise

    def text(self, sql: str, params: dict[str, str] | None = None, fmt: str = "TSVRaw") -> str:
        result = self._conn.query(sql, fmt, params=params or {})
        return bytes(result.bytes()).decode("utf-8", errors="replace")

    def close(self) -> None:
        self._conn.close()


class _ServerConnection:
    """A clickhouse-connect HTTP client; limits and readonly go with every request."""

    def __init__(self, dsn: str, settings: dict[str, Any] | None) -> None:
        self._client = server_client(dsn)
        self._settings = None if settings is None else {**settings, "readonly": 1,
                                                         "cancel_http_readonly_queries_on_client_close": 1}

    def text(self, sql: str, params: dict[str, str] | None = None, fmt: str = "TSVRaw") -> str:
        raw = self._client.raw_query(sql, parameters=params or None, settings=self._settings, fmt=fmt)
        return raw.decode("utf-8", errors="replace")

    def close(self) -> None:
        self._client.close()


def _literal(value: Any) -> str:
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return str(value)


class AnalystEngine:
    """Runs analyst SQL read-only, bounded and cancellable (see the module doc).

    Thread-safe: each :meth:`run` uses a connection of its own, so several may
    run at once on different threads while :meth:`cancel` is called from another.
    """

    def __init__(self, dsn: str, limits: AnalystLimits | None = None) -> None:
        self.dsn = dsn
        self.limits = limits or AnalystLimits()
        scheme = urlsplit(dsn).scheme.lower() if "://" in dsn else dsn.partition(":")[0]
        if scheme == "chdb":
            path = _chdb_path(dsn)
            if self.limits.max_threads == 0:
                self.limits = replace(self.limits, max_threads=embedded_threads())
            self._open: Callable[[dict[str, Any] | None], _Connection] = lambda s: _ChdbConnection(path, s)
        elif scheme in ("http", "https"):
            self._open = lambda s: _ServerConnection(dsn, s)
        else:
            raise StoreError(f"{DSN_KEY}: unsupported scheme {scheme!r} (use chdb:///path or http(s)://host:port)")
        self._killer: _Connection | None = None
        self._lock = threading.Lock()

    @staticmethod
    def new_tag() -> str:
        return uuid.uuid4().hex

    def run(self, sql: str, tag: str | None = None) -> QueryResult:
        """One read-only SELECT; QueryRefused (one line) for anything else."""
        tag = tag or self.new_tag()
        conn = self._open(self.limits.settings())
        try:
            canonical = self._canonical(conn, sql)
            wrapped = f"SELECT * FROM ({canonical})"
            try:
                ast = conn.text(f"EXPLAIN AST {wrapped}")
            except Exception as exc:
                raise QueryRefused(_refusal(exc)) from None
            called = {name.lower() for name in _AST_FUNCTION.findall(ast)}
            if called & FORBIDDEN_FUNCTIONS:
                raise QueryRefused(
                    f"refused: {', '.join(sorted(called & FORBIDDEN_FUNCTIONS))}() reads outside the database"
                )
            if _AST_SETTINGS.search(ast):
                # ClickHouse ignores a subquery's SETTINGS under readonly=1; say so rather than run it
                raise QueryRefused("refused: read-only: settings cannot be changed by an analyst query (SETTINGS)")
            try:
                out = conn.text(f"{wrapped} /* {_MARKER} {tag} */", fmt="JSONCompact")
            except Exception as exc:
                raise _run_error(exc) from None
        finally:
            conn.close()
        body = orjson.loads(out)
        return QueryResult(columns=[m["name"] for m in body["meta"]], rows=[tuple(r) for r in body["data"]])

    def _canonical(self, conn: _Connection, sql: str) -> str:
        if not sql.strip():
            raise QueryRefused("refused: empty statement")
        try:
            text = conn.text("SELECT formatQuerySingleLine(unhex({q:String}))", {"q": sql.encode().hex()})
        except Exception as exc:
            raise QueryRefused(_refusal(exc)) from None
        return text.strip()

    def cancel(self, tag: str) -> None:
        """Kill the query run with ``tag`` (from any thread); nothing if it already ended."""
        with self._lock:
            try:
                if self._killer is None:
                    self._killer = self._open(None)
                # the pattern is split so this statement's own text does not match it
                self._killer.text(
                    f"KILL QUERY WHERE query LIKE concat('%{_MARKER} ', '{tag}', '%') ASYNC"
                )
            except Exception:  # best effort: max_execution_time bounds the query anyway
                pass

    def close(self) -> None:
        with self._lock:
            if self._killer is not None:
                self._killer.close()
                self._killer = None


def _refusal(exc: BaseException) -> str:
    message = _clean(exc)
    if "Multi-statements" in message:
        return "refused: one statement per request (" + message + ")"
    if "Syntax error" in message:
        return "refused: only a single SELECT (or WITH ... SELECT) statement runs here, without FORMAT, " \
               "INTO OUTFILE or SETTINGS changes (" + message + ")"
    return "refused: " + message


def _run_error(exc: BaseException) -> StoreError:
    message = _clean(exc)
    if "(READONLY)" in message or "ACCESS_DENIED" in message or "readonly mode" in message:
        return QueryRefused("refused: read-only (" + message + ")")
    if "TOO_MANY_ROWS_OR_BYTES" in message:
        return StoreError("query stopped: its result is larger than the analyst limits (" + message + ")")
    if "TIMEOUT_EXCEEDED" in message:
        return StoreError("query stopped: it ran longer than the analyst time limit (" + message + ")")
    if "QUERY_WAS_CANCELLED" in message:
        return StoreError("query cancelled")
    return StoreError("query failed: " + message)


def _clean(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    text = text.replace("Streaming query failed: ", "")
    return text if len(text) <= 400 else text[:400] + " ..."
