"""A real PostgreSQL 15 with pgaudit for the tests: Debian's packages (installed by
``make system-deps``), one throwaway cluster in a temporary directory on a free
loopback port, logging as a production server does (the logging collector writing
the stderr log and jsonlog side by side).

As root, the cluster runs as the ``postgres`` (else ``nobody``) user: PostgreSQL
refuses to run as root.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

PG_BIN = Path("/usr/lib/postgresql/15/bin")
PGAUDIT = Path("/usr/lib/postgresql/15/lib/pgaudit.so")


def missing() -> str:
    """Why no server can be started here ("" when it can)."""
    if not (PG_BIN / "postgres").exists():
        return f"PostgreSQL 15 is not installed ({PG_BIN}/postgres); `make system-deps` installs postgresql-15"
    if not PGAUDIT.exists():
        return f"pgaudit is not installed ({PGAUDIT}); `make system-deps` installs postgresql-15-pgaudit"
    return ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_as() -> list[str]:
    if os.geteuid() != 0:
        return []
    for user in ("postgres", "nobody"):
        try:
            pwd.getpwnam(user)
        except KeyError:
            continue
        return ["runuser", "-u", user, "--"]
    raise RuntimeError("running as root and neither a postgres nor a nobody user exists")


@dataclass
class PgServer:
    root: Path
    port: int
    prefix: list[str]

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def stderr_log(self) -> Path:
        return self.root / "log" / "pg"

    @property
    def json_log(self) -> Path:
        return self.root / "log" / "pg.json"

    def conninfo(self, user: str = "postgres", dbname: str = "appdb", **extra: str) -> str:
        parts = {"host": "127.0.0.1", "port": str(self.port), "user": user, "dbname": dbname, **extra}
        return " ".join(f"{k}={v}" for k, v in parts.items())

    def ctl(self, *args: str) -> None:
        subprocess.run([*self.prefix, str(PG_BIN / "pg_ctl"), "-D", str(self.data), *args],
                       check=True, capture_output=True, timeout=120)

    def sql(self, *statements: str, dbname: str = "appdb") -> None:
        import psycopg

        with psycopg.connect(self.conninfo(dbname=dbname), autocommit=True) as conn:
            for st in statements:
                conn.execute(st)  # type: ignore[arg-type]

    def reconfigure(self, **settings: str) -> None:
        """ALTER SYSTEM + reload, and wait until new sessions see the values."""
        import psycopg

        self.sql(*(f"ALTER SYSTEM SET {k} = '{v}'" for k, v in settings.items()), "SELECT pg_reload_conf()")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with psycopg.connect(self.conninfo(), autocommit=True) as conn:
                now = {k: conn.execute(f"SHOW {k}").fetchone()[0] for k in settings}  # type: ignore[index]
            if now == settings:
                return
            time.sleep(0.1)
        raise TimeoutError(f"settings {settings} not in effect after reload")


@contextmanager
def running_pg(**conf: str) -> Iterator[PgServer]:
    root = Path(tempfile.mkdtemp(prefix="agentwatch-pg-"))
    prefix = _run_as()
    if prefix:
        owner = pwd.getpwnam(prefix[2])
        os.chown(root, owner.pw_uid, owner.pw_gid)
    root.chmod(0o755)
    server = PgServer(root, _free_port(), prefix)
    try:
        subprocess.run([*prefix, str(PG_BIN / "initdb"), "-D", str(server.data), "-A", "trust", "-U", "postgres",
                        "--no-sync", "-E", "UTF8"], check=True, capture_output=True, timeout=120)
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(server.port),
            "unix_socket_directories": f"'{root}'",
            "shared_preload_libraries": "'pgaudit'",
            "fsync": "off",
            "logging_collector": "on",
            "log_destination": "'stderr,jsonlog'",
            "log_directory": f"'{root / 'log'}'",
            "log_filename": "'pg'",
            "log_rotation_age": "0",
            "log_rotation_size": "0",
            "log_connections": "on",
            "log_disconnections": "on",
            "pgaudit.log": "'none'",  # audited per role (ALTER ROLE ... SET pgaudit.log)
            **{k: f"'{v}'" for k, v in conf.items()},
        }
        with (server.data / "postgresql.conf").open("a") as f:
            f.writelines(f"{k} = {v}\n" for k, v in settings.items())
        server.ctl("-w", "-t", "60", "-l", str(root / "startup.log"), "start")
        server.sql("CREATE DATABASE appdb", dbname="postgres")
        yield server
    finally:
        try:
            server.ctl("-m", "fast", "-w", "stop")
        except Exception:  # noqa: BLE001 - never started, or already gone
            pass
        shutil.rmtree(root, ignore_errors=True)


def one_record_per_message(text: str) -> list[bytes]:
    """What a shipper whose multi-line rule starts a message at each line beginning with a
    timestamp (Fluent Bit, Vector, the Collector's filelog recombine) sends: an ERROR and
    its STATEMENT are two messages, a statement's continuation lines stay with it."""
    out: list[str] = []
    for line in text.splitlines():
        if line[:1].isdigit() or not out:
            out.append(line)
        else:
            out[-1] += "\n" + line
    return [m.encode() for m in out]
