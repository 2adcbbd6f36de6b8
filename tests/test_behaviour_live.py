"""The behaviour corpus through the live worker on the real broker.

Every scenario of tests/scenarios is fed to the input topics of its own real
worker (real Kafka, real chDB), its records spread at random over the topics'
partitions and shuffled in arrival order (each record moves by up to
``SHUFFLE_S`` of event time, within the allowed lateness), as several
producers and a Collector's batching would deliver them. The alerts on the
alerts topic must be exactly the scenario's expected alerts, every expected
one found and none unexpected, and the same (detector, agent, tenant) as a
replay of the scenario in event-time order with the same policy: replay and
the worker agree whatever the arrival order and partitioning.

The corpus policy waits 30 s of allowed lateness and a 300 s join window; the
worker only decides an absence once that much idle time has passed, so this
run shortens both (for replay and live alike) to keep the suite quick.
"""

from __future__ import annotations

import asyncio
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import pytest
import yaml
from aiokafka import AIOKafkaProducer

from schemas.alerts import Alert
from streams.replay import classify, decode_any, records_in_event_time
from streams.scorecard import DetectorScore, Scenario, format_table, load_scenarios, merge_scores, score
from streams.policy_file import load_policy
from tests.live import LiveWorker

pytestmark = pytest.mark.kafka

CORPUS = Path(__file__).parent / "scenarios"
LATENESS_S = 5.0
JOIN_WINDOW_S = 15.0
PARALLEL = 8  # workers mostly wait (settling, the horizon below): more at once, less wall time
PARTITIONS = 3
SHUFFLE_S = 2.0
WAVE_S = 3.0  # with SHUFFLE_S, within the allowed lateness
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


class Record(NamedTuple):
    ts: float  # shuffled event time
    kind: str  # input: otlp, audit or native
    value: bytes
    partition: int
    events: int  # events it decodes to


def shuffled(scenario: Scenario, rng: random.Random) -> list[Record]:
    """The scenario's records in an arrival order where each moved by up to SHUFFLE_S of
    event time, each to a random partition; a record that decodes to no event keeps its
    predecessor's time. A PostgreSQL server log is the exception docs/join.md states: its
    shipper keys it by server, so its lines stay in order on one partition (a session's
    connection line says who runs the statements after it)."""
    out: list[Record] = []
    last = 0.0
    for rec in records_in_event_time(scenario.inputs):
        events = decode_any(rec.value, origin=rec.topic).events
        ts = last = min((e.ts_seconds for e in events), default=last)
        kind = classify(rec.value)
        if kind == "audit" and rec.value.lstrip()[:1] not in (b"{", b"["):
            out.append(Record(ts, kind, rec.value, 0, len(events)))
        else:
            out.append(Record(ts + rng.uniform(0, SHUFFLE_S), kind, rec.value, rng.randrange(PARTITIONS), len(events)))
    out.sort(key=lambda r: r.ts)  # stable: a server log's records keep their order
    return out


def waves(records: list[Record]) -> list[list[Record]]:
    """The records cut where their (shuffled) event time passes WAVE_S from the wave's first."""
    out: list[list[Record]] = []
    start = -1e18
    for r in records:
        if r.ts - start > WAVE_S:
            out.append([])
            start = r.ts
        out[-1].append(r)
    return out


def run_live(scenario: Scenario, policy: Path, bootstrap: str, home: Path) -> list[Alert]:
    rng = random.Random(scenario.name)  # a different spread per scenario, the same every run
    async def started() -> AIOKafkaProducer:
        p = AIOKafkaProducer(bootstrap_servers=bootstrap)
        await p.start()
        return p

    loop = asyncio.new_event_loop()  # one producer per scenario, on this thread's own loop
    producer = loop.run_until_complete(started())
    try:
        with LiveWorker(bootstrap, home, policy=policy, partitions=PARTITIONS) as w:
            topics = {"otlp": w.settings.topic_otlp, "audit": w.settings.topic_audit_in,
                      "native": w.settings.topic_events_in}
            produced = decoded = 0
            extra = 0.0  # events the worker counts beyond the decoded ones (identity links)
            for wave in waves(shuffled(scenario, rng)):
                # a recording compresses minutes of event time into the seconds it takes to
                # send it; in real time the worker has long finished an event when one minutes
                # later arrives. So a wave waits for the one before it to be through the
                # detectors (otherwise the worker's own consumption order, across partitions
                # and through one hop more for spans than for native events, would skew event
                # time by minutes); within a wave, records are shuffled and spread as they come
                if produced:
                    seen = w.wait_settled(settle_s=1.5, messages=produced, events=decoded + extra)
                    extra = max(extra, seen - decoded)
                for r in wave:
                    loop.run_until_complete(producer.send_and_wait(topics[r.kind], r.value, partition=r.partition))
                produced += len(wave)
                decoded += sum(r.events for r in wave)
            w.wait_settled()
            # then at least long enough for the join window and the lateness to pass in idle
            # event time (so an unexpected alert would have fired), and until every expected
            # alert is there (a loaded machine may need longer)
            settled = time.monotonic()

            def done(alerts: list[Alert]) -> bool:
                return time.monotonic() - settled >= HORIZON_S and all(
                    any(e.matches(a) for a in alerts) for e in scenario.expected)

            return w.wait_alerts(done, timeout=2 * HORIZON_S + 20)
    finally:
        loop.run_until_complete(producer.stop())
        loop.close()


def test_corpus_gives_the_expected_alerts_live_and_in_replay(kafka_bootstrap, tmp_path):
    scenarios = load_scenarios(CORPUS)
    assert len(scenarios) >= 20
    policies = {sc.name: quick_policy(sc, tmp_path) for sc in scenarios}

    replay_total: dict[str, DetectorScore] = {}
    replayed: dict[str, list[Alert]] = {}
    for sc in scenarios:
        from streams.scorecard import replay_scenario

        replayed[sc.name] = replay_scenario(sc, load_policy(policies[sc.name]))
        merge_scores(replay_total, score(sc.expected, replayed[sc.name]), sc.name)

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
    differ = {sc.name: (sorted(who(live[sc.name]) - who(replayed[sc.name])),
                        sorted(who(replayed[sc.name]) - who(live[sc.name])))
              for sc in scenarios if who(live[sc.name]) != who(replayed[sc.name])}
    assert not differ, f"live differs from replay (live only, replay only): {differ}"


def who(alerts: list[Alert]) -> set[tuple[str, str, str]]:
    return {(a.detector, a.agent_id, a.tenant) for a in alerts if a.mode.value != "shadow"}
