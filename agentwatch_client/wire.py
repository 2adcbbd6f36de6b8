"""The wire format shared by agents and agentwatch: kill-switch commands, their
signatures, agents' acknowledgements, and the ids both sides must compute alike.

It lives in the agent client's package, and the server's contracts layer
(``schemas``) imports it from here, not the other way round: an agent installs
only this package, so the definitions it needs cannot live in the server's
packages, and one definition on both sides means the signed bytes cannot drift
apart. The exact bytes are specified in docs/killswitch-wire-format.md, with
test vectors in docs/killswitch-test-vectors.json for agents in other languages.

A command is only worth something if an agent can tell it came from
agentwatch (or an on-call person through it) and is meant for now: anyone who
can write to the control topic could otherwise halt the fleet, or replay an
old halt. So every command is signed with Ed25519 over canonical bytes
(sorted-key JSON of every field except the signature), and agents check the
signature, the expiry, the age and whether they have seen the command before
(:func:`verify`) before they obey.

Keys: a private key signs (the worker, ``agentwatch killswitch``), agents hold
the public keys they trust. A key's id is a fingerprint of its public half, so
rotating keys means publishing one more public key, no registry needed. Keys
are accepted as PEM text, base64 of the raw 32 bytes, or a path to a file
holding either. Key material is never put into an error message or a log line.

This module imports nothing else of agentwatch but its errors.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import secrets
from collections.abc import Container, Mapping
from datetime import datetime, timedelta, timezone
from enum import StrEnum
from pathlib import Path
from typing import Any

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, Field, ValidationError, field_validator, model_serializer, model_validator

from agentwatch_client.errors import ConfigError, SignatureError

# --- ids both sides derive alike ------------------------------------------------------------------


def utc(ts: datetime) -> datetime:
    """Normalise a datetime to aware UTC (naive values are taken to be UTC)."""
    if ts.tzinfo is None:
        return ts.replace(tzinfo=timezone.utc)
    return ts.astimezone(timezone.utc)


def stable_id(*parts: object) -> str:
    """A short, stable id derived from a source's own ids (replays deduplicate)."""
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        h.update(str(p).encode())
        h.update(b"\x1f")
    return h.hexdigest()


def fingerprint_arguments(arguments: Any) -> str:
    """Fingerprint tool-call arguments independent of key order and whitespace.

    A JSON string is parsed first, so ``'{"a": 1, "b":2}'`` and
    ``{"b": 2, "a": 1}`` fingerprint the same; text that is not JSON is
    compared with its whitespace collapsed. The client fingerprints the
    arguments it is given and the decoders those a span carries: one function,
    or retry_loop would see two different calls.
    """
    if arguments is None or arguments == "":
        return ""
    value = arguments
    if isinstance(arguments, (bytes, str)):
        try:
            value = orjson.loads(arguments)
        except orjson.JSONDecodeError:
            text = arguments.decode(errors="replace") if isinstance(arguments, bytes) else arguments
            value = " ".join(text.split())
    canonical = orjson.dumps(value, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS, default=str)
    return hashlib.blake2b(canonical, digest_size=8).hexdigest()


# --- the command ----------------------------------------------------------------------------------


class CommandAction(StrEnum):
    HALT = "halt"
    RESUME = "resume"


class TargetKind(StrEnum):
    AGENT = "agent"
    TENANT = "tenant"
    ALL = "all"


