"""Every runbook URL an alert can carry resolves to a page in docs/runbooks/.

Detector alerts get theirs from the Alertmanager output (AGENTWATCH_RUNBOOK_BASE_URL
+ /<detector>.md); the worker's self-health alerts from the Prometheus rules.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from detectors.canary import CANARY, SHADOW_VERSION
from detectors.engine import build_detectors
from detectors.policy import DetectorsConfig, Policy
from schemas.alerts import Severity
from sinks.alertmanager import AlertmanagerOutput
from sinks.delivery import OVERFLOW_DETECTOR
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


# every page has these, detector or self-health alike (the what / confirm / halt / tune)
SECTIONS = ("## What fired", "## Confirm it in ClickHouse", "## Halt or resume", "## Tune a false positive")


def detector_names() -> set[str]:
    """Every detector name an alert can carry: the ones the engine builds, the policy's, the
    control plane's, the canary analysis's and the alert router's storm summary."""
    built = {d.name for d in build_detectors(Policy())}
    return built | set(DetectorsConfig.model_fields) | {UNACKED_DETECTOR, CANARY, SHADOW_VERSION, OVERFLOW_DETECTOR}


def _detector_constants() -> set[str]:
    """Detector names written in the code: ``name = "..."`` of a detector class, or a constant
    passed as ``detector=``; a new one without a page fails the test below."""
    found = set()
    for path in [*(ROOT / "detectors").glob("*.py"), *(ROOT / "streams").glob("*.py"), *(ROOT / "sinks").glob("*.py")]:
        text = path.read_text()
        found |= set(re.findall(r'^    name = "(\w+)"', text, re.M))
        found |= set(re.findall(r'^[A-Z_]*DETECTOR\w* = "(\w+)"', text, re.M))
        found |= set(re.findall(r'^(?:CANARY|SHADOW_VERSION) = "(\w+)"', text, re.M))
    return found


def test_the_default_base_is_the_runbooks_directory() -> None:
    assert BASE.startswith(REPO_PREFIX) and (ROOT / BASE.removeprefix(REPO_PREFIX)) == RUNBOOKS


def test_every_detector_alert_links_to_its_page() -> None:
    names = detector_names()
    assert len(names) >= 11 and _detector_constants() <= names, _detector_constants() - names
    output = AlertmanagerOutput("http://127.0.0.1:1", runbook_base_url=BASE)
    for name in sorted(names):
        payload = output.payload(make_alert(Severity.HIGH, detector=name))
        annotations = payload["annotations"]
        assert isinstance(annotations, dict)
        page = _resolve(annotations["runbook_url"])
        assert page.name == f"{name}.md"
        text = page.read_text()
        for section in SECTIONS:
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
        assert page.parent == RUNBOOKS, rule["alert"]
        for section in SECTIONS:
            assert section in page.read_text(), f"{page.name}: no {section!r}"


def test_every_page_is_for_an_alert_and_listed() -> None:
    """No orphan page, and the index lists every page."""
    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r]
    linked = {f"{n}.md" for n in detector_names()} | {_resolve(r["annotations"]["runbook_url"]).name for r in rules}
    pages = {p.name for p in RUNBOOKS.glob("*.md")} - {"README.md"}
    assert pages == linked, pages ^ linked
    index = (RUNBOOKS / "README.md").read_text()
    assert all(f"]({p})" in index for p in pages), [p for p in pages if f"]({p})" not in index]


def _anchors(doc: Path) -> set[str]:
    """The anchors a Markdown renderer (GitHub's) gives the headings of ``doc``."""
    out = set()
    for heading in re.findall(r"^#+\s+(.+?)\s*$", doc.read_text(), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", "")).replace(" ", "-")
        out.add(slug)
    return out


def test_links_between_docs_resolve() -> None:
    """Relative links in docs/ and the README point at files that exist, and at headings that exist."""
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", doc.read_text()):
            if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
                continue
            linked = (doc.parent / target) if target else doc
            assert linked.exists(), f"{doc.relative_to(ROOT)}: broken link {target}"
            assert linked.resolve().is_relative_to(ROOT), f"{doc.relative_to(ROOT)}: {target} leaves the repository"
            if anchor and linked.suffix == ".md":
                assert anchor in _anchors(linked), f"{doc.relative_to(ROOT)}: no heading #{anchor} in {target}"


def test_the_readme_links_only_to_files_in_the_repository() -> None:
    links = re.findall(r"\]\(([^)\s]+)\)", (ROOT / "README.md").read_text())
    assert links and not [t for t in links if re.match(r"[a-z]+:", t)]


def test_the_design_and_the_license_are_in_the_repository() -> None:
    """docs/architecture.md has the layers, dataflow, topics and guarantees, and names every topic
    the worker uses; the LICENSE is the Apache License 2.0 the package declares."""
    from streams.settings import Settings

    design = (ROOT / "docs" / "architecture.md").read_text()
    for section in ("## Layers", "## Dataflow", "## Topics", "## Guarantees"):
        assert section in design, section
    topics = design.split("## Topics", 1)[1].split("\n## ", 1)[0]
    defaults = {name: f.default for name, f in Settings.model_fields.items() if name.startswith("topic_")}
    missing = [t for t in defaults.values() if f"`{t}`" not in topics]
    assert len(defaults) >= 12 and not missing, missing
    license_text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in license_text
    assert re.search(r'^license = "Apache-2.0"$', (ROOT / "pyproject.toml").read_text(), re.M)


def test_the_readme_still_has_its_two_commands() -> None:
    """A newcomer needs two commands, both Makefile targets that set everything up."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## The two commands", 1)[1].split("\n## ", 1)[0]
    block = re.findall(r"```sh\n(.*?)```", section, re.S)[0]
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
    assert commands == ["make demo", "make test"], commands
    makefile = (ROOT / "Makefile").read_text()
    for target in ("demo", "test"):
        assert re.search(rf"^{target}: system-deps \$\(BIN\)/agentwatch\b", makefile, re.M), target
