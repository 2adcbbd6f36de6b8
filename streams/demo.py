"""``agentwatch demo``: the whole pipeline on the embedded defaults.

Starts what is missing (the local broker, a worker), runs a simulated fleet
(healthy agents and a few that misbehave) through the real topics, prints
alerts as they arrive on the alerts topic, and ends with a ClickHouse query
the user can run again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from agentwatch_client import AgentClient
from schemas.alerts import Alert
from schemas.errors import AgentwatchError
from schemas.control import KillSwitchCommand
from streams.control_plane import control_settings, trusted_keys_text
from streams.fleet import default_fleet, run_fleet
from streams.killswitch import format_active, list_active
from streams.control_plane import AGENT_KEYS_DIR
from streams.kafka import ensure_topics, input_topics, topic_options
from streams.kafka_security import kafka_options as kafka_security
from streams.query import format_table, run_query
from streams.settings import Settings
from streams.worker import WorkerInfo, running_worker

DEMO_POLICY = Path(__file__).resolve().parent.parent / "deploy" / "policies" / "demo.yaml"
DEMO_QUERY = (
    "SELECT detector, agent_id, severity, count, summary "
    "FROM agentwatch.alerts_latest ORDER BY first_seen"
)


def say(msg: str) -> None:
    print(msg, flush=True)


def _start_worker(settings: Settings, bootstrap: str) -> tuple[subprocess.Popen[bytes], WorkerInfo]:
    log_path = settings.home_dir / "worker.log"
    env = {**os.environ, "AGENTWATCH_BOOTSTRAP": bootstrap, "AGENTWATCH_HOME": str(settings.home_dir)}
    if settings.policy_file is None:
        env["AGENTWATCH_POLICY_FILE"] = str(DEMO_POLICY)  # retry_loop in enforce mode: kill switches
    if settings.web_port == 6066:
        env["AGENTWATCH_WEB_PORT"] = "0"  # do not collide with another faust app on the default port
    with log_path.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "streams.cli", "worker"], env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace").splitlines()[-5:]
            raise AgentwatchError("the worker exited at start; last lines of "
                                  f"{log_path}:\n" + "\n".join(tail))
        info = running_worker(settings)
        if info is not None and info.pid == proc.pid:
            return proc, info
        time.sleep(0.5)
    proc.terminate()
    raise AgentwatchError(f"the worker did not become ready within 120 s (see {log_path})")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _print_alert(a: Alert) -> None:
    when = a.last_seen.strftime("%H:%M:%S")
    say(f"  ALERT {when} [{a.severity.value:>8}] {a.detector:<12} agent={a.agent_id:<18} "
        f"x{a.count:<3} {a.summary}  (id {a.alert_id[:12]})")


async def _run(settings: Settings, bootstrap: str, duration_s: float) -> int:
    security = kafka_security(settings)
    consumer = AIOKafkaConsumer(settings.topic_alerts, bootstrap_servers=bootstrap, auto_offset_reset="latest",
                                **security)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, **security)
    fleet = default_fleet()
    first_alert: dict[str, float] = {}
    keys = trusted_keys_text(control_settings(settings), settings.home_dir)

    def on_halt_for(agent_id: str):  # noqa: ANN202 - a closure per agent
        def on_halt(cmd: KillSwitchCommand) -> None:
            since = first_alert.get(agent_id)
            latency = f", {1000 * (time.monotonic() - since):.0f} ms after its first alert" if since else ""
            say(f"  HALT  {agent_id} verified and obeyed kill switch {cmd.command_id[:12]} "
                f"(issued by {cmd.issued_by}{latency}): it stops acting and acknowledges")
        return on_halt

    # each simulated agent listens for kill switches like a real one (lookback 0: a fresh demo run
    # starts its agents un-halted even if an earlier run halted them)
    clients = {a.agent_id: AgentClient(a.agent_id, bootstrap, tenant=a.tenant, public_keys=keys,
                                       on_halt=on_halt_for(a.agent_id), events_topic=settings.topic_events_in,
                                       control_topic=settings.topic_control, acks_topic=settings.topic_acks,
                                       lookback_s=0, kafka_options=security,
                                       # its own ack key, generated once; the worker finds its public half
                                       ack_key=str(settings.home_dir / AGENT_KEYS_DIR / f"{a.agent_id}.key"))
               for a in fleet}
    await consumer.start()
    await producer.start()
    for c in clients.values():
        await c.start()
    seen: dict[str, Alert] = {}
    try:
        await consumer.seek_to_end()

        async def watch() -> None:
            async for msg in consumer:
                a = Alert.model_validate(orjson.loads(msg.value))
                seen[a.alert_id] = a
                first_alert.setdefault(a.agent_id, time.monotonic())
                _print_alert(a)

        watcher = asyncio.create_task(watch())
        say(f"publishing simulated agent traffic for {duration_s:.0f}s "
            "(5 agents: 3 healthy, ops-bot-7 stuck in a retry loop, research-agent-3 failing; "
            "plus 3 malformed records for the DLQ)...")
        sent = await run_fleet(producer, otlp_topic=settings.topic_otlp, events_topic=settings.topic_events_in,
                               duration_s=duration_s, fleet=fleet, clients=clients)
        say(f"fleet done: {sent} messages published; waiting for the last alerts...")
        await asyncio.sleep(8)
        watcher.cancel()
        halted = sorted(a for a, c in clients.items() if c.halted)
        say(f"agents halted by a kill switch: {', '.join(halted) or 'none'}; "
            f"still running: {', '.join(sorted(set(clients) - set(halted)))}")
    finally:
        for c in clients.values():
            await c.stop()
        await producer.stop()
        await consumer.stop()
    return len(seen)


def run_demo(settings: Settings, *, duration_s: float, keep_running: bool) -> int:
    from deploy import broker

    settings.home_dir.mkdir(parents=True, exist_ok=True)
    # the demo prints what its simulated agents do itself; their client's own log lines would repeat it
    logging.getLogger("agentwatch.client").setLevel(logging.ERROR)
    started_broker = False
    bootstrap = settings.bootstrap
    if not bootstrap:
        info = broker.status(settings.broker_dir)
        if info is None:
            say("starting the local Kafka broker (the first run resolves its jars with Maven)...")
            info = broker.up(settings.broker_dir)
            started_broker = True
        bootstrap = info.bootstrap
    say(f"broker: {bootstrap}")

    worker_proc = None
    n_alerts = 0
    # the demo plays the producers' side: it creates the input topics (the worker creates only its own),
    # before the worker starts so that it subscribes to topics that exist
    asyncio.run(ensure_topics(bootstrap, [*input_topics(settings), settings.topic_alerts], settings.partitions,
                              **topic_options(settings)))
    try:
        worker = running_worker(settings)
        if worker is None:
            say("starting the worker...")
            worker_proc, worker = _start_worker(settings, bootstrap)
        say(f"worker: pid {worker.pid}, metrics at {worker.url}/metrics, ClickHouse {worker.dsn}")
        n_alerts = asyncio.run(_run(settings, bootstrap, duration_s))
        say(f"\n{n_alerts} alerts received. Stored in ClickHouse; the query:\n  agentwatch query \"{DEMO_QUERY}\"\n")
        result = run_query(settings, DEMO_QUERY)
        say(format_table(result.columns, result.rows))
        dlq = run_query(settings, "SELECT topic, reason FROM agentwatch.dlq ORDER BY received_at")
        say("\nmalformed input kept in the DLQ with its reason:")
        say(format_table(dlq.columns, dlq.rows))
        say("\nkill switches in force (agentwatch killswitch list):")
        say(format_active(list_active(settings)))
    finally:
        if worker_proc is not None and not keep_running:
            _stop(worker_proc)
        if started_broker and not keep_running:
            broker.down(settings.broker_dir)
    if keep_running:
        say("\nbroker and worker left running (`agentwatch broker down` stops the broker).")
    say(f"\nrun the query again any time:\n  agentwatch query \"{DEMO_QUERY}\"")
    return 0 if n_alerts else 1
