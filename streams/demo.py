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
from datetime import datetime, timezone
from pathlib import Path

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from agentwatch_client import AgentClient
from schemas.alerts import Alert
from schemas.errors import AgentwatchError
from schemas.control import KillSwitchCommand
from streams.control_plane import control_settings, trusted_keys_text
from streams.fleet import (
    CANARY_AGENT,
    CANARY_BASELINE,
    CANARY_CANDIDATE,
    SCRIPTED_AGENTS,
    default_fleet,
    incident_script,
    run_canary,
    run_fleet,
    run_script,
)
from streams.killswitch import format_active, list_active
from streams.control_plane import AGENT_KEYS_DIR
from streams.kafka import ensure_topics, input_topics, topic_options
from streams.kafka_security import kafka_options as kafka_security
from streams.query import format_table, run_query
from streams.settings import Settings

TOPIC_FIELDS = [name for name in Settings.model_fields if name.startswith("topic_")]
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
    env["AGENTWATCH_APP_ID"] = settings.app_id
    env.update({f"AGENTWATCH_{name.upper()}": getattr(settings, name) for name in TOPIC_FIELDS})
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


# (family shown in the summary, detector); the kill switch is the halts the detectors caused
FAMILIES = [
    ("token spike", "token_spike"),
    ("disallowed access", "disallowed_access"),
    ("escalation bypass (approval flow)", "escalation_bypass"),
    ("peer preservation", "peer_preservation"),
    ("unattributed side effect (audit record)", "unattributed_side_effect"),
    ("retry loop", "retry_loop"),
    ("canary rollback (agent version)", "canary"),
]


async def _run(settings: Settings, bootstrap: str, duration_s: float,
               first_by_detector: dict[str, float]) -> dict[str, Alert]:
    security = kafka_security(settings)
    consumer = AIOKafkaConsumer(settings.topic_alerts, bootstrap_servers=bootstrap, auto_offset_reset="latest",
                                **security)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, **security)
    fleet = default_fleet()
    first_alert: dict[str, float] = {}
    keys = trusted_keys_text(control_settings(settings), settings.home_dir)
    start = datetime.now(timezone.utc)
    script = incident_script(start)

    def on_halt_for(agent_id: str):  # noqa: ANN202 - a closure per agent
        def on_halt(cmd: KillSwitchCommand) -> None:
            since = first_alert.get(agent_id)
            latency = f", {1000 * (time.monotonic() - since):.0f} ms after its first alert" if since else ""
            say(f"  HALT  {agent_id} verified and obeyed kill switch {cmd.command_id[:12]} "
                f"(issued by {cmd.issued_by}{latency}): it stops acting and acknowledges")
        return on_halt

    # each simulated agent listens for kill switches like a real one (lookback 0: a fresh demo run
    # starts its agents un-halted even if an earlier run halted them)
    agent_ids = [(a.agent_id, a.tenant) for a in fleet] + [(a, "acme") for a in SCRIPTED_AGENTS]
    clients = {agent: AgentClient(agent, bootstrap, tenant=tenant, public_keys=keys,
                                  on_halt=on_halt_for(agent), events_topic=settings.topic_events_in,
                                  control_topic=settings.topic_control, acks_topic=settings.topic_acks,
                                  lookback_s=0, kafka_options=security,
                                  # each agent signs its acks; the worker finds the public half under <home>
                                  ack_key=str(settings.home_dir / AGENT_KEYS_DIR / f"{agent}.key"))
               for agent, tenant in agent_ids}
    # triage-bot's two versions, each an instance with its own client: a version-scoped halt
    # (a failed canary's rollback) stops the candidate's only
    canary_clients = {v: AgentClient(CANARY_AGENT, bootstrap, tenant="acme", agent_version=v, public_keys=keys,
                                     on_halt=on_halt_for(f"{CANARY_AGENT}@{v}"),
                                     events_topic=settings.topic_events_in, control_topic=settings.topic_control,
                                     acks_topic=settings.topic_acks, lookback_s=0, kafka_options=security,
                                     batch_interval_s=0.2,
                                     # one agent, one key: its instances of either version sign acks alike
                                     ack_key=str(settings.home_dir / AGENT_KEYS_DIR / f"{CANARY_AGENT}.key"))
                      for v in (CANARY_BASELINE, CANARY_CANDIDATE)}
    await consumer.start()
    await producer.start()
    for c in [*clients.values(), *canary_clients.values()]:
        await c.start()
    seen: dict[str, Alert] = {}
    try:
        await consumer.seek_to_end()

        async def watch() -> None:
            async for msg in consumer:
                a = Alert.model_validate(orjson.loads(msg.value))
                seen[a.alert_id] = a
                first_alert.setdefault(a.agent_id, time.monotonic())
                if a.agent_version:
                    first_alert.setdefault(f"{a.agent_id}@{a.agent_version}", time.monotonic())
                first_by_detector.setdefault(a.detector, time.monotonic() - traffic_started)
                _print_alert(a)

        traffic_started = time.monotonic()
        watcher = asyncio.create_task(watch())
        say(f"publishing simulated agent traffic for {duration_s:.0f}s: 5 fleet agents (3 healthy, ops-bot-7 "
            "stuck in a retry loop, research-agent-3 failing; plus 3 malformed records for the DLQ) and one "
            f"scripted incident per detector family; {CANARY_AGENT} runs {CANARY_BASELINE} and, as a canary, "
            f"{CANARY_CANDIDATE}, which repeats its searches...")
        fleet_task = run_fleet(producer, otlp_topic=settings.topic_otlp, events_topic=settings.topic_events_in,
                               duration_s=duration_s, fleet=fleet, clients=clients)
        script_task = run_script(script, producer, events_topic=settings.topic_events_in,
                                 audit_topic=settings.topic_audit_in, clients=clients, say=say)
        canary_task = run_canary(canary_clients, duration_s=duration_s)
        sent, _, _ = await asyncio.gather(fleet_task, script_task, canary_task)
        say(f"traffic done: {sent} fleet messages and {len(script)} scripted steps published; "
            "waiting for the last alerts (absence is decided after the allowed lateness)...")
        wanted = {d for _, d in FAMILIES}
        deadline = time.monotonic() + 45
        while time.monotonic() < deadline and not wanted <= {a.detector for a in seen.values()}:
            await asyncio.sleep(0.5)
        await asyncio.sleep(2)
        watcher.cancel()
        halted = sorted(a for a, c in clients.items() if c.halted)
        say(f"agents halted by a kill switch: {', '.join(halted) or 'none'}; "
            f"still running: {', '.join(sorted(set(clients) - set(halted)))}")
        say(f"{CANARY_AGENT} by version: " + ", ".join(
            f"{v} {'halted (rolled back)' if c.halted else 'running'}" for v, c in canary_clients.items()))
    finally:
        for c in [*clients.values(), *canary_clients.values()]:
            await c.stop()
        await producer.stop()
        await consumer.stop()
    return seen


