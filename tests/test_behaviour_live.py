"""The behaviour corpus through the live worker on the real broker.

Every scenario of tests/scenarios is fed, record by record in event time, to
the input topics of its own real worker (real Kafka, real chDB), and the
alerts on the alerts topic must be exactly the scenario's expected alerts:
every expected one found and none unexpected. The same scenarios replayed
with the same policy must give the same verdict, so replay and the worker
agree.

The corpus policy waits 30 s of allowed lateness and a 300 s join window; the
worker only decides an absence once that much idle time has passed, so this
run shortens both (for replay and live alike) to keep the suite quick.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from schemas.alerts import Alert
from streams.replay import classify, records_in_event_time
from streams.scorecard import DetectorScore, Scenario, format_table, load_scenarios, merge_scores, score
from streams.policy_file import load_policy
from tests.live import LiveWorker

pytestmark = pytest.mark.kafka

CORPUS = Path(__file__).parent / "scenarios"
LATENESS_S = 5.0
JOIN_WINDOW_S = 15.0
PARALLEL = 4
HORIZON_S = JOIN_WINDOW_S + 2 * LATENESS_S + 5


def quick_policy(scenario: Scenario, directory: Path) -> Path:
    data = yaml.safe_load(scenario.policy_path.read_text()) if scenario.policy_path else {}
    data["allowed_lateness_s"] = LATENESS_S
    data.setdefault("join", {})["window_s"] = JOIN_WINDOW_S
    data["join"].pop("allowed_lateness_s", None)
    # CloudTrail's delivery delay (15 min by default) would make a live run wait that long
    # in wall time for an unconfirmed action: the records here arrive at once
    data["join"]["allowed_lateness_by_source"] = {"cloudtrail": LATENESS_S}
    path = directory / f"{scenario.name}.policy.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def wait_ingested(w: LiveWorker, messages: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while w.metric("agentwatch_messages_in_total") < messages:
        assert time.monotonic() < deadline, w.log_tail()
        time.sleep(0.2)


def run_live(scenario: Scenario, policy: Path, bootstrap: str, home: Path) -> list[Alert]:
    with LiveWorker(bootstrap, home, policy=policy, partitions=1) as w:
        topics = {"otlp": w.settings.topic_otlp, "audit": w.settings.topic_audit_in,
                  "native": w.settings.topic_events_in}
        produced, last_topic = 0, None
        for rec in records_in_event_time(scenario.inputs):
            topic = topics[classify(rec.value)]
            if last_topic is not None and topic != last_topic:
                # Kafka orders records within a partition, not across topics; a record of
                # another source waits until the worker has read what came before it, so
                # the worker sees the event-time order replay sees
                wait_ingested(w, produced)
            w.produce(topic, [rec.value])
            produced, last_topic = produced + 1, topic
        w.wait_settled()
        # then at least long enough for the join window and the lateness to pass in idle
        # event time (so an unexpected alert would have fired), and until every expected
        # alert is there (a loaded machine may need longer)
        settled = time.monotonic()

        def done(alerts: list[Alert]) -> bool:
            return time.monotonic() - settled >= HORIZON_S and all(
                any(e.matches(a) for a in alerts) for e in scenario.expected)

        return w.wait_alerts(done, timeout=2 * HORIZON_S + 20)


def test_corpus_gives_the_expected_alerts_live_and_in_replay(kafka_bootstrap, tmp_path):
    scenarios = load_scenarios(CORPUS)
    assert len(scenarios) >= 20
    policies = {sc.name: quick_policy(sc, tmp_path) for sc in scenarios}

    replay_total: dict[str, DetectorScore] = {}
    for sc in scenarios:
        from streams.scorecard import replay_scenario

        merge_scores(replay_total, score(sc.expected, replay_scenario(sc, load_policy(policies[sc.name]))), sc.name)

    started = time.monotonic()
    with ThreadPoolExecutor(PARALLEL) as pool:
        live = dict(zip([sc.name for sc in scenarios], pool.map(
            lambda sc: run_live(sc, policies[sc.name], kafka_bootstrap, tmp_path), scenarios)))
    live_total: dict[str, DetectorScore] = {}
    for sc in scenarios:
        merge_scores(live_total, score(sc.expected, live[sc.name]), sc.name)

    print(f"\nreplay scorecard:\n{format_table(replay_total)}")
    print(f"live scorecard ({len(scenarios)} workers, {time.monotonic() - started:.0f}s):\n{format_table(live_total)}")
    for name, total in (("replay", replay_total), ("live", live_total)):
        problems = [(d, s.missed, s.unexpected) for d, s in total.items() if s.missed or s.unexpected]
        assert not problems, f"{name}: {problems}"
    assert sum(s.found for s in live_total.values()) == sum(s.expected for s in live_total.values()) > 20