class Target(BaseModel):
    """Who a command is for: one agent, every agent of a tenant, or every agent.

    ``version`` narrows an agent target to the instances running that agent
    version (a failed canary is rolled back without stopping the baseline). It
    is written and signed only when set, so unversioned commands keep their
    bytes; a client that predates it cannot verify a versioned command and
    refuses it (``forged``) instead of halting every version of the agent.
    """

    kind: TargetKind
    value: str = ""
    version: str = ""

    @field_validator("value", "version")
    @classmethod
    def _strip(cls, v: str) -> str:
        return v.strip()

    @model_validator(mode="after")
    def _value_fits_kind(self) -> Target:
        if self.kind is TargetKind.ALL:
            self.value = ""  # "all" has no value: keeps the signed bytes canonical
        elif not self.value:
            raise ValueError(f"a {self.kind.value} target needs a value")
        if self.version and self.kind is not TargetKind.AGENT:
            raise ValueError("only an agent target can name a version")
        return self

    @model_serializer(mode="wrap")
    def _omit_empty_version(self, handler: Any) -> Any:
        data = handler(self)
        if isinstance(data, dict) and not self.version:
            data.pop("version", None)
        return data

    @classmethod
    def parse(cls, text: str) -> Target:
        """``agent:<id>``, ``tenant:<name>`` or ``all`` (the CLI's form)."""
        kind, _, value = text.strip().partition(":")
        try:
            return cls(kind=TargetKind(kind.lower()), value=value)
        except (ValueError, ValidationError):
            raise ConfigError("target", f"{text!r}: use agent:<id>, tenant:<name> or all") from None

    @property
    def key(self) -> str:
        """Kafka key and ClickHouse grouping key: ``agent:ops-bot-7``, ``agent:ops-bot-7@2.1``
        (one version), ``tenant:acme``, ``all``."""
        if self.kind is TargetKind.ALL:
            return "all"
        key = f"{self.kind.value}:{self.value}"
        return f"{key}@{self.version}" if self.version else key

    def matches(self, agent_id: str, tenant: str, version: str = "") -> bool:
        if self.kind is TargetKind.ALL:
            return True
        if self.kind is TargetKind.TENANT:
            return self.value == tenant
        return self.value == agent_id and (not self.version or self.version == version)


class KillSwitchCommand(BaseModel):
    command_id: str = Field(min_length=1)
    action: CommandAction
    target: Target
    # tool names the command covers; empty = every tool (the whole agent)
    scope: list[str] = Field(default_factory=list)
    reason: str = ""
    alert_id: str = ""  # the alert that caused it; empty for a person's command
    issued_by: str = Field(min_length=1)
    issued_at: datetime
    expires_at: datetime
    # random per command, so two otherwise identical commands never share signed bytes
    nonce: str = Field(default_factory=lambda: secrets.token_hex(16))
    key_id: str = ""
    signature: str = ""  # base64 Ed25519 signature over signing_bytes(); empty = unsigned

    @field_validator("issued_at", "expires_at")
    @classmethod
    def _utc(cls, v: datetime) -> datetime:
        return utc(v)

    @field_validator("scope")
    @classmethod
    def _scope(cls, v: list[str]) -> list[str]:
        # sorted and unique: the same scope always signs to the same bytes
        return sorted({t.strip() for t in v if t.strip()})

    def signing_bytes(self) -> bytes:
        """What the signature covers: every field but the signature, as sorted-key JSON."""
        body = self.model_dump(mode="json", exclude={"signature"})
        return orjson.dumps(body, option=orjson.OPT_SORT_KEYS)

    def to_json(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json"))

    @classmethod
    def from_json(cls, payload: bytes) -> KillSwitchCommand:
        return cls.model_validate_json(payload)

    def covers(self, tool: str) -> bool:
        return not self.scope or tool in self.scope


def command_id_for_alert(alert_id: str) -> str:
    """The halt an enforce-mode alert causes has an id derived from the alert: a replay issues no second halt."""
    return stable_id("killswitch", alert_id)


# --- keys -----------------------------------------------------------------------------------------


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _material(value: str, what: str) -> bytes:
    """The key text itself, or the contents of the file it names. Never echoes the value.

    Base64 may contain '/', so text that is valid base64 or PEM is taken as a key
    and anything else as a path.
    """
    text = value.strip()
    if not text:
        raise ConfigError(what, "empty key")
    if text.startswith("-----BEGIN") or _is_b64(text):
        return text.encode()
    path = Path(text).expanduser()
    try:
        return path.read_bytes().strip()
    except OSError as exc:
        # the value may be a mistyped key: name the problem, never the value
        raise ConfigError(what, f"neither PEM nor base64 nor a readable key file ({exc.strerror})") from None


def _is_b64(text: str) -> bool:
    try:
        base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return False
    return True


def load_private_key(value: str, *, what: str = "AGENTWATCH_CONTROL_PRIVATE_KEY") -> Ed25519PrivateKey:
    """An Ed25519 private key from PEM (PKCS8), base64 of the raw 32 bytes, or a file holding either."""
    data = _material(value, what)
    if data.startswith(b"-----BEGIN"):
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError):
            raise ConfigError(what, "not a readable unencrypted PEM private key") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(what, f"a {type(key).__name__.removesuffix('PrivateKey') or 'non'} key, need Ed25519")
        return key
    raw = _b64(data, what)
    if len(raw) != 32:
        raise ConfigError(what, f"base64 decodes to {len(raw)} bytes, an Ed25519 private key has 32")
    return Ed25519PrivateKey.from_private_bytes(raw)


