"""Agent versions in the model: decoded from the telemetry agents emit, carried through
identity and the join, stamped on alerts, and a version-scoped kill switch that stops
only that version (docs/canary.md, docs/killswitch-wire-format.md)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import orjson

from agentwatch_client.wire import generate_keypair, load_private_key, load_public_keys
from detectors.engine import DetectionEngine
from detectors.identity import IdentityResolver
from detectors.policy import parse_policy
from schemas.alerts import HALT_VERSION_LABEL, Alert, Mode, Severity
from schemas.control import CommandAction, KillSwitchCommand, Target, TargetKind, command_event, sign, verify
from schemas.decoders.native import decode_native
from schemas.decoders.otlp import decode_otlp
from schemas.events import Event, EventKind, events_from_json, events_to_json
from schemas.internal_wire import events_from_wire, events_to_wire
from streams.control_plane import ControlPlane

T0 = 1_780_000_000


def _attrs(d: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"key": k, "value": {"stringValue": v}} for k, v in d.items()]


def _span(span_id: str, parent: str, name: str, attrs: dict[str, Any], at: int) -> dict[str, Any]:
    return {"traceId": "ab" * 16, "spanId": span_id, "parentSpanId": parent, "name": name,
            "startTimeUnixNano": str(at * 10**9), "endTimeUnixNano": str(at * 10**9 + 1000),
            "attributes": _attrs(attrs)}


def _otlp(resource: dict[str, Any], spans: list[dict[str, Any]]) -> bytes:
    return orjson.dumps({"resourceSpans": [{"resource": {"attributes": _attrs(resource)},
                                            "scopeSpans": [{"spans": spans}]}]})


TOOL = {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "search"}
AGENT = {"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "support-bot"}


def test_version_from_resource_span_and_deployment() -> None:
    # service.version on the resource applies to every span of it
    (ev,) = decode_otlp(_otlp({"service.name": "bot", "service.version": "1.4.0"},
                              [_span("01" * 8, "", "tool", TOOL, T0)])).events
    assert ev.agent_version == "1.4.0"
    # no service.version: the k8s deployment's name (a canary runs as its own deployment)
    (ev,) = decode_otlp(_otlp({"service.name": "bot", "k8s.deployment.name": "bot-canary"},
                              [_span("01" * 8, "", "tool", TOOL, T0)])).events
    assert ev.agent_version == "bot-canary"
    # the agent span's gen_ai.agent.version beats the resource, and its children take it
    res = decode_otlp(_otlp({"service.name": "bot", "service.version": "1.4.0"}, [
        _span("01" * 8, "02" * 8, "tool", TOOL, T0),
        _span("02" * 8, "", "invoke_agent", {**AGENT, "gen_ai.agent.version": "1.5.0-rc1"}, T0 + 1)])).events
    assert [(e.kind, e.agent_id, e.agent_version) for e in res] == [
        (EventKind.TOOL_CALL, "support-bot", "1.5.0-rc1"), (EventKind.AGENT, "support-bot", "1.5.0-rc1")]


def test_version_of_an_agent_span_arriving_in_a_later_record() -> None:
    resolver = IdentityResolver(30.0)
    child = decode_otlp(_otlp({"service.name": "bot"}, [_span("01" * 8, "02" * 8, "tool", TOOL, T0)])).events
    assert resolver.process(child) == []  # waits for its agent span
    parent = decode_otlp(_otlp({"service.name": "bot"}, [
        _span("02" * 8, "", "invoke_agent", {**AGENT, "gen_ai.agent.version": "2.0"}, T0 + 1)])).events
    # the state survives a snapshot in between
    resolver = IdentityResolver.restore(30.0, resolver.snapshot())
    out = resolver.process(parent)
    assert {(e.kind, e.agent_id, e.agent_version) for e in out} == {
        (EventKind.TOOL_CALL, "support-bot", "2.0"), (EventKind.AGENT, "support-bot", "2.0")}


def test_version_survives_native_decoding_and_internal_hops() -> None:
    (ev,) = decode_native(orjson.dumps({"kind": "tool_call", "agent_id": "a", "agent_version": "3.1",
                                        "ts": T0, "tool_name": "x", "outcome": "ok"})).events
    assert ev.agent_version == "3.1"
    (back,) = events_from_json(events_to_json([ev]))
    assert back.agent_version == "3.1"
    (hop,) = events_from_wire(events_to_wire([ev]))  # the stages' internal format
    assert hop.agent_version == "3.1"


def _tool(agent: str, version: str, at: float, tool: str = "search", **kw: Any) -> Event:
    return Event(event_id=f"{agent}-{version}-{at}-{tool}", kind=EventKind.TOOL_CALL,
                 ts=datetime.fromtimestamp(at, tz=timezone.utc), agent_id=agent, agent_version=version,
                 source="native", tool_name=tool, args_fingerprint="same", outcome="ok", **kw)


def test_alert_carries_the_version_of_its_evidence() -> None:
    engine = DetectionEngine(parse_policy({}))
    alerts = engine.process([_tool("bot", "1.5", T0 + i) for i in range(5)])
    assert alerts and {a.agent_version for a in alerts} == {"1.5"}


def test_version_scoped_target_signs_matches_and_stays_compatible() -> None:
    private, public = generate_keypair()
    key, keys = load_private_key(private), load_public_keys(public)
    now = datetime.now(timezone.utc)
    scoped = sign(KillSwitchCommand(command_id="c1", action=CommandAction.HALT,
                                    target=Target(kind=TargetKind.AGENT, value="bot", version="1.5"),
                                    issued_by="agentwatch", issued_at=now, expires_at=now + timedelta(hours=1)), key)
    assert scoped.target.key == "agent:bot@1.5"
    wire = orjson.loads(scoped.to_json())
    assert wire["target"] == {"kind": "agent", "value": "bot", "version": "1.5"}
    verify(KillSwitchCommand.from_json(scoped.to_json()), keys, now=now)
    assert scoped.target.matches("bot", "default", "1.5")
    assert not scoped.target.matches("bot", "default", "1.4")
    assert not scoped.target.matches("bot", "default")  # an instance that does not know its version
    # an unversioned target writes no version member: its signed bytes are what they always were
    plain = Target(kind=TargetKind.AGENT, value="bot")
    assert "version" not in orjson.loads(plain.model_dump_json()) and plain.matches("bot", "default", "1.4")
    # a client that predates versions reads the target without it: the signature no longer
    # matches, so it refuses the command rather than halting every version of the agent
    old = dict(wire, target={"kind": "agent", "value": "bot"})
    try:
        verify(KillSwitchCommand.model_validate(old), keys, now=now)
    except Exception as exc:  # SignatureError
        assert str(exc).startswith("forged")
    else:
        raise AssertionError("an unversioned reading of a versioned command must not verify")


def test_enforce_alert_with_halt_version_issues_a_version_scoped_halt() -> None:
    private, _ = generate_keypair()
    plane = ControlPlane(load_private_key(private), ack_deadline_s=10.0)
    now = datetime.now(timezone.utc)
    alert = Alert(alert_id="a1", detector="canary", detector_version="1", policy_version="p", mode=Mode.ENFORCE,
                  severity=Severity.HIGH, agent_id="bot", agent_version="1.5", first_seen=now, last_seen=now,
                  summary="canary failed", action="halt", labels={HALT_VERSION_LABEL: "1.5"})
    (cmd,) = plane.on_alerts([alert], now)
    assert cmd.target == Target(kind=TargetKind.AGENT, value="bot", version="1.5")
    # the detectors see the halt as one of that version only: the baseline acting is no finding
    engine = DetectionEngine(parse_policy({}))
    engine.process([command_event(cmd)])
    cmd_ts = cmd.issued_at.timestamp()
    base = [_tool("bot", "1.4", cmd_ts + 60 + i, tool=f"t{i}") for i in range(3)]
    cand = [_tool("bot", "1.5", cmd_ts + 60 + i, tool=f"u{i}") for i in range(3)]
    alerts = engine.process(base + cand)
    after_halt = [a for a in alerts if a.detector == "peer_preservation"]
    assert after_halt and {a.agent_version for a in after_halt} == {"1.5"}


def test_a_configured_version_attribute_wins_and_survives_a_restore() -> None:
    from detectors.policy import IdentityRule

    record = _otlp({"service.name": "bot", "service.version": "1.4.0", "k8s.pod.label.release": "canary-7"},
                   [_span("01" * 8, "", "tool", TOOL, T0)])
    resolver = IdentityResolver(30.0, version_attribute="k8s.pod.label.release",
                                rules=[IdentityRule(match={"service.name": "bot"}, agent_id="bot-{service.version}")])
    resolver = IdentityResolver.restore(30.0, resolver.snapshot(), version_attribute="k8s.pod.label.release",
                                        rules=[IdentityRule(match={"service.name": "bot"}, agent_id="bot-x")])
    (ev,) = resolver.process(decode_otlp(record).events)
    assert (ev.agent_id, ev.agent_version) == ("bot-x", "canary-7")
    # the correlate stage passes the policy's rules and attribute to a restored resolver too
    from streams.stages import CorrelateStage

    policy = parse_policy({"canary": {"version_attribute": "k8s.pod.label.release"},
                           "identity_rules": [{"match": {"service.name": "bot"}, "agent_id": "mapped"}]})
    stage = CorrelateStage.restore(policy, CorrelateStage(policy).snapshot())
    (ev,) = stage.process_local(decode_otlp(record).events)
    assert (ev.agent_id, ev.agent_version) == ("mapped", "canary-7")
