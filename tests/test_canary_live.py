"""A canary judged live: a real worker on the real broker, agents on the real client.

One worker, three analyses and a shadow version, all at once: a baseline and a
candidate of ``support-bot`` take traffic side by side; the candidate retries
more and reads a protected resource; its verdict turns ``fail`` with its
numbers, an enforce-mode alert fires, and the signed halt stops only the
candidate's client while the baseline's keeps working. ``calm-bot``'s candidate
behaves like its baseline (``pass``); ``thin-bot``'s has too little traffic
(``inconclusive``); a shadow version's audited write is an alert. The recorded
traffic carries past event times, so the verdicts come as fast as the worker
reads it, not after minutes of wall time.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from agentwatch_client.wire import KillSwitchCommand, generate_keypair
from schemas.alerts import HALT_VERSION_LABEL, Alert, Mode
from schemas.canary import CanaryVerdict, Verdict
from streams.client import AgentClient
from streams.control_plane import AGENT_KEYS_DIR
from tests.live import LiveWorker

pytestmark = pytest.mark.kafka

PRIV, PUB = generate_keypair()
ACK_DEADLINE_S = 3
ANALYSIS = """
    - agent: {agent}
      baseline: "1.4"
      candidate: "1.5"
      min_tasks: 15
      judge_every_s: 120
      metrics:
        violations_per_1k_actions: {{max_increase: 0.25, min_delta: 20}}
        retried_call_rate: {{max_increase: 0.25, min_delta: 0.05}}
"""
POLICY = f"""
version: canary-live-1
protected_resources: ["secrets/*"]
detectors:
  peer_preservation:
    mode: alert
    grace_s: 1
canary:
  mode: enforce
  window_s: 60
  task_idle_s: 20
  shadow_versions:
    support-bot: ["2.0-shadow"]
  analyses:{''.join(ANALYSIS.format(agent=a) for a in ('support-bot', 'calm-bot', 'thin-bot'))}