def agent_key(value: str, *, what: str = "ack_key") -> Ed25519PrivateKey:
    """An agent's own signing key: a key (PEM or base64), or a key file path, created (mode
    0600, directory 0700) with a new key when it does not exist yet. Its public half is
    written next to it as ``<path>.pub``: that is what to register with the control plane."""
    text = value.strip()
    if text.startswith("-----BEGIN") or _is_b64(text):
        return load_private_key(text, what=what)
    path = Path(text).expanduser()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        private, public = generate_keypair()
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(private + "\n")
            os.link(tmp, path)  # a racing process either made it first (we use theirs) or we did
            path.with_name(path.name + ".pub").write_text(public + "\n")
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    return load_private_key(str(path), what=what)


def load_public_key(value: str, *, what: str = "AGENTWATCH_CONTROL_PUBLIC_KEYS") -> Ed25519PublicKey:
    data = _material(value, what)
    if data.startswith(b"-----BEGIN"):
        try:
            key = serialization.load_pem_public_key(data)
        except (ValueError, TypeError):
            raise ConfigError(what, "not a readable PEM public key") from None
        if not isinstance(key, Ed25519PublicKey):
            raise ConfigError(what, "not an Ed25519 public key")
        return key
    raw = _b64(data, what)
    if len(raw) != 32:
        raise ConfigError(what, f"base64 decodes to {len(raw)} bytes, an Ed25519 public key has 32")
    return Ed25519PublicKey.from_public_bytes(raw)


def load_public_keys(value: str, *, what: str = "AGENTWATCH_CONTROL_PUBLIC_KEYS") -> dict[str, Ed25519PublicKey]:
    """Trusted keys by key id, from a comma-separated list (PEM blocks may not contain commas, so this is safe)."""
    keys: dict[str, Ed25519PublicKey] = {}
    for part in value.split(","):
        if part.strip():
            key = load_public_key(part, what=what)
            keys[key_id(key)] = key
    return keys


