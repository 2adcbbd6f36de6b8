"""The agentwatch pipeline under the bench: a real worker process on the bench's topics.

Throughput: the worker reads the pre-filled spans and audit topics from the
start; its rate is spans (+ audit records) through the detectors per second,
from the first detected event to the last, read from its /metrics.

Live phase, same worker, afterwards: fresh traffic at half that rate with
event time = now, and every few seconds a looping agent whose halt is
received by a real AgentClient. Measured, all on this host's wall clock:

* detection latency: the looping message's produce call -> the retry_loop
  alert read from the alerts topic (producer linger, broker, the worker's
  batching and its three stages, the alert's publication and the bench's
  fetch are all inside);
* kill switch: that alert's arrival -> the agent client's ``on_halt``;
* the worker's RSS, sampled every second.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import random
import re
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from schemas.alerts import Alert
from schemas.control import KillSwitchCommand, generate_keypair
from schemas.errors import AgentwatchError
from streams.bench.peers import progress, progress_done
from streams.bench.workload import (CHILDREN, LIVE_POLICY, POLICY, TraceWriter, Workload, clock_message, llm,
                                    loop_trace, tool)
from streams.client import AgentClient
from streams.settings import Settings
from streams.worker import NEVER, WorkerInfo, running_worker

METRICS_TIMEOUT_S = 30.0  # a worker busy with a large batch answers late: that is not a failure
STALL_S = 180.0
# every other live loop's agent span is sent this long after its tool calls, in a later message
AGENT_SPAN_WAIT_S = 1.0


@dataclass
class PipelineResult:
    seconds: float = 0.0
    alerts: dict[str, int] = field(default_factory=dict)
    latency_s: list[tuple[float, float]] = field(default_factory=list)  # (since live start, latency)
    # loops whose agent span came AGENT_SPAN_WAIT_S later, in a later message: the wait for
    # it (deciding span's produce -> agent span's produce) and the latency after it
    agent_wait_s: list[float] = field(default_factory=list)
    latency_after_agent_s: list[float] = field(default_factory=list)
    killswitch_s: list[float] = field(default_factory=list)
    rss: list[tuple[float, int]] = field(default_factory=list)  # (since live start, bytes)
    live_rate: float = 0.0
    live_rate_asked: bool = False  # --live-rate, not half the measured rate
    live_loops: int = 0
    live_alerts: int = 0
    live_halts: int = 0
    home: Path | None = None
    # the worker's own account of the throughput input: late events per stage, DLQ records
    late: dict[str, float] = field(default_factory=dict)


def _metric(text: str, name: str) -> float:
    """The sum of a metric's series, whatever their labels (its one value when it has none)."""
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def _counts(text: str) -> tuple[float, float]:
    """(events decoded at ingest, events through detect) in one /metrics text."""
    return _metric(text, "agentwatch_events_in_total"), _metric(text, "agentwatch_events_detected_total")


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Worker:
    """A worker subprocess with its own home, topics and signing key."""

    def __init__(self, settings: Settings, bootstrap: str, spans_topic: str, audit_topic: str, *,
                 partitions: int = 1) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="agentwatch-bench-"))
        run = uuid.uuid4().hex[:6]
        policy = self.policy = self.home / "policy.yaml"
        policy.write_text(POLICY)
        self.private_key, self.public_key = generate_keypair()
        self.env = {**os.environ, "AGENTWATCH_BOOTSTRAP": bootstrap, "AGENTWATCH_HOME": str(self.home),
                    "AGENTWATCH_APP_ID": f"bench-{run}", "AGENTWATCH_TOPIC_OTLP": spans_topic,
                    "AGENTWATCH_TOPIC_AUDIT_IN": audit_topic, "AGENTWATCH_WEB_PORT": "0",
                    "AGENTWATCH_CLICKHOUSE_DSN": f"chdb://{self.home / 'clickhouse'}",
                    "AGENTWATCH_PARTITIONS": str(partitions),
                    "AGENTWATCH_POLICY_FILE": str(policy), "AGENTWATCH_CONTROL_PRIVATE_KEY": self.private_key,
                    "AGENTWATCH_KILLSWITCH_ACK_DEADLINE_S": "5"}
        self.topics: dict[str, str] = {}
        for name in ("events_in", "dlq", "alerts", "shadow_alerts", "by_trace", "by_agent", "by_tenant", "control", "acks"):
            self.topics[name] = self.env[f"AGENTWATCH_TOPIC_{name.upper()}"] = f"bench.{run}.{name}"
        self.settings = settings.with_overrides(home=self.home, clickhouse_dsn=self.env["AGENTWATCH_CLICKHOUSE_DSN"])
        self.proc: subprocess.Popen[bytes] | None = None
        self.info: WorkerInfo | None = None

    def start(self) -> None:
        self.log = (self.home / "worker.log").open("wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "streams.cli", "worker"], env=self.env, stdout=self.log,
                                     stderr=subprocess.STDOUT)

    async def wait_ready(self) -> WorkerInfo:
        deadline = time.monotonic() + 180
        while self.info is None:
            self.check()
            if time.monotonic() > deadline:
                raise AgentwatchError(f"the bench worker did not start; see {self.home / 'worker.log'}")
            await asyncio.sleep(0.3)
            self.info = running_worker(self.settings)
        return self.info

    def check(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AgentwatchError(f"the bench worker exited ({self.proc.returncode}); see {self.home / 'worker.log'}")

    async def metrics(self) -> str | None:
        """/metrics text, or None when the worker did not answer in time (retried by the caller)."""
        assert self.info is not None
        url = self.info.url + "/metrics"

        def get() -> str | None:
            try:
                with urllib.request.urlopen(url, timeout=METRICS_TIMEOUT_S) as r:
                    return r.read().decode()
            except (urllib.error.URLError, TimeoutError, ConnectionError):
                return None

        return await asyncio.to_thread(get)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.log.close()


class AlertLog:
    """Every alert on the alerts topic, with its arrival time (wall clock)."""

    def __init__(self, bootstrap: str, topic: str, security: Mapping[str, Any]) -> None:
        self.bootstrap, self.topic, self.security = bootstrap, topic, security
        self.ids: dict[str, set[str]] = defaultdict(set)
        self.arrived: dict[tuple[str, str], float] = {}  # (detector, agent) -> first arrival

    async def run(self) -> None:
        consumer = AIOKafkaConsumer(self.topic, bootstrap_servers=self.bootstrap, auto_offset_reset="earliest",
                                    enable_auto_commit=False, group_id=f"bench-alerts-{uuid.uuid4().hex[:8]}",
                                    **self.security)
        await consumer.start()
        try:
            while True:
                batches = await consumer.getmany(timeout_ms=200)
                now = time.time()
                for records in batches.values():
                    for r in records:
                        try:
                            a = Alert.model_validate_json(r.value)
                        except ValueError:
                            continue
                        self.ids[a.detector].add(a.alert_id)
                        self.arrived.setdefault((a.detector, a.agent_id), now)
        finally:
            await consumer.stop()

    def counts(self) -> dict[str, int]:
        return {d: len(ids) for d, ids in self.ids.items()}


def _labelled(text: str, name: str, label: str) -> dict[str, float]:
    pattern = rf'^{name}{{[^}}]*{label}="([^"]*)"[^}}]*}} (\S+)$'
    return {m.group(1): float(m.group(2)) for m in re.finditer(pattern, text, re.M)}


async def _throughput(w: Worker, alerts: AlertLog, wl: Workload, res: PipelineResult) -> float:
    last_text: list[str] = []

    async def detected() -> tuple[float, float] | None:
        w.check()
        text = await w.metrics()
        if text is None:
            return None
        last_text[:] = [text]
        return _counts(text)

    seconds = await _timed(detected, wl.spans + wl.audit_records, "agentwatch pipeline", w.home,
                           lambda: f"{sum(alerts.counts().values())} alerts")
    if last_text:
        res.late = _labelled(last_text[0], "agentwatch_late_events_total", "stage")
    return seconds


# how often the throughput phase polls /metrics: its figure is exact to about this much
POLL_S = 0.1


async def _timed(counts: Callable[[], Awaitable[tuple[float, float] | None]], target: int, label: str,
                 home: Path, status: Callable[[], str] = lambda: "") -> float:
    """Seconds from the worker's first input to ``target`` events through the detect stages,
    from polls of ``counts()``: (events decoded at ingest, events through detect) so far,
    None when a worker did not answer in time.

    The clock starts between the last poll that saw nothing decoded and the first that saw
    something: the whole pipeline's time, not the detect stage's alone (the last of three
    stages, it reports its first events when the stages before it are well into the input,
    which counted from then made the rate up to twice what the worker does). When the first
    answer already shows input decoded, the clock starts when the worker came up."""
    ready = idle_t = time.perf_counter()
    start_t: float | None = None
    n = 0.0
    last_progress = time.monotonic()
    while n < target:
        await asyncio.sleep(POLL_S)
        got = await counts()
        now = time.perf_counter()
        if got is not None:
            decoded, m = got
            if start_t is None:
                if decoded > 0:
                    start_t = ready if idle_t == ready else (idle_t + now) / 2
                else:
                    idle_t = now
            if m > n:
                last_progress = time.monotonic()
                n = m
        if time.monotonic() - last_progress > STALL_S:
            raise AgentwatchError(f"{label} stalled at {n:,.0f}/{target:,} events; see the logs in {home}")
        progress(f"{label}: {n:,.0f}/{target:,} events {status()}")
    progress_done(f"{label}: {target:,} events")
    return time.perf_counter() - (start_t if start_t is not None else ready)


async def _live_policy(w: Worker) -> None:
    """Hot-reload the live phase's policy (workload.LIVE_POLICY) and wait until it is in force."""
    w.policy.write_text(LIVE_POLICY)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = await w.metrics()
        if text is not None and _labelled(text, "agentwatch_policy_reloads_total", "result").get("ok", 0) >= 1:
            # the correlate stages take it at their next tick (a snapshot and a restore of the
            # backlog's join state, whose watermark then moves on by the lateness given back):
            # the live phase starts once that is done, not during it
            await asyncio.sleep(5)
            return
        progress("live phase: waiting for the worker to reload its policy")
        await asyncio.sleep(0.5)
    raise AgentwatchError(f"the bench worker did not reload its policy; see {w.home / 'worker.log'}")


async def _await_alerts(alerts: AlertLog, expected: dict[str, int], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = alerts.counts()
        if all(got.get(d, 0) >= n for d, n in expected.items()):
            return
        progress(f"waiting for alerts: {sum(got.values())}/{sum(expected.values())}")
        await asyncio.sleep(0.5)


async def _live(w: Worker, alerts: AlertLog, bootstrap: str, spans_topic: str, rate: float, duration_s: float,
                res: PipelineResult, security: Mapping[str, Any]) -> None:
    loops = int(min(30, max(2, duration_s // 2)))
    interval = duration_s / loops
    halted: dict[str, float] = {}
    clients: dict[str, AgentClient] = {}

    def on_halt_of(agent: str):  # type: ignore[no-untyped-def]
        def on_halt(cmd: KillSwitchCommand) -> None:
            halted.setdefault(agent, time.time())
        return on_halt

    # each client says it obeyed a halt: expected here, and it would break the progress line
    logging.getLogger("agentwatch.client").setLevel(logging.ERROR)
    progress(f"live phase: starting {loops} agent clients")
    for k in range(loops):
        agent = f"live-loop-{k:02d}"
        clients[agent] = AgentClient(agent, bootstrap, public_keys=w.public_key, on_halt=on_halt_of(agent),
                                     events_topic=w.topics["events_in"], control_topic=w.topics["control"],
                                     acks_topic=w.topics["acks"], kafka_options=security,
                                     # its ack key's public half lands where the worker looks for it
                                     ack_key=str(w.home / "keys" / "agents" / f"{agent}.key"))
    await asyncio.gather(*(c.start() for c in clients.values()))
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, max_request_size=8 << 20, **security)
    await producer.start()
    rng = random.Random(7)
    produced_at: dict[str, float] = {}
    held: list[tuple[float, tuple[str, bytes, bytes, int, int]]] = []  # (send at, agent span)
    agent_at: dict[str, float] = {}  # produce of a held-back agent span
    pid = w.proc.pid if w.proc else 0
    try:
        start = time.time()
        sent_spans = 0
        next_loop = interval / 2
        next_rss = 0.0
        pool = [f"live-agent-{i:03d}" for i in range(100)]
        i = 0
        while (elapsed := time.time() - start) < duration_s:
            # pace: the spans sent so far should have taken sent/rate seconds
            ahead = sent_spans / rate - elapsed
            if ahead > 0:
                await asyncio.sleep(ahead)
            w.check()
            wr = TraceWriter(rng)
            now_ns = time.time_ns()
            for _ in range(max(1, 100 // (CHILDREN + 1))):
                children = [tool("search_docs", f'{{"q": {i}, "c": {c}}}') for c in range(6)] + [llm(10)] * 3
                wr.trace(pool[i % len(pool)], now_ns, children)
                i += 1
            loop_agent = ""
            if elapsed >= next_loop and len(produced_at) < loops:
                loop_agent = f"live-loop-{len(produced_at):02d}"
                # odd loops: the agent span ends last and is exported in a later message
                split = len(produced_at) % 2 == 1
                loop_trace(wr, loop_agent, now_ns, agent_span=not split)
                for span in wr.held:
                    held.append((time.time() + AGENT_SPAN_WAIT_S, span))
                next_loop += interval
            due = [h for h in held if h[0] <= time.time()]
            for h in due:
                wr.add_held(h[1])
                held.remove(h)
            msg = wr.take()
            if loop_agent:
                produced_at[loop_agent] = time.time()
            for _, span in due:
                agent_at[span[0]] = time.time()
            await producer.send(spans_topic, msg.value, timestamp_ms=msg.ts_ms)
            sent_spans += msg.spans
            if elapsed >= next_rss:
                res.rss.append((elapsed, _rss(pid)))
                next_rss += 1.0
            progress(f"live phase at {rate:,.0f} spans/s: {elapsed:,.0f}/{duration_s:,.0f}s, "
                     f"{len(produced_at)} loops, {len(halted)} halts")
        while held:  # the last loops' agent spans
            send_at, span = held.pop(0)
            await asyncio.sleep(max(0.0, send_at - time.time()))
            wr = TraceWriter(rng)
            wr.add_held(span)
            msg = wr.take()
            agent_at[span[0]] = time.time()
            await producer.send(spans_topic, msg.value, timestamp_ms=msg.ts_ms)
        res.live_rate = sent_spans / max(time.time() - start, 1e-6)
        await producer.flush()
        # the last loops' alerts and halts
        deadline = time.time() + 60
        while time.time() < deadline and (
                len(halted) < len(produced_at)
                or any(("retry_loop", a) not in alerts.arrived for a in produced_at)):
            await asyncio.sleep(0.2)
        for agent, t in produced_at.items():
            got = alerts.arrived.get(("retry_loop", agent))
            if got is not None and agent in agent_at:
                res.agent_wait_s.append(agent_at[agent] - t)
                res.latency_after_agent_s.append(got - agent_at[agent])
            elif got is not None:
                res.latency_s.append((t - start, got - t))
            if got is not None and agent in halted:
                res.killswitch_s.append(halted[agent] - got)
        res.live_loops, res.live_halts = len(produced_at), len(halted)
        res.live_alerts = sum(1 for a in produced_at if ("retry_loop", a) in alerts.arrived)
        progress_done(f"live phase: {res.live_loops} loops, {res.live_alerts} alerts, {res.live_halts} halts")
    finally:
        await producer.stop()
        await asyncio.gather(*(c.stop() for c in clients.values()), return_exceptions=True)


async def run_pipeline(settings: Settings, bootstrap: str, spans_topic: str, audit_topic: str, wl: Workload,
                       duration_s: float, security: Mapping[str, Any], *,
                       live_rate: float | None = None) -> PipelineResult:
    # the bench times alerts as it reads them: its own process must not stop for a second
    # to walk the input it holds (the worker's GC settings, streams/worker.py)
    thresholds = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(50_000, 20, NEVER)
    try:
        return await _run_pipeline(settings, bootstrap, spans_topic, audit_topic, wl, duration_s, security,
                                   live_rate=live_rate)
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()


async def _run_pipeline(settings: Settings, bootstrap: str, spans_topic: str, audit_topic: str, wl: Workload,
                        duration_s: float, security: Mapping[str, Any], *,
                        live_rate: float | None) -> PipelineResult:
    w = Worker(settings, bootstrap, spans_topic, audit_topic)
    res = PipelineResult(home=w.home)
    progress("agentwatch pipeline: starting a worker")
    w.start()
    try:
        await w.wait_ready()
        alerts = AlertLog(bootstrap, w.topics["alerts"], security)
        reader = asyncio.create_task(alerts.run())
        try:
            res.seconds = await _throughput(w, alerts, wl, res)
            producer = AIOKafkaProducer(bootstrap_servers=bootstrap, **security)
            await producer.start()
            try:
                clock = clock_message(random.Random(5), time.time_ns())
                await producer.send_and_wait(spans_topic, clock.value, timestamp_ms=clock.ts_ms)
            finally:
                await producer.stop()
            await _await_alerts(alerts, wl.expected, 90)
            res.alerts = alerts.counts()
            if duration_s > 0:
                await _live_policy(w)
                res.live_rate_asked = live_rate is not None
                rate = live_rate or (wl.spans / res.seconds) / 2
                await _live(w, alerts, bootstrap, spans_topic, rate, duration_s, res, security)
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
    finally:
        w.stop()
    return res


class WorkerGroup:
    """The split deployment on the bench's topics (docs/architecture.md, "Deployment
    shapes"): ``workers`` detection-only workers in one consumer group, sharing every stage
    by partition, and one ``agentwatch store`` process writing the embedded store."""

    def __init__(self, settings: Settings, bootstrap: str, spans_topic: str, audit_topic: str, workers: int) -> None:
        self.base = Worker(settings, bootstrap, spans_topic, audit_topic, partitions=workers)
        self.workers = workers
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Any] = []

    @property
    def home(self) -> Path:
        return self.base.home

    def _spawn(self, command: str, name: str, env: dict[str, str]) -> None:
        log = (self.home / f"{name}.log").open("wb")
        self.logs.append(log)
        self.procs.append(subprocess.Popen([sys.executable, "-m", "streams.cli", command], env=env, stdout=log,
                                           stderr=subprocess.STDOUT))

    def start(self) -> None:
        self._spawn("store", "store", self.base.env)
        for k in range(self.workers):
            self._spawn("worker", f"worker-{k}", {**self.base.env, "AGENTWATCH_WORKER_STORE": "false"})

    def check(self) -> None:
        for p in self.procs:
            if p.poll() is not None:
                raise AgentwatchError(f"a bench process exited ({p.returncode}); see the logs in {self.home}")

    def urls(self) -> list[str]:
        """The /metrics addresses of the detection workers that are up."""
        out = []
        for record in sorted((self.home / "workers").glob("*.json")):
            try:
                out.append(json.loads(record.read_text())["url"] + "/metrics")
            except (OSError, ValueError, KeyError):
                continue
        return out

    async def detected(self) -> tuple[float, float] | None:
        """Events decoded at ingest and through the detect stages, summed over every worker
        (None until all of them answer)."""
        self.check()
        urls = self.urls()
        if len(urls) < self.workers:
            return None

        def get(url: str) -> tuple[float, float] | None:
            try:
                with urllib.request.urlopen(url, timeout=METRICS_TIMEOUT_S) as r:
                    text = r.read().decode()
            except (urllib.error.URLError, TimeoutError, ConnectionError):
                return None
            return _counts(text)

        counts = await asyncio.gather(*(asyncio.to_thread(get, u) for u in urls))
        if any(c is None for c in counts):
            return None
        return sum(c[0] for c in counts if c), sum(c[1] for c in counts if c)

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        for log in self.logs:
            log.close()


async def run_scale_out(settings: Settings, bootstrap: str, spans_topic: str, audit_topic: str, wl: Workload,
                        workers: int) -> float:
    """Seconds ``workers`` detection workers and a store process take for the throughput input
    (its topics have ``workers`` partitions)."""
    group = WorkerGroup(settings, bootstrap, spans_topic, audit_topic, workers)
    label = f"agentwatch, {workers} workers + store"
    progress(f"{label}: starting")
    group.start()
    try:
        return await _timed(group.detected, wl.spans + wl.audit_records, label, group.home)
    finally:
        group.stop()
