"""Spans and the audit records they cause, for the join tests and scenarios.

Spans come from the real OpenTelemetry SDK, shaped like instrumented agents:
``invoke_agent`` -> ``execute_tool <tool>`` -> a CLIENT span for the request the
tool made (an HTTP call to the Kubernetes API server, whose traceparent becomes
the Audit-ID; a botocore call carrying ``aws.request_id``). Audit records are
written in each system's documented format. Regenerate the join scenarios with::

    python -m tests.join_traces
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson
import yaml
from opentelemetry.trace import SpanKind

from tests.otel_traces import BASE_NS, GENAI, MS, Clock, Sdk, _agent_span, _timed_span, _tool_span, AgentRun, ToolCall
from tests.otel_traces import make_sdk, to_records, write_jsonl

SCENARIOS = Path(__file__).parent / "scenarios"
ACCOUNT = "123456789012"
DATA_ROLE = f"arn:aws:sts::{ACCOUNT}:assumed-role/agent-data-role/agent-data-session"
OPS_SA = "system:serviceaccount:agents:ops-agent"


@dataclass(frozen=True)
class Caused:
    """One agent run with one tool call and the request the tool made."""

    spans: list[Any]
    trace_id: str
    client_span_id: str
    tool_span_id: str
    traceparent: str
    start_ns: int
    end_ns: int


def tool_run(sdk: Sdk, agent_id: str, tool: str, *, at_s: float, call_id: str, client: str,
             client_attrs: dict[str, Any] | None = None) -> Caused:
    clock = Clock(BASE_NS + int(at_s * 1e9))
    run = AgentRun(agent_id, agent_id, [])
    name, attrs = _agent_span(GENAI, run)
    ids: dict[str, int] = {}
    start = clock.now
    with _timed_span(sdk.tracer, name, attrs, clock):
        clock.advance(500)
        tname, tattrs = _tool_span(GENAI, ToolCall(tool, '{"replicas": 3}', call_id=call_id))
        with _timed_span(sdk.tracer, tname, tattrs, clock) as tool_span:
            ids["tool"] = tool_span.get_span_context().span_id
            clock.advance(20)
            with _timed_span(sdk.tracer, client, dict(client_attrs or {}), clock, SpanKind.CLIENT) as c:
                ctx = c.get_span_context()
                ids["trace"], ids["client"] = ctx.trace_id, ctx.span_id
                clock.advance(120)
            clock.advance(30)
        clock.advance(400)
    trace, client_id = f"{ids['trace']:032x}", f"{ids['client']:016x}"
    return Caused(sdk.finished(), trace, client_id, f"{ids['tool']:016x}", f"00-{trace}-{client_id}-01",
                  start, clock.now)


def _iso(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, tz=timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def k8s_scale_events(audit_id: str, at_ns: int, *, user: str = OPS_SA) -> list[dict[str, Any]]:
    """RequestReceived and ResponseComplete of a deployment scale, as the API server logs them."""
    base = {
        "kind": "Event", "apiVersion": "audit.k8s.io/v1", "level": "Metadata", "auditID": audit_id,
        "requestURI": "/apis/apps/v1/namespaces/prod/deployments/payments/scale", "verb": "update",
        "user": {"username": user, "uid": "5a8e1b9c-4d3f-4b1e-9a77-2f7c0a3b6d11",
                 "groups": ["system:serviceaccounts", "system:serviceaccounts:agents", "system:authenticated"]},
        "sourceIPs": ["10.0.3.17"], "userAgent": "ops-agent/1.4 (linux/amd64) kubernetes-client-python",
        "objectRef": {"resource": "deployments", "namespace": "prod", "name": "payments", "apiGroup": "apps",
                      "apiVersion": "v1", "subresource": "scale"},
        "requestReceivedTimestamp": _iso(at_ns),
    }
    received = {**base, "stage": "RequestReceived", "stageTimestamp": _iso(at_ns)}
    complete = {**base, "stage": "ResponseComplete", "stageTimestamp": _iso(at_ns + 40 * MS),
                "responseStatus": {"metadata": {}, "code": 200},
                "annotations": {"authorization.k8s.io/decision": "allow",
                                "authorization.k8s.io/reason": 'RBAC: allowed by RoleBinding "ops-agent/prod"'}}
    return [received, complete]


def cloudtrail_put_object(request_id: str, at_ns: int, *, event_id: str) -> dict[str, Any]:
    """A CloudTrail data event record (S3 PutObject) as CloudTrail documents it."""
    return {
        "eventVersion": "1.09",
        "userIdentity": {
            "type": "AssumedRole", "principalId": "AROAEXAMPLEID:agent-data-session", "arn": DATA_ROLE,
            "accountId": ACCOUNT, "accessKeyId": "ASIAEXAMPLEKEY",
            "sessionContext": {"sessionIssuer": {"type": "Role", "principalId": "AROAEXAMPLEID",
                                                 "arn": f"arn:aws:iam::{ACCOUNT}:role/agent-data-role",
                                                 "accountId": ACCOUNT, "userName": "agent-data-role"},
                               "attributes": {"creationDate": _iso(at_ns - 600 * 10**9), "mfaAuthenticated": "false"}},
        },
        "eventTime": _iso(at_ns).split(".")[0] + "Z",
        "eventSource": "s3.amazonaws.com", "eventName": "PutObject", "awsRegion": "eu-west-1",
        "sourceIPAddress": "10.0.7.21", "userAgent": "[Boto3/1.34.0 md/Botocore#1.34.0]",
        "requestParameters": {"bucketName": "reports-export", "key": "q4/summary.csv", "Host": "reports-export.s3.amazonaws.com"},
        "responseElements": None,
        "requestID": request_id, "eventID": event_id, "readOnly": False,
        "resources": [{"type": "AWS::S3::Object", "ARN": "arn:aws:s3:::reports-export/q4/summary.csv"},
                      {"accountId": ACCOUNT, "type": "AWS::S3::Bucket", "ARN": "arn:aws:s3:::reports-export"}],
        "eventType": "AwsApiCall", "managementEvent": False, "recipientAccountId": ACCOUNT,
        "eventCategory": "Data",
    }


def botocore_attrs(request_id: str) -> dict[str, Any]:
    """What opentelemetry-instrumentation-botocore puts on its CLIENT span."""
    return {"rpc.system": "aws-api", "rpc.service": "S3", "rpc.method": "PutObject",
            "aws.region": "eu-west-1", "aws.request_id": request_id, "http.status_code": 200}


PG_ROLE = "agent_sql"
PG_PID = 4711


def _pg_ts(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC"


def pg_session_log(write: Caused, denied: Caused, untraced_at_ns: int) -> bytes:
    """The server log of one agent session, as PostgreSQL 15 + pgaudit 1.7 write it under
    PostgreSQL's default log_line_prefix '%m [%p] ' (shapes copied from a real server's
    log, tests/fixtures/audit/pg): the traced multi-line UPDATE (continuation lines start
    with a TAB), a traced SELECT refused with its STATEMENT record, then with no span an
    untraced DELETE and a read of the protected hr.salaries, amid the server's own records."""
    p = f"[{PG_PID}]"
    t = _pg_ts
    at = untraced_at_ns
    lines = [
        f"{t(write.start_ns)} {p} LOG:  connection received: host=10.0.4.12 port=51514",
        f"{t(write.start_ns + MS)} {p} LOG:  connection authorized: user={PG_ROLE} database=appdb "
        "application_name=agent-sql",
        f"{t(write.start_ns + 560 * MS)} {p} LOG:  AUDIT: SESSION,1,1,WRITE,UPDATE,,,\"UPDATE orders",
        "\t   SET status = 'refunded'",
        f"\t WHERE id = $1 /*traceparent='{write.traceparent}'*/\",<not logged>",
        f"{t(denied.start_ns + 560 * MS)} {p} ERROR:  permission denied for table bonuses",
        f"{t(denied.start_ns + 560 * MS)} {p} STATEMENT:  SELECT amount FROM hr.bonuses WHERE id = $1 "
        f"/*traceparent='{denied.traceparent}'*/",
        f"{t(at)} [77] LOG:  checkpoint starting: time",
        f"{t(at + 10 * MS)} {p} LOG:  AUDIT: SESSION,3,1,WRITE,DELETE,,,DELETE FROM orders WHERE id = $1,<not logged>",
        f"{t(at + 20 * MS)} {p} LOG:  AUDIT: SESSION,4,1,READ,SELECT,,,SELECT amount FROM hr.salaries WHERE id = 1,"
        "<not logged>",
        f"{t(at + 30 * MS)} {p} LOG:  disconnection: session time: 0:00:25.012 user={PG_ROLE} database=appdb "
        "host=10.0.4.12 port=51514",
        f"{t(at + 900 * MS)} [77] LOG:  checkpoint complete: wrote 3 buffers (0.0%); 0 WAL file(s) added, 0 removed, "
        "0 recycled; write=0.302 s, sync=0.001 s, total=0.312 s; sync files=3, longest=0.001 s, average=0.001 s; "
        "distance=5 kB, estimate=5 kB",
    ]
    return "".join(line + "\n" for line in lines).encode()


