"""Builds docs/killswitch-test-vectors.json: kill-switch commands as they arrive on the
control topic, the exact bytes their signature covers, and the verdict an agent must reach.

Deterministic (a fixed test key; Ed25519 signatures are deterministic), so the test
can rebuild the file and compare: the vectors cannot drift from the implementation.
Regenerate with ``.venv/bin/python -m tests.killswitch_vectors > docs/killswitch-test-vectors.json``.
Only the client package is used: this is what an agent has.
"""

from __future__ import annotations

import base64
import hashlib
from datetime import datetime, timedelta, timezone
from typing import Any

import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agentwatch_client.errors import SignatureError
from agentwatch_client.wire import KillSwitchCommand, key_id, refusal_reason, sign, verify

# test keys only: derived from public strings, never use them for anything real
SIGNER = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"agentwatch test vector signer").digest())
STRANGER = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"agentwatch test vector stranger").digest())
NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=timezone.utc)
MAX_AGE_S = 86400.0
CLOCK_SKEW_S = 30.0


def _b64_public(private: Ed25519PrivateKey) -> str:
    raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def _command(**over: Any) -> KillSwitchCommand:
    fields: dict[str, Any] = dict(
        command_id="cmd-0001", action="halt", target={"kind": "agent", "value": "ops-bot-7"}, scope=[],
        reason="retry_loop: deploy_service called 6 times with the same arguments", alert_id="a1b2c3",
        issued_by="agentwatch", issued_at=NOW - timedelta(seconds=5), expires_at=NOW + timedelta(hours=1),
        nonce="00112233445566778899aabbccddeeff",
    )
    fields.update(over)
    return KillSwitchCommand.model_validate(fields)


def _wire(cmd: KillSwitchCommand) -> dict[str, Any]:
    return orjson.loads(cmd.to_json())


def _cases() -> list[tuple[str, str, dict[str, Any], dict[str, Any]]]:
    """(name, description, wire object, verify options)."""
    signed = sign(_command(), SIGNER)
    cases: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = [
        ("halt_agent", "a halt of every tool of one agent", _wire(signed), {}),
        ("halt_tenant_scoped_unicode",
         "a halt of two tools of a tenant's agents; the reason holds non-ASCII, a quote, a newline and a "
         "control character (escaping rules)",
         _wire(sign(_command(command_id="cmd-0002", target={"kind": "tenant", "value": "acme"},
                             scope=["kubectl_apply", "deploy_service"],
                             reason='stopp\u00e9 "now"\nby on-call \u2014 tab\there \x01', alert_id="",
                             issued_by="alice@example.org"), SIGNER)), {}),
        ("resume_all", "a resume for every agent (target all has an empty value)",
         _wire(sign(_command(command_id="cmd-0003", action="resume", target={"kind": "all"}, reason="lifted",
                             alert_id=""), SIGNER)), {}),
    ]
    # non-canonical but equivalent text on the wire: an offset instead of Z, a fraction of a
    # second with fewer digits, an unsorted scope with a duplicate and padding, an unknown field.
    # The signature was made over the canonical form; the verifier must canonicalise.
    odd = sign(_command(command_id="cmd-0004", scope=["b_tool", "a_tool"],
                        issued_at=datetime(2026, 3, 1, 11, 59, 55, 500000, tzinfo=timezone.utc)), SIGNER)
    w = _wire(odd)
    w["issued_at"] = "2026-03-01T13:59:55.5+02:00"
    w["scope"] = [" b_tool", "a_tool", "b_tool", ""]
    w["x_unknown_field"] = "ignored and not signed"
    cases.append(("non_canonical_text", "equivalent values written differently; canonicalise before checking", w,
                  {}))
    tampered = _wire(signed)
    tampered["scope"] = ["read_logs"]
    cases.append(("forged_scope_changed", "the scope was changed after signing", tampered, {}))
    unsigned = _wire(signed)
    unsigned["signature"] = ""
    cases.append(("unsigned", "no signature", unsigned, {}))
    cases.append(("unknown_key", "signed by a key the agent does not trust",
                  _wire(sign(_command(command_id="cmd-0005"), STRANGER)), {}))
    cases.append(("expired", "checked after its expiry", _wire(signed),
                  {"now": (NOW + timedelta(hours=2)).isoformat().replace("+00:00", "Z")}))
    cases.append(("not_yet_valid", "issued more than the clock skew in the future",
                  _wire(sign(_command(command_id="cmd-0006", issued_at=NOW + timedelta(minutes=5)), SIGNER)), {}))
    cases.append(("replayed_too_old", "issued longer than max_age_s ago, though not expired",
                  _wire(sign(_command(command_id="cmd-0007", issued_at=NOW - timedelta(days=2),
                                      expires_at=NOW + timedelta(days=5)), SIGNER)), {}))
    cases.append(("replayed_seen", "a command id this agent has already received", _wire(signed),
                  {"seen_command_ids": ["cmd-0001"]}))
    versioned = sign(_command(command_id="cmd-0008", target={"kind": "agent", "value": "ops-bot-7",
                                                             "version": "2.1.0-rc1"},
                              reason="canary: 2.1.0-rc1 failed against 2.0.3"), SIGNER)
    cases.append(("halt_agent_version", "a halt of one version of an agent (a failed canary's rollback): "
                  "target.version is signed", _wire(versioned), {}))
    return cases


def build() -> dict[str, Any]:
    trusted = {key_id(SIGNER.public_key()): SIGNER.public_key()}
    vectors = []
    for name, description, wire, opts in _cases():
        now = datetime.fromisoformat(opts.get("now", NOW.isoformat()))
        seen = opts.get("seen_command_ids", [])
        raw = orjson.dumps(wire)
        cmd = KillSwitchCommand.from_json(raw)
        try:
            verify(cmd, trusted, now=now, seen_ids=set(seen), max_age_s=MAX_AGE_S, clock_skew_s=CLOCK_SKEW_S)
            verdict = "valid"
        except SignatureError as exc:
            verdict = refusal_reason(exc)
        signing = cmd.signing_bytes()
        vectors.append({
            "name": name,
            "description": description,
            "now": now.isoformat().replace("+00:00", "Z"),
            "seen_command_ids": seen,
            "wire": raw.decode(),
            "signing_bytes": signing.decode(),
            "signing_bytes_hex": signing.hex(),
            "expect": verdict,
        })
    return {
        "spec": "docs/killswitch-wire-format.md",
        "trusted_public_keys_b64": [_b64_public(SIGNER)],
        "trusted_key_ids": sorted(trusted),
        "max_age_s": MAX_AGE_S,
        "clock_skew_s": CLOCK_SKEW_S,
        "vectors": vectors,
    }


def render() -> bytes:
    return orjson.dumps(build(), option=orjson.OPT_INDENT_2) + b"\n"


if __name__ == "__main__":
    import sys

    sys.stdout.buffer.write(render())
