"""Running the worker process, and finding it from other commands."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import logging
import socket
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import faust

from streams.policy_file import PolicyWatcher, load_policy
from schemas.errors import AgentwatchError
from schemas.redact import mask_secrets
from streams.app import Pipeline, Roles
from streams.kafka import ensure_topics, owned_topics, resolve_bootstrap, topic_options, warn_missing_inputs
from streams.kafka_security import kafka_options
from streams.logs import setup_logging
from streams.settings import Settings
from streams.state import STATE_TOPIC_CONFIG

# a threshold no count reaches: the oldest generation is collected only when asked
NEVER = 1 << 30


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
    except urllib.error.HTTPError:
        pass  # it answered: alive, if unhealthy (503 names the stalled stage)
    except (OSError, urllib.error.URLError):
        return None
    return info


def detect_worker_files(settings: Settings) -> list[Path]:
    """Records of detection-only workers (no store, so not ``worker.json``): one per process."""
    return sorted((settings.home_dir / "workers").glob("*.json"))


def run_worker(settings: Settings, roles: Roles | None = None) -> None:
    """Run a worker until stopped. By default it detects and, unless ``worker_store`` is
    false, owns the store; ``Roles(detect=False)`` is the store process (`agentwatch store`)."""
    roles = roles or Roles(detect=True, store=settings.worker_store)
    setup_logging(settings.log_level, settings.log_format)
    watcher = PolicyWatcher(settings.policy_file) if settings.policy_file else None
    policy = watcher.current if watcher else load_policy(None)
    bootstrap = resolve_bootstrap(settings)
    warn_missing_inputs(bootstrap, settings)
    partitions = asyncio.run(ensure_topics(bootstrap, owned_topics(settings), settings.partitions,
                                           overrides={settings.topic_by_agent: settings.agent_partitions,
                                                      settings.topic_state: 1},
                                           topic_configs={settings.topic_state: STATE_TOPIC_CONFIG},
                                           **topic_options(settings)))
    if settings.web_port == 0:
        settings = settings.with_overrides(web_port=free_port())
    existing = running_worker(settings) if roles.store else None
    if existing is not None and settings.dsn.startswith("chdb://") and existing.dsn == mask_secrets(settings.dsn):
        raise AgentwatchError(
            f"another worker (pid {existing.pid}) already owns the embedded ClickHouse store "
            f"{mask_secrets(settings.dsn)}; to run more than one worker, use a ClickHouse server "
            "(AGENTWATCH_CLICKHOUSE_DSN=http://host:8123), or detection-only workers "
            "(AGENTWATCH_WORKER_STORE=false) with one `agentwatch store` process"
        )
    pipeline = Pipeline(settings, policy, bootstrap, partitions, watcher, roles)
    if roles.store:
        pipeline.open_store()  # a locked embedded store fails here, before consuming anything
    settings.home_dir.mkdir(parents=True, exist_ok=True)
    # the record is readable by anyone who can read the home: no credential goes in it
    record = WorkerInfo(os.getpid(), f"http://{settings.web_host}:{settings.web_port}", mask_secrets(settings.dsn),
                        mask_secrets(bootstrap))
    # worker.json names the process that holds the store (`agentwatch query` asks it);
    # detection-only workers each leave a record under workers/ (their /metrics address).
    # Written once the worker is ready (joined, state restored, producer warm): whoever waits
    # for the record (the demo, tests, a supervisor's script) may send input at once
    record_file = settings.worker_file
    if not roles.store:
        record_file = settings.home_dir / "workers" / f"{os.getpid()}.json"
        record_file.parent.mkdir(parents=True, exist_ok=True)
    pipeline.when_ready(lambda: record_file.write_text(json.dumps(record.__dict__)))
    _worker_file[os.getpid()] = record_file
    _tune_gc()
    # mode's Worker creates its loop lazily; faust needs one set before it starts
    asyncio.set_event_loop(asyncio.new_event_loop())
    worker = BoundedShutdownWorker(
        pipeline.app,
        shutdown_timeout_s=settings.shutdown_timeout_s,
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
        _remove_if_ours(record_file)
        pipeline.close()


def _tune_gc() -> None:
    """Collect cycles less often than CPython's default, and the oldest generation never on
    its own (the pipeline's timer runs it every ``gc_full_s``).

    Decoding allocates tens of objects per event, so at the default thresholds the
    cyclic collector ran every few dozen events, and each run walked the young objects
    of every batch in flight: about a third of a decode's time. The oldest generation
    holds the state (windows, join, redelivery memory: millions of objects at a few
    thousand spans/s), and CPython collects it whenever a quarter of it is new since the
    last time, which churning windows make true every few seconds: measured in a worker
    at 8,000 spans/s, full collections of 1.0-1.4 s every 2 s, finding nothing (the state
    is freed by reference counting; nothing it holds relies on cycle collection), the
    event loop held throughout. Objects alive at start (modules, settings) are frozen out
    of the collector's walks.
    """
    gc.freeze()
    gc.set_threshold(50_000, 20, NEVER)


class BoundedShutdownWorker(faust.Worker):
    """A faust worker whose SIGTERM/SIGINT always ends the process within a bound.

    A clean stop waits for the stages to finish their batch, drains the on-call
    outputs and commits what was acked; a stage stuck on a store or broker that
    does not answer would hold that stop forever. A watchdog started by the
    signal ends the process after ``shutdown_timeout_s``. Nothing is lost
    either way: what was not acked is not committed and is processed again.
    """

    def __init__(self, *args: object, shutdown_timeout_s: float, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self._shutdown_timeout_s = shutdown_timeout_s
        self._watchdog: threading.Timer | None = None

    def _arm_watchdog(self) -> None:
        if self._watchdog is not None:
            return

        def expire() -> None:
            logging.getLogger("agentwatch.worker").critical(
                "shutdown did not finish in time; exiting without a clean stop",
                extra={"shutdown_timeout_s": self._shutdown_timeout_s})
            _remove_if_ours(_worker_file.get(os.getpid(), Path("/nonexistent")))
            os._exit(3)

        self._watchdog = threading.Timer(self._shutdown_timeout_s, expire)
        self._watchdog.daemon = True
        self._watchdog.start()

    def _on_sigterm(self) -> None:
        self._arm_watchdog()
        super()._on_sigterm()

    def _on_sigint(self) -> None:
        self._arm_watchdog()
        super()._on_sigint()


# the worker file of this process, removed by the shutdown watchdog too
_worker_file: dict[int, Path] = {}


def _remove_if_ours(path: Path) -> None:
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass
