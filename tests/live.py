"""A real worker process on a real broker, for integration tests.

``LiveWorker`` starts ``python -m streams.cli worker`` with topics, consumer
group and embedded ClickHouse of its own (so tests never see each other's
data), waits until it serves, and offers what a test needs: produce to an
input topic, read an output topic, and query ClickHouse through the worker's
loopback endpoint (the worker owns the embedded store).

    with LiveWorker(kafka_bootstrap, tmp_path) as w:
        w.produce(w.settings.topic_otlp, [payload])
        alerts = w.wait_alerts(lambda a: any(x.agent_id == "x" for x in a))
        rows = w.wait_rows("SELECT count() FROM agentwatch.events", lambda r: r[0][0] > 0)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import ConsumerRecord

from schemas.alerts import Alert
from sinks.clickhouse import QueryResult
from streams.kafka import ensure_topics, input_topics
from streams.query import run_query
from streams.settings import Settings, load_settings
from streams.worker import running_worker

REPO = Path(__file__).resolve().parent.parent
TOPIC_FIELDS = [name for name in Settings.model_fields if name.startswith("topic_")]


class LiveWorker:
    def __init__(
        self,
        bootstrap: str,
        home: Path,
        *,
        policy: Path | None = None,
        env: dict[str, str] | None = None,
        partitions: int = 2,
    ) -> None:
        run = uuid.uuid4().hex[:8]
        self.bootstrap = bootstrap
        self.home = Path(home) / f"worker-{run}"
        values: dict[str, Any] = {
            "home": self.home,
            "bootstrap": bootstrap,
            "app_id": f"test-{run}",
            "partitions": partitions,
            "web_port": 0,
            "clickhouse_dsn": f"chdb://{self.home / 'clickhouse'}",
            "batch_within_s": 0.1,
            "tick_s": 0.5,
            "log_level": "info",
        }
        if policy is not None:
            values["policy_file"] = policy
        for name in TOPIC_FIELDS:
            values[name] = f"t{run}.{name.removeprefix('topic_')}"
        self.env = {**os.environ, **{f"AGENTWATCH_{k.upper()}": str(v) for k, v in values.items()}, **(env or {})}
        # resolve the web port at start; settings used to find the worker must not say 0
        self.settings = load_settings(**{k: v for k, v in values.items() if k != "web_port"})
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.home / "worker.log"
        self.role = "all"

    def sibling(self, role: str, name: str) -> "LiveWorker":
        """Another process of the same deployment (home, topics, group, store): ``detect``
        (a detection-only worker, AGENTWATCH_WORKER_STORE=false) or ``store`` (`agentwatch store`)."""
        other = copy.copy(self)
        other.role = role
        other.proc = None
        other.log_path = self.home / f"{name}.log"
        other.env = {**self.env, "AGENTWATCH_WORKER_STORE": "false" if role == "detect" else "true"}
        return other

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, timeout: float = 120) -> "LiveWorker":
        self.home.mkdir(parents=True, exist_ok=True)
        # the producers' side: agentwatch creates only its own topics, never its inputs.
        # In a thread: start() may be called from a test that runs an event loop.
        inputs = list(input_topics(self.settings))
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, ensure_topics(self.bootstrap, inputs, self.settings.partitions)).result()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "streams.cli", "store" if self.role == "store" else "worker"],
                cwd=REPO, env=self.env,
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited ({self.proc.returncode}):\n{self.log_tail()}")
            if self.url() is not None:
                return self
            time.sleep(0.3)
        raise TimeoutError(f"worker not ready in {timeout}s:\n{self.log_tail()}")

    def url(self) -> str | None:
        """The web address of this process once it serves (None before)."""
        assert self.proc is not None
        if self.role == "detect":
            # a detection-only worker holds no store: its record is workers/<pid>.json
            try:
                url = json.loads((self.home / "workers" / f"{self.proc.pid}.json").read_text())["url"]
                urllib.request.urlopen(url + "/healthz", timeout=2).read()
            except urllib.error.HTTPError:
                return str(url)  # answers, if unhealthy
            except (OSError, ValueError, KeyError):
                return None
            return str(url)
        info = running_worker(self.settings)
        return info.url if info is not None and info.pid == self.proc.pid else None

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> "LiveWorker":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # -- Kafka -----------------------------------------------------------------------------

    def produce(self, topic: str, values: list[bytes], *, key: bytes | None = None,
                headers: list[tuple[str, bytes]] | None = None) -> None:
        async def _go() -> None:
            p = AIOKafkaProducer(bootstrap_servers=self.bootstrap)
            await p.start()
            try:
                for v in values:
                    await p.send_and_wait(topic, v, key=key, headers=headers)
            finally:
                await p.stop()

        asyncio.run(_go())

    def consume(self, topic: str, until: Callable[[list[ConsumerRecord]], bool], *,
                timeout: float = 60) -> list[ConsumerRecord]:
        """Read ``topic`` from the beginning until ``until(records)`` holds."""

        async def _go() -> list[ConsumerRecord]:
            c = AIOKafkaConsumer(topic, bootstrap_servers=self.bootstrap, auto_offset_reset="earliest",
                                 enable_auto_commit=False)
            await c.start()
            got: list[ConsumerRecord] = []
            try:
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    batches = await c.getmany(timeout_ms=500)
                    for recs in batches.values():
                        got.extend(recs)
                    if until(got):
                        return got
                return got
            finally:
                await c.stop()

        return asyncio.run(_go())

    def wait_alerts(self, until: Callable[[list[Alert]], bool], *, timeout: float = 60,
                    shadow: bool = False) -> list[Alert]:
        """Latest state of each alert on the alerts topic, once ``until`` holds (or at timeout)."""
        topic = self.settings.topic_shadow_alerts if shadow else self.settings.topic_alerts
        latest: dict[str, Alert] = {}

        def check(records: list[ConsumerRecord]) -> bool:
            for r in records:
                a = Alert.model_validate(orjson.loads(r.value))
                latest[a.alert_id] = a
            records.clear()
            return until(list(latest.values()))

        self.consume(topic, check, timeout=timeout)
        return list(latest.values())

    def metric(self, name: str) -> float:
        """Sum of a metric's samples on the worker's /metrics endpoint."""
        url = self.url()
        assert url is not None, self.log_tail()
        text = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name) and not line.startswith("#") and line[len(name)] in " {")

    def wait_settled(self, *, settle_s: float = 3.0, timeout: float = 120, messages: int = 0,
                     events: float | None = None) -> float:
        """Wait until the worker has taken ``messages`` input messages and the detect stage
        has seen ``events`` events, or (when it never does: duplicates, dead letters) events
        and then nothing new for ``settle_s`` (a loaded machine can take a while to start
        consuming); return the events seen."""
        deadline = time.monotonic() + timeout
        last, since = -1.0, time.monotonic()
        while time.monotonic() < deadline:
            n = self.metric("agentwatch_events_detected_total")
            taken = self.metric("agentwatch_messages_in_total") >= messages
            if taken and events is not None and n >= events:
                return n
            if n != last or not taken:
                last, since = n, time.monotonic()
            elif (n > 0 or messages) and time.monotonic() - since >= settle_s:
                return n
            time.sleep(0.1 if events is not None else min(0.5, settle_s / 2))
        raise TimeoutError(f"worker did not settle ({last} events):\n{self.log_tail()}")

    # -- ClickHouse ------------------------------------------------------------------------

    def query(self, sql: str) -> QueryResult:
        return run_query(self.settings, sql)

    def wait_rows(self, sql: str, until: Callable[[list[tuple[Any, ...]]], bool], *,
                  timeout: float = 60) -> list[tuple[Any, ...]]:
        deadline = time.monotonic() + timeout
        rows: list[tuple[Any, ...]] = []
        while time.monotonic() < deadline:
            rows = self.query(sql).rows
            if until(rows):
                return rows
            time.sleep(0.5)
        return rows
