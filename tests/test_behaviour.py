"""The behaviour corpus through ``agentwatch replay``: every expected alert, nothing else.

Each scenario under tests/scenarios/ holds inputs in real wire formats and the
alerts it must produce (none for the benign ones). The live-worker run of the
same corpus lives with the pipeline tests; both use streams.scorecard.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from streams.replay import replay
from streams.scorecard import load_scenarios, score

CORPUS = Path(__file__).parent / "scenarios"
SCENARIOS = load_scenarios(CORPUS)


def test_corpus_has_positive_and_benign_scenarios_for_every_detector():
    expected = {e.detector for s in SCENARIOS for e in s.expected}
    assert {"retry_loop", "token_spike", "disallowed_access", "escalation_bypass", "peer_preservation"} <= expected
    assert sum(1 for s in SCENARIOS if not s.expected) >= 5


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_scenario(scenario):
    result = replay(scenario.inputs, scenario.policy())
    assert result.dead == [], [d.reason for d in result.dead]
    per_detector = score(scenario.expected, result.alerts)
    missed = {d: s.missed for d, s in per_detector.items() if s.missed}
    unexpected = {d: s.unexpected for d, s in per_detector.items() if s.unexpected}
    assert not missed, f"{scenario.description}: expected alerts not raised: {missed}"
    assert not unexpected, f"{scenario.description}: unexpected alerts: {unexpected}"
    # a replay of the same input yields the same alert ids
    again = replay(scenario.inputs, scenario.policy())
    assert sorted(a.alert_id for a in again.alerts) == sorted(a.alert_id for a in result.alerts)
    for a in result.alerts:
        assert a.policy_version == "corpus-1" and a.evidence
