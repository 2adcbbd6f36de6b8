"""Write the basic-auth web config that Prometheus and Alertmanager read (``--web.config.file``).

Both take a bcrypt hash of the password, never the password, and neither expands
environment variables in that file, so the compose stack cannot derive it from
``MONITORING_PASSWORD`` itself. Run once, before ``docker compose up``::

    MONITORING_PASSWORD=... python -m deploy.web_config deploy/secrets

It writes ``deploy/secrets/web-config.yml`` (ignored by git, like the signing key)
for the user ``agentwatch``; ``promtool check web-config`` accepts it
(tests/test_deploy_configs.py). ``htpasswd -nbBC 10 agentwatch PASSWORD`` gives an
equivalent hash.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

USER = "agentwatch"
FILENAME = "web-config.yml"


def bcrypt_hash(password: str, rounds: int = 10) -> str:
    """A bcrypt hash ($2b$) as Prometheus' exporter-toolkit verifies it."""
    try:
        import bcrypt  # type: ignore[import-not-found]
    except ImportError:
        with warnings.catch_warnings():  # deprecated, but the libcrypt it wraps does bcrypt
            warnings.simplefilter("ignore", DeprecationWarning)
            import crypt

        return crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=1 << rounds))
    return str(bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds)).decode())


def render(password: str, user: str = USER) -> str:
    if not password:
        raise ValueError("an empty password would let anyone in")
    return f"# written by deploy/web_config.py\nbasic_auth_users:\n  {user}: '{bcrypt_hash(password)}'\n"


def write(directory: Path, password: str) -> Path:
    path = directory / FILENAME
    path.write_text(render(password))
    # a hash, not the password: readable by the containers' own users (nobody, uid 65534)
    path.chmod(0o644)
    return path


def main(argv: list[str]) -> int:
    password = os.environ.get("MONITORING_PASSWORD", "")
    if len(argv) != 1 or not password:
        print("usage: MONITORING_PASSWORD=... python -m deploy.web_config DIRECTORY", file=sys.stderr)
        return 2
    print(write(Path(argv[0]), password))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
