"""The span/audit join on the real broker: a worker process, its topics, chDB.

Each audit format (Kubernetes audit line with a traceparent Audit-ID, a
CloudTrail record whose requestID is a span's aws.request_id, OCSF 6003 with
trace.uid/trace.span.uid, a pgaudit line with a traceparent SQL comment, a
native audit event) goes in with the OTLP spans of the tool call that caused
it, audit first for some and spans first (agent span first: out of order) for
others; the join is read back from ClickHouse through the worker.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import orjson
import pytest
import yaml

from schemas.otlp_json import request_to_otlp_json
from tests.join_traces import (
    K8S_CLIENT, K8S_CLIENT_ATTRS, OPS_SA, Caused, botocore_attrs, cloudtrail_put_object,
    k8s_scale_events, tool_run,
)
from tests.live import LiveWorker
from tests.otel_traces import BASE_NS, MS, make_sdk, to_records

pytestmark = pytest.mark.kafka

AT = 5000.0  # seconds after BASE: every run close together in event time (within the lateness)


def _iso(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, tz=timezone.utc).isoformat().replace("+00:00", "Z")


def _run(seed: int, agent: str, tool: str, at: float, client: str, attrs: dict[str, object]) -> Caused:
    sdk = make_sdk(f"{agent}-svc", instance_id=f"{agent}-svc-0", seed=seed)
    return tool_run(sdk, agent, tool, at_s=AT + at, call_id=f"call-{seed}", client=client, client_attrs=attrs)


def ocsf(c: Caused) -> bytes:
    return orjson.dumps({
        "class_uid": 6003, "category_uid": 6, "activity_id": 3, "type_uid": 600303, "severity_id": 1,
        "time": (c.start_ns + 540 * MS) // MS, "status_id": 1, "status": "Success",
        "actor": {"user": {"name": "agent-ocsf-role", "uid": "AROAEXAMPLE:agent-ocsf"}},
        "api": {"operation": "UpdateItem", "service": {"name": "dynamodb.amazonaws.com"},
                "request": {"uid": "b0f1c1e2-0000-4000-8000-00000000ocsf"}},
        "resources": [{"uid": "arn:aws:dynamodb:eu-west-1:123456789012:table/orders", "type": "AWS::DynamoDB::Table"}],
        "trace": {"uid": c.trace_id, "span": {"uid": c.client_span_id}},
        "metadata": {"uid": f"ocsf-{c.trace_id[:8]}", "version": "1.4.0", "product": {"name": "gateway"}},
    })


def pgaudit(c: Caused) -> bytes:
    ts = datetime.fromtimestamp((c.start_ns + 540 * MS) / 1e9, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    return (f"{ts} UTC [4242] agent_sql@appdb LOG:  AUDIT: SESSION,7,1,WRITE,UPDATE,TABLE,public.orders,"
            f"\"UPDATE orders SET status = 'refunded' WHERE id = 9 /*traceparent='{c.traceparent}'*/\",<not logged>"
            ).encode()


def native(c: Caused) -> bytes:
    return orjson.dumps({"kind": "audit", "ts": _iso(c.start_ns + 540 * MS), "principal": "svc-payments",
                         "action": "payments.refund", "resource": "order/9", "outcome": "allow",
                         "trace_id": c.trace_id, "span_id": c.client_span_id})


@pytest.fixture(scope="module")
def worker(kafka_bootstrap, tmp_path_factory):
    home: Path = tmp_path_factory.mktemp("join-live")
    policy = home / "policy.yaml"
    policy.write_text(yaml.safe_dump({
        "version": "join-live-1",
        "allowed_lateness_s": 10,
        "join": {"window_s": 15},
        "identity_map": [{"principal": OPS_SA, "agent_id": "agent-ops"},
                         {"principal": "arn:aws:sts::123456789012:assumed-role/agent-data-role/*",
                          "agent_id": "agent-data"}],
        "detectors": {"unconfirmed_action": {"tools": ["scale_deployment"]}},
    }))
    with LiveWorker(kafka_bootstrap, home, policy=policy) as w:
        yield w


def test_each_audit_format_joins_its_span_in_either_order(worker: LiveWorker):
    s = worker.settings
    runs = {
        "k8s_audit": _run(601, "agent-ops", "scale_deployment", 0, K8S_CLIENT, K8S_CLIENT_ATTRS),
        "cloudtrail": _run(602, "agent-data", "export_report", 1, "S3.PutObject", botocore_attrs("LIVEREQ0000000001")),
        "ocsf": _run(603, "agent-ocsf", "update_order", 2, "DynamoDB.UpdateItem", {"rpc.system": "aws-api"}),
        "pgaudit": _run(604, "agent-sql", "refund_order", 3, "UPDATE", {"db.system": "postgresql"}),
        "native_audit": _run(605, "agent-pay", "refund", 4, "POST", {"http.request.method": "POST"}),
    }
    audits = {
        "k8s_audit": (s.topic_audit_in, [orjson.dumps(e) for e in k8s_scale_events(
            runs["k8s_audit"].traceparent, runs["k8s_audit"].start_ns + 540 * MS)]),
        "cloudtrail": (s.topic_audit_in, [orjson.dumps({"Records": [cloudtrail_put_object(
            "LIVEREQ0000000001", runs["cloudtrail"].start_ns + 540 * MS, event_id="live-ct-1")]})]),
        "ocsf": (s.topic_audit_in, [ocsf(runs["ocsf"])]),
        "pgaudit": (s.topic_audit_in, [pgaudit(runs["pgaudit"])]),
        "native_audit": (s.topic_audit_in, [native(runs["native_audit"])]),
    }
    for i, (fmt, c) in enumerate(runs.items()):
        spans = [request_to_otlp_json(r) for r in to_records(c.spans, 1)]
        if i % 2 == 0:  # audit first, then the spans agent-span first (out of order)
            worker.produce(*audits[fmt])
            worker.produce(s.topic_otlp, list(reversed(spans)))
        else:  # spans first, in export order
            worker.produce(s.topic_otlp, spans)
            worker.produce(*audits[fmt])
    # an agent principal's write that no span explains: unattributed once the window closes
    worker.produce(s.topic_audit_in, [orjson.dumps(e) for e in k8s_scale_events(
        "9d2e4f60-1111-4a2b-8c3d-000000000001", BASE_NS + int((AT + 5) * 1e9))])

    sql = ("SELECT audit_source, agent_id, identity, tool_name, tool_call_id, trace_id, joined_via, join_status "
           "FROM agentwatch.audit_attribution WHERE join_status IN ('matched', 'unattributed') ORDER BY audit_source")
    rows = worker.wait_rows(sql, lambda r: len(r) >= 6, timeout=120)
    got = {(r[0], r[7]): r for r in rows}
    for fmt, c in runs.items():
        row = got.get((fmt, "matched"))
        assert row is not None, (fmt, rows, worker.log_tail())
        agent = {"k8s_audit": "agent-ops", "cloudtrail": "agent-data", "ocsf": "agent-ocsf",
                 "pgaudit": "agent-sql", "native_audit": "agent-pay"}[fmt]
        assert row[1:3] == (agent, "join"), row
        assert row[4] == f"call-{600 + list(runs).index(fmt) + 1}" and row[5] == c.trace_id, row
    assert got[("cloudtrail", "matched")][6] == "aws.request_id"
    assert got[("k8s_audit", "unattributed")][1:3] == ("agent-ops", "identity_map")

    # the auditable tool call was confirmed; the non-final k8s stage is stored, not joined
    confirmed = worker.wait_rows(
        "SELECT join_status FROM agentwatch.tool_call_confirmation WHERE tool_name = 'scale_deployment'",
        lambda r: bool(r), timeout=30)
    assert confirmed == [("matched",)]
    stages = worker.query("SELECT count() FROM agentwatch.events WHERE kind = 'audit' "
                          "AND attributes['join'] = 'not_final'").rows
    assert stages[0][0] == 2
    alerts = worker.wait_alerts(lambda a: any(x.detector == "unattributed_side_effect" for x in a), timeout=60)
    assert {(a.detector, a.agent_id) for a in alerts} == {("unattributed_side_effect", "agent-ops")}


def test_audit_later_than_the_allowed_lateness_is_stored_marked_not_lost(worker: LiveWorker):
    old = orjson.dumps({"kind": "audit", "ts": _iso(BASE_NS + int((AT - 3600) * 1e9)), "principal": OPS_SA,
                        "action": "delete", "resource": "pods/prod/payments-0", "outcome": "allow",
                        "trace_id": "7" * 32, "span_id": "8" * 16})
    worker.produce(worker.settings.topic_audit_in, [old])
    rows = worker.wait_rows(
        "SELECT agent_id, identity FROM agentwatch.events WHERE kind = 'audit' AND attributes['join'] = 'late'",
        lambda r: bool(r), timeout=60)
    assert rows == [("agent-ops", "identity_map")], worker.log_tail()
