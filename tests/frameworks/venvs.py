"""The framework matrix's virtualenvs and span generation.

Each framework lives in a virtualenv of its own under ``.venv-frameworks/<name>``
(their dependencies clash with ours and with each other), created from
``tests/frameworks/requirements/<name>.txt`` and reused while that file is
unchanged (a stamp holds its hash), so only the first run installs.

``python -m tests.frameworks.venvs`` (the Makefile's ``frameworks`` target)
creates them all; ``generate(dir)`` runs every combination's generator once and
returns the files of OTLP records they wrote.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
VENVS = Path(os.environ.get("AGENTWATCH_FRAMEWORK_VENVS", REPO / ".venv-frameworks"))
PYTHON = os.environ.get("AGENTWATCH_FRAMEWORK_PYTHON", sys.executable)


@dataclass(frozen=True)
class Combo:
    framework: str  # virtualenv and generator name
    instrumentation: str

    @property
    def name(self) -> str:
        return f"{self.framework}-{self.instrumentation}"


COMBOS = (
    Combo("langgraph", "openinference"),
    Combo("langgraph", "openllmetry"),
    Combo("openai_agents", "openinference"),
    Combo("openai_agents", "openllmetry"),
    Combo("pydantic_ai", "builtin"),
    Combo("pydantic_ai", "openinference"),
    Combo("smolagents", "openinference"),
    Combo("crewai", "openinference"),
    Combo("crewai", "openllmetry"),
)
FRAMEWORKS = tuple(dict.fromkeys(c.framework for c in COMBOS))


class VenvError(RuntimeError):
    pass


def _requirements(framework: str) -> Path:
    return HERE / "requirements" / f"{framework}.txt"


def venv_python(framework: str) -> Path:
    return VENVS / framework / "bin" / "python"


def ensure_venv(framework: str) -> Path:
    """The framework's virtualenv, created or re-created when its requirements changed."""
    req = _requirements(framework)
    digest = hashlib.sha256(req.read_bytes()).hexdigest()
    home = VENVS / framework
    stamp = home / ".requirements.sha256"
    if stamp.is_file() and stamp.read_text().strip() == digest and venv_python(framework).exists():
        return venv_python(framework)
    for cmd in ([PYTHON, "-m", "venv", "--clear", str(home)],
                [str(venv_python(framework)), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                 "-r", str(req)]):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise VenvError(f"{framework}: {' '.join(cmd[:3])} failed:\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
    stamp.write_text(digest)
    return venv_python(framework)


def ensure_all() -> None:
    # one at a time: pip is mostly network and disk, and the machine may be shared
    for framework in FRAMEWORKS:
        ensure_venv(framework)


def generate_one(combo: Combo, out_dir: Path) -> Path:
    python = ensure_venv(combo.framework)
    out = out_dir / f"{combo.name}.records.jsonl"
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "CREWAI_DISABLE_TELEMETRY": "true",
           "CREWAI_TRACING_ENABLED": "false", "OTEL_SDK_DISABLED": "false"}
    proc = subprocess.run([str(python), f"gen_{combo.framework}.py", combo.instrumentation, str(out)], cwd=HERE,
                          capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0 or not out.is_file():
        raise VenvError(f"{combo.name}: generator failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return out


def generate(out_dir: Path, combos: tuple[Combo, ...] = COMBOS) -> dict[Combo, Path]:
    """Run every combination's generator (two at a time: each is one mostly idle process)."""
    ensure_all()
    out_dir.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(2) as pool:
        paths = list(pool.map(lambda c: generate_one(c, out_dir), combos))
    return dict(zip(combos, paths))


if __name__ == "__main__":
    try:
        ensure_all()
    except VenvError as exc:
        print(f"frameworks: {exc}", file=sys.stderr)
        sys.exit(1)
    print(f"framework virtualenvs ready in {VENVS}")
