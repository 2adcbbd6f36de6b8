"""Audit decoders against records shaped as each producer documents them."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import orjson
import pytest

from schemas.decoders import DecodeResult
from schemas.decoders.audit import (
    decode_audit,
    decode_cloudtrail,
    decode_k8s_audit,
    decode_native_audit,
    decode_ocsf,
    decode_pgaudit,
    find_traceparent,
    pg_prefix_regex,
)
from schemas.events import AUDIT_OUTCOMES, Event, EventKind

FIXTURES = Path(__file__).parent / "fixtures" / "audit"


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def decoded(name: str) -> DecodeResult:
    return decode_audit(fixture(name), origin=name)


# (fixture, event index, expected fields): one row per record the formats map differently.
EXPECTED: list[tuple[str, int, dict[str, object]]] = [
    (
        "k8s_audit.log",
        0,
        dict(source="k8s_audit", principal="mayor-malware", action="list", resource="secrets/wareville", outcome="deny"),
    ),
    (
        "k8s_audit.log",
        2,
        dict(
            principal="system:serviceaccount:agents:ops-agent",
            action="update",
            resource="deployments.apps/prod/payments",  # the subresource has its own field
            name="update deployments.apps/prod/payments/scale",
            outcome="allow",
            trace_id="4bf92f3577b34da6a3ce929d0e0e4736",
            span_id="00f067aa0ba902b7",
        ),
    ),
    ("k8s_audit.log", 3, dict(resource="roles.rbac.authorization.k8s.io/wareville", outcome="allow")),
    ("k8s_audit.log", 4, dict(principal="alice@example.com", action="patch", outcome="error")),
    ("k8s_eventlist.json", 0, dict(principal="system:kube-scheduler", resource="nodes", outcome="deny")),
    ("k8s_eventlist.json", 1, dict(action="create", resource="pods/default/nginx", name="create pods/default/nginx/exec", outcome="allow")),
    (
        "cloudtrail_records.json",
        0,
        dict(
            source="cloudtrail",
            tenant="123456789012",
            principal="arn:aws:iam::123456789012:user/Mateo",
            action="ec2.amazonaws.com:StartInstances",
            resource="i-EXAMPLE56126103cb",
            outcome="allow",
        ),
    ),
    (
        "cloudtrail_records.json",
        1,
        dict(
            principal="arn:aws:sts::123456789012:assumed-role/agent-runtime/agent-7f3a",
            action="s3.amazonaws.com:PutObject",
            resource="arn:aws:s3:::finance-reports/2024/q1/payroll.csv",
            outcome="allow",
        ),
    ),
    ("cloudtrail_records.json", 2, dict(action="iam.amazonaws.com:CreateUser", outcome="deny")),
    (
        "cloudtrail_records.json",
        3,
        dict(resource="arn:aws:lambda:us-east-1:123456789012:function:refund", outcome="error"),
    ),
    (
        "ocsf_api_activity.json",
        0,
        dict(
            source="ocsf",
            tenant="123456789012",
            principal="agent-runtime",
            action="lambda.amazonaws.com:UpdateFunctionConfiguration",
            resource="arn:aws:lambda:us-east-1:123456789012:function:refund",
            outcome="deny",
            trace_id="4bf92f3577b34da6a3ce929d0e0e4736",
            span_id="00f067aa0ba902b7",
            ts=datetime(2024, 5, 1, 12, 0, 2, tzinfo=timezone.utc),
        ),
    ),
    (
        "pgaudit.log",
        0,
        dict(
            source="pgaudit",
            principal="alice",
            action="INSERT",
            resource="public.orders",
            outcome="allow",
            trace_id="0af7651916cd43dd8448eb211c80319c",
            span_id="b7ad6b7169203331",
            ts=datetime(2024, 5, 1, 12, 0, 0, 123000, tzinfo=timezone.utc),
        ),
    ),
    (
        "pgaudit.log",
        1,
        dict(action="SELECT", resource="public.account", span_id="00f067aa0ba902b7", tool_call_id="call_42"),
    ),
    ("pgaudit.log", 2, dict(action="CREATE TABLE", resource="public.audit_off", trace_id="")),
    (
        "pgaudit.log",
        3,
        dict(principal="mallory", action="SELECT", resource="public.payroll", outcome="deny", trace_id="1" * 32),
    ),
    ("pgaudit.log", 4, dict(action="DISCARD", resource="MISC", outcome="allow")),
    (
        "native_audit.json",
        0,
        dict(
            source="native_audit",
            tenant="acme",
            agent_id="billing-agent",
            principal="svc-payments",
            action="payments.refund",
            resource="order/981",
            outcome="allow",
            trace_id="0af7651916cd43dd8448eb211c80319c",
            tool_call_id="call_42",
        ),
    ),
    ("native_audit.json", 1, dict(outcome="deny", ts=datetime(2024, 5, 1, 12, 0, 1, tzinfo=timezone.utc))),
]


@pytest.mark.parametrize(("name", "index", "expected"), EXPECTED, ids=lambda v: str(v)[:40])
def test_fields_map_per_format(name: str, index: int, expected: dict[str, object]) -> None:
    event = decoded(name).events[index]
    assert event.kind is EventKind.AUDIT
    assert event.origin == name
    assert {k: getattr(event, k) for k in expected} == expected


# (fixture, event index, correlation keys that must be present with these values)
CORRELATION: list[tuple[str, int, dict[str, str]]] = [
    (
        "k8s_audit.log",
        2,
        {
            "k8s.audit_id": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "k8s.pod.name": "ops-agent-7d9f8b6c5-x2x4q",
            "k8s.object.uid": "9f1d2e3c-aaaa-4bbb-8ccc-dddddddddddd",
        },
    ),
    (
        "cloudtrail_records.json",
        1,
        {
            "aws.request_id": "8Q2ZJ4K1W9X7V6B3",
            "cloudtrail.event_id": "1c2d3e4f-5a6b-4c7d-8e9f-0a1b2c3d4e5f",
            "cloudtrail.shared_event_id": "6b8c1e2a-3f4d-4e5f-8a9b-0c1d2e3f4a5b",
            "aws.access_key_id": "ASIAEXAMPLETEMPKEY01",
        },
    ),
    (
        "ocsf_api_activity.json",
        0,
        {
            "request_id": "f47c68f2-d3ac-4f96-b2f4-5d497bf79b64",
            "aws.request_id": "f47c68f2-d3ac-4f96-b2f4-5d497bf79b64",
            "ocsf.uid": "0f9e8d7c-6b5a-4c3d-9e1f-2a3b4c5d6e7f",
        },
    ),
    ("pgaudit.log", 1, {"db.postgresql.pid": "1234", "db.postgresql.statement_id": "2.1", "gen_ai.tool.call.id": "call_42"}),
    ("native_audit.json", 0, {"payments.request_id": "req-9", "gen_ai.tool.call.id": "call_42"}),
]


@pytest.mark.parametrize(("name", "index", "keys"), CORRELATION, ids=lambda v: str(v)[:40])
def test_correlation_keys(name: str, index: int, keys: dict[str, str]) -> None:
    correlation = decoded(name).events[index].correlation
    assert {k: correlation.get(k) for k in keys} == keys


@pytest.mark.parametrize(
    "name", ["k8s_audit.log", "k8s_eventlist.json", "cloudtrail_records.json", "ocsf_api_activity.json", "pgaudit.log", "native_audit.json"]
)
def test_event_ids_are_stable_and_distinct(name: str) -> None:
    first, second = decoded(name), decoded(name)
    ids = [e.event_id for e in first.events]
    assert ids == [e.event_id for e in second.events]
    assert len(set(ids)) == len(ids)
    assert all(e.outcome in AUDIT_OUTCOMES or e.attributes.get("final") == "false" for e in first.events)


def test_events_round_trip_through_json() -> None:
    for name in ("k8s_audit.log", "pgaudit.log", "cloudtrail_records.json"):
        for event in decoded(name).events:
            assert Event.model_validate_json(event.to_json()) == event


# --- Kubernetes specifics


def test_k8s_non_final_stage_decodes_without_outcome() -> None:
    received = decoded("k8s_audit.log").events[1]
    assert received.attributes["stage"] == "RequestReceived"
    assert received.attributes["final"] == "false"
    assert received.outcome == ""
    completed = decoded("k8s_audit.log").events[2]
    assert completed.attributes["final"] == "true"
    # same request, different stage: different event ids
    assert received.event_id != completed.event_id


def test_k8s_annotations_user_agent_and_impersonation_in_attributes() -> None:
    events = decoded("k8s_audit.log").events
    assert events[0].attributes["annotation.authorization.k8s.io/decision"] == "forbid"
    assert events[0].attributes["user_agent"].startswith("kubectl/")
    assert events[4].attributes["impersonated_user"] == "system:serviceaccount:agents:ops-agent"


def test_k8s_eventlist_bad_item_is_its_own_failure() -> None:
    result = decoded("k8s_eventlist.json")
    assert len(result.events) == 2
    [failure] = result.failures
    assert failure.source == "k8s_audit"
    assert "auditID" in failure.reason
    assert orjson.loads(failure.raw)["user"]["username"] == "broken"


def test_k8s_single_event_and_direct_entry_point() -> None:
    line = fixture("k8s_audit.log").splitlines()[2]
    assert decode_k8s_audit(line).events[0].trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert decode_k8s_audit(orjson.loads(line)).events[0].action == "update"
    assert decode_k8s_audit(fixture("native_audit.json")).failures


def test_k8s_decision_forbid_wins_over_status_code() -> None:
    event = orjson.loads(fixture("k8s_audit.log").splitlines()[3])
    event["annotations"]["authorization.k8s.io/decision"] = "forbid"
    assert decode_k8s_audit(event).events[0].outcome == "deny"


# --- traceparent extraction


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7")),
        ("req-00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-00;x", ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7")),
        ("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", None),  # version ff is invalid
        ("00-00000000000000000000000000000000-00f067aa0ba902b7-01", None),  # all-zero trace id
        ("a1b2c3d4-0001-4000-8000-000000000001", None),  # a plain UUID audit id
    ],
)
def test_find_traceparent(text: str, expected: tuple[str, str] | None) -> None:
    assert find_traceparent(text) == expected


def test_sqlcommenter_traceparent_among_other_pairs() -> None:
    line = (
        "2024-05-01 12:00:00.123 UTC [77] bob@appdb LOG:  AUDIT: SESSION,9,1,WRITE,DELETE,TABLE,public.users,"
        "\"DELETE FROM users WHERE id = 3 /*db_driver='psycopg%3A3.1',route='%2Fadmin',"
        "traceparent='00-5bd66ef5095369c7b0d1f8f4bd33716a-c532cb4098ac3dd2-01',tracestate='congo%3Dt61rcWkgMzE'*/\",<not logged>"
    )
    [event] = decode_audit(line.encode()).events
    assert (event.trace_id, event.span_id) == ("5bd66ef5095369c7b0d1f8f4bd33716a", "c532cb4098ac3dd2")
    assert event.attributes["sqlcommenter.route"] == "/admin"
    assert event.action == "DELETE"


# --- pgaudit specifics


def test_pgaudit_quoted_statement_with_commas_and_doubled_quotes() -> None:
    events = decoded("pgaudit.log").events
    assert events[0].attributes["statement"].startswith("INSERT INTO orders (id, note) VALUES (1, 'a, \"quoted\" note')")
    assert events[1].attributes["statement"] == (
        "select password\n  from account /*application='billing-agent',gen_ai.tool.call.id='call_42',"
        "traceparent='00-0af7651916cd43dd8448eb211c80319c-00f067aa0ba902b7-01'*/"
    )


def test_pgaudit_prefixless_and_custom_prefix() -> None:
    [bare] = decode_pgaudit(
        b"AUDIT: OBJECT,3,1,READ,SELECT,TABLE,public.account_role_map,select 1,<not logged>",
        received_at=datetime(2024, 5, 1, tzinfo=timezone.utc),
    ).events
    assert (bare.principal, bare.action, bare.resource) == ("", "SELECT", "public.account_role_map")
    assert bare.attributes["ts_source"] == "received"

    line = b"2024-05-01 14:00:00 CEST carol appdb [99]: LOG:  AUDIT: SESSION,1,1,READ,SELECT,,,select now(),<not logged>"
    [event] = decode_audit(line, log_line_prefix="%t %u %d [%p]: ", log_timezone="Europe/Berlin").events
    assert (event.principal, event.resource, event.attributes["pg.database"]) == ("carol", "READ", "appdb")
    assert event.ts == datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)  # CEST is UTC+2
    # without the server's log_timezone the abbreviation is refused, never read as UTC
    [failure] = decode_audit(line, log_line_prefix="%t %u %d [%p]: ").failures
    assert "AGENTWATCH_PG_LOG_TIMEZONE" in failure.reason and "'CEST'" in failure.reason
    assert pg_prefix_regex("%m [%p] %q%u@%d ").match(fixture("pgaudit.log").decode().splitlines()[0])


def test_pgaudit_numeric_offset_prefix_time() -> None:
    line = b"2024-05-01 14:00:00.5+02 [5] dave@db LOG:  AUDIT: SESSION,1,1,READ,SELECT,,,select 1,<not logged>"
    [event] = decode_audit(line).events
    assert event.ts == datetime(2024, 5, 1, 12, 0, 0, 500000, tzinfo=timezone.utc)


def test_pgaudit_prefixless_without_time_is_a_failure() -> None:
    result = decode_pgaudit(b"AUDIT: SESSION,1,1,READ,SELECT,,,select 1,<not logged>")
    assert not result.events
    assert "timestamp" in result.failures[0].reason


def test_pgaudit_jsonlog() -> None:
    record = {
        "timestamp": "2024-05-01 12:00:00.123 UTC",
        "user": "alice",
        "dbname": "appdb",
        "pid": 1234,
        "error_severity": "LOG",
        "message": "AUDIT: SESSION,1,1,WRITE,UPDATE,TABLE,public.orders,UPDATE orders SET x = 1,<not logged>",
    }
    [event] = decode_audit(orjson.dumps(record)).events
    assert (event.source, event.principal, event.action, event.resource) == ("pgaudit", "alice", "UPDATE", "public.orders")


# --- CloudTrail specifics


def test_cloudtrail_file_with_one_bad_record() -> None:
    result = decode_cloudtrail(fixture("cloudtrail_records.json"))
    assert len(result.events) == 4
    [failure] = result.failures
    assert failure.reason == "cloudtrail: missing required field 'eventName'"
    assert orjson.loads(failure.raw)["requestID"] == "NO-EVENT-NAME"  # the bad record's own bytes


def test_cloudtrail_single_record_and_identity_fallbacks() -> None:
    record = orjson.loads(fixture("cloudtrail_records.json"))["Records"][0]
    assert decode_audit(orjson.dumps(record)).events[0].action == "ec2.amazonaws.com:StartInstances"
    record["userIdentity"] = {"type": "AWSService", "invokedBy": "ec2.amazonaws.com"}
    assert decode_cloudtrail(record).events[0].principal == "ec2.amazonaws.com"
    record["userIdentity"] = {"type": "Unknown"}
    assert "userIdentity" in decode_cloudtrail(record).failures[0].reason


@pytest.mark.parametrize(
    ("error_code", "outcome"),
    [
        ("AccessDenied", "deny"),
        ("AccessDeniedException", "deny"),
        ("Client.UnauthorizedOperation", "deny"),
        ("Forbidden", "deny"),
        ("NoSuchBucket", "error"),
        ("ThrottlingException", "error"),
        (None, "allow"),
    ],
)
def test_cloudtrail_outcome_mapping(error_code: str | None, outcome: str) -> None:
    record = orjson.loads(fixture("cloudtrail_records.json"))["Records"][1]
    if error_code:
        record["errorCode"] = error_code
    assert decode_cloudtrail(record).events[0].outcome == outcome


# --- OCSF specifics


@pytest.mark.parametrize(
    ("changes", "outcome"),
    [
        ({"status_id": 1, "disposition_id": 1}, "allow"),
        ({"status_id": 2, "disposition_id": None, "api": {"operation": "x", "response": {"code": 500}}}, "error"),
        ({"status_id": 2, "disposition_id": None}, "deny"),  # response code 403 in the fixture
        ({"status_id": 1, "disposition_id": 26}, "deny"),  # Unauthorized
        ({"status_id": None, "status": "Failure", "disposition_id": 27}, "error"),
    ],
)
def test_ocsf_outcome_mapping(changes: dict[str, object], outcome: str) -> None:
    event = orjson.loads(fixture("ocsf_api_activity.json")) | changes
    assert decode_ocsf(event).events[0].outcome == outcome


def test_ocsf_wrong_class_and_missing_fields() -> None:
    event = orjson.loads(fixture("ocsf_api_activity.json"))
    assert "not API Activity" in decode_ocsf(event | {"class_uid": 3002}).failures[0].reason
    assert "'api.operation'" in decode_ocsf(event | {"api": {}}).failures[0].reason
    assert "'time'" in decode_ocsf({k: v for k, v in event.items() if k != "time"}).failures[0].reason


def test_ocsf_without_metadata_uid_still_has_stable_id() -> None:
    event = orjson.loads(fixture("ocsf_api_activity.json"))
    del event["metadata"]["uid"]
    assert decode_ocsf(event).events[0].event_id == decode_ocsf(orjson.dumps(event)).events[0].event_id


# --- native specifics


def test_native_single_object_and_bad_item() -> None:
    items = orjson.loads(fixture("native_audit.json"))
    assert decode_native_audit(orjson.dumps(items[1])).events[0].outcome == "deny"
    result = decode_audit(fixture("native_audit.json"))
    assert len(result.events) == 2
    assert "'outcome'" in result.failures[0].reason
    assert result.failures[0].source == "native_audit"


def test_native_rejects_malformed_trace_id() -> None:
    bad = {"kind": "audit", "ts": "2024-05-01T00:00:00Z", "principal": "p", "action": "a", "outcome": "allow", "trace_id": "xyz"}
    assert "trace_id" in decode_native_audit(bad).failures[0].reason


# --- detection and garbage


PG = b"2024-05-01 12:00:00.123 UTC [1] a@b "


@pytest.mark.parametrize(
    ("payload", "reason", "source"),
    [
        (b"", "empty record", "audit"),
        (b"   \n", "empty record", "audit"),
        (b"hello world", "not JSON and not a PostgreSQL log line", "audit"),
        (b"{not json", "invalid JSON", "audit"),
        (b'{"foo": 1}', "unrecognised audit record", "audit"),
        (b"42", "unrecognised audit record", "audit"),
        (b'"text"', "unrecognised audit record", "audit"),
        (b"\xff\xfe\x00garbage", "not JSON", "audit"),
        (b'{"apiVersion": "audit.k8s.io/v1", "kind": "Policy"}', "is not an audit Event", "k8s_audit"),
        (b'{"Records": "nope"}', "'Records' is not a list", "cloudtrail"),
        (b'{"class_uid": 6003, "api": "oops", "time": 1}', "ocsf: missing required field", "ocsf"),
        (b'{"kind": "audit", "principal": "p", "action": "a", "outcome": "allow"}', "'ts'", "native_audit"),
        (PG + b"LOG:  AUDIT: SESSION,x,1,READ,SELECT,,,s,<none>", "STATEMENT_ID", "pgaudit"),
        (PG + b"LOG:  AUDIT: SESSION,1,1", "expected at least 7", "pgaudit"),
        (PG + b"LOG:  AUDIT: BOGUS,1,1,READ,SELECT,,,s,<none>", "AUDIT_TYPE", "pgaudit"),
    ],
)
def test_garbage_becomes_failure_with_reason(payload: bytes, reason: str, source: str) -> None:
    result = decode_audit(payload)
    assert not result.events
    [failure] = result.failures
    assert reason in failure.reason
    assert failure.source == source
    assert failure.raw == payload  # the DLQ gets the original bytes


def test_server_records_that_are_not_audit_are_skipped_not_failures() -> None:
    result = decode_audit(PG + b"LOG:  connection authorized: user=a")
    assert (result.events, result.failures, result.skipped) == ([], [], 1)


def test_json_lines_chunk_mixes_formats_and_failures() -> None:
    ocsf = orjson.dumps(orjson.loads(fixture("ocsf_api_activity.json")))
    chunk = fixture("k8s_audit.log").splitlines()[0] + b"\n" + ocsf + b"\n{broken\n"
    result = decode_audit(chunk)
    assert [e.source for e in result.events] == ["k8s_audit", "ocsf"]
    assert len(result.failures) == 1 and "invalid JSON" in result.failures[0].reason
