"""Reading the policy file: loading it and watching it for changes.

File I/O lives here, in the wiring layer; detectors/policy.py holds the policy
model and ``parse_policy`` (pure: data in, validated Policy out).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import yaml

from detectors.policy import Policy, parse_policy
from schemas.errors import PolicyError


def load_policy(path: str | Path | None) -> Policy:
    """Load and validate a policy file; ``None`` gives the built-in defaults."""
    if path is None:
        return Policy()
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise PolicyError("(file)", f"cannot read: {exc.strerror}", source=str(p)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "(file)"
        raise PolicyError(where, f"not valid YAML: {getattr(exc, 'problem', exc)}", source=str(p)) from None
    return parse_policy(data, source=str(p))


@dataclass
class PolicyWatcher:
    """Reloads a policy file when it changes; a bad file keeps the last good policy.

    Pure (no faust): the worker calls ``check()`` periodically and rebuilds its
    detectors when it returns True. A file that fails to load leaves
    ``current`` untouched and sets ``last_error`` (a PolicyError naming file, key
    and problem), so a typo during an edit never disarms the detectors.
    """

    path: Path

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self.current: Policy = load_policy(self.path)  # the first load must succeed
        self.last_error: PolicyError | None = None
        self._stamp = self._read_stamp()

    def _read_stamp(self) -> tuple[float, bytes] | None:
        try:
            return self.path.stat().st_mtime, hashlib.sha256(self.path.read_bytes()).digest()
        except OSError:
            return None

    def check(self) -> bool:
        """Reload if the file's mtime or contents changed; True when a new policy is in force."""
        stamp = self._read_stamp()
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            new = load_policy(self.path)
        except PolicyError as exc:
            self.last_error = exc
            return False
        self.last_error = None
        if new.content_hash == self.current.content_hash and new.version == self.current.version:
            return False  # touched, not changed
        self.current = new
        return True