K8S_CLIENT = "PUT"
K8S_CLIENT_ATTRS = {"http.request.method": "PUT", "server.address": "kubernetes.default.svc",
                    "url.full": "https://kubernetes.default.svc/apis/apps/v1/namespaces/prod/deployments/payments/scale"}


# --- the join scenarios --------------------------------------------------------------


def _policy() -> str:
    corpus = yaml.safe_load((SCENARIOS / "policy.yaml").read_text())
    corpus.setdefault("detectors", {})["unconfirmed_action"] = {"tools": ["scale_deployment", "export_report"]}
    corpus["identity_map"] = corpus.get("identity_map", []) + [{"principal": PG_ROLE, "agent_id": "agent-sql"}]
    corpus["protected_resources"] = corpus.get("protected_resources", []) + ["hr.salaries"]
    corpus["join"] = {"window_s": 120}
    return "# the corpus policy plus the tools that must leave an audit record\n" + yaml.safe_dump(corpus, sort_keys=False)


def _write(name: str, description: str, alerts: list[dict[str, str]], files: dict[str, Any]) -> None:
    d = SCENARIOS / name
    d.mkdir(parents=True, exist_ok=True)
    for old in d.iterdir():
        old.unlink()
    for fname, content in files.items():
        if fname.endswith("spans.jsonl"):
            write_jsonl(d / fname, content)
        elif isinstance(content, bytes):
            (d / fname).write_bytes(content)
    (d / "policy.yaml").write_text(_policy())
    (d / "expected.yaml").write_text(yaml.safe_dump({"description": description, "alerts": alerts}, sort_keys=False))


