"""``agentwatch killswitch issue|lift|list``: kill switches issued and lifted by people.

A person's command is signed with the same key as the worker's (settings:
``AGENTWATCH_CONTROL_PRIVATE_KEY``, or the development key under the home
directory), published on the control topic, and recorded in
``agentwatch.killswitches`` with who issued it. Recording: when a worker owns
the embedded store (chDB allows one process per directory) the worker records
every command it reads from the control topic; otherwise this process writes
the row itself. Both may happen (a server DSN): rows collapse by command_id.
"""

from __future__ import annotations

import asyncio
import getpass
import socket
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from schemas.control import CommandAction, KillSwitchCommand, Target
from schemas.errors import ConfigError
from sinks.clickhouse import open_store
from sinks.control import ControlPublisher
from streams.control_plane import control_settings, signing_key
from streams.kafka import ensure_topics, resolve_bootstrap, topic_options
from streams.kafka_security import kafka_options
from streams.query import run_query
from streams.settings import Settings
from streams.worker import running_worker

ACTIVE_VIEW = "agentwatch.killswitches_active"
ACTIVE_COLUMNS = ("command_id", "target_kind", "target_value", "target_version", "scope", "reason", "alert_id",
                  "issued_by", "issued_at", "expires_at")


@dataclass(frozen=True)
class ActiveKillSwitch:
    command_id: str
    target: str  # agent:<id>, tenant:<name> or all
    scope: list[str]  # empty = every tool
    reason: str
    alert_id: str
    issued_by: str
    issued_at: datetime
    expires_at: datetime


def default_issuer() -> str:
    """Who is issuing: the OS user at this host (recorded with the command, not authenticated)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _target(target: str | Target) -> Target:
    return target if isinstance(target, Target) else Target.parse(target)


def issue(
    settings: Settings,
    target: str | Target,
    *,
    reason: str,
    scope: Sequence[str] = (),
    ttl_s: float = 3600.0,
    issued_by: str | None = None,
) -> KillSwitchCommand:
    """Halt ``target`` (``agent:<id>``, ``tenant:<name>`` or ``all``) for ``ttl_s`` seconds; return the signed command."""
    if not reason.strip():
        raise ConfigError("reason", "say why: it is recorded and shown to on-call and the agent")
    if ttl_s <= 0:
        raise ConfigError("ttl", "must be > 0 seconds")
    return _send(settings, CommandAction.HALT, _target(target), reason=reason, scope=scope, ttl_s=ttl_s,
                 issued_by=issued_by)


def lift(
    settings: Settings,
    target: str | Target,
    *,
    reason: str = "lifted",
    scope: Sequence[str] = (),
    issued_by: str | None = None,
) -> KillSwitchCommand:
    """Resume ``target``: lifts its halts (all of them, or the named tools of scoped halts)."""
    control = control_settings(settings)
    # a resume must stay verifiable as long as agents may read it back on restart
    return _send(settings, CommandAction.RESUME, _target(target), reason=reason, scope=scope,
                 ttl_s=control.killswitch_max_age_s, issued_by=issued_by)


def _send(settings: Settings, action: CommandAction, target: Target, *, reason: str, scope: Sequence[str],
          ttl_s: float, issued_by: str | None) -> KillSwitchCommand:
    control = control_settings(settings)
    key = signing_key(control, settings.home_dir)
    now = datetime.now(timezone.utc)
    cmd = KillSwitchCommand(
        command_id=uuid.uuid4().hex,
        action=action,
        target=target,
        scope=list(scope),
        reason=reason,
        issued_by=issued_by or default_issuer(),
        issued_at=now,
        expires_at=now + timedelta(seconds=ttl_s),
    )
    bootstrap = resolve_bootstrap(settings)

    async def _publish() -> KillSwitchCommand:
        await ensure_topics(bootstrap, [settings.topic_control], settings.partitions, **topic_options(settings))
        async with ControlPublisher(bootstrap, settings.topic_control, private_key=key,
                                    security=kafka_options(settings)) as publisher:
            (sent,) = await publisher.publish([cmd])
        return sent

    sent = asyncio.run(_publish())
    _record(settings, sent)
    return sent


def _record(settings: Settings, cmd: KillSwitchCommand) -> None:
    worker = running_worker(settings)
    if worker is not None and worker.dsn == settings.dsn:
        return  # the worker owns the embedded store and records what it reads from the control topic
    store = open_store(settings.dsn)
    try:
        store.apply_schema()
        store.insert_killswitches([cmd])
    finally:
        store.close()


def list_active(settings: Settings) -> list[ActiveKillSwitch]:
    """Kill switches in force now, oldest first (through the worker when it owns the store)."""
    result = run_query(settings, f"SELECT {', '.join(ACTIVE_COLUMNS)} FROM {ACTIVE_VIEW} ORDER BY issued_at")
    return [_active(dict(zip(result.columns, row))) for row in result.rows]


def _dt(v: Any) -> datetime:
    # rows read through the worker's /query endpoint carry ISO strings, direct reads datetimes
    d = v if isinstance(v, datetime) else datetime.fromisoformat(str(v))
    return d if d.tzinfo else d.replace(tzinfo=timezone.utc)


def _active(r: dict[str, Any]) -> ActiveKillSwitch:
    kind, value, version = str(r["target_kind"]), str(r["target_value"]), str(r.get("target_version") or "")
    return ActiveKillSwitch(
        command_id=str(r["command_id"]),
        target="all" if kind == "all" else f"{kind}:{value}" + (f"@{version}" if version else ""),
        scope=list(r["scope"] or []),
        reason=str(r["reason"]),
        alert_id=str(r["alert_id"]),
        issued_by=str(r["issued_by"]),
        issued_at=_dt(r["issued_at"]),
        expires_at=_dt(r["expires_at"]),
    )


def format_active(rows: Sequence[ActiveKillSwitch]) -> str:
    """A table for the CLI."""
    if not rows:
        return "no kill switch in force"
    header = ("TARGET", "SCOPE", "ISSUED BY", "ISSUED AT", "EXPIRES AT", "COMMAND", "REASON")
    cells = [
        (r.target, ",".join(r.scope) or "*", r.issued_by, r.issued_at.strftime("%Y-%m-%d %H:%M:%S"),
         r.expires_at.strftime("%Y-%m-%d %H:%M:%S"), r.command_id[:12], r.reason[:60])
        for r in rows
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)
