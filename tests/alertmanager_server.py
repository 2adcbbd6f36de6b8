"""Run the real Prometheus Alertmanager (Debian's package) on loopback for tests.

The tests never install anything: without the binary they skip, naming the
package to install (``APT_INSTALL``). ``AGENTWATCH_ALERTMANAGER_BIN`` points at
a binary elsewhere.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

import pytest

APT_INSTALL = "apt-get update && apt-get install -y prometheus-alertmanager"
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "deploy" / "alertmanager" / "alertmanager.yml"
_CANDIDATES = ("prometheus-alertmanager", "alertmanager")


def find_alertmanager() -> str | None:
    """Path of an Alertmanager binary, or None."""
    explicit = os.environ.get("AGENTWATCH_ALERTMANAGER_BIN")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    for name in _CANDIDATES:
        found = shutil.which(name) or (f"/usr/bin/{name}" if os.access(f"/usr/bin/{name}", os.X_OK) else None)
        if found:
            return found
    return None


def require_alertmanager() -> str:
    """The binary's path, or skip the test saying how to get it."""
    binary = find_alertmanager()
    if binary is None:
        pytest.skip(
            "Prometheus Alertmanager binary not found (looked for $AGENTWATCH_ALERTMANAGER_BIN, "
            f"{', '.join(_CANDIDATES)} on PATH); install it with: {APT_INSTALL}"
        )
    return binary


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class AlertmanagerServer:
    """One Alertmanager process with its own storage dir; a context manager."""

    def __init__(self, workdir: Path, *, config: Path = DEFAULT_CONFIG, binary: str | None = None) -> None:
        self.binary = binary or require_alertmanager()
        self.workdir = workdir
        self.config = config
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = workdir / "alertmanager.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *, ready_timeout_s: float = 20.0) -> AlertmanagerServer:
        # a port picked free can be taken before the process binds it: try a few
        for _ in range(3):
            self.port = free_port()
            storage = self.workdir / f"data-{self.port}"
            storage.mkdir(parents=True, exist_ok=True)
            with self._log.open("ab") as log_file:
                self._proc = subprocess.Popen(
                    [
                        self.binary,
                        f"--config.file={self.config}",
                        f"--storage.path={storage}",
                        f"--web.listen-address=127.0.0.1:{self.port}",
                        "--cluster.listen-address=",  # empty: no gossip ports, no peers
                        "--log.level=warn",
                    ],
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            if self._wait_ready(ready_timeout_s):
                return self
            self.stop()
        raise RuntimeError(f"Alertmanager did not become ready; its log:\n{self.log_tail()}")

    def _wait_ready(self, timeout_s: float) -> bool:
        assert self._proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as resp:
                    if resp.status == 200:
                        return True
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.05)
        return False

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self._log.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return "(no log)"

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()  # SIGTERM: Alertmanager writes its snapshot and exits
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def __enter__(self) -> AlertmanagerServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