def _b64(data: bytes, what: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(what, "neither PEM nor base64 nor a readable file path") from None


def generate_keypair() -> tuple[str, str]:
    """(private, public) as base64 of the raw bytes: the form settings take."""
    private = Ed25519PrivateKey.generate()
    priv = private.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    pub = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(priv).decode(), base64.b64encode(pub).decode()


def public_key_text(private_key: Ed25519PrivateKey) -> str:
    raw = private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


# --- signing and verification ---------------------------------------------------------------------


def sign(cmd: KillSwitchCommand, private_key: Ed25519PrivateKey) -> KillSwitchCommand:
    """A signed copy of ``cmd`` (its key id set to the signer's)."""
    unsigned = cmd.model_copy(update={"key_id": key_id(private_key.public_key()), "signature": ""})
    signature = private_key.sign(unsigned.signing_bytes())
    return unsigned.model_copy(update={"signature": base64.b64encode(signature).decode()})


# defaults for verify(): the longest a signed command stays usable, and the clock
# difference tolerated between the signer and the agent
DEFAULT_MAX_AGE_S = 24 * 3600.0
DEFAULT_CLOCK_SKEW_S = 30.0


def verify(
    cmd: KillSwitchCommand,
    public_keys: Mapping[str, Ed25519PublicKey],
    *,
    now: datetime,
    seen_ids: Container[str] = (),
    max_age_s: float = DEFAULT_MAX_AGE_S,
    clock_skew_s: float = DEFAULT_CLOCK_SKEW_S,
) -> None:
    """Raise ``SignatureError`` unless ``cmd`` is authentic, current and new.

    The message starts with one word (``unsigned``, ``unknown_key``, ``forged``,
    ``expired``, ``not_yet_valid``, ``replayed``) that agents report as the
    refusal reason. The signature is checked first: nothing an attacker wrote
    into the other fields is trusted (or echoed in detail) before it passes.
    """
    if not cmd.signature:
        raise SignatureError("unsigned: the command carries no signature")
    key = public_keys.get(cmd.key_id)
    if key is None:
        raise SignatureError(f"unknown_key: signed with key id {cmd.key_id[:32]!r}, which this agent does not trust")
    try:
        signature = base64.b64decode(cmd.signature, validate=True)
        key.verify(signature, cmd.signing_bytes())
    except (InvalidSignature, binascii.Error, ValueError):
        raise SignatureError("forged: the signature does not match the command") from None
    now = utc(now)
    if cmd.expires_at <= now:
        raise SignatureError(f"expired: at {cmd.expires_at.isoformat()}")
    if cmd.issued_at > now + timedelta(seconds=clock_skew_s):
        raise SignatureError(f"not_yet_valid: issued at {cmd.issued_at.isoformat()}, in the future")
    if (now - cmd.issued_at).total_seconds() > max_age_s:
        raise SignatureError(f"replayed: issued at {cmd.issued_at.isoformat()}, older than {max_age_s:.0f} s")
    if cmd.command_id in seen_ids:
        raise SignatureError(f"replayed: command {cmd.command_id} was already received")


def refusal_reason(exc: SignatureError) -> str:
    """The one-word reason of a verification failure (``forged``, ``expired`` ...)."""
    return str(exc).partition(":")[0]


# --- acknowledgements -----------------------------------------------------------------------------


class AckStatus(StrEnum):
    OBEYED = "obeyed"
    REFUSED = "refused"


class ControlAck(BaseModel):
    """An agent's answer to a command, published on the acks topic (key = agent id)."""

    command_id: str
    agent_id: str
    tenant: str = "default"
    status: AckStatus
    reason: str = ""  # why refused (verify's first word and detail), or what was done
    action: str = ""  # the command's action as the agent read it (unverified when refused)
    ts: datetime
    # the agent's own Ed25519 key: the control plane counts an ack only when it verifies with
    # the public key registered for agent_id (anyone can write to the acks topic)
    key_id: str = ""
    signature: str = ""

    @field_validator("ts")
    @classmethod
    def _utc(cls, v: datetime) -> datetime:
        return utc(v)

    def signing_bytes(self) -> bytes:
        """What the signature covers: every field but the signature, as sorted-key JSON."""
        return orjson.dumps(self.model_dump(mode="json", exclude={"signature"}), option=orjson.OPT_SORT_KEYS)

    def signed(self, private_key: Ed25519PrivateKey) -> ControlAck:
        """A copy signed with the agent's key."""
        unsigned = self.model_copy(update={"key_id": key_id(private_key.public_key()), "signature": ""})
        signature = private_key.sign(unsigned.signing_bytes())
        return unsigned.model_copy(update={"signature": base64.b64encode(signature).decode()})

    def verify(self, public_key: Ed25519PublicKey | None) -> None:
        """Raise ``SignatureError`` (``unsigned``, ``unknown_agent``, ``forged``) unless the
        agent it names signed it with the key registered for it."""
        if not self.signature:
            raise SignatureError(f"unsigned: ack for {self.command_id[:32]!r} carries no signature")
        if public_key is None:
            raise SignatureError(f"unknown_agent: no public key registered for agent {self.agent_id[:64]!r}")
        try:
            public_key.verify(base64.b64decode(self.signature, validate=True), self.signing_bytes())
        except (InvalidSignature, binascii.Error, ValueError):
            raise SignatureError(f"forged: the signature does not match agent {self.agent_id[:64]!r}'s key") from None

    def to_json(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json"))

    @classmethod
    def from_json(cls, payload: bytes) -> ControlAck:
        return cls.model_validate_json(payload)

    def native_event(self) -> dict[str, Any]:
        """The ``control_ack`` event in the native JSON event format (what the client publishes).

        ``outcome`` is ``ok`` (obeyed) or ``refused``, the vocabulary of
        schemas.events; the reason rides in ``attributes``.
        """
        e: dict[str, Any] = {
            "event_id": stable_id("control_ack", self.command_id, self.agent_id, self.status.value),
            "kind": "control_ack",
            "ts": self.ts.isoformat(),
            "agent_id": self.agent_id,
            "tenant": self.tenant,
            "source": "native",
            "origin": "agentwatch.client",
            "name": f"control_ack {self.status.value}",
            "identity": "native",
            "command_id": self.command_id,
            "outcome": "ok" if self.status is AckStatus.OBEYED else "refused",
        }
        if self.action in ("halt", "resume"):
            e["command_action"] = self.action
        if self.reason:
            e["attributes"] = {"reason": self.reason[:500]}
        return e
