"""Signed commands and the worker's control plane, without a broker: pure logic in event order."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from pydantic import SecretStr

from schemas.alerts import Alert, Mode, Severity
from schemas.control import (
    AckStatus,
    ControlAck,
    KillSwitchCommand,
    Target,
    command_id_for_alert,
    generate_keypair,
    key_id,
    load_private_key,
    load_public_keys,
    refusal_reason,
    sign,
    verify,
)
from schemas.errors import ConfigError, SignatureError
from schemas.events import EventKind
from streams.control_plane import (
    UNACKED_DETECTOR,
    AgentKeys,
    ControlPlane,
    ControlSettings,
    signing_key,
    trusted_keys,
)

T0 = datetime(2025, 6, 1, 12, 0, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def keys() -> tuple[str, str]:
    return generate_keypair()


# each agent's own ack key, registered with the plane (AGENTWATCH_AGENT_ACK_KEYS form)
AGENT_KEYS = {agent: generate_keypair() for agent in ("ops-bot-7", "other", "b", "x")}
REGISTRY = ",".join(f"{agent}={pub}" for agent, (_, pub) in AGENT_KEYS.items())


def _plane(private: str, **kw: object) -> ControlPlane:
    return ControlPlane(load_private_key(private), agent_keys=AgentKeys(REGISTRY), **kw)  # type: ignore[arg-type]


def _ack(**kw: object) -> ControlAck:
    """An ack signed by the agent it names."""
    ack = ControlAck(**kw)  # type: ignore[arg-type]
    return ack.signed(load_private_key(AGENT_KEYS[ack.agent_id][0]))


def _alert(mode: Mode = Mode.ENFORCE, action: str = "halt", alert_id: str = "a1", agent: str = "ops-bot-7") -> Alert:
    return Alert(alert_id=alert_id, detector="retry_loop", detector_version="1", policy_version="p1",
                 mode=mode, severity=Severity.HIGH, agent_id=agent, first_seen=T0, last_seen=T0,
                 summary="kubectl_apply retried 5 times", action=action)


def _cmd(**kw: object) -> KillSwitchCommand:
    base: dict[str, object] = dict(command_id="c1", action="halt", target=Target.parse("agent:a"),
                                   issued_by="alice", issued_at=T0, expires_at=T0 + timedelta(hours=1))
    return KillSwitchCommand(**{**base, **kw})  # type: ignore[arg-type]


# --- signing -------------------------------------------------------------------------------------


def test_signature_survives_the_wire_and_refuses_every_bad_command(keys: tuple[str, str]) -> None:
    priv, pub = keys
    trusted = load_public_keys(pub)
    good = sign(_cmd(scope=["b", "a"]), load_private_key(priv))
    back = KillSwitchCommand.from_json(good.to_json())
    verify(back, trusted, now=T0 + timedelta(seconds=1))

    other = sign(_cmd(), load_private_key(generate_keypair()[0]))
    cases = {
        "unsigned": (_cmd(), {}),
        "unknown_key": (other, {}),
        "forged": (back.model_copy(update={"target": Target.parse("agent:b")}), {}),
        "expired": (back, {"now": T0 + timedelta(hours=2)}),
        "replayed": (back, {"seen_ids": {"c1"}}),
        "not_yet_valid": (back, {"now": T0 - timedelta(minutes=5)}),
    }
    for reason, (cmd, kw) in cases.items():
        args: dict[str, object] = {"now": T0 + timedelta(seconds=1), **kw}
        with pytest.raises(SignatureError) as exc:
            verify(cmd, trusted, **args)  # type: ignore[arg-type]
        assert refusal_reason(exc.value) == reason
    # too old to be current even though not expired: a replay of an old halt
    long_lived = sign(_cmd(expires_at=T0 + timedelta(days=30)), load_private_key(priv))
    with pytest.raises(SignatureError, match="^replayed"):
        verify(long_lived, trusted, now=T0 + timedelta(days=2))


def test_keys_load_from_pem_base64_and_files_and_errors_never_show_the_key(tmp_path: Path,
                                                                           keys: tuple[str, str]) -> None:
    from cryptography.hazmat.primitives import serialization

    priv, pub = keys
    key = load_private_key(priv)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    f = tmp_path / "k.pem"
    f.write_text(pem)
    assert load_private_key(pem).public_key() == key.public_key()
    assert load_private_key(str(f)).public_key() == key.public_key()
    pub_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    assert load_public_keys(f"{pub_pem},{pub}").keys() == load_public_keys(pub).keys()
    for bad in (priv[:20], "s3cret-but-not-a-key"):  # wrong length; neither key nor file
        with pytest.raises(ConfigError) as exc:
            load_private_key(bad)
        assert bad not in str(exc.value)
    # a settings object never prints the private key
    assert priv not in repr(ControlSettings(control_private_key=SecretStr(priv)))


def test_development_key_is_created_once_private_and_trusted(tmp_path: Path) -> None:
    control = ControlSettings(control_private_key=SecretStr(""), control_public_keys="")
    k1 = signing_key(control, tmp_path)
    k2 = signing_key(control, tmp_path)
    assert k1.public_key() == k2.public_key()
    assert (tmp_path / "keys/control_ed25519.key").stat().st_mode & 0o077 == 0
    cmd = sign(_cmd(), k1)
    verify(cmd, trusted_keys(control, tmp_path), now=T0)


# --- the control plane ---------------------------------------------------------------------------


def test_enforce_alert_issues_exactly_one_signed_halt(keys: tuple[str, str]) -> None:
    priv, pub = keys
    plane = _plane(priv, ack_deadline_s=10)
    alert = _alert()
    cmds = plane.on_alerts([alert, _alert(Mode.ALERT, "notify", "a2"), _alert(Mode.SHADOW, "record", "a3")], T0)
    assert len(cmds) == 1
    cmd = cmds[0]
    assert cmd.command_id == command_id_for_alert("a1") and cmd.alert_id == "a1"
    assert cmd.target.key == "agent:ops-bot-7" and cmd.action == "halt" and cmd.scope == []
    verify(cmd, load_public_keys(pub), now=T0)
    # the engine re-emits a growing alert, a replay re-emits it: no second halt
    assert plane.on_alerts([alert.model_copy(update={"count": 3})], T0 + timedelta(seconds=5)) == []
    # reading our own command back does not track it twice, and yields the detectors' event
    events = plane.on_command(cmd, T0)
    assert [e.kind for e in events] == [EventKind.CONTROL_COMMAND]
    assert events[0].target_agent_id == "ops-bot-7" and events[0].command_action == "halt"
    assert len(plane.pending) == 1


def test_unacknowledged_halt_escalates_once_after_the_deadline(keys: tuple[str, str]) -> None:
    plane = _plane(keys[0], ack_deadline_s=10)
    (cmd,) = plane.on_alerts([_alert()], T0)
    assert plane.tick(T0 + timedelta(seconds=9)) == []
    # an ack from someone else is not the target's
    plane.on_ack(_ack(command_id=cmd.command_id, agent_id="other", status=AckStatus.OBEYED, ts=T0))
    (esc,) = plane.tick(T0 + timedelta(seconds=10))
    assert esc.detector == UNACKED_DETECTOR and esc.severity is Severity.CRITICAL
    assert esc.mode is Mode.ALERT and esc.agent_id == "ops-bot-7"
    assert esc.labels["command_id"] == cmd.command_id and "not acknowledged" in esc.summary
    assert plane.tick(T0 + timedelta(seconds=30)) == []
    # deterministic id: a second plane seeing the same command escalates with the same id
    plane2 = _plane(keys[0], ack_deadline_s=10)
    plane2.on_command(cmd, T0)
    assert [a.alert_id for a in plane2.tick(T0 + timedelta(seconds=11))] == [esc.alert_id]


def test_ack_in_time_means_no_escalation_even_when_it_overtakes_the_command(keys: tuple[str, str]) -> None:
    plane = _plane(keys[0], ack_deadline_s=10)
    (cmd,) = plane.on_alerts([_alert()], T0)
    plane.on_ack(_ack(command_id=cmd.command_id, agent_id="ops-bot-7", status=AckStatus.OBEYED,
                            ts=T0 + timedelta(seconds=1)))
    assert plane.tick(T0 + timedelta(seconds=60)) == []
    # a person's command read from the topic, whose ack arrived first
    human = sign(_cmd(command_id="h1", target=Target.parse("agent:b")), load_private_key(keys[0]))
    plane.on_ack(_ack(command_id="h1", agent_id="b", status=AckStatus.OBEYED, ts=T0))
    plane.on_command(human, T0)
    assert plane.tick(T0 + timedelta(seconds=60)) == []
    assert plane.pending == []


def test_refusal_by_the_target_escalates_at_once(keys: tuple[str, str]) -> None:
    plane = _plane(keys[0], ack_deadline_s=10)
    (cmd,) = plane.on_alerts([_alert()], T0)
    plane.on_ack(_ack(command_id=cmd.command_id, agent_id="ops-bot-7", status=AckStatus.REFUSED,
                            reason="unknown_key: ...", ts=T0))
    (esc,) = plane.tick(T0 + timedelta(seconds=1))
    assert "refused by its target" in esc.summary


def test_tenant_halt_needs_one_obeying_agent(keys: tuple[str, str]) -> None:
    plane = _plane(keys[0], ack_deadline_s=10)
    cmd = sign(_cmd(command_id="t1", target=Target.parse("tenant:acme")), load_private_key(keys[0]))
    plane.on_command(cmd, T0)
    plane.on_ack(_ack(command_id="t1", agent_id="x", tenant="other", status=AckStatus.OBEYED, ts=T0))
    assert [a.agent_id for a in plane.tick(T0 + timedelta(seconds=11))] == ["tenant:acme"]
    cmd2 = sign(_cmd(command_id="t2", target=Target.parse("tenant:acme")), load_private_key(keys[0]))
    plane.on_command(cmd2, T0)
    plane.on_ack(_ack(command_id="t2", agent_id="x", tenant="acme", status=AckStatus.OBEYED, ts=T0))
    assert plane.tick(T0 + timedelta(seconds=11)) == []


def test_control_records_read_back_are_verified_before_they_count(keys: tuple[str, str]) -> None:
    plane = _plane(keys[0], ack_deadline_s=10)
    good = sign(_cmd(command_id="g1"), load_private_key(keys[0]))
    cmd, events = plane.on_control_record(good.to_json(), T0)
    assert cmd == good and [e.command_id for e in events] == ["g1"]
    forged = sign(_cmd(command_id="f1"), load_private_key(generate_keypair()[0]))
    for raw in (forged.to_json(), _cmd(command_id="u1").to_json(), b"not json"):
        assert plane.on_control_record(raw, T0) == (None, [])
    assert plane.unverified_commands == 3
    assert [c.command_id for c in plane.pending] == ["g1"]
    assert ControlPlane.parse_ack(b"{}") is None


def test_forged_unsigned_or_unregistered_acks_do_not_count_and_the_escalation_fires(keys: tuple[str, str]) -> None:
    plane = _plane(keys[0], ack_deadline_s=10)
    (cmd,) = plane.on_alerts([_alert()], T0)
    obeyed = ControlAck(command_id=cmd.command_id, agent_id="ops-bot-7", status=AckStatus.OBEYED,
                        ts=T0 + timedelta(seconds=1))
    # unsigned; signed with someone else's key; signed by a registered agent then rewritten to name
    # the target; and an agent nobody registered
    assert plane.on_ack(obeyed) == "unsigned"
    assert plane.on_ack(obeyed.signed(load_private_key(generate_keypair()[0]))) == "forged"
    rewritten = obeyed.model_copy(update={"agent_id": "other"}).signed(
        load_private_key(AGENT_KEYS["other"][0])).model_copy(update={"agent_id": "ops-bot-7"})
    assert plane.on_ack(rewritten) == "forged"
    stranger = obeyed.model_copy(update={"agent_id": "stranger"}).signed(load_private_key(generate_keypair()[0]))
    assert plane.on_ack(stranger) == "unknown_agent"
    assert plane.forged_acks == {"unsigned": 1, "forged": 2, "unknown_agent": 1}
    (esc,) = plane.tick(T0 + timedelta(seconds=10))
    assert esc.detector == UNACKED_DETECTOR and esc.agent_id == "ops-bot-7"


def test_the_agents_genuine_ack_clears_it_after_a_forgery(keys: tuple[str, str]) -> None:
    plane = _plane(keys[0], ack_deadline_s=10)
    (cmd,) = plane.on_alerts([_alert()], T0)
    obeyed = ControlAck(command_id=cmd.command_id, agent_id="ops-bot-7", status=AckStatus.OBEYED, ts=T0)
    assert plane.on_ack(obeyed) == "unsigned"
    assert plane.on_ack(obeyed.signed(load_private_key(AGENT_KEYS["ops-bot-7"][0]))) is None
    assert plane.tick(T0 + timedelta(seconds=60)) == []


def test_agent_keys_from_a_file_and_from_key_files_the_client_writes(tmp_path: Path) -> None:
    from agentwatch_client.wire import agent_key

    priv, pub = generate_keypair()
    listing = tmp_path / "agents.txt"
    listing.write_text(f"# agent_id key\nalpha {pub}\n")
    assert AgentKeys(str(listing)).get("alpha") is not None
    key_dir = tmp_path / "keys" / "agents"
    made = agent_key(str(key_dir / "beta.key"))  # generated: private 0600, public next to it
    assert (key_dir / "beta.key").stat().st_mode & 0o777 == 0o600
    found = AgentKeys("", key_dir).get("beta")
    assert found is not None and key_id(found) == key_id(made.public_key())
    assert AgentKeys("", key_dir).get("../beta") is None
    with pytest.raises(ConfigError):
        AgentKeys("alpha")


def test_a_halt_read_back_by_another_worker_is_not_issued_again_for_the_episode(keys: tuple[str, str]) -> None:
    """Worker 1 issued a halt and died (or lost the partition); worker 2, reading the control
    topic, must not halt the same runaway agent again: not for the same alert re-derived
    from the re-read input, nor for a sibling alert of the same episode."""
    issuer, successor = _plane(keys[0]), _plane(keys[0])
    (cmd,) = issuer.on_alerts([_alert(alert_id="a1")], T0)
    successor.on_command(cmd, T0 + timedelta(seconds=1))
    later = T0 + timedelta(seconds=30)
    assert successor.on_alerts([_alert(alert_id="a1"), _alert(alert_id="a2")], later) == []
    # a person's halt does not stand for an episode: the enforce alert still halts
    person = _plane(keys[0])
    person.on_command(_cmd(command_id="p1", target=Target.parse("agent:ops-bot-7")), T0)
    assert len(person.on_alerts([_alert(alert_id="a3")], later)) == 1
    # after a resume, a new incident gets a new halt
    successor.on_command(_cmd(command_id="r1", action="resume", target=Target.parse("agent:ops-bot-7")), later)
    assert len(successor.on_alerts([_alert(alert_id="a4")], later)) == 1


def test_only_the_owner_of_the_target_escalates_and_a_new_owner_takes_over(keys: tuple[str, str]) -> None:
    """Every worker tracks every command; ``owns`` picks the one that speaks for it."""
    plane = _plane(keys[0], ack_deadline_s=10)
    plane.on_command(_cmd(command_id="c1", target=Target.parse("agent:x")), T0)
    late = T0 + timedelta(seconds=11)
    assert plane.tick(late, owns=lambda cmd: False) == []  # another worker holds agent x
    (esc,) = plane.tick(late + timedelta(seconds=1), owns=lambda cmd: True)  # x's partition moved here
    assert esc.labels["command_id"] == "c1"
    # and an acknowledged command escalates nowhere, whoever owns it
    plane.on_command(_cmd(command_id="c2", target=Target.parse("agent:b")), T0)
    plane.on_ack(_ack(command_id="c2", agent_id="b", status=AckStatus.OBEYED, ts=T0))
    assert plane.tick(late, owns=lambda cmd: True) == []
