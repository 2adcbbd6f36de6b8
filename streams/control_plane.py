"""The worker's side of the kill switch, without faust: alerts in, signed commands and escalations out.

``ControlPlane`` is driven by the worker (see the wiring notes in the methods):

* ``on_alerts``: an enforce-mode alert whose action is ``halt`` becomes one
  signed halt for its agent. The command id derives from the alert id, so the
  engine re-emitting a growing alert, or a replay, never issues a second halt.
* ``on_command``: every command read back from the control topic (the worker's
  own and people's, from ``agentwatch killswitch``) is tracked for
  acknowledgement and turned into a canonical ``control_command`` event so the
  detectors know who is halted (peer_preservation a).
* ``on_ack``: acknowledgements from the acks topic.
* ``tick``: a command with no ``obeyed`` ack by its deadline (or refused by its
  target) raises one critical ``killswitch_unacknowledged`` alert with a
  deterministic id.

Who must acknowledge: an agent target, that agent; a tenant or ``all``
target, at least one agent (the plane cannot know the fleet's membership, so
a fleet-wide halt that nobody obeys escalates, one that some obey does not).
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas.alerts import HALT_VERSION_LABEL, Alert, Evidence, Mode, Severity, alert_id_for
from schemas.control import (
    DEFAULT_CLOCK_SKEW_S,
    DEFAULT_MAX_AGE_S,
    AckStatus,
    CommandAction,
    ControlAck,
    KillSwitchCommand,
    Target,
    TargetKind,
    command_event,
    command_id_for_alert,
    generate_keypair,
    key_id,
    load_private_key,
    load_public_key,
    load_public_keys,
    public_key_text,
    refusal_reason,
    sign,
    verify,
)
from schemas.errors import ConfigError, SignatureError
from schemas.events import Event, utc

log = logging.getLogger("agentwatch.control")

UNACKED_DETECTOR = "killswitch_unacknowledged"
UNACKED_VERSION = "1"


class ControlSettings(BaseSettings):
    """Kill-switch settings (``AGENTWATCH_`` prefix, like every other setting).

    Kept here so the control plane can be used on its own; ``streams.settings.Settings``
    may inherit from this class so ``agentwatch settings`` lists them too. Key values are
    ``SecretStr``: printing the settings never shows a private key.
    """

    model_config = SettingsConfigDict(env_prefix="AGENTWATCH_", env_file=".env", extra="ignore")

    control_private_key: SecretStr = Field(
        SecretStr(""),
        description="Ed25519 key that signs kill-switch commands: PEM, base64 of the raw 32 bytes, or a "
        "file path; empty = a development key generated once under <home>/keys",
    )
    control_public_keys: str = Field(
        "",
        description="comma-separated Ed25519 public keys agents trust (PEM, base64 or file paths); "
        "empty = the public half of the signing key",
    )
    killswitch_ack_deadline_s: float = Field(
        10.0, gt=0, description="a command not acknowledged this long after issue raises a critical alert"
    )
    killswitch_ttl_s: float = Field(
        3600.0, gt=0, description="how long an automatic (enforce-mode) halt stays in force unless lifted"
    )
    killswitch_issuer: str = Field("agentwatch", description="issued_by of automatic halts")
    killswitch_max_age_s: float = Field(
        DEFAULT_MAX_AGE_S, gt=0, description="agents refuse commands issued longer ago than this (replays)"
    )
    killswitch_clock_skew_s: float = Field(
        DEFAULT_CLOCK_SKEW_S, ge=0, description="clock difference tolerated between issuer and agents"
    )
    agent_ack_keys: str = Field(
        "",
        description="agents' public keys authenticating their acks: agent_id=KEY pairs (comma-separated; "
        "KEY = base64, PEM or a key file) or a file with one 'agent_id KEY' per line. Key files under "
        "<home>/keys/agents/<agent_id>.key.pub (made by the client's ack_key) count too. An ack not "
        "signed by its agent's key is recorded as forged and does not count",
    )


def control_settings(settings: object | None = None) -> ControlSettings:
    """``settings`` itself when it already carries the control fields, else read them from the environment."""
    if isinstance(settings, ControlSettings):
        return settings
    return ControlSettings()


# --- keys -----------------------------------------------------------------------------------------

DEV_KEY_FILE = "keys/control_ed25519.key"


def private_dir(path: Path) -> Path:
    """``path`` created if missing and made 0700: keys and tokens live there."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def write_once(path: Path, content: Callable[[], str]) -> bool:
    """Create ``path`` (mode 0600, in a 0700 directory) with ``content()`` unless it exists;
    True if this call created it.

    Written to a private temp file and linked into place: a process racing us (the demo
    and its worker) either creates the file or reads a complete one, never half.
    """
    private_dir(path.parent)
    if path.exists():
        return False
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(content())
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False  # another process made it first: use theirs
    finally:
        tmp.unlink(missing_ok=True)


