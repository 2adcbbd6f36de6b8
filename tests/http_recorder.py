"""A local HTTP server that records every request it gets (a webhook target, a probe that
shows whether something fetched a URL)."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class Recorder:
    url: str
    requests: list[tuple[str, str, bytes]] = field(default_factory=list)  # (method, path, body)

    @property
    def bodies(self) -> list[bytes]:
        return [body for _, _, body in self.requests]


@contextmanager
def recording_server() -> Iterator[Recorder]:
    rec = Recorder("")

    class Handler(http.server.BaseHTTPRequestHandler):
        def _record(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            rec.requests.append((self.command, self.path, self.rfile.read(length) if length else b""))
            self.send_response(200)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(b"recorded\n")

        do_GET = do_POST = do_PUT = do_HEAD = _record

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    rec.url = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield rec
    finally:
        server.shutdown()
        server.server_close()
