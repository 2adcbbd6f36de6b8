"""The worker's ``/query`` and ``/healthz``: who may ask, and how a query runs.

``/query`` answers only a request that

* names this worker in its ``Host`` header (loopback names, the bind address,
  ``AGENTWATCH_QUERY_ALLOWED_HOSTS``): a DNS-rebinding page's requests carry
  its own host name and are refused;
* carries no ``Origin`` header, or one of those hosts: a browser always sends
  ``Origin`` on a cross-site POST, so a web page cannot query blind;
* is ``Content-Type: application/json`` (a cross-site ``text/plain`` "simple
  request" needs no preflight; JSON does, and we answer no preflight);
* carries ``Authorization: Bearer <token>`` (``AGENTWATCH_QUERY_TOKEN``, or the
  token generated once into ``<home>/keys/query_token``, mode 0600).

The SQL then runs on :class:`sinks.analyst.AnalystEngine` (read-only,
bounded, one statement) in threads of its own, never on the store's writer
thread and never on the event loop; when the client goes away the query is
killed.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import secrets
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import orjson

from schemas.errors import AgentwatchError
from schemas.redact import mask_secrets
from sinks.analyst import AnalystEngine, AnalystLimits, QueryRefused
from streams.control_plane import write_once
from streams.settings import Settings

log = logging.getLogger("agentwatch.query")

TOKEN_FILE = "keys/query_token"
MAX_BODY_BYTES = 256 * 1024
MAX_CONCURRENT = 2


def query_token(settings: Settings) -> str:
    """The bearer token ``/query`` requires: the setting, else one generated once under the home."""
    configured = settings.query_token.get_secret_value().strip()
    if configured:
        return configured
    path = settings.home_dir / TOKEN_FILE
    write_once(path, lambda: secrets.token_urlsafe(32) + "\n")
    return path.read_text().strip()


def limits(settings: Settings) -> AnalystLimits:
    return AnalystLimits(settings.query_max_seconds, settings.query_max_rows, settings.query_max_bytes,
                         settings.query_max_threads)


def allowed_hosts(settings: Settings) -> frozenset[str]:
    """Host header values (lower case, with the port) this worker answers /query to."""
    port = settings.web_port
    names = {"localhost", "127.0.0.1", "[::1]", settings.web_host.lower()}
    hosts = {f"{n}:{port}" for n in names}
    for extra in filter(None, (h.strip().lower() for h in settings.query_allowed_hosts.split(","))):
        hosts.add(extra if ":" in extra.rsplit("]", 1)[-1] else f"{extra}:{port}")
    return frozenset(hosts)


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: dict[str, Any]


def health(settings: Settings) -> dict[str, Any]:
    """What /healthz shows: never a credential."""
    return {"ok": True, "pid": os.getpid(), "dsn": mask_secrets(settings.dsn)}


class QueryApi:
    """Authenticates and runs ``/query`` requests for one worker."""

    def __init__(self, settings: Settings) -> None:
        self.engine = AnalystEngine(settings.dsn, limits(settings))
        self._token = query_token(settings).encode()
        self._hosts = allowed_hosts(settings)
        self._pool = ThreadPoolExecutor(max_workers=MAX_CONCURRENT, thread_name_prefix="analyst")
        self._tags: set[str] = set()

    def close(self) -> None:
        """Kill running queries and release the engine."""
        self.kill_running()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.engine.close()

    def kill_running(self) -> None:
        for tag in list(self._tags):
            self.engine.cancel(tag)

    async def on_shutdown(self, *_: Any, **__: Any) -> None:
        """The worker is stopping: its web server waits for open requests, so end them now."""
        if self._tags:
            await asyncio.get_running_loop().run_in_executor(None, self.kill_running)

    def check(self, headers: Any) -> Answer | None:
        """Why a request is refused before its body is read, or None."""
        host = (headers.get("Host") or "").lower()
        if host not in self._hosts:
            return Answer(421, {"error": f"refused: Host {host!r} is not this worker"})
        origin = headers.get("Origin")
        if origin is not None and urlsplit(origin).netloc.lower() not in self._hosts:
            return Answer(403, {"error": "refused: cross-origin request"})
        auth = headers.get("Authorization") or ""
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self._token):
            return Answer(401, {"error": "unauthorized: /query needs Authorization: Bearer <token> "
                                         "(`agentwatch query-token` prints it)"})
        ctype = (headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if ctype != "application/json":
            return Answer(415, {"error": "refused: the body must be application/json {\"sql\": \"SELECT ...\"}"})
        return None

    async def handle(self, request: Any) -> Answer:
        refused = self.check(request.headers)
        if refused is not None:
            return refused
        if (request.content_length or 0) > MAX_BODY_BYTES:
            return Answer(413, {"error": f"refused: body larger than {MAX_BODY_BYTES} bytes"})
        try:
            body = orjson.loads(await request.read())
            sql = body["sql"]
            if not isinstance(sql, str):
                raise TypeError
        except Exception:
            return Answer(400, {"error": "refused: body must be JSON {\"sql\": \"SELECT ...\"}"})
        if len(self._tags) >= MAX_CONCURRENT:
            return Answer(429, {"error": f"busy: {MAX_CONCURRENT} analyst queries already running"})
        tag = self.engine.new_tag()
        self._tags.add(tag)
        try:
            return await self._run(sql, tag, request)
        finally:
            self._tags.discard(tag)

    async def _run(self, sql: str, tag: str, request: Any) -> Answer:
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._pool, self.engine.run, sql, tag)
        try:
            while True:
                done, _ = await asyncio.wait({future}, timeout=0.25)
                if done:
                    break
                transport = request.transport
                if transport is None or transport.is_closing():
                    log.warning("analyst client went away; killing its query", extra={"tag": tag})
                    await loop.run_in_executor(None, self.engine.cancel, tag)
                    return Answer(499, {"error": "client closed the request"})
            result = future.result()
        except asyncio.CancelledError:
            await loop.run_in_executor(None, self.engine.cancel, tag)
            raise
        except QueryRefused as exc:
            return Answer(400, {"error": str(exc)})
        except AgentwatchError as exc:
            return Answer(422, {"error": str(exc)})
        return Answer(200, {"columns": result.columns, "rows": [list(r) for r in result.rows]})
