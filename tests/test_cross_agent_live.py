"""The tenant-keyed stage on the real broker: per-agent detection on every partition, and what
needs several agents at once decided from their signals, once, across a SIGKILL.

The agents below are chosen to land on different partitions of the agent-keyed topic, so no
detect partition sees enough of them alone. The worker checkpoints every 30 s here: the kill
lands before any checkpoint, so the restarted worker re-reads its detect input and sends the
same token signals again; the tenant stage must count them once (the sum is exactly at the
budget, and one more token must tip it over)."""

from __future__ import annotations

import math
import signal
import time
from datetime import datetime, timezone
from pathlib import Path

import orjson
import pytest

from detectors.cross_agent import signals_from_bytes
from schemas.alerts import Alert
from streams.kafka import partition_for
from tests.live import LiveWorker

pytestmark = pytest.mark.kafka

PARTITIONS = 4
POLICY = """\
version: cross-agent-test
budgets:
  tenant_tokens_per_hour: {acme: 10000}
"""


def agents_on_different_partitions(n: int) -> list[str]:
    out: list[str] = []
    seen: set[int] = set()
    for i in range(1000):
        agent = f"agent-{i}"
        p = partition_for(agent, PARTITIONS)
        if p not in seen:
            seen.add(p)
            out.append(agent)
        if len(out) == n:
            return out
    raise AssertionError("not enough partitions")


def at(base: float, s: float) -> str:
    return datetime.fromtimestamp(base + s, tz=timezone.utc).isoformat()


def llm(agent: str, base: float, s: float, tokens: int) -> bytes:
    return orjson.dumps({"kind": "llm_call", "agent_id": agent, "tenant": "acme", "ts": at(base, s),
                         "model": "m", "input_tokens": tokens, "event_id": f"llm-{agent}-{s}"})


def budget_alerts(alerts: list[Alert]) -> list[Alert]:
    return [a for a in alerts if a.labels.get("pattern") == "tenant_budget"]


def test_tenant_budget_and_coordination_across_partitions_survive_a_sigkill(kafka_bootstrap, tmp_path: Path):
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    a, b, c, d = agents_on_different_partitions(4)
    # half an hour into the previous clock hour: every call of the test falls in one budget hour
    base = math.floor(time.time() / 3600) * 3600 - 1800
    w = LiveWorker(kafka_bootstrap, tmp_path, policy=policy, partitions=PARTITIONS,
                   env={"AGENTWATCH_CHECKPOINT_S": "30"})
    with w:
        # 4 x 2,500 = 10,000: at the budget, not over it
        w.produce(w.settings.topic_events_in, [llm(agent, base, i, 2_500) for i, agent in enumerate((a, b, c, d))])
        signals = w.consume(w.settings.topic_by_tenant,
                            lambda recs: sum(len(signals_from_bytes(r.value)) for r in recs) >= 4, timeout=90)
        assert sum(len(signals_from_bytes(r.value)) for r in signals) == 4, w.log_tail()
        time.sleep(3)  # the tenant stage takes them (its checkpoint, like detect's, is 30 s away)
        assert w.proc is not None
        w.proc.send_signal(signal.SIGKILL)
        w.proc.wait()

        w.start()  # detect re-reads its input and signals the same calls again
        resent = w.consume(w.settings.topic_by_tenant,
                           lambda recs: sum(len(signals_from_bytes(r.value)) for r in recs) >= 8, timeout=120)
        assert sum(len(signals_from_bytes(r.value)) for r in resent) == 8, w.log_tail()
        w.wait_settled(settle_s=3)
        time.sleep(3)
        assert budget_alerts(w.wait_alerts(lambda _: False, timeout=3)) == [], "counted a signal twice"

        # one token more is over the budget: exactly one tenant alert, naming no single agent
        w.produce(w.settings.topic_events_in, [llm(a, base, 100, 1)])
        alerts = budget_alerts(w.wait_alerts(lambda al: bool(budget_alerts(al)), timeout=90))
        assert [(x.agent_id, x.tenant, x.count, x.labels["used"]) for x in alerts] == [("", "acme", 1, "10001")], \
            w.log_tail()
        assert set(alerts[0].labels["agents"].split(",")) == {a, b, c, d}

        # coordination: two agents on different partitions shield the same halted agent
        halt = {"kind": "control_command", "ts": at(base, 200), "agent_id": d, "target_agent_id": d,
                "command_id": "cmd-x", "command_action": "halt", "attributes": {"target": f"agent:{d}"}}
        shield = [{"kind": "agent", "ts": at(base, 200 + s), "agent_id": agent, "lifecycle": "restart",
                   "target_agent_id": d} for s, agent in ((20, a), (40, b))]
        w.produce(w.settings.topic_events_in, [orjson.dumps(halt)])
        # the halt is through before the shielding comes (they may be on different input partitions)
        w.wait_settled(settle_s=2)
        w.produce(w.settings.topic_events_in, [orjson.dumps(e) for e in shield])

        def coordinated(al: list[Alert]) -> list[Alert]:
            return [x for x in al if x.labels.get("pattern") == "coordinated"]

        alerts = w.wait_alerts(lambda al: bool(coordinated(al)), timeout=90)
        got = sorted((x.agent_id, x.labels["pattern"]) for x in alerts if x.detector == "peer_preservation")
        assert got == sorted([(a, "coordinated"), (a, "shielding"), (b, "shielding")]), w.log_tail()
        assert coordinated(alerts)[0].labels["agents"] == ",".join(sorted((a, b)))
