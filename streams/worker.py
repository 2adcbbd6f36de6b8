"""Running the worker process, and finding it from other commands."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import faust

from detectors.policy import PolicyWatcher, load_policy
from schemas.errors import AgentwatchError
from schemas.redact import mask_secrets
from streams.app import Pipeline
from streams.kafka import all_topics, ensure_topics, resolve_bootstrap
from streams.logs import setup_logging
from streams.settings import Settings
from streams.warmup import rebuild_state


@dataclass(frozen=True)
class WorkerInfo:
    pid: int
    url: str
    dsn: str
    bootstrap: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def running_worker(settings: Settings) -> WorkerInfo | None:
    """The live worker of this AGENTWATCH_HOME, if its web endpoint answers."""
    try:
        rec = json.loads(settings.worker_file.read_text())
        info = WorkerInfo(**rec)
    except (OSError, ValueError, TypeError):
        return None
    try:
        os.kill(info.pid, 0)
        with urllib.request.urlopen(info.url + "/healthz", timeout=2) as r:
            r.read()
    except (OSError, urllib.error.URLError):
        return None
    return info


def run_worker(settings: Settings) -> None:
    setup_logging(settings.log_level, settings.log_format)
    watcher = PolicyWatcher(settings.policy_file) if settings.policy_file else None
    policy = watcher.current if watcher else load_policy(None)
    bootstrap = resolve_bootstrap(settings)
    partitions = asyncio.run(ensure_topics(bootstrap, all_topics(settings), settings.partitions,
                                           overrides={settings.topic_by_agent: settings.detect_partitions}))
    if settings.web_port == 0:
        settings = settings.with_overrides(web_port=free_port())
    existing = running_worker(settings)
    if existing is not None and settings.dsn.startswith("chdb://") and existing.dsn == mask_secrets(settings.dsn):
        raise AgentwatchError(
            f"another worker (pid {existing.pid}) already owns the embedded ClickHouse store "
            f"{settings.dsn}; running more than one worker needs a ClickHouse server "
            "(AGENTWATCH_CLICKHOUSE_DSN=http://host:8123)"
        )
    pipeline = Pipeline(settings, policy, bootstrap, partitions, watcher)
    pipeline.open_store()  # a locked embedded store fails here, before consuming anything
    asyncio.run(rebuild_state(
        bootstrap=bootstrap, group=settings.app_id, by_trace_topic=settings.topic_by_trace,
        by_agent_topic=settings.topic_by_agent, correlate=pipeline.correlate, detect=pipeline.detect,
        horizon_s=settings.state_rebuild_s,
    ))
    settings.home_dir.mkdir(parents=True, exist_ok=True)
    # the record is readable by anyone who can read the home: no credential goes in it
    record = WorkerInfo(os.getpid(), f"http://{settings.web_host}:{settings.web_port}", mask_secrets(settings.dsn),
                        mask_secrets(bootstrap))
    settings.worker_file.write_text(json.dumps(record.__dict__))
    # mode's Worker creates its loop lazily; faust needs one set before it starts
    asyncio.set_event_loop(asyncio.new_event_loop())
    worker = faust.Worker(
        pipeline.app,
        loglevel=settings.log_level.upper(),
        quiet=True,
        override_logging=False,
        redirect_stdouts=False,
    )
    try:
        worker.execute_from_commandline()
    except SystemExit:
        if pipeline.crashed is not None:
            raise AgentwatchError(f"a processing stage crashed: {pipeline.crashed!r} (see the log)") from None
        raise
    finally:
        _remove_if_ours(settings.worker_file)
        pipeline.close()


def _remove_if_ours(path: Path) -> None:
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass
