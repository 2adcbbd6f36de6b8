"""Scale-out: two detection workers in one consumer group and one store process, all real
processes on the real broker and the embedded store.

The fault-injection workload (tests/test_faults_live.py: retry loops among poison records)
goes through worker A; worker B joins mid-stream; then A is SIGKILLed and B carries on
alone. Meanwhile kill switches are issued for agents and acknowledged by them (the acks
land on whichever acks partition their key picks, the commands on the control partition
theirs picks), and one is never acknowledged. Printed and asserted:

* events produced == stored (the store process writes them from the topics; none lost),
  every poison record in the DLQ;
* alert ids and final counts == an uninterrupted run, plus exactly one
  ``killswitch_unacknowledged``: the ignored command's. Acknowledged commands escalate
  nowhere, whichever worker tracks them and whichever dies.

The halted agents are not the workload's, and their commands are dated before it, so
the commands neither mark the workload's agents as halted nor move event time. One
agent restarts a halted agent's runtime (peer_preservation shielding) from another detect
partition than the halted agent's: the halt must reach the shielder's partition too.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import signal
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from agentwatch_client.wire import agent_key
from schemas.alerts import Alert, alert_id_for
from schemas.canary import CanaryVerdict, Verdict
from schemas.control import (AckStatus, ControlAck, KillSwitchCommand, Target, command_event, generate_keypair,
                             load_private_key, sign)
from schemas.decoders.native import decode_native
from sinks.control import ControlPublisher
from streams.control_plane import AGENT_KEYS_DIR, UNACKED_DETECTOR
from streams.kafka import partition_for
from streams.policy_file import load_policy
from streams.stages import DetectStage, IngestStage, RawRecord
from tests.live import LiveWorker
from tests.test_faults_live import T0, Workload, expected_alerts, produce_chunk, workload

pytestmark = pytest.mark.kafka

PRIV, _ = generate_keypair()
KEY = load_private_key(PRIV)
SEED = 4
ACK_DEADLINE_S = 8
# shielding is judged in alert mode here: an enforce-mode halt issued now would move event time
POLICY = """
version: scale-out-1
detectors:
  peer_preservation:
    mode: alert