def write_scenarios() -> None:
    # k8s: the tool's request carries its traceparent as Audit-ID -> joined, confirmed
    ops = tool_run(make_sdk("ops-agent-svc", instance_id="ops-agent-svc-0", seed=401), "agent-ops",
                   "scale_deployment", at_s=100, call_id="call_scale_1", client=K8S_CLIENT,
                   client_attrs=K8S_CLIENT_ATTRS)
    k8s = b"".join(orjson.dumps(e) + b"\n" for e in k8s_scale_events(ops.traceparent, ops.start_ns + 530 * MS))
    _write("join_confirmed_k8s", "an ops agent scales a deployment; the API server's audit record carries its "
           "traceparent, so the write is explained and the tool call confirmed",
           [], {"spans.jsonl": to_records(ops.spans, 2), "k8s_audit.log": k8s})

    # the same write without any span: the agent's service account acted off the books
    ghost = k8s_scale_events("3f1c9a52-7d0e-4c55-b0a4-2a9d61e0c7b3", BASE_NS + 200 * 10**9)
    _write("join_unattributed_k8s", "the ops agent's service account scales a deployment and no span explains it",
           [{"detector": "unattributed_side_effect", "agent_id": "agent-ops"}],
           {"k8s_audit.log": b"".join(orjson.dumps(e) + b"\n" for e in ghost)})

    # CloudTrail: requestID == the botocore span's aws.request_id -> joined (arrives before the spans)
    data = tool_run(make_sdk("agent-data-svc", instance_id="agent-data-svc-0", seed=402), "agent-data",
                    "export_report", at_s=300, call_id="call_export_1", client="S3.PutObject",
                    client_attrs=botocore_attrs("7Q1ZK4PB3M9XW2C8"))
    trail = {"Records": [cloudtrail_put_object("7Q1ZK4PB3M9XW2C8", data.start_ns + 560 * MS,
                                               event_id="8c1d3a0e-5b7f-4e2a-9d61-0f3b2c4a5e71")]}
    _write("join_confirmed_cloudtrail", "a data agent exports a report to S3; CloudTrail's requestID matches the "
           "span's aws.request_id", [], {"a_cloudtrail.json": orjson.dumps(trail, option=orjson.OPT_INDENT_2),
                                         "spans.jsonl": to_records(data.spans, 4)})

    # the agent reports the export succeeded, but S3 never saw the request
    liar = tool_run(make_sdk("agent-data-svc", instance_id="agent-data-svc-0", seed=403), "agent-data",
                    "export_report", at_s=400, call_id="call_export_2", client="S3.PutObject",
                    client_attrs=botocore_attrs("NOSUCHREQUEST0001"))
    # and a CloudTrail write by the same role no span explains
    stray = {"Records": [cloudtrail_put_object("5H8TR2NQ6VZ1Y3K7", BASE_NS + 430 * 10**9,
                                               event_id="0d6e2b71-93a4-4c1f-8e5d-7a2b9c3f1e04")]}
    _write("join_unconfirmed_cloudtrail", "a data agent reports an S3 export that CloudTrail never recorded, and the "
           "same role writes an object no span explains",
           [{"detector": "unconfirmed_action", "agent_id": "agent-data"},
            {"detector": "unattributed_side_effect", "agent_id": "agent-data"}],
           {"spans.jsonl": to_records(liar.spans, 4), "cloudtrail.json": orjson.dumps(stray, option=orjson.OPT_INDENT_2)})


    # PostgreSQL: an agent's SQL carries sqlcommenter traceparents; the server log holds the rest
    sdk = make_sdk("agent-sql-svc", instance_id="agent-sql-svc-0", seed=404)
    db = {"db.system": "postgresql", "db.namespace": "appdb"}
    write = tool_run(sdk, "agent-sql", "refund_order", at_s=500, call_id="call_refund_1", client="UPDATE",
                     client_attrs=db)
    denied = tool_run(sdk, "agent-sql", "read_bonus", at_s=510, call_id="call_bonus_1", client="SELECT",
                      client_attrs=db)
    _write("join_pgaudit", "an agent's traced UPDATE and refused SELECT join their tool calls through the SQL "
           "comment; with the same role and no span it deletes a row and reads the protected hr.salaries",
           [{"detector": "unattributed_side_effect", "agent_id": "agent-sql"},
            {"detector": "disallowed_access", "agent_id": "agent-sql", "pattern": "protected"},
            {"detector": "disallowed_access", "agent_id": "agent-sql", "pattern": "deny"}],
           {"spans.jsonl": to_records(write.spans + denied.spans, 2),
            "postgres.log": pg_session_log(write, denied, BASE_NS + 530 * 10**9)})


if __name__ == "__main__":
    write_scenarios()