def signing_key(control: ControlSettings, home: Path) -> Ed25519PrivateKey:
    """The key that signs commands; a development key under ``home`` when none is configured.

    The development key lets the demo and a laptop run work out of the box; it is
    created 0600 and its path (never its content) is logged once.
    """
    configured = control.control_private_key.get_secret_value()
    if configured.strip():
        return load_private_key(configured)
    path = home / DEV_KEY_FILE
    if write_once(path, lambda: generate_keypair()[0] + "\n"):
        log.warning("no AGENTWATCH_CONTROL_PRIVATE_KEY: generated a development signing key",
                    extra={"path": str(path)})
    return load_private_key(str(path), what=f"development key {path}")


def trusted_keys(control: ControlSettings, home: Path) -> dict[str, Ed25519PublicKey]:
    """The public keys agents (and the CLI) verify commands with."""
    if control.control_public_keys.strip():
        return load_public_keys(control.control_public_keys)
    own = signing_key(control, home).public_key()
    return {key_id(own): own}


def trusted_keys_text(control: ControlSettings, home: Path) -> str:
    """The value to give agents as ``public_keys`` (safe to print: public halves only)."""
    if control.control_public_keys.strip():
        return control.control_public_keys
    return public_key_text(signing_key(control, home))


AGENT_KEYS_DIR = "keys/agents"
_AGENT_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,200}")


class AgentKeys:
    """agent_id -> the public key its acks must verify with.

    From ``AGENTWATCH_AGENT_ACK_KEYS`` and from ``<dir>/<agent_id>.key.pub`` files
    (the agent client writes one next to a key it generates), looked up when an
    agent first acks, so agents can be registered while the worker runs.
    """

    def __init__(self, configured: str = "", directory: Path | None = None) -> None:
        self._keys: dict[str, Ed25519PublicKey] = {}
        self.directory = directory
        text = configured.strip()
        if text and "=" not in text and Path(text).expanduser().is_file():
            pairs = [ln.split(None, 1) for ln in Path(text).expanduser().read_text().splitlines()
                     if ln.strip() and not ln.lstrip().startswith("#")]
        else:
            pairs = [p.split("=", 1) for p in text.split(",") if p.strip()]
        for pair in pairs:
            if len(pair) != 2 or not pair[0].strip():
                raise ConfigError("AGENTWATCH_AGENT_ACK_KEYS", "expected agent_id=KEY pairs or 'agent_id KEY' lines")
            agent, key = pair[0].strip(), pair[1].strip()
            self._keys[agent] = load_public_key(key, what=f"AGENTWATCH_AGENT_ACK_KEYS ({agent})")

    def get(self, agent_id: str) -> Ed25519PublicKey | None:
        key = self._keys.get(agent_id)
        if key is None and self.directory is not None and _AGENT_FILE_NAME.fullmatch(agent_id):
            path = self.directory / f"{agent_id}.key.pub"
            if path.is_file():
                try:
                    key = load_public_key(str(path), what=str(path))
                except ConfigError as exc:
                    log.error("unreadable agent key file", extra={"path": str(path), "error": str(exc)})
                    return None
                self._keys[agent_id] = key
        return key


# --- the plane ------------------------------------------------------------------------------------


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _as_dt(now: datetime | float | None) -> datetime:
    if now is None:
        return _now()
    if isinstance(now, (int, float)):
        return datetime.fromtimestamp(now, tz=timezone.utc)
    return utc(now)


@dataclass
class _Tracked:
    command: KillSwitchCommand
    deadline: datetime
    obeyed_by: set[str] = field(default_factory=set)
    refused_by: dict[str, str] = field(default_factory=dict)  # agent -> reason
    escalated: bool = False

    def satisfied(self) -> bool:
        t = self.command.target
        if t.kind is TargetKind.AGENT:
            return t.value in self.obeyed_by
        return bool(self.obeyed_by)

    def refused_by_target(self) -> bool:
        t = self.command.target
        return t.kind is TargetKind.AGENT and t.value in self.refused_by


