"""The agent client as an agent installs it: light, importable anywhere, and its kill-switch
wire format checkable by agents in other languages (docs/killswitch-wire-format.md)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import venv
from datetime import datetime
from pathlib import Path

import pytest

from agentwatch_client.errors import SignatureError
from agentwatch_client.wire import KillSwitchCommand, load_public_keys, refusal_reason, verify
from tests import killswitch_vectors

ROOT = Path(__file__).resolve().parents[1]
VECTORS = ROOT / "docs" / "killswitch-test-vectors.json"


def test_vectors_file_is_what_the_implementation_produces() -> None:
    assert VECTORS.read_bytes() == killswitch_vectors.render(), (
        "docs/killswitch-test-vectors.json is stale: python -m tests.killswitch_vectors > it")


def test_every_verdict_is_covered_by_a_vector() -> None:
    verdicts = {v["expect"] for v in json.loads(VECTORS.read_text())["vectors"]}
    assert verdicts == {"valid", "unsigned", "unknown_key", "forged", "expired", "not_yet_valid", "replayed"}


# Run inside the fresh virtualenv too: it uses only the client package and the JSON file.
CHECK_VECTORS = r'''
import json, sys
from datetime import datetime
from agentwatch_client.errors import SignatureError
from agentwatch_client.wire import KillSwitchCommand, load_public_keys, refusal_reason, verify

doc = json.load(open(sys.argv[1]))
keys = load_public_keys(",".join(doc["trusted_public_keys_b64"]))
assert sorted(keys) == doc["trusted_key_ids"], (sorted(keys), doc["trusted_key_ids"])
for v in doc["vectors"]:
    cmd = KillSwitchCommand.from_json(v["wire"].encode())
    assert cmd.signing_bytes().hex() == v["signing_bytes_hex"], v["name"]
    assert cmd.signing_bytes().decode() == v["signing_bytes"], v["name"]
    try:
        verify(cmd, keys, now=datetime.fromisoformat(v["now"].replace("Z", "+00:00")),
               seen_ids=set(v["seen_command_ids"]), max_age_s=doc["max_age_s"], clock_skew_s=doc["clock_skew_s"])
        got = "valid"
    except SignatureError as exc:
        got = refusal_reason(exc)
    assert got == v["expect"], (v["name"], got, v["expect"])
print(f"{len(doc['vectors'])} vectors ok")
'''


def test_vectors_verify_here() -> None:
    out = subprocess.run([sys.executable, "-c", CHECK_VECTORS, str(VECTORS)], capture_output=True, text=True,
                         check=False)
    assert out.returncode == 0, out.stderr
    # and the same checks in this process, so a failure points at a line
    doc = json.loads(VECTORS.read_text())
    keys = load_public_keys(",".join(doc["trusted_public_keys_b64"]))
    for v in doc["vectors"]:
        cmd = KillSwitchCommand.from_json(v["wire"].encode())
        try:
            verify(cmd, keys, now=datetime.fromisoformat(v["now"]), seen_ids=set(v["seen_command_ids"]))
            got = "valid"
        except SignatureError as exc:
            got = refusal_reason(exc)
        assert got == v["expect"], v["name"]


# an Ed25519 public key as X.509 SubjectPublicKeyInfo (DER): this fixed prefix, then the raw 32 bytes
ED25519_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")


def test_vectors_verify_with_openssl_not_only_python(tmp_path: Path) -> None:
    """The signature is plain Ed25519 over exactly the documented signing bytes, and the key id
    the documented SHA-256 prefix: checked by OpenSSL, as an agent in another language would."""
    import base64
    import binascii

    doc = json.loads(VECTORS.read_text())
    raw_keys = [base64.b64decode(k) for k in doc["trusted_public_keys_b64"]]
    key_files = {}
    for raw in raw_keys:
        der = tmp_path / f"key{len(key_files)}.der"
        der.write_bytes(ED25519_SPKI_PREFIX + raw)
        digest = subprocess.run(["openssl", "dgst", "-sha256", "-hex"], input=raw, capture_output=True, check=True)
        key_files[digest.stdout.decode().split()[-1][:16]] = der
    assert sorted(key_files) == doc["trusted_key_ids"]
    checked = {"good": 0, "bad": 0}
    for v in doc["vectors"]:
        wire = json.loads(v["wire"])
        if not wire.get("signature") or wire.get("key_id") not in key_files or v["expect"] == "unknown_key":
            continue
        try:
            signature = base64.b64decode(wire["signature"], validate=True)
        except binascii.Error:
            assert v["expect"] == "forged", v["name"]
            continue
        (tmp_path / "msg").write_bytes(bytes.fromhex(v["signing_bytes_hex"]))
        (tmp_path / "sig").write_bytes(signature)
        out = subprocess.run(["openssl", "pkeyutl", "-verify", "-pubin", "-keyform", "DER", "-inkey",
                              str(key_files[wire["key_id"]]), "-rawin", "-in", str(tmp_path / "msg"),
                              "-sigfile", str(tmp_path / "sig")], capture_output=True, text=True, check=False)
        valid_signature = v["expect"] != "forged"  # expired, replayed ... are refused after the signature
        assert (out.returncode == 0) == valid_signature, (v["name"], out.stdout, out.stderr)
        checked["good" if valid_signature else "bad"] += 1
    assert checked["good"] >= 4 and checked["bad"] >= 1, checked


APP = r'''
import schemas                      # the application's own module, not ours
assert schemas.APP_SCHEMAS is True
from agentwatch_client import AgentClient, SyncAgentClient, KillSwitchCommand
from streams.client import AgentClient as Compat   # the old import path still works
assert Compat is AgentClient
import schemas as again
assert again.APP_SCHEMAS is True    # still the application's module after importing the client
heavy = [m for m in ("faust", "chdb", "clickhouse_connect", "pydantic_settings", "yaml") if m in sys.modules]
assert not heavy, heavy
print("client ok")
'''


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new virtualenv with ``pip install <this project>``: the base install, as an agent gets it."""
    tmp = tmp_path_factory.mktemp("client-venv")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".venv", ".agentwatch", ".git", "build", "*.egg-info", "__pycache__", ".pytest_cache", "tests"))
    env_dir = tmp / "venv"
    venv.create(env_dir, with_pip=True)
    pip = subprocess.run([str(env_dir / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check",
                          str(src)], capture_output=True, text=True, check=False, timeout=900)
    assert pip.returncode == 0, pip.stderr[-3000:]
    return env_dir


def test_base_install_is_the_light_client(fresh_venv: Path) -> None:
    listed = subprocess.run([str(fresh_venv / "bin" / "pip"), "list", "--format=json"], capture_output=True,
                            text=True, check=True).stdout
    installed = {p["name"].lower() for p in json.loads(listed)}
    assert "agentwatch" in installed
    assert not installed & {"faust-streaming", "chdb", "clickhouse-connect", "pydantic-settings", "pyyaml"}, installed
    # the CLI of a client-only install says what to install instead of a traceback
    cli = subprocess.run([str(fresh_venv / "bin" / "agentwatch"), "settings"], capture_output=True, text=True,
                         check=False)
    assert cli.returncode == 2 and "agentwatch[server]" in cli.stderr and "Traceback" not in cli.stderr


def test_client_imports_inside_an_app_with_its_own_schemas_module(fresh_venv: Path, tmp_path: Path) -> None:
    app = tmp_path / "app"
    app.mkdir()
    (app / "schemas.py").write_text("APP_SCHEMAS = True\n")
    (app / "main.py").write_text("import sys\n" + APP)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    out = subprocess.run([str(fresh_venv / "bin" / "python"), "main.py"], cwd=app, capture_output=True,
                         text=True, check=False, env=env)
    assert out.returncode == 0 and "client ok" in out.stdout, out.stderr
    vec = subprocess.run([str(fresh_venv / "bin" / "python"), "-c", CHECK_VECTORS, str(VECTORS)], cwd=app,
                         capture_output=True, text=True, check=False, env=env)
    assert vec.returncode == 0 and "vectors ok" in vec.stdout, vec.stderr
    typed = subprocess.run([str(fresh_venv / "bin" / "python"), "-c",
                            "import agentwatch_client, pathlib; "
                            "print((pathlib.Path(agentwatch_client.__file__).parent / 'py.typed').exists())"],
                           cwd=app, capture_output=True, text=True, check=True, env=env)
    assert typed.stdout.strip() == "True"


def test_the_documented_examples_call_the_real_api() -> None:
    """docs/client.md's examples compile, import what the package exports, and call the client's
    methods and constructors with arguments they accept (a renamed argument breaks the doc, here)."""
    import ast
    import inspect

    import agentwatch_client
    from agentwatch_client import AgentClient, SyncAgentClient

    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "client.md").read_text(), re.S)
    assert len(blocks) >= 2
    signatures = {"AgentClient": inspect.signature(AgentClient),
                  "SyncAgentClient": inspect.signature(SyncAgentClient),
                  **{name: inspect.signature(getattr(AgentClient, name))
                     for name in ("record_tool_call", "record_llm_call", "emit", "allowed", "flush")}}
    sync_client_kwargs = set(inspect.signature(AgentClient).parameters)  # SyncAgentClient passes **kwargs on
    checked = 0
    for block in blocks:
        tree = ast.parse(block)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "agentwatch_client":
                assert all(hasattr(agentwatch_client, a.name) for a in node.names), [a.name for a in node.names]
            if not isinstance(node, ast.Call):
                continue
            name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
            if name not in signatures:
                continue
            keywords = {k.arg for k in node.keywords if k.arg}
            params = signatures[name].parameters
            accepted = set(params) | (sync_client_kwargs if name == "SyncAgentClient" else set())
            assert keywords <= accepted, (name, keywords - accepted)
            positional = [p for p in params.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                          and p.name != "self"]
            assert len(node.args) <= len(positional), (name, len(node.args))
            checked += 1
    assert checked >= 6, checked
