"""Every runbook URL an alert can carry resolves to a page in docs/runbooks/.

Detector alerts get theirs from the Alertmanager output (AGENTWATCH_RUNBOOK_BASE_URL
+ /<detector>.md); the worker's self-health alerts from the Prometheus rules.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from detectors.engine import build_detectors
from detectors.policy import DetectorsConfig, Policy
from schemas.alerts import Severity
from sinks.alertmanager import AlertmanagerOutput
from streams.control_plane import UNACKED_DETECTOR
from streams.settings import Settings
from tests.test_alert_outputs import make_alert

ROOT = Path(__file__).resolve().parents[1]
RUNBOOKS = ROOT / "docs" / "runbooks"
RULES = ROOT / "deploy" / "prometheus" / "rules" / "agentwatch.yml"
BASE = Settings.model_fields["runbook_base_url"].default
# the repository's docs/runbooks as the default base names it
REPO_PREFIX = "https://github.com/agentwatch/agentwatch/blob/main/"


def _resolve(url: str) -> Path:
    assert url.startswith(REPO_PREFIX), f"{url}: not a page of this repository"
    path = ROOT / url.removeprefix(REPO_PREFIX)
    assert path.is_file(), f"{url}: {path.relative_to(ROOT)} does not exist"
    return path


def detector_names() -> set[str]:
    """Every detector that can raise an alert: the ones the engine builds, the policy's, the control plane's."""
    built = {d.name for d in build_detectors(Policy())}
    return built | set(DetectorsConfig.model_fields) | {UNACKED_DETECTOR}


def test_the_default_base_is_the_runbooks_directory() -> None:
    assert BASE.startswith(REPO_PREFIX) and (ROOT / BASE.removeprefix(REPO_PREFIX)) == RUNBOOKS


def test_every_detector_alert_links_to_its_page() -> None:
    names = detector_names()
    assert len(names) >= 8
    output = AlertmanagerOutput("http://127.0.0.1:1", runbook_base_url=BASE)
    for name in sorted(names):
        payload = output.payload(make_alert(Severity.HIGH, detector=name))
        annotations = payload["annotations"]
        assert isinstance(annotations, dict)
        page = _resolve(annotations["runbook_url"])
        assert page.name == f"{name}.md"
        text = page.read_text()
        for section in ("## What fired", "## Confirm it in ClickHouse", "## Halt or resume", "## Tune a false positive"):
            assert section in text, f"{page.name}: no {section!r}"


def test_a_configured_base_url_is_used() -> None:
    output = AlertmanagerOutput("http://127.0.0.1:1", runbook_base_url="https://wiki.example/agentwatch/runbooks/")
    notes = output.payload(make_alert(detector="token_spike"))["annotations"]
    assert isinstance(notes, dict) and notes["runbook_url"] == "https://wiki.example/agentwatch/runbooks/token_spike.md"


def test_every_self_health_rule_links_to_its_page() -> None:
    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r]
    assert {r["alert"] for r in rules} >= {"AgentwatchWorkerDown", "AgentwatchConsumerLagHigh",
                                           "AgentwatchSinkFailures", "AgentwatchDeadLetterRate"}
    for rule in rules:
        page = _resolve(rule["annotations"]["runbook_url"])
        assert page.parent == RUNBOOKS and "## What fired" in page.read_text(), rule["alert"]


def test_links_between_docs_resolve() -> None:
    """Relative links in docs/ and the README point at files that exist."""
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
                continue
            assert (doc.parent / target).exists(), f"{doc.relative_to(ROOT)}: broken link {target}"
            assert (doc.parent / target).resolve().is_relative_to(ROOT), f"{doc.relative_to(ROOT)}: {target} leaves the repository"
