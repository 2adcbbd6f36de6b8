"""``agentwatch compare-detectors``: a candidate policy beside the live one, over the same input.

A detector candidate (new thresholds, a detector switched on or to another
mode) is a policy change. Before promoting it, replay the same recorded input
(files, or every scenario of the behaviour corpus) once under the live policy
and once under the candidate, and compare the alerts: per detector, how many
fired under each, how many under both, and which only under one. Alerts are
the same alert when their ids are: an id is a fingerprint of detector, agent,
subject and the event time the condition began, not of the policy.

The candidate file holds the keys that change, merged over the live policy
(mappings key by key, anything else replaced): ``{"version": "retry-v2",
"detectors": {"retry_loop": {"same_call_threshold": 4}}}``. A complete policy
file works too. Promotion is then the same edit to the live policy file,
versioned like any other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import yaml

from detectors.policy import Policy, parse_policy
from schemas.alerts import Alert
from schemas.errors import PolicyError
from streams.replay import replay
from streams.scorecard import load_scenarios


@dataclass(slots=True)
class DetectorDiff:
    live: int = 0
    candidate: int = 0
    both: int = 0
    only_live: list[str] = field(default_factory=list)
    only_candidate: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Comparison:
    live_version: str
    candidate_version: str
    detectors: dict[str, DetectorDiff] = field(default_factory=dict)
    # per scenario of a corpus (empty for plain files): the same figures
    scenarios: dict[str, dict[str, DetectorDiff]] = field(default_factory=dict)

    def to_json(self) -> bytes:
        def diff(d: DetectorDiff) -> dict[str, Any]:
            return {"live": d.live, "candidate": d.candidate, "both": d.both, "only_live": d.only_live,
                    "only_candidate": d.only_candidate}
        return orjson.dumps({
            "live_version": self.live_version, "candidate_version": self.candidate_version,
            "detectors": {k: diff(v) for k, v in sorted(self.detectors.items())},
            "scenarios": {s: {k: diff(v) for k, v in sorted(ds.items())} for s, ds in sorted(self.scenarios.items())},
        }, option=orjson.OPT_INDENT_2)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_overlay(path: Path) -> dict[str, Any]:
    """A candidate file: a YAML mapping (PolicyError naming the file otherwise)."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise PolicyError("(file)", f"cannot read: {exc.strerror}", source=str(path)) from None
    except yaml.YAMLError as exc:
        raise PolicyError("(file)", f"not valid YAML: {getattr(exc, 'problem', exc)}", source=str(path)) from None
    if not isinstance(data, dict):
        raise PolicyError("(top level)", "a candidate must be a mapping of policy keys", source=str(path))
    return data


def candidate_policy(live: Policy, overlay: dict[str, Any], *, source: str = "<candidate>") -> Policy:
    """The live policy with the candidate's keys merged over it (validated like any policy)."""
    merged = _merge(live.model_dump(mode="json"), overlay)
    if "version" not in overlay:
        merged["version"] = f"{live.version}+candidate"
    return parse_policy(merged, source=source)


def _describe(a: Alert) -> str:
    return f"{a.agent_id} {a.severity.value} {a.labels.get('pattern', '')}: {a.summary}"[:300]


def compare_alerts(live: list[Alert], candidate: list[Alert]) -> dict[str, DetectorDiff]:
    """Per detector: alerts under each policy, under both, and only under one."""
    out: dict[str, DetectorDiff] = {}
    lv = {(a.detector, a.alert_id): a for a in live}
    cv = {(a.detector, a.alert_id): a for a in candidate}
    for key in sorted(lv.keys() | cv.keys()):
        d = out.setdefault(key[0], DetectorDiff())
        in_live, in_cand = key in lv, key in cv
        d.live += in_live
        d.candidate += in_cand
        if in_live and in_cand:
            d.both += 1
        elif in_live:
            d.only_live.append(_describe(lv[key]))
        else:
            d.only_candidate.append(_describe(cv[key]))
    return out


def _add(total: dict[str, DetectorDiff], part: dict[str, DetectorDiff], prefix: str = "") -> None:
    for det, d in part.items():
        t = total.setdefault(det, DetectorDiff())
        t.live += d.live
        t.candidate += d.candidate
        t.both += d.both
        t.only_live += [prefix + x for x in d.only_live]
        t.only_candidate += [prefix + x for x in d.only_candidate]


def compare_paths(paths: list[Path], live: Policy, overlay: dict[str, Any]) -> Comparison:
    cand = candidate_policy(live, overlay)
    cmp = Comparison(live.version, cand.version)
    cmp.detectors = compare_alerts(replay(paths, live).alerts, replay(paths, cand).alerts)
    return cmp


def compare_corpus(corpus: Path, overlay: dict[str, Any], *, policy_path: Path | None = None) -> Comparison:
    """Every scenario under its own policy (live) and with the candidate's keys merged over it."""
    scenarios = load_scenarios(corpus, policy_path)
    cmp = Comparison("", "")
    for sc in scenarios:
        live = sc.policy()
        cand = candidate_policy(live, overlay)
        cmp.live_version, cmp.candidate_version = cmp.live_version or live.version, cand.version
        part = compare_alerts(replay(sc.inputs, live).alerts, replay(sc.inputs, cand).alerts)
        cmp.scenarios[sc.name] = part
        _add(cmp.detectors, part, prefix=f"{sc.name}: ")
    return cmp


def format_report(cmp: Comparison) -> str:
    lines = [f"live {cmp.live_version} vs candidate {cmp.candidate_version}",
             f"{'detector':<26}{'live':>6}{'candidate':>11}{'both':>6}{'only live':>11}{'only candidate':>16}"]
    for det in sorted(cmp.detectors):
        d = cmp.detectors[det]
        lines.append(f"{det:<26}{d.live:>6}{d.candidate:>11}{d.both:>6}{len(d.only_live):>11}"
                     f"{len(d.only_candidate):>16}")
    changed = [s for s, ds in sorted(cmp.scenarios.items())
               if any(d.only_live or d.only_candidate for d in ds.values())]
    if cmp.scenarios:
        lines.append(f"{len(cmp.scenarios)} scenarios, {len(changed)} with different alerts"
                     + (f": {', '.join(changed)}" if changed else ""))
    for det in sorted(cmp.detectors):
        for x in cmp.detectors[det].only_live:
            lines.append(f"  ONLY LIVE      {det}: {x}")
        for x in cmp.detectors[det].only_candidate:
            lines.append(f"  ONLY CANDIDATE {det}: {x}")
    return "\n".join(lines)