"""


def shield(halted: KillSwitchCommand, partitions: int) -> tuple[str, bytes]:
    """An agent on another detect partition than the halted one restarts its runtime."""
    target = halted.target.value
    agent = next(f"shielder-{i}" for i in range(100)
                 if partition_for(f"shielder-{i}", partitions) != partition_for(target, partitions))
    ev = {"kind": "agent", "lifecycle": "restart", "agent_id": agent, "target_agent_id": target,
          "ts": (T0 + timedelta(minutes=5, seconds=30)).isoformat(), "event_id": f"s{SEED}-shield"}
    return agent, json.dumps(ev).encode()


def shield_alerts(policy_file: Path, halted: KillSwitchCommand, value: bytes, topic: str) -> dict[str, int]:
    """What one detect stage that sees everything (replay) makes of the halt and the shielding."""
    routed = IngestStage({topic: decode_native}).process([RawRecord(topic, 0, 0, value)])
    detect = DetectStage(load_policy(policy_file))
    alerts = detect.process([command_event(halted), *(ev for evs in routed.by_agent.values() for ev in evs)])
    return {a.alert_id: a.count for a in alerts + detect.finish()}


def halt_and_ack(w: LiveWorker, agents: list[str], *, acked: bool = True) -> list[KillSwitchCommand]:
    """Halts for ``agents``, each acknowledged (signed by the agent's own key) unless ``acked`` is false."""
    now = datetime.now(timezone.utc)
    cmds = [sign(KillSwitchCommand(command_id=uuid.uuid4().hex, action="halt",  # type: ignore[arg-type]
                                   target=Target.parse(f"agent:{a}"), reason="scale-out test", issued_by="pytest",
                                   issued_at=T0 - timedelta(minutes=1), expires_at=now + timedelta(hours=1)), KEY)
            for a in agents]

    async def publish() -> None:
        async with ControlPublisher(w.bootstrap, w.settings.topic_control) as p:
            await p.publish(cmds)

    asyncio.run(publish())
    if acked:
        for cmd in cmds:
            agent = cmd.target.value
            key = agent_key(str(w.home / AGENT_KEYS_DIR / f"{agent}.key"))
            ack = ControlAck(command_id=cmd.command_id, agent_id=agent, status=AckStatus.OBEYED, action="halt",
                             ts=datetime.now(timezone.utc)).signed(key)
            w.produce(w.settings.topic_acks, [ack.to_json()], key=agent.encode())
    return cmds


def stored_events(store: LiveWorker) -> tuple[int, int]:
    rows = store.query(f"SELECT count(), uniqExact(event_id) FROM agentwatch.events "
                       f"WHERE startsWith(event_id, 's{SEED}-')").rows
    return int(rows[0][0]), int(rows[0][1])


def wait_stored(store: LiveWorker, n: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while stored_events(store)[1] < n:
        assert time.monotonic() < deadline, store.log_tail()
        time.sleep(0.3)


def test_second_worker_joins_then_first_is_sigkilled(kafka_bootstrap: str, tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    base = LiveWorker(kafka_bootstrap, tmp_path, partitions=2, policy=policy,
                      env={"AGENTWATCH_CONTROL_PRIVATE_KEY": PRIV, "AGENTWATCH_DETECT_PARTITIONS": "2",
                           "AGENTWATCH_KILLSWITCH_ACK_DEADLINE_S": str(ACK_DEADLINE_S)})
    store, a, b = base.sibling("store", "store"), base.sibling("detect", "worker-a"), base.sibling("detect", "worker-b")
    load: Workload = workload(seed=SEED)
    procs = [store, a, b]
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:  # both start at once
            list(pool.map(LiveWorker.start, [store, a]))
        acked: list[KillSwitchCommand] = []
        last_command = time.monotonic()
        shielding: dict[str, int] = {}
        ignored: list[KillSwitchCommand] = []
        for c, chunk in enumerate(load.chunks):
            if c == 2:
                b.start()  # joins mid-stream: partitions (and their state) move to it
            produce_chunk(a, chunk)
            if c < 4:
                acked += halt_and_ack(a, [f"halted-{c}-{i}" for i in range(3)])
                last_command = time.monotonic()
            if c == 1:
                ignored += halt_and_ack(a, ["ignores-halts"], acked=False)
                # a canary verdict, as a detection worker publishes it: the store process stores it
                a.produce(a.settings.topic_canary, [CanaryVerdict(
                    verdict_id=f"v{SEED}", agent_id="canaried", baseline_version="1", candidate_version="2",
                    verdict=Verdict.PASS, test="mann_whitney", confidence=0.95, judged_at=T0, baseline_tasks=30,
                    candidate_tasks=30, min_tasks=20).to_json()], key=b"canaried")
                shielder, value = shield(acked[0], 2)
                a.produce(a.settings.topic_events_in, [value], key=shielder.encode())
                shielding = shield_alerts(policy, acked[0], value, a.settings.topic_events_in)
            if c == 3:
                time.sleep(0.5)  # somewhere inside the processing of this chunk
                assert a.proc is not None
                a.proc.send_signal(signal.SIGKILL)
                a.proc.wait()
            # the next chunk once this one is stored (see test_faults_live: pacing keeps the
            # verdict independent of how a backlog interleaves across partitions)
            wait_stored(store, (c + 1) * 8 * 8 + (c >= 1), timeout=180)

        want = expected_alerts(load, a.settings.topic_events_in)
        want.update({alert_id_for(UNACKED_DETECTOR, cmd.target.value, cmd.command_id): 1 for cmd in ignored})
        assert len(shielding) == 1, shielding
        want.update(shielding)
        deadline = time.monotonic() + 120
        dead = 0
        while time.monotonic() < deadline:
            dead = int(store.query("SELECT uniqExact(topic, partition, offset) FROM agentwatch.dlq").rows[0][0])
            if dead >= load.poison:
                break
            time.sleep(0.5)

        def complete(alerts: list[Alert]) -> bool:
            got = {x.alert_id: x.count for x in alerts}
            return all(got.get(k) == n for k, n in want.items())

        alerts = b.wait_alerts(complete, timeout=90)
        # a false escalation would come at the latest one deadline after the last command was
        # read (B ticks every 0.5 s): wait until that has passed, then read the topic again
        time.sleep(max(0.0, last_command + ACK_DEADLINE_S + 4 - time.monotonic()))
        alerts = b.wait_alerts(lambda _: False, timeout=5)
        got = {x.alert_id: x.count for x in alerts}
        extra = sorted(set(got) - set(want))
        wrong = {k: (got.get(k), n) for k, n in want.items() if got.get(k) != n}
        unacked = [x for x in alerts if x.detector == UNACKED_DETECTOR]
        total, distinct = stored_events(store)
        rows = store.query("SELECT count() FROM agentwatch.killswitches FINAL").rows
        verdicts = store.query(f"SELECT verdict_id FROM agentwatch.canary_verdicts WHERE verdict_id = 'v{SEED}'").rows
        print(f"\n[scale-out: B joins, A SIGKILLed] events produced={load.valid_events + 1} stored={distinct} "
              f"duplicates={total - distinct} poison produced={load.poison} dlq={dead} | alerts "
              f"expected={len(want)} emitted={len(got)} extra={len(extra)} wrong_count={len(wrong)} | "
              f"commands acked={len(acked)} ignored={len(ignored)} killswitch_unacknowledged={len(unacked)} "
              f"commands stored={rows[0][0]}")
        logs = "\n".join(f"--- {p.log_path.name}\n{p.log_tail(15)}" for p in procs)
        assert distinct == load.valid_events + 1, logs  # the workload and the shielding event
        assert dead == load.poison, logs
        assert [x.labels.get("command_id") for x in unacked] == [c.command_id for c in ignored], logs
        assert not extra and not wrong, (extra, wrong, logs)
        assert int(rows[0][0]) == len(acked) + len(ignored), logs
        assert verdicts == [(f"v{SEED}",)], logs
        assert b.proc is not None and b.proc.poll() is None, logs
    finally:
        for p in procs:
            if p.proc is not None:
                p.stop()
