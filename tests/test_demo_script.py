"""The demo's scripted incidents, replayed offline under the demo policy: each detector
family it promises fires, on the agent it names, and the approved transfer does not."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import orjson

from streams.policy_file import load_policy
from streams.demo import DEMO_POLICY, FAMILIES
from streams.fleet import CANARY_AGENT, CANARY_BASELINE, CANARY_CANDIDATE, canary_task, incident_script
from streams.replay import replay


def test_every_scripted_incident_fires_its_detector(tmp_path: Path) -> None:
    script = incident_script(datetime.now(timezone.utc))
    events, audit = tmp_path / "events.jsonl", tmp_path / "audit.jsonl"
    with events.open("wb") as ev, audit.open("wb") as au:
        for step in script:
            for record in step.records:
                (ev if step.topic == "events" else au).write(orjson.dumps(record) + b"\n")
    result = replay([events, audit], load_policy(DEMO_POLICY))
    assert not result.dead
    fired = {(a.detector, a.agent_id) for a in result.alerts}
    assert fired == {
        ("token_spike", "summarizer-2"),
        ("disallowed_access", "support-bot-2"),
        ("escalation_bypass", "finance-agent"),
        ("unattributed_side_effect", "docs-writer"),
        ("peer_preservation", "ops-bot-8"),
    }
    # one escalation: the second, unapproved transfer; the approved one is covered
    [bypass] = [a for a in result.alerts if a.detector == "escalation_bypass"]
    assert bypass.count == 1
    # the retry loops come from the simulated fleet, the canary from triage-bot's two versions
    # (test_canary_rollout), which the live demo runs beside the script
    assert {d for _, d in FAMILIES} - {d for d, _ in fired} == {"retry_loop", "canary"}


def test_canary_rollout_fails_and_rolls_back_the_candidate_only(tmp_path: Path) -> None:
    """triage-bot's traffic as the demo paces it (a task a second per version), replayed."""
    start = datetime.now(timezone.utc)
    path = tmp_path / "canary.jsonl"
    with path.open("wb") as f:
        for i in range(40):
            for version in (CANARY_BASELINE, CANARY_CANDIDATE):
                for record in canary_task(version, i, start + timedelta(seconds=i)):
                    f.write(orjson.dumps(record) + b"\n")
    result = replay([path], load_policy(DEMO_POLICY))
    assert not result.dead
    [canary] = result.alerts
    assert (canary.detector, canary.agent_id, canary.mode.value, canary.labels["halt_version"]) == (
        "canary", CANARY_AGENT, "enforce", CANARY_CANDIDATE)
    # it fails within the demo's minute: judged every 10 s once 8 tasks of each version completed
    assert (canary.first_seen - start).total_seconds() < 40, canary.summary