def _summary(settings: Settings, since: datetime, first_by_detector: dict[str, float]) -> tuple[str, list[str]]:
    """The summary table of this run (from ClickHouse) and the families that produced no alert."""
    after = since.strftime("%Y-%m-%d %H:%M:%S")
    rows = run_query(settings, "SELECT detector, count(), groupUniqArray(agent_id), groupUniqArray(severity), "
                               "groupUniqArray(mode) FROM agentwatch.alerts_latest "
                               f"WHERE last_seen >= toDateTime64('{after}', 6, 'UTC') GROUP BY detector").rows
    by_detector = {r[0]: r for r in rows}
    halts = run_query(settings, "SELECT target_value, command_id FROM agentwatch.killswitches FINAL "
                                f"WHERE action = 'halt' AND alert_id != '' AND issued_at >= "
                                f"toDateTime64('{after}', 6, 'UTC')").rows
    acked = run_query(settings, "SELECT DISTINCT command_id FROM agentwatch.events "
                                "WHERE kind = 'control_ack' AND outcome = 'ok' AND ts >= "
                                f"toDateTime64('{after}', 6, 'UTC')").rows
    table: list[tuple[str, ...]] = []
    missing = []
    for family, detector in FAMILIES:
        r = by_detector.get(detector)
        if r is None:
            missing.append(family)
            table.append((family, detector, "0", "-", "-", "-", "-"))
            continue
        at = first_by_detector.get(detector)
        table.append((family, detector, str(r[1]), ", ".join(sorted(r[2])), "/".join(sorted(r[3])),
                      "/".join(sorted(r[4])), f"+{at:.0f}s" if at is not None else "-"))
    if not halts:
        missing.append("kill switch")
    ours = {h[1] for h in halts}
    table.append(("kill switch", "(enforce mode)", f"{len(halts)} halts",
                  ", ".join(sorted({h[0] for h in halts})) or "-",
                  f"{len(ours & {a[0] for a in acked})} obeyed+acked", "halt", "-"))
    header = ["family", "detector", "alerts", "agents", "severity", "mode", "first alert"]
    return format_table(header, table), missing


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
    summary, missing = "", ["all"]
    if running_worker(settings) is None:
        # topics and consumer group of this run only: an earlier run's traffic, halts and detector
        # state (rebuilt from its internal topics) must not leak into this one. The store is shared;
        # what is shown below is this run's.
        run_id = time.strftime("demo%Y%m%d%H%M%S")
        settings = settings.with_overrides(app_id=f"agentwatch-{run_id}", **{
            name: f"{getattr(settings, name)}.{run_id}" for name in TOPIC_FIELDS})
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
        run_started = datetime.now(timezone.utc)
        first_by_detector: dict[str, float] = {}
        seen = asyncio.run(_run(settings, bootstrap, duration_s, first_by_detector))
        n_alerts = len(seen)
        after = f"toDateTime64('{run_started.strftime('%Y-%m-%d %H:%M:%S')}', 6, 'UTC')"
        say(f"\n{n_alerts} alerts received; this run's, as stored in ClickHouse:")
        result = run_query(settings, DEMO_QUERY.replace(" ORDER BY", f" WHERE last_seen >= {after} ORDER BY"))
        say(format_table(result.columns, result.rows))
        dlq = run_query(settings, f"SELECT topic, reason FROM agentwatch.dlq WHERE received_at >= {after} "
                                  "ORDER BY received_at")
        say("\nmalformed input kept in the DLQ with its reason:")
        say(format_table(dlq.columns, dlq.rows))
        say("\nkill switches in force (agentwatch killswitch list):")
        say(format_active(list_active(settings)))
        # the stored alerts land a moment after they are published
        deadline = time.monotonic() + 15
        summary, missing = _summary(settings, run_started, first_by_detector)
        while missing and time.monotonic() < deadline:
            time.sleep(1)
            summary, missing = _summary(settings, run_started, first_by_detector)
    finally:
        if worker_proc is not None and not keep_running:
            _stop(worker_proc)
        if started_broker and not keep_running:
            broker.down(settings.broker_dir)
    if keep_running:
        say("\nbroker and worker left running (`agentwatch broker down` stops the broker).")
    say(f"\nrun the query again any time:\n  agentwatch query \"{DEMO_QUERY}\"")
    say("\nsummary: every detector family, from the alerts stored in ClickHouse")
    say(summary)
    if missing:
        say(f"not shown this run: {', '.join(missing)} (see {settings.home_dir / 'worker.log'})")
        return 1
    return 0
