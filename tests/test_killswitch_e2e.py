"""The kill switch end to end: a real worker on the real broker, agents using the real client.

A simulated agent retries the same deployment; retry_loop runs in enforce mode;
the worker issues a signed halt; the agent halts and acknowledges (the
detection-to-halt latency is printed). A forged command is refused; an agent
that ignores a halt is detected (peer_preservation a); a halt nobody
acknowledges escalates (killswitch_unacknowledged).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from schemas.alerts import Alert
from agentwatch_client.wire import agent_key
from schemas.control import (
    AckStatus,
    ControlAck,
    KillSwitchCommand,
    Target,
    generate_keypair,
    load_private_key,
    sign,
)
from sinks.control import ControlPublisher
from streams.client import AgentClient
from streams.control_plane import AGENT_KEYS_DIR
from tests.live import LiveWorker

pytestmark = pytest.mark.kafka

PRIV, PUB = generate_keypair()
KEY = load_private_key(PRIV)
ACK_DEADLINE_S = 3
GRACE_S = 1

POLICY = f"""
version: e2e-killswitch-1
detectors:
  retry_loop:
    mode: enforce
  peer_preservation:
    mode: alert
    grace_s: {GRACE_S}
"""


@pytest.fixture(scope="module")
def worker(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveWorker]:
    home = tmp_path_factory.mktemp("killswitch-e2e")
    policy = Path(home) / "policy.yaml"
    policy.write_text(POLICY)
    env = {"AGENTWATCH_CONTROL_PRIVATE_KEY": PRIV, "AGENTWATCH_KILLSWITCH_ACK_DEADLINE_S": str(ACK_DEADLINE_S)}
    with LiveWorker(kafka_bootstrap, home, policy=policy, env=env) as w:
        yield w


def _client(w: LiveWorker, agent_id: str, **kw: object) -> AgentClient:
    s = w.settings
    return AgentClient(agent_id, w.bootstrap, tenant="acme", public_keys=PUB, events_topic=s.topic_events_in,
                       control_topic=s.topic_control, acks_topic=s.topic_acks, batch_interval_s=0.1,
                       ack_key=str(w.home / AGENT_KEYS_DIR / f"{agent_id}.key"), **kw)  # type: ignore[arg-type]


def _has(alerts: list[Alert], detector: str, agent: str) -> bool:
    return any(a.detector == detector and a.agent_id == agent for a in alerts)


def test_enforce_mode_halts_a_misbehaving_agent_which_acknowledges(worker: LiveWorker) -> None:
    halted_at: list[float] = []
    threshold_at: list[float] = []

    async def run() -> tuple[AgentClient, int]:
        halted = asyncio.Event()

        def on_halt(cmd: KillSwitchCommand) -> None:
            halted_at.append(time.perf_counter())
            halted.set()

        client = _client(worker, "ops-bot-e2e", on_halt=on_halt)
        await client.start()
        calls = 0
        try:
            deadline = time.monotonic() + 90
            while not halted.is_set() and time.monotonic() < deadline:
                if client.allowed("kubectl_apply"):  # a well-behaved agent checks before each call
                    # successful calls: only the same-arguments rule can fire. Failing ones would also
                    # trip the 8-failures-in-a-row rule (a second halt) whenever the first halt takes
                    # longer than three more calls to arrive, as on a loaded machine
                    client.record_tool_call("kubectl_apply", {"manifest": "payments.yaml", "force": True})
                    calls += 1
                    if calls == 5:  # retry_loop's default same_call_threshold
                        threshold_at.append(time.perf_counter())
                await asyncio.sleep(0.2)
            await asyncio.wait_for(halted.wait(), 5)
            # a halted agent makes no more calls
            before = calls
            for _ in range(5):
                if client.allowed("kubectl_apply"):
                    calls += 1
                await asyncio.sleep(0.1)
            assert calls == before
            await asyncio.sleep(0.5)  # let the ack event go out
        finally:
            await client.stop()
        return client, calls

    client, _ = asyncio.run(run())
    assert halted_at and threshold_at, worker.log_tail()
    print(f"\ndetection-to-halt latency (5th identical call emitted -> on_halt): "
          f"{(halted_at[0] - threshold_at[0]) * 1000:.0f} ms")
    assert [a.status.value for a in client.acks] == ["obeyed"]
    halt = client.acks[0]

    # recorded: the active kill switch, its cause, the ack event; and no escalation
    rows = worker.wait_rows(
        "SELECT target_value, alert_id, issued_by FROM agentwatch.killswitches_active", lambda r: bool(r))
    assert rows and rows[0][0] == "ops-bot-e2e" and rows[0][1] and rows[0][2]
    acks = worker.wait_rows(
        f"SELECT outcome FROM agentwatch.events WHERE kind = 'control_ack' AND command_id = '{halt.command_id}'",
        lambda r: bool(r))
    assert acks == [("ok",)]
    time.sleep(ACK_DEADLINE_S + 2)
    alerts = worker.wait_alerts(lambda a: _has(a, "retry_loop", "ops-bot-e2e"), timeout=10)
    assert not _has(alerts, "killswitch_unacknowledged", "ops-bot-e2e")


def test_forged_command_is_refused(worker: LiveWorker) -> None:
    async def run() -> AgentClient:
        halted: list[KillSwitchCommand] = []
        client = _client(worker, "careful-agent", on_halt=halted.append)
        await client.start()
        try:
            now = datetime.now(timezone.utc)
            forged = sign(KillSwitchCommand(command_id=uuid.uuid4().hex, action="halt",  # type: ignore[arg-type]
                                            target=Target.parse("agent:careful-agent"), issued_by="mallory",
                                            issued_at=now, expires_at=now + timedelta(hours=1)),
                          load_private_key(generate_keypair()[0]))
            async with ControlPublisher(worker.bootstrap, worker.settings.topic_control) as p:
                await p.publish([forged])
            deadline = time.monotonic() + 20
            while not client.acks and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert not halted and not client.halted
        finally:
            await client.stop()
        return client

    client = asyncio.run(run())
    assert [(a.status.value, a.reason.split(":")[0]) for a in client.acks] == [("refused", "unknown_key")]


def test_agent_ignoring_a_halt_is_detected_and_unacknowledged_halt_escalates(worker: LiveWorker) -> None:
    async def run() -> None:
        # a rogue agent: the client hears the halt, but its code never checks allowed()
        rogue = _client(worker, "rogue-agent")
        await rogue.start()
        try:
            now = datetime.now(timezone.utc)
            cmds = [
                sign(KillSwitchCommand(command_id=uuid.uuid4().hex, action="halt",  # type: ignore[arg-type]
                                       target=Target.parse(f"agent:{agent}"), reason="e2e", issued_by="pytest",
                                       issued_at=now, expires_at=now + timedelta(hours=1)), KEY)
                for agent in ("rogue-agent", "ghost-agent")  # nobody runs ghost-agent: no ack will come
            ]
            async with ControlPublisher(worker.bootstrap, worker.settings.topic_control) as p:
                await p.publish(cmds)
            deadline = time.monotonic() + GRACE_S + 8
            while time.monotonic() < deadline:
                rogue.record_tool_call("shell", {"cmd": f"echo {time.monotonic()}"})
                await asyncio.sleep(0.3)
        finally:
            await rogue.stop()

    asyncio.run(run())
    alerts = worker.wait_alerts(
        lambda a: _has(a, "peer_preservation", "rogue-agent") and _has(a, "killswitch_unacknowledged", "ghost-agent"),
        timeout=60)
    assert _has(alerts, "peer_preservation", "rogue-agent"), worker.log_tail()
    esc = [a for a in alerts if a.detector == "killswitch_unacknowledged" and a.agent_id == "ghost-agent"]
    assert esc and esc[0].severity.value == "critical"


def test_forged_ack_does_not_silence_the_escalation_and_the_genuine_ack_clears_it(worker: LiveWorker) -> None:
    """Anyone can write to the acks topic: an 'obeyed' ack the halted agent did not sign is
    recorded as forged and the escalation fires; the agent's own signed ack clears its halt."""
    # what the client does with ack_key: a key of its own, its public half where the worker looks
    signing = agent_key(str(worker.home / AGENT_KEYS_DIR / "signing-agent.key"))
    now = datetime.now(timezone.utc)
    forged_cmd, genuine_cmd = (
        sign(KillSwitchCommand(command_id=uuid.uuid4().hex, action="halt",  # type: ignore[arg-type]
                               target=Target.parse("agent:signing-agent"), reason="e2e", issued_by="pytest",
                               issued_at=now, expires_at=now + timedelta(hours=1)), KEY)
        for _ in range(2))

    def ack(cmd: KillSwitchCommand) -> ControlAck:
        return ControlAck(command_id=cmd.command_id, agent_id="signing-agent", tenant="acme",
                          status=AckStatus.OBEYED, action="halt", ts=datetime.now(timezone.utc))

    async def publish() -> None:
        async with ControlPublisher(worker.bootstrap, worker.settings.topic_control) as p:
            await p.publish([forged_cmd, genuine_cmd])

    asyncio.run(publish())
    mallory = load_private_key(generate_keypair()[0])
    worker.produce(worker.settings.topic_acks, [
        ack(forged_cmd).to_json(),                      # unsigned
        ack(forged_cmd).signed(mallory).to_json(),      # signed, by the wrong key
        ack(genuine_cmd).signed(mallory).to_json(),     # a forgery first: it must not block the genuine ack
        ack(genuine_cmd).signed(signing).to_json(),     # the agent's own
    ], key=b"signing-agent")
    alerts = worker.wait_alerts(lambda a: any(x.detector == "killswitch_unacknowledged"
                                              and x.labels.get("command_id") == forged_cmd.command_id for x in a),
                                timeout=60)
    escalated = {a.labels.get("command_id") for a in alerts if a.detector == "killswitch_unacknowledged"}
    assert forged_cmd.command_id in escalated, worker.log_tail()
    deadline = time.monotonic() + 30
    while worker.metric("agentwatch_forged_acks_total") < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert worker.metric("agentwatch_forged_acks_total") >= 3
    # recorded as forged, with the command it claimed to acknowledge
    forged_lines = [line for line in worker.log_path.read_text().splitlines() if "forged acknowledgement" in line]
    assert {forged_cmd.command_id, genuine_cmd.command_id} <= {json.loads(line)["command_id"] for line in forged_lines}
    time.sleep(ACK_DEADLINE_S + 2)
    alerts = worker.wait_alerts(lambda a: False, timeout=5)
    escalated = {a.labels.get("command_id") for a in alerts if a.detector == "killswitch_unacknowledged"}
    assert genuine_cmd.command_id not in escalated
