"""``agentwatch query``: read-only SQL against the configured ClickHouse.

While a worker owns the embedded store (chDB opens a directory in one process
only), the query goes through that worker's loopback ``/query`` endpoint with
the bearer token; otherwise it runs here. Either way it runs on
:class:`sinks.analyst.AnalystEngine`: one SELECT, readonly, bounded.
"""

from __future__ import annotations

import csv
import io
import urllib.error
import urllib.request
from typing import Any

import orjson

from schemas.errors import StoreError
from schemas.redact import mask_secrets
from sinks.analyst import AnalystEngine
from sinks.clickhouse import QueryResult
from streams.query_api import limits, query_token
from streams.settings import Settings
from streams.worker import running_worker


def run_query(settings: Settings, sql: str) -> QueryResult:
    worker = running_worker(settings)
    if worker is not None and worker.dsn == mask_secrets(settings.dsn):
        return _via_worker(worker.url, sql, query_token(settings), settings.query_max_seconds + 30)
    engine = AnalystEngine(settings.dsn, limits(settings))
    try:
        return engine.run(sql)
    finally:
        engine.close()


def _via_worker(url: str, sql: str, token: str, timeout_s: float) -> QueryResult:
    req = urllib.request.Request(url + "/query", data=orjson.dumps({"sql": sql}), method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            body = orjson.loads(r.read())
    except urllib.error.HTTPError as exc:
        try:
            message = orjson.loads(exc.read()).get("error", str(exc))
        except Exception:
            message = str(exc)
        raise StoreError(f"query through the worker at {url}: {message}") from None
    except TimeoutError:
        raise StoreError(f"the worker at {url} did not answer within {timeout_s:.0f}s") from None
    except urllib.error.URLError as exc:
        raise StoreError(f"the worker at {url} did not answer: {exc.reason}") from None
    return QueryResult(columns=body["columns"], rows=[tuple(r) for r in body["rows"]])


def _cell(v: Any, width: int = 60) -> str:
    s = v.isoformat(sep=" ") if hasattr(v, "isoformat") else str(v)
    s = s.replace("\n", " ")
    return s if len(s) <= width else s[: width - 1] + "…"


def format_table(columns: list[str], rows: list[tuple[Any, ...]]) -> str:
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    out.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(out)


def _plain(v: Any) -> Any:
    """A cell as JSON/CSV carry it: times in ISO 8601, bytes as text, the rest as is."""
    if hasattr(v, "isoformat"):
        return v.isoformat()
    if isinstance(v, bytes):
        return v.decode(errors="replace")
    return v


def format_result(columns: list[str], rows: list[tuple[Any, ...]], fmt: str) -> str:
    """``table`` (for people), ``json`` (one object per row per line) or ``csv`` (header first).

    The table and CSV have their header even with no rows: a script can tell
    "nothing matched" from "the query printed nothing".
    """
    if fmt == "json":
        return "".join(orjson.dumps(dict(zip(columns, map(_plain, row))), default=str).decode() + "\n"
                       for row in rows)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([[_plain(v) for v in row] for row in rows])
        return buf.getvalue()
    return format_table(columns, rows) + "\n"