"""


def _tasks(agent: str, version: str, n: int, t0: float, *, degraded: bool) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i in range(n):
        trace = hashlib.blake2b(f"{agent}/{version}/{i}".encode(), digest_size=16).hexdigest()
        at = t0 + 10 * i
        base = {"agent_id": agent, "agent_version": version, "trace_id": trace}
        calls = [("search", {"q": i}), ("reply", {"to": i})]
        if degraded:
            calls += [("search", {"q": i}), ("search", {"q": i}), ("read_secret", {"name": "prod-db"})]
        out.append({**base, "kind": "llm_call", "ts": at, "span_id": f"{i:08x}00000000", "model": "m",
                    "input_tokens": 300, "output_tokens": 200, "outcome": "ok"})
        for k, (tool, args) in enumerate(calls):
            ev = {**base, "kind": "tool_call", "ts": at + 1 + k, "span_id": f"{i:08x}{k + 1:08x}",
                  "tool_name": tool, "arguments": args, "outcome": "ok"}
            if tool == "read_secret":
                ev["resource"] = "secrets/prod-db"
            out.append(ev)
    return out


@pytest.fixture(scope="module")
def worker(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveWorker]:
    home = tmp_path_factory.mktemp("canary-live")
    policy = Path(home) / "policy.yaml"
    policy.write_text(POLICY)
    env = {"AGENTWATCH_CONTROL_PRIVATE_KEY": PRIV, "AGENTWATCH_KILLSWITCH_ACK_DEADLINE_S": str(ACK_DEADLINE_S)}
    with LiveWorker(kafka_bootstrap, home, policy=policy, env=env) as w:
        yield w


def _client(w: LiveWorker, version: str, halted: list[KillSwitchCommand]) -> AgentClient:
    s = w.settings
    return AgentClient("support-bot", w.bootstrap, agent_version=version, public_keys=PUB,
                       events_topic=s.topic_events_in, control_topic=s.topic_control, acks_topic=s.topic_acks,
                       batch_interval_s=0.1, on_halt=halted.append,
                       ack_key=str(w.home / AGENT_KEYS_DIR / "support-bot.key"))  # the agent's key, either version


def _verdicts(w: LiveWorker, until: Any, timeout: float = 90) -> dict[str, list[CanaryVerdict]]:
    by_agent: dict[str, list[CanaryVerdict]] = {}

    def check(records: list[Any]) -> bool:
        for r in records:
            v = CanaryVerdict.model_validate(orjson.loads(r.value))
            by_agent.setdefault(v.agent_id, []).append(v)
        records.clear()
        return bool(until(by_agent))

    w.consume(w.settings.topic_canary, check, timeout=timeout)
    return by_agent


def test_a_degraded_canary_fails_and_only_its_version_stops(worker: LiveWorker) -> None:
    t0 = time.time() - 3600  # recorded traffic: an hour ago, in event time
    events = (_tasks("support-bot", "1.4", 60, t0, degraded=False)
              + _tasks("support-bot", "1.5", 60, t0 + 5, degraded=True)
              + _tasks("calm-bot", "1.4", 60, t0, degraded=False)
              + _tasks("calm-bot", "1.5", 60, t0 + 5, degraded=False)
              + _tasks("thin-bot", "1.4", 60, t0, degraded=False)
              + _tasks("thin-bot", "1.5", 5, t0 + 5, degraded=True))
    events.append({"kind": "audit", "agent_id": "support-bot", "agent_version": "2.0-shadow", "ts": t0 + 3,
                   "principal": "system:serviceaccount:bots:support", "action": "patch",
                   "resource": "deployments/web", "outcome": "allow"})
    events.sort(key=lambda e: e["ts"])
    halted_base: list[KillSwitchCommand] = []
    halted_cand: list[KillSwitchCommand] = []

    async def run() -> tuple[AgentClient, AgentClient]:
        base, cand = _client(worker, "1.4", halted_base), _client(worker, "1.5", halted_cand)
        await base.start()
        await cand.start()
        try:
            await asyncio.to_thread(worker.produce, worker.settings.topic_events_in,
                                    [orjson.dumps(events[i:i + 200]) for i in range(0, len(events), 200)])
            deadline = time.monotonic() + 120
            while not halted_cand and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            await asyncio.sleep(1.0)  # a halt for the baseline, were there one, arrives with it
            # after the rollback both keep reporting; only the candidate should have stopped
            for c in (base, cand):
                c.record_tool_call("search", {"q": "after"})
            await asyncio.sleep(2.0)
            for c in (base, cand):
                c.record_tool_call("search", {"q": "after again"})
            await asyncio.sleep(0.5)
        finally:
            await base.stop()
            await cand.stop()
        return base, cand

    base, cand = asyncio.run(run())
    halted_at = time.monotonic()
    assert halted_cand, worker.log_tail()
    (cmd,) = halted_cand
    assert (cmd.target.value, cmd.target.version) == ("support-bot", "1.5")
    assert not halted_base and not base.halted and base.allowed("search")
    assert cand.halted and not cand.allowed("search")
    assert [a.status.value for a in cand.acks] == ["obeyed"] and base.acks == []

    verdicts = _verdicts(worker, lambda v: {"support-bot", "calm-bot", "thin-bot"} <= v.keys()
                         and any(x.verdict is Verdict.FAIL for x in v["support-bot"]))
    fail = next(v for v in verdicts["support-bot"] if v.verdict is Verdict.FAIL)
    numbers = {m.metric: m for m in fail.metrics}
    assert numbers["retried_call_rate"].outcome == "fail" and numbers["retried_call_rate"].candidate == 0.4
    assert numbers["violations_per_1k_actions"].baseline == 0.0 and fail.candidate_tasks >= 15
    assert {v.verdict for v in verdicts["calm-bot"]} <= {Verdict.PASS, Verdict.INCONCLUSIVE}
    assert verdicts["calm-bot"][-1].verdict is Verdict.PASS
    assert {v.verdict for v in verdicts["thin-bot"]} == {Verdict.INCONCLUSIVE}

    def done(alerts: list[Alert]) -> bool:
        return (any(a.detector == "canary" for a in alerts) and any(a.detector == "shadow_version" for a in alerts)
                and any(a.detector == "peer_preservation" for a in alerts))

    # past the ack deadline: an ack the control plane could not verify would have escalated by now
    time.sleep(max(0.0, halted_at + ACK_DEADLINE_S + 3 - time.monotonic()))
    alerts = worker.wait_alerts(done, timeout=60)
    assert not [a for a in alerts if a.detector == "killswitch_unacknowledged"], "the candidate's ack was not counted"
    (canary,) = [a for a in alerts if a.detector == "canary"]
    assert (canary.mode, canary.agent_id, canary.labels[HALT_VERSION_LABEL]) == (Mode.ENFORCE, "support-bot", "1.5")
    assert canary.alert_id == fail.alert_id and "retried_call_rate" in canary.summary
    assert {a.agent_version for a in alerts if a.detector == "shadow_version"} == {"2.0-shadow"}
    # acting after the rollback is the candidate's finding, never the baseline's
    assert {a.agent_version for a in alerts if a.detector == "peer_preservation"} == {"1.5"}
    # stored for dashboards: the verdicts and each version's windows
    rows = worker.wait_rows("SELECT agent_id, verdict FROM agentwatch.canary_verdicts FINAL "
                            "WHERE verdict = 'fail'", lambda r: len(r) >= 1)
    assert rows == [("support-bot", "fail")]
