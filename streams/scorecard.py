"""The behaviour corpus and its scorecard.

A scenario is a directory under ``tests/scenarios/``: input files in real wire
formats (OTLP JSON lines from the OpenTelemetry SDK, native JSON events,
Kubernetes audit lines ...) plus ``expected.yaml``::

    description: one line saying what happens
    alerts:                      # empty for a benign scenario
      - detector: retry_loop
        agent_id: agent-billing-7
        severity: high           # optional
        pattern: same_call       # optional: the alert's labels["pattern"] (a glob)

A scenario may carry its own ``policy.yaml``; otherwise the corpus policy
(``<corpus>/policy.yaml``) applies. ``score`` compares what was expected with
what fired: an expected entry is found when at least one alert matches it; an
alert matching no entry is unexpected. The same functions serve the replay
test, the live-worker run and ``agentwatch scorecard``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import yaml

from detectors.policy import Policy

from streams.policy_file import load_policy
from schemas.alerts import Alert
from schemas.errors import AgentwatchError

EXPECTED = "expected.yaml"
POLICY = "policy.yaml"
INPUT_SUFFIXES = (".jsonl", ".json", ".log", ".ndjson")


@dataclass(frozen=True, slots=True)
class ExpectedAlert:
    detector: str
    agent_id: str
    severity: str = ""
    pattern: str = ""

    def matches(self, alert: Alert) -> bool:
        return (
            alert.detector == self.detector
            and alert.agent_id == self.agent_id
            and (not self.severity or alert.severity.value == self.severity)
            and (not self.pattern or fnmatchcase(alert.labels.get("pattern", ""), self.pattern))
        )


@dataclass(slots=True)
class Scenario:
    name: str
    directory: Path
    inputs: list[Path]
    expected: list[ExpectedAlert]
    policy_path: Path | None
    description: str = ""

    def policy(self) -> Policy:
        return load_policy(self.policy_path)


@dataclass(slots=True)
class DetectorScore:
    expected: int = 0
    found: int = 0
    missed: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


def _expected_entries(path: Path) -> tuple[str, list[ExpectedAlert]]:
    try:
        doc: Any = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise AgentwatchError(f"{path}: cannot read expected alerts: {exc}") from None
    entries = []
    for i, item in enumerate(doc.get("alerts") or []):
        try:
            entries.append(ExpectedAlert(**item))
        except TypeError as exc:
            raise AgentwatchError(f"{path}: alerts[{i}]: {exc}") from None
    return str(doc.get("description", "")), entries


def load_scenarios(corpus_dir: Path, policy_path: Path | None = None) -> list[Scenario]:
    """Every scenario directory of a corpus, by name. ``policy_path`` overrides
    the corpus policy (not a scenario's own)."""
    corpus_dir = Path(corpus_dir)
    default_policy = policy_path or (corpus_dir / POLICY if (corpus_dir / POLICY).is_file() else None)
    out = []
    for d in sorted(p for p in corpus_dir.iterdir() if (p / EXPECTED).is_file()):
        description, expected = _expected_entries(d / EXPECTED)
        inputs = sorted(p for p in d.iterdir() if p.suffix in INPUT_SUFFIXES and p.is_file())
        own = d / POLICY
        out.append(Scenario(d.name, d, inputs, expected, own if own.is_file() else default_policy, description))
    return out


def _describe(alert: Alert) -> str:
    return f"{alert.agent_id} {alert.severity.value} {alert.labels.get('pattern', '')}: {alert.summary}"


def score(expected: Iterable[ExpectedAlert], actual: Iterable[Alert]) -> dict[str, DetectorScore]:
    """Per detector: how many alerts were expected and found, which were missed,
    and which fired that nobody expected."""
    expected, actual = list(expected), list(actual)
    out: dict[str, DetectorScore] = {}
    for e in expected:
        s = out.setdefault(e.detector, DetectorScore())
        s.expected += 1
        if any(e.matches(a) for a in actual):
            s.found += 1
        else:
            s.missed.append(f"{e.agent_id} {e.severity} {e.pattern}".strip())
    for a in actual:
        if not any(e.matches(a) for e in expected):
            out.setdefault(a.detector, DetectorScore()).unexpected.append(_describe(a))
    return out


def merge_scores(total: dict[str, DetectorScore], part: dict[str, DetectorScore], scenario: str) -> None:
    for det, s in part.items():
        t = total.setdefault(det, DetectorScore())
        t.expected += s.expected
        t.found += s.found
        t.missed += [f"{scenario}: {m}" for m in s.missed]
        t.unexpected += [f"{scenario}: {u}" for u in s.unexpected]


def replay_scenario(scenario: Scenario, policy: Policy | None = None) -> list[Alert]:
    from streams.replay import replay  # replay pulls in every decoder; keep import light for loaders

    return replay(scenario.inputs, policy or scenario.policy()).alerts


def format_table(total: dict[str, DetectorScore]) -> str:
    lines = [f"{'detector':<26}{'expected':>9}{'found':>7}{'missed':>8}{'unexpected':>12}"]
    for det in sorted(total):
        s = total[det]
        lines.append(f"{det:<26}{s.expected:>9}{s.found:>7}{len(s.missed):>8}{len(s.unexpected):>12}")
    for det in sorted(total):
        for m in total[det].missed:
            lines.append(f"  MISSED     {det}: {m}")
        for u in total[det].unexpected:
            lines.append(f"  UNEXPECTED {det}: {u}")
    return "\n".join(lines)


def run_scorecard(corpus_dir: Path, policy_path: Path | None = None) -> int:
    """Replay every scenario of the corpus and print the per-detector table.
    Returns 0 when every expected alert was found and nothing unexpected fired."""
    total: dict[str, DetectorScore] = {}
    scenarios = load_scenarios(corpus_dir, policy_path)
    for sc in scenarios:
        merge_scores(total, score(sc.expected, replay_scenario(sc)), sc.name)
    print(f"{len(scenarios)} scenarios from {corpus_dir}")
    print(format_table(total))
    bad = any(s.missed or s.unexpected for s in total.values())
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(run_scorecard(Path(sys.argv[1] if len(sys.argv) > 1 else "tests/scenarios")))