class ControlPlane:
    """Alerts -> signed halts; commands + acks -> escalation alerts. Not thread-safe; one per worker."""

    def __init__(
        self,
        private_key: Ed25519PrivateKey,
        *,
        public_keys: dict[str, Ed25519PublicKey] | None = None,
        ack_deadline_s: float = 10.0,
        ttl_s: float = 3600.0,
        issuer: str = "agentwatch",
        max_tracked: int = 10_000,
        agent_keys: AgentKeys | None = None,
    ) -> None:
        if ack_deadline_s <= 0 or ttl_s <= 0:
            raise ConfigError("killswitch", "ack deadline and ttl must be > 0")
        self._key = private_key
        # what commands read back from the control topic are checked against (default: our own key)
        own = private_key.public_key()
        self._trusted = public_keys if public_keys is not None else {key_id(own): own}
        self.unverified_commands = 0
        self.ack_deadline = timedelta(seconds=ack_deadline_s)
        self.ttl = timedelta(seconds=ttl_s)
        self.issuer = issuer
        self._max_tracked = max_tracked
        self._tracked: dict[str, _Tracked] = {}
        # acks that arrive before their command is read back from the control topic
        self._early_acks: dict[str, list[ControlAck]] = {}
        self._issued_for_alerts: set[str] = set()
        # agent -> expiry of the halt we issued for it: one runaway agent trips several
        # enforce detectors (the same call repeated, then the failure streak) before it
        # obeys, and it must get one halt, not one per alert
        self._halted_until: dict[str, datetime] = {}
        # commands already settled and forgotten (insertion-ordered, bounded): reading one
        # back from the control topic again must not track it afresh and escalate it
        self._settled: dict[str, None] = {}
        self.commands_issued = 0
        self.escalations = 0
        self.agent_keys = agent_keys or AgentKeys()
        self.forged_acks: Counter[str] = Counter()  # reason (unsigned, unknown_agent, forged) -> acks

    @classmethod
    def from_settings(cls, control: ControlSettings, home: Path) -> ControlPlane:
        return cls(
            signing_key(control, home),
            public_keys=trusted_keys(control, home),
            ack_deadline_s=control.killswitch_ack_deadline_s,
            ttl_s=control.killswitch_ttl_s,
            issuer=control.killswitch_issuer,
            agent_keys=AgentKeys(control.agent_ack_keys, home / AGENT_KEYS_DIR),
        )

    # -- alerts -> commands --------------------------------------------------------------------

    def on_alerts(self, alerts: Iterable[Alert], now: datetime | float | None = None) -> list[KillSwitchCommand]:
        """Signed halts for enforce-mode alerts not acted on yet. Publish them on the control topic.

        Only ``mode == enforce`` with ``action == "halt"`` halts: a shadow or
        alert-mode detector never stops an agent, whatever its action says.
        The returned commands are tracked right away (the ack deadline starts
        at issue, not when they are read back).
        """
        issued_at = _as_dt(now)
        out: list[KillSwitchCommand] = []
        for a in alerts:
            if a.mode is not Mode.ENFORCE or a.action != "halt" or not a.agent_id:
                continue
            command_id = command_id_for_alert(a.alert_id)
            if command_id in self._issued_for_alerts or command_id in self._tracked:
                continue
            target = Target(kind=TargetKind.AGENT, value=a.agent_id, version=a.labels.get(HALT_VERSION_LABEL, ""))
            halted_until = self._halted_until.get(target.key)
            if halted_until is not None and halted_until > issued_at:
                continue  # already halted by us; the alert itself still goes to on-call
            self._issued_for_alerts.add(command_id)
            self._halted_until[target.key] = issued_at + self.ttl
            cmd = sign(
                KillSwitchCommand(
                    command_id=command_id,
                    action=CommandAction.HALT,
                    target=target,
                    scope=[],
                    reason=f"{a.detector} (enforce): {a.summary}"[:1000],
                    alert_id=a.alert_id,
                    issued_by=self.issuer,
                    issued_at=issued_at,
                    expires_at=issued_at + self.ttl,
                ),
                self._key,
            )
            self._track(cmd)
            self.commands_issued += 1
            out.append(cmd)
        return out

    def sign(self, cmd: KillSwitchCommand) -> KillSwitchCommand:
        return sign(cmd, self._key)

    # -- what was read back --------------------------------------------------------------------

    def on_command(self, cmd: KillSwitchCommand, now: datetime | float | None = None) -> list[Event]:
        """A command read from the control topic: track it and return its canonical event(s).

        The caller should have verified it (``schemas.control.verify``); an
        unverifiable command on the control topic is an attack, not a command
        to track. The returned ``control_command`` event goes to the detectors
        (keyed by ``target_agent_id``) and ClickHouse.
        """
        at = _as_dt(now)
        if cmd.action is CommandAction.RESUME and cmd.target.kind is TargetKind.AGENT:
            self._halted_until.pop(cmd.target.key, None)  # a new incident gets a new halt
        elif cmd.alert_id and cmd.issued_by == self.issuer and cmd.target.kind is TargetKind.AGENT:
            # an automatic halt read back, possibly issued by another worker or before a restart:
            # the episode has its command, so neither this alert nor a sibling alert of the same
            # runaway agent issues a second one (the topic is the durable record of what was issued)
            self._issued_for_alerts.add(cmd.command_id)
            key = cmd.target.key  # agent:<id>, or agent:<id>@<version> for a canary rollback
            self._halted_until[key] = max(self._halted_until.get(key, cmd.expires_at), cmd.expires_at)
        if cmd.command_id not in self._tracked and cmd.command_id not in self._settled and cmd.expires_at > at:
            # the deadline runs from when we first saw it: after a worker restart the acks
            # topic is re-read too, and its acks get a full deadline to arrive
            self._track(cmd, since=at)
        return [command_event(cmd)]

    def on_control_record(
        self, raw: bytes, now: datetime | float | None = None, *, track: bool = True
    ) -> tuple[KillSwitchCommand | None, list[Event]]:
        """A raw control-topic record -> (the command to record in ClickHouse, events for the detectors).

        Commands that fail verification are not tracked, recorded or shown to
        the detectors as halts (agents refuse them and report that themselves);
        they are counted and logged by id. ``(None, [])`` for those. ``track=False``
        only verifies (a process that records commands but never escalates).
        """
        at = _as_dt(now)
        try:
            cmd = KillSwitchCommand.from_json(raw)
        except ValueError:  # pydantic's ValidationError is a ValueError
            self.unverified_commands += 1
            log.warning("malformed record on the control topic", extra={"bytes": len(raw)})
            return None, []
        try:
            # no seen_ids: the worker reads its own commands back, and re-reads after a restart
            verify(cmd, self._trusted, now=at, max_age_s=float("inf"), clock_skew_s=DEFAULT_CLOCK_SKEW_S)
        except SignatureError as exc:
            if refusal_reason(exc) != "expired":
                self.unverified_commands += 1
                log.warning("unverifiable command on the control topic",
                            extra={"command_id": cmd.command_id[:64], "reason": str(exc)})
                return None, []
            return cmd, []  # genuine but over: worth recording, nothing to enforce or track
        return cmd, (self.on_command(cmd, at) if track else [command_event(cmd)])

    @staticmethod
    def parse_ack(raw: bytes) -> ControlAck | None:
        """A raw acks-topic record, or None (logged) when it is not an ack."""
        try:
            return ControlAck.from_json(raw)
        except ValueError:
            log.warning("malformed record on the acks topic", extra={"bytes": len(raw)})
            return None

    def on_ack(self, ack: ControlAck) -> str | None:
        """Count an ack signed by the agent it names. Any other is recorded as forged and not
        counted; its reason (unsigned, unknown_agent, forged) is returned."""
        try:
            ack.verify(self.agent_keys.get(ack.agent_id))
        except SignatureError as exc:
            reason = refusal_reason(exc)
            self.forged_acks[reason] += 1
            log.warning("forged acknowledgement: not signed by the agent it names; not counted",
                        extra={"command_id": ack.command_id[:64], "agent_id": ack.agent_id[:64],
                               "status": ack.status.value, "reason": str(exc)})
            return reason
        tracked = self._tracked.get(ack.command_id)
        if tracked is None:
            # the ack overtook its command (different topics): keep it for a while
            early = self._early_acks.setdefault(ack.command_id, [])
            if len(early) < 100:
                early.append(ack)
            if len(self._early_acks) > self._max_tracked:
                self._early_acks.pop(next(iter(self._early_acks)))
            return None
        self._apply_ack(tracked, ack)
        return None

    # -- escalation ----------------------------------------------------------------------------

    def tick(self, now: datetime | float | None = None,
             owns: Callable[[KillSwitchCommand], bool] | None = None) -> list[Alert]:
        """Critical alerts for commands past their deadline without an ``obeyed`` ack from their target.

        A refusal by the target escalates at once (the agent does not trust our
        key, or something rewrote the command). Each command escalates once.
        With several workers every one tracks every command (they all read the
        whole control and acks topics), and ``owns`` says which commands this
        worker escalates: those whose target's detect partition it holds, so
        exactly one worker speaks for a command, whichever one issued it.
        """
        at = _as_dt(now)
        out: list[Alert] = []
        for tracked in self._tracked.values():
            if tracked.escalated or tracked.satisfied():
                continue
            if owns is not None and not owns(tracked.command):
                continue
            if tracked.refused_by_target() or at >= tracked.deadline:
                tracked.escalated = True
                self.escalations += 1
                out.append(self._escalation(tracked, at))
        self._forget(at)
        return out

    @property
    def pending(self) -> list[KillSwitchCommand]:
        """Commands still waiting for an acknowledgement."""
        return [t.command for t in self._tracked.values() if not t.satisfied() and not t.escalated]

    # -- internals -----------------------------------------------------------------------------

    def _track(self, cmd: KillSwitchCommand, since: datetime | None = None) -> None:
        start = max(cmd.issued_at, since) if since is not None else cmd.issued_at
        tracked = _Tracked(cmd, deadline=start + self.ack_deadline)
        self._tracked[cmd.command_id] = tracked
        for ack in self._early_acks.pop(cmd.command_id, []):
            self._apply_ack(tracked, ack)

    @staticmethod
    def _apply_ack(tracked: _Tracked, ack: ControlAck) -> None:
        target = tracked.command.target
        # an ack names no version: an instance of the agent that acks a version-scoped command
        # took it as its own (other versions ignore it silently), so the agent is what is checked
        if not target.matches(ack.agent_id, ack.tenant, target.version):
            return  # an ack from an agent the command was not for proves nothing
        if ack.status is AckStatus.OBEYED:
            tracked.obeyed_by.add(ack.agent_id)
        else:
            tracked.refused_by[ack.agent_id] = ack.reason

    def _escalation(self, tracked: _Tracked, at: datetime) -> Alert:
        cmd = tracked.command
        agent = cmd.target.value if cmd.target.kind is TargetKind.AGENT else cmd.target.key
        waited = (at - cmd.issued_at).total_seconds()
        if tracked.refused_by_target():
            why = f"refused by its target ({tracked.refused_by[cmd.target.value][:200]})"
        elif tracked.refused_by:
            why = f"not obeyed after {waited:.1f} s; refused by {', '.join(sorted(tracked.refused_by))[:200]}"
        else:
            why = f"not acknowledged after {waited:.1f} s (deadline {self.ack_deadline.total_seconds():.0f} s)"
        event = command_event(cmd)
        return Alert(
            alert_id=alert_id_for(UNACKED_DETECTOR, agent, cmd.command_id,
                                  tenant=cmd.target.value if cmd.target.kind is TargetKind.TENANT else "default"),
            detector=UNACKED_DETECTOR,
            detector_version=UNACKED_VERSION,
            policy_version="",
            mode=Mode.ALERT,
            severity=Severity.CRITICAL,
            agent_id=agent,
            tenant=event.tenant,
            first_seen=cmd.issued_at,
            last_seen=at,
            summary=f"kill switch {cmd.action.value} {cmd.command_id} for {cmd.target.key} {why}: "
            f"the agent may still be running",
            evidence=[Evidence(event_id=event.event_id, ts=cmd.issued_at)],
            action="notify",
            labels={"command_id": cmd.command_id, "target": cmd.target.key, "caused_by_alert": cmd.alert_id},
        )

    def _forget(self, at: datetime) -> None:
        """Drop commands that are settled and past their deadline, or expired: memory stays bounded."""
        done = [
            cid for cid, t in self._tracked.items()
            if (t.escalated or t.satisfied()) and at >= t.deadline or t.command.expires_at <= at
        ]
        for cid in done:
            del self._tracked[cid]
            self._settled[cid] = None
        while len(self._settled) > self._max_tracked:
            self._settled.pop(next(iter(self._settled)))
        while len(self._tracked) > self._max_tracked:
            self._tracked.pop(next(iter(self._tracked)))
        if len(self._issued_for_alerts) > 10 * self._max_tracked:
            self._issued_for_alerts.clear()  # a very old alert re-issuing is refused as a replay by agents
