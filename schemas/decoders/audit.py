"""Audit-record decoders: Kubernetes, CloudTrail, OCSF API Activity, pgaudit, native.

``decode_audit`` takes one record (a Kafka message value, one line or one file)
and detects its format; the per-format functions are public for callers that
already know what they read. Every decoded record becomes one
``Event(kind=AUDIT)`` with ``principal`` / ``action`` / ``resource`` /
``outcome`` (allow | deny | error), a stable ``event_id`` derived from the
source's own id, and every id that can join it with the span that caused it:
W3C trace context in ``trace_id`` / ``span_id``, the rest in ``correlation``
under the keys named by the ``CORR_*`` constants below.

Detection order (first match wins, so it is unambiguous):

1. JSON ``apiVersion: audit.k8s.io/*`` with kind Event / EventList -> k8s_audit
2. JSON ``Records`` list, or ``eventVersion`` + ``eventSource``      -> cloudtrail
3. JSON ``class_uid``                                                -> ocsf
4. JSON PostgreSQL ``jsonlog`` (``error_severity`` + ``message``)    -> pgaudit
5. JSON ``kind: audit``                                              -> native_audit
6. text: an ``AUDIT:`` record or an ERROR line of a PostgreSQL log   -> pgaudit

Kubernetes stages: every stage decodes, but only ResponseComplete and Panic
carry an outcome. The others get ``attributes["stage"]`` and
``attributes["final"] = "false"`` and an empty outcome unless the authorizer
already forbade the request; joins and detectors must use final events only.
Keeping them (rather than dropping them) keeps a watch that never completes
visible and never discards input silently.

pgaudit: an AUDIT record is "allow" (pgaudit logs statements as they run). A
statement PostgreSQL then refuses shows up as an ERROR record (plus its
STATEMENT line when both are in one payload), decoded as its own event:
"deny" for missing privileges, else "error". Any other PostgreSQL log record is
a Failure, so feeding a whole server log puts its non-audit lines in the DLQ.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from schemas.decoders import DecodeResult
from schemas.errors import DecodeError
from schemas.events import AUDIT_OUTCOMES, Event, IdentitySource, stable_id

from schemas.decoders.audit_base import (  # noqa: F401 - re-exported: the audit decoders' public names
    _K8S_FINAL_STAGES,
    CORR_AWS_ACCESS_KEY_ID,
    CORR_AWS_REQUEST_ID,
    CORR_CLOUDTRAIL_EVENT_ID,
    CORR_CLOUDTRAIL_SHARED_EVENT_ID,
    CORR_K8S_AUDIT_ID,
    CORR_K8S_CREDENTIAL_ID,
    CORR_K8S_OBJECT_UID,
    CORR_K8S_POD_NAME,
    CORR_K8S_POD_UID,
    CORR_K8S_USER_UID,
    CORR_OCSF_CORRELATION_UID,
    CORR_OCSF_UID,
    CORR_PG_PID,
    CORR_PG_SESSION_ID,
    CORR_PG_STATEMENT_ID,
    CORR_REQUEST_ID,
    CORR_SESSION_ID,
    CORR_TOOL_CALL_ID,
    SOURCE_CLOUDTRAIL,
    SOURCE_K8S,
    SOURCE_NATIVE,
    SOURCE_OCSF,
    SOURCE_PGAUDIT,
    SOURCE_UNKNOWN,
    _audit_event,
    _compact,
    _content_id,
    _Ctx,
    _failure,
    _get,
    _guarded,
    _parse_ts,
    _raw_of,
    _require,
    _str,
    find_traceparent,
)
from schemas.decoders.pgaudit import (  # noqa: F401 - re-exported
    AUTO_PREFIX,
    DEFAULT_PG_LOG_LINE_PREFIX,
    PG_PREFIX_PRESETS,
    PgLogConfig,
    PgStitcher,
    Stitched,
    decode_pgaudit,
    looks_like_pg_text,
    pg_jsonlog_event,
    pg_prefix_regex,
    sql_tables,
)


# --------------------------------------------------------------------------- Kubernetes


def _k8s_outcome(code: int | None, decision: str, stage: str) -> str:
    if decision == "forbid":
        return "deny"
    if stage not in _K8S_FINAL_STAGES:
        return ""
    if stage == "Panic":
        return "error"
    if code is None:
        # a final event always has responseStatus; without one trust the authorizer
        return "allow" if decision == "allow" else "error"
    if code in (401, 403):
        return "deny"
    return "allow" if code < 400 else "error"


def _k8s_resource(event: Mapping[str, Any]) -> str:
    """``resource[.group]/namespace/name`` (empty parts left out); the subresource
    (``scale``, ``status``, ``exec`` ...) is ``attributes["k8s.subresource"]``, so one
    object has one name whatever part of it a request touched. The requestURI path
    for non-resource requests such as /healthz."""
    ref = event.get("objectRef")
    if not isinstance(ref, Mapping) or not ref.get("resource"):
        return str(event.get("requestURI") or "").split("?", 1)[0]
    kind = str(ref["resource"]) + (f".{ref['apiGroup']}" if ref.get("apiGroup") else "")
    parts = [kind, _str(ref, "namespace"), _str(ref, "name")]
    return "/".join(p for p in parts if p)


def _first(value: Any) -> str:
    """user.extra values are lists of strings."""
    if isinstance(value, list):
        return str(value[0]) if value else ""
    return "" if value is None else str(value)


def _k8s_event(event: Mapping[str, Any], ctx: _Ctx) -> Event:
    fmt = SOURCE_K8S
    audit_id = _require(event, "auditID", fmt)
    stage = _require(event, "stage", fmt)
    verb = _require(event, "verb", fmt)
    username = _require(event, "user.username", fmt)
    ts = _parse_ts(event.get("stageTimestamp") or event.get("requestReceivedTimestamp"), "stageTimestamp", fmt)
    annotations = event.get("annotations") if isinstance(event.get("annotations"), Mapping) else {}
    decision = str(annotations.get("authorization.k8s.io/decision", ""))
    code = _get(event, "responseStatus.code")
    extra = _get(event, "user.extra") or {}

    # The Audit-ID request header may carry the caller's traceparent (and the
    # API server then uses it as auditID); an annotation may carry one too.
    trace = find_traceparent(audit_id) or next(
        filter(None, (find_traceparent(str(v)) for v in annotations.values())), None
    )
    trace_id, span_id = trace or ("", "")
    correlation = _compact(
        [
            (CORR_K8S_AUDIT_ID, audit_id),
            (CORR_K8S_USER_UID, _str(event, "user.uid")),
            (CORR_K8S_OBJECT_UID, _str(event, "objectRef.uid")),
            (CORR_K8S_POD_NAME, _first(extra.get("authentication.kubernetes.io/pod-name"))),
            (CORR_K8S_POD_UID, _first(extra.get("authentication.kubernetes.io/pod-uid"))),
            (CORR_K8S_CREDENTIAL_ID, _first(extra.get("authentication.kubernetes.io/credential-id"))),
        ]
    )
    attributes = _compact(
        [
            ("stage", stage),
            ("final", str(stage in _K8S_FINAL_STAGES).lower()),
            ("level", event.get("level")),
            ("user_agent", event.get("userAgent")),
            ("request_uri", event.get("requestURI")),
            ("source_ips", ",".join(map(str, event.get("sourceIPs") or []))),
            ("groups", ",".join(map(str, _get(event, "user.groups") or []))),
            ("impersonated_user", _str(event, "impersonatedUser.username")),
            ("response_code", code),
            ("response_reason", _str(event, "responseStatus.reason")),
            ("k8s.resource", _str(event, "objectRef.resource")),
            ("k8s.subresource", _str(event, "objectRef.subresource")),
            ("k8s.api_group", _str(event, "objectRef.apiGroup")),
            ("k8s.namespace", _str(event, "objectRef.namespace")),
            ("k8s.name", _str(event, "objectRef.name")),
        ]
        + [(f"annotation.{k}", v) for k, v in annotations.items()]
    )
    resource = _k8s_resource(event)
    subresource = _str(event, "objectRef.subresource")
    return _audit_event(
        ctx,
        SOURCE_K8S,
        event_id=stable_id(SOURCE_K8S, audit_id, stage),
        ts=ts,
        name=f"{verb} {resource}" + (f"/{subresource}" if subresource else ""),
        principal=username,
        action=verb,
        resource=resource,
        outcome=_k8s_outcome(code if isinstance(code, int) else None, decision, stage),
        trace_id=trace_id,
        span_id=span_id,
        correlation=correlation,
        attributes=attributes,
    )


def _k8s_records(doc: Mapping[str, Any]) -> list[Any]:
    kind = doc.get("kind")
    if kind == "EventList":
        items = doc.get("items")
        if not isinstance(items, list):
            raise DecodeError("k8s_audit: EventList without an 'items' list")
        return items
    if kind == "Event":
        return [doc]
    raise DecodeError(f"k8s_audit: kind {kind!r} is not an audit Event or EventList")


# --------------------------------------------------------------------------- CloudTrail

# errorCodes that mean "not allowed" rather than "failed"; matched as substrings
# because services decorate them (Client.UnauthorizedOperation, AccessDeniedException).
_CLOUDTRAIL_DENY = ("AccessDenied", "UnauthorizedOperation", "Unauthorized", "Forbidden", "NotAuthorized")

# requestParameters naming the target when a record has no resources[] (most
# specific first); S3 and EC2 instance sets are built in _cloudtrail_param_resources.
_CLOUDTRAIL_TARGET_PARAMS = (
    "functionName",
    "tableName",
    "secretId",
    "roleArn",
    "roleName",
    "policyArn",
    "userName",
    "groupName",
    "keyId",
    "topicArn",
    "queueUrl",
    "logGroupName",
    "clusterName",
    "dBInstanceIdentifier",
    "name",
)


def _cloudtrail_param_resources(params: Mapping[str, Any]) -> list[str]:
    if params.get("bucketName"):  # the ARN form, so it matches resources[].ARN of data events
        key = _str(params, "key")
        return [f"arn:aws:s3:::{params['bucketName']}" + (f"/{key}" if key else "")]
    instances = _get(params, "instancesSet.items")
    if isinstance(instances, list) and instances:
        return [i for i in (_str(item, "instanceId") for item in instances) if i]
    target = _str(params, *_CLOUDTRAIL_TARGET_PARAMS)
    return [target] if target else []


def _cloudtrail_principal(identity: Mapping[str, Any]) -> str:
    principal = _str(
        identity, "arn", "sessionContext.sessionIssuer.arn", "principalId", "userName", "invokedBy"
    )
    if not principal:
        raise DecodeError(
            "cloudtrail: userIdentity has none of arn, sessionContext.sessionIssuer.arn, "
            "principalId, userName, invokedBy"
        )
    return principal


def _cloudtrail_resources(record: Mapping[str, Any]) -> list[str]:
    arns = [_str(r, "ARN", "arn") for r in record.get("resources") or [] if isinstance(r, Mapping)]
    if any(arns):
        return [a for a in arns if a]
    params = record.get("requestParameters")
    return _cloudtrail_param_resources(params) if isinstance(params, Mapping) else []


def _cloudtrail_outcome(record: Mapping[str, Any]) -> str:
    error_code = _str(record, "errorCode")
    if error_code:
        return "deny" if any(d in error_code for d in _CLOUDTRAIL_DENY) else "error"
    if _str(record, "responseElements.ConsoleLogin") == "Failure":
        return "deny"  # a failed console login has no errorCode, only this
    return "allow"


def _cloudtrail_event(record: Mapping[str, Any], ctx: _Ctx) -> Event:
    fmt = SOURCE_CLOUDTRAIL
    event_id = _require(record, "eventID", fmt)
    source = _require(record, "eventSource", fmt)
    name = _require(record, "eventName", fmt)
    ts = _parse_ts(record.get("eventTime"), "eventTime", fmt)
    identity = record.get("userIdentity")
    if not isinstance(identity, Mapping):
        raise DecodeError("cloudtrail: missing required field 'userIdentity'")
    resources = _cloudtrail_resources(record)
    return _audit_event(
        ctx,
        SOURCE_CLOUDTRAIL,
        event_id=stable_id(SOURCE_CLOUDTRAIL, event_id),
        ts=ts,
        tenant=_str(record, "recipientAccountId") or _str(identity, "accountId") or ctx.tenant,
        name=f"{source}:{name}",
        principal=_cloudtrail_principal(identity),
        action=f"{source}:{name}",
        resource=resources[0] if resources else "",
        outcome=_cloudtrail_outcome(record),
        correlation=_compact(
            [
                (CORR_AWS_REQUEST_ID, _str(record, "requestID")),
                (CORR_CLOUDTRAIL_EVENT_ID, event_id),
                (CORR_CLOUDTRAIL_SHARED_EVENT_ID, _str(record, "sharedEventID")),
                (CORR_AWS_ACCESS_KEY_ID, _str(identity, "accessKeyId")),
            ]
        ),
        attributes=_compact(
            [
                ("resources", ",".join(resources[1:])),
                ("identity_type", _str(identity, "type")),
                ("principal_id", _str(identity, "principalId")),
                ("session_issuer", _str(identity, "sessionContext.sessionIssuer.arn")),
                ("invoked_by", _str(identity, "invokedBy")),
                ("aws_region", _str(record, "awsRegion")),
                ("source_ip", _str(record, "sourceIPAddress")),
                ("user_agent", _str(record, "userAgent")),
                ("event_type", _str(record, "eventType")),
                ("read_only", _str(record, "readOnly")),
                ("error_code", _str(record, "errorCode")),
                ("error_message", _str(record, "errorMessage")),
                ("event_version", _str(record, "eventVersion")),
            ]
        ),
    )


def _cloudtrail_records(doc: Mapping[str, Any]) -> list[Any]:
    if "Records" in doc:
        records = doc["Records"]
        if not isinstance(records, list):
            raise DecodeError("cloudtrail: 'Records' is not a list")
        return records
    return [doc]


# --------------------------------------------------------------------------- OCSF

OCSF_API_ACTIVITY = 6003
# disposition_id values meaning the action did not go through because it was not allowed:
# 2 Blocked, 6 Dropped, 24 Access Revoked, 25 Rejected, 26 Unauthorized; 27 is Error.
_OCSF_DENY_DISPOSITIONS = frozenset({2, 6, 24, 25, 26})
_OCSF_ERROR_DISPOSITION = 27
# name before uid: for Kubernetes and IAM sources name is what the native decoders call principal
_OCSF_PRINCIPAL_PATHS = ("actor.user.name", "actor.user.uid", "actor.user.email_addr", "actor.process.name", "actor.app_name")
_HEX32 = re.compile(r"^[0-9a-fA-F]{32}$")
_HEX16 = re.compile(r"^[0-9a-fA-F]{16}$")


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _ocsf_outcome(event: Mapping[str, Any]) -> str:
    disposition = _int(event.get("disposition_id"))
    if disposition in _OCSF_DENY_DISPOSITIONS:
        return "deny"
    if disposition == _OCSF_ERROR_DISPOSITION:
        return "error"
    status_id = _int(event.get("status_id"))
    failed = status_id == 2 if status_id is not None else _str(event, "status").lower() == "failure"
    if not failed:
        return "allow"  # Success, Unknown (0) and Other (99): the API activity happened
    response_code = _int(_get(event, "api.response.code"))
    error = _str(event, "api.response.error", "status_code").lower()
    if response_code in (401, 403) or "denied" in error or "unauthorized" in error or "forbidden" in error:
        return "deny"
    return "error"


def _ocsf_trace(event: Mapping[str, Any]) -> tuple[str, str]:
    """OCSF trace.uid / trace.span.uid, kept only when they are W3C-shaped hex ids."""
    trace_uid, span_uid = _str(event, "trace.uid"), _str(event, "trace.span.uid")
    if not _HEX32.match(trace_uid):
        return "", ""
    return trace_uid.lower(), span_uid.lower() if _HEX16.match(span_uid) else ""


def _ocsf_event(event: Mapping[str, Any], ctx: _Ctx) -> Event:
    fmt = SOURCE_OCSF
    class_uid = _int(event.get("class_uid"))
    if class_uid != OCSF_API_ACTIVITY:
        raise DecodeError(f"ocsf: class_uid {event.get('class_uid')!r} is not API Activity ({OCSF_API_ACTIVITY})")
    operation = _require(event, "api.operation", fmt)
    ts = _parse_ts(event.get("time"), "time", fmt)
    principal = _str(event, *_OCSF_PRINCIPAL_PATHS)
    if not principal:
        raise DecodeError("ocsf: missing required field 'actor.user' (name or uid) or 'actor.process.name'")
    service = _str(event, "api.service.name")
    resources = [r for r in event.get("resources") or [] if isinstance(r, Mapping)]
    resource_names = [_str(r, "uid", "name") for r in resources]
    metadata_uid = _str(event, "metadata.uid")
    request_uid = _str(event, "api.request.uid")
    is_aws = _str(event, "cloud.provider").upper() == "AWS"
    trace_id, span_id = _ocsf_trace(event)
    return _audit_event(
        ctx,
        SOURCE_OCSF,
        # metadata.uid is only "recommended" in OCSF: without it the content is the identity
        event_id=stable_id(SOURCE_OCSF, metadata_uid or _content_id(event)),
        ts=ts,
        tenant=_str(event, "metadata.tenant_uid", "cloud.account.uid") or ctx.tenant,
        name=f"{service}:{operation}" if service else operation,
        principal=principal,
        action=f"{service}:{operation}" if service else operation,
        resource=next((r for r in resource_names if r), ""),
        outcome=_ocsf_outcome(event),
        trace_id=trace_id,
        span_id=span_id,
        correlation=_compact(
            [
                (CORR_REQUEST_ID, request_uid),
                # Security Lake maps CloudTrail requestID here: join like CloudTrail does
                (CORR_AWS_REQUEST_ID, request_uid if is_aws else ""),
                (CORR_OCSF_UID, metadata_uid),
                (CORR_OCSF_CORRELATION_UID, _str(event, "metadata.correlation_uid")),
                (CORR_SESSION_ID, _str(event, "actor.session.uid")),
                # a trace uid that is not a W3C id still joins by equality
                ("ocsf.trace_uid", "" if trace_id else _str(event, "trace.uid")),
            ]
        ),
        attributes=_compact(
            [
                ("resources", ",".join(r for r in resource_names[1:] if r)),
                ("actor.user.uid", _str(event, "actor.user.uid")),
                ("actor.user.name", _str(event, "actor.user.name")),
                ("activity_id", _str(event, "activity_id")),
                ("status", _str(event, "status")),
                ("status_detail", _str(event, "status_detail")),
                ("disposition", _str(event, "disposition", "disposition_id")),
                ("response_code", _str(event, "api.response.code")),
                ("product", _str(event, "metadata.product.name")),
                ("cloud.provider", _str(event, "cloud.provider")),
                ("cloud.region", _str(event, "cloud.region")),
                ("src_ip", _str(event, "src_endpoint.ip")),
                ("user_agent", _str(event, "http_request.user_agent")),
            ]
        ),
    )


# --------------------------------------------------------------------------- native

_NATIVE_ID_FIELDS = ("ts", "principal", "action", "resource", "outcome", "trace_id", "span_id", "tool_call_id")


def _native_event(doc: Mapping[str, Any], ctx: _Ctx) -> Event:
    fmt = SOURCE_NATIVE
    principal = _require(doc, "principal", fmt)
    action = _require(doc, "action", fmt)
    outcome = _require(doc, "outcome", fmt)
    if outcome not in AUDIT_OUTCOMES:
        raise DecodeError(f"native_audit: field 'outcome' is {outcome!r}, expected one of {sorted(AUDIT_OUTCOMES)}")
    ts = _parse_ts(doc.get("ts"), "ts", fmt)
    trace_id, span_id = _str(doc, "trace_id").lower(), _str(doc, "span_id").lower()
    if trace_id and not _HEX32.match(trace_id):
        raise DecodeError(f"native_audit: field 'trace_id' is not 32 hex digits: {trace_id!r}")
    if span_id and not _HEX16.match(span_id):
        raise DecodeError(f"native_audit: field 'span_id' is not 16 hex digits: {span_id!r}")
    correlation = doc.get("correlation") or {}
    attributes = doc.get("attributes") or {}
    if not isinstance(correlation, Mapping) or not isinstance(attributes, Mapping):
        raise DecodeError("native_audit: 'correlation' and 'attributes' must be JSON objects")
    tool_call_id = _str(doc, "tool_call_id")
    agent_id = _str(doc, "agent_id")
    return _audit_event(
        ctx,
        SOURCE_NATIVE,
        # the client's own id when it sends one; else the fields that make the event what it is
        event_id=_str(doc, "event_id") or stable_id(SOURCE_NATIVE, *(_str(doc, f) for f in _NATIVE_ID_FIELDS)),
        ts=ts,
        tenant=_str(doc, "tenant") or ctx.tenant,
        agent_id=agent_id,
        identity=IdentitySource.NATIVE if agent_id else IdentitySource.UNKNOWN,
        name=action,
        principal=principal,
        action=action,
        resource=_str(doc, "resource"),
        outcome=outcome,
        trace_id=trace_id,
        span_id=span_id,
        tool_call_id=tool_call_id,
        correlation=_compact(correlation.items()) | _compact([(CORR_TOOL_CALL_ID, tool_call_id)]),
        attributes=_compact(attributes.items()),
    )


# --------------------------------------------------------------------------- dispatch


@dataclass(frozen=True, slots=True)
class _JsonFormat:
    """A JSON audit format: how to recognise a document, unwrap it into records, map a record."""

    source: str
    matches: Callable[[Mapping[str, Any]], bool]
    records: Callable[[Mapping[str, Any]], list[Any]]
    to_event: Callable[[Mapping[str, Any], _Ctx], Event | None]  # None: a valid record to skip


def _single(doc: Mapping[str, Any]) -> list[Any]:
    return [doc]


_K8S = _JsonFormat(
    SOURCE_K8S,
    lambda d: str(d.get("apiVersion", "")).startswith("audit.k8s.io/"),
    _k8s_records,
    _k8s_event,
)
_CLOUDTRAIL = _JsonFormat(
    SOURCE_CLOUDTRAIL,
    lambda d: "Records" in d or ("eventVersion" in d and "eventSource" in d),
    _cloudtrail_records,
    _cloudtrail_event,
)
_OCSF = _JsonFormat(SOURCE_OCSF, lambda d: "class_uid" in d, _single, _ocsf_event)
_PG_JSONLOG = _JsonFormat(
    SOURCE_PGAUDIT,
    lambda d: "error_severity" in d and isinstance(d.get("message"), str),
    _single,
    lambda d, ctx: pg_jsonlog_event(d, ctx, ctx.pg or PgLogConfig()),
)
_NATIVE = _JsonFormat(SOURCE_NATIVE, lambda d: d.get("kind") == "audit", _single, _native_event)

# Order is the detection order documented at the top of the module.
_JSON_FORMATS: tuple[_JsonFormat, ...] = (_K8S, _CLOUDTRAIL, _OCSF, _PG_JSONLOG, _NATIVE)
_UNRECOGNISED = (
    "unrecognised audit record: JSON object has none of apiVersion audit.k8s.io/*, "
    "Records or eventVersion+eventSource (CloudTrail), class_uid (OCSF), "
    "error_severity+message (PostgreSQL jsonlog), kind=audit (native)"
)


def _decode_doc(fmt: _JsonFormat, doc: Mapping[str, Any], raw: bytes, ctx: _Ctx) -> DecodeResult:
    """One JSON document of a known format: each record it wraps succeeds or fails alone."""
    try:
        records = fmt.records(doc)
    except DecodeError as e:
        return _failure(raw, e.reason, fmt.source)
    if len(records) == 1 and records[0] is doc:
        return _guarded(raw, fmt.source, lambda: [fmt.to_event(doc, ctx)])
    result = DecodeResult()
    for record in records:
        if not isinstance(record, Mapping):
            result.extend(_failure(_raw_of(record), f"{fmt.source}: record is not a JSON object", fmt.source))
            continue
        result.extend(_guarded(_raw_of(record), fmt.source, lambda r=record: [fmt.to_event(r, ctx)]))
    return result


def _detect_and_decode(doc: Any, raw: bytes, ctx: _Ctx) -> DecodeResult:
    if isinstance(doc, list):  # a JSON array: native events, or any format's records
        result = DecodeResult()
        for item in doc:
            result.extend(_detect_and_decode(item, _raw_of(item), ctx))
        return result
    if not isinstance(doc, Mapping):
        return _failure(raw, f"unrecognised audit record: JSON {type(doc).__name__}, expected an object", SOURCE_UNKNOWN)
    fmt = next((f for f in _JSON_FORMATS if f.matches(doc)), None)
    if fmt is None:
        return _failure(raw, _UNRECOGNISED, SOURCE_UNKNOWN)
    return _decode_doc(fmt, doc, raw, ctx)


def _decode_json(
    payload: bytes, ctx: _Ctx, only: _JsonFormat | None = None
) -> DecodeResult:
    """Parse JSON (one document, or JSON lines as the k8s log backend writes them)."""
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError as e:
        lines = [ln for ln in payload.splitlines() if ln.strip()]
        if len(lines) < 2:
            return _failure(payload, f"invalid JSON: {e}", only.source if only else SOURCE_UNKNOWN)
        result = DecodeResult()
        for ln in lines:
            result.extend(_decode_json(ln, ctx, only))
        return result
    if only is None:
        return _detect_and_decode(doc, payload, ctx)
    if isinstance(doc, Mapping) and only.matches(doc):
        return _decode_doc(only, doc, payload, ctx)
    if isinstance(doc, list):
        result = DecodeResult()
        for item in doc:
            result.extend(_decode_json(_raw_of(item), ctx, only))
        return result
    return _failure(payload, f"{only.source}: record is not in this format", only.source)


def _decode_format(fmt: _JsonFormat, payload: bytes | Mapping[str, Any], origin: str, tenant: str) -> DecodeResult:
    """A per-format entry point: bytes are parsed, an already parsed document is used as is."""
    ctx = _Ctx(origin, tenant)
    try:
        if not isinstance(payload, Mapping):
            return _decode_json(payload, ctx, fmt)
        raw = _raw_of(payload)
        if not fmt.matches(payload):
            return _failure(raw, f"{fmt.source}: record is not in this format", fmt.source)
        return _decode_doc(fmt, payload, raw, ctx)
    except Exception as e:  # never raise, whatever the input
        return _failure(_raw_of(payload) if isinstance(payload, Mapping) else payload, f"{fmt.source}: {e}", fmt.source)


def decode_k8s_audit(payload: bytes | Mapping[str, Any], *, origin: str = "", tenant: str = "default") -> DecodeResult:
    """Kubernetes ``audit.k8s.io/v1`` Event, EventList, or JSON lines of Events."""
    return _decode_format(_K8S, payload, origin, tenant)


def decode_cloudtrail(payload: bytes | Mapping[str, Any], *, origin: str = "", tenant: str = "default") -> DecodeResult:
    """A CloudTrail log file (``{"Records": [...]}``) or a single record (EventBridge, CloudWatch)."""
    return _decode_format(_CLOUDTRAIL, payload, origin, tenant)


def decode_ocsf(payload: bytes | Mapping[str, Any], *, origin: str = "", tenant: str = "default") -> DecodeResult:
    """An OCSF API Activity (class_uid 6003) event, or a JSON array of them."""
    return _decode_format(_OCSF, payload, origin, tenant)


def decode_native_audit(payload: bytes | Mapping[str, Any], *, origin: str = "", tenant: str = "default") -> DecodeResult:
    """agentwatch's own audit event (``kind: audit``), or a JSON array of them."""
    return _decode_format(_NATIVE, payload, origin, tenant)


def decode_audit(
    payload: bytes,
    *,
    origin: str = "",
    tenant: str = "default",
    log_line_prefix: str = AUTO_PREFIX,
    log_timezone: str = "",
    received_at: datetime | None = None,
    pg: PgLogConfig | None = None,
) -> DecodeResult:
    """Detect the format of one audit record (or file) and decode it; never raises.

    ``tenant`` is used when the record names none. ``pg`` (or ``log_line_prefix``
    and ``log_timezone``) and ``received_at`` only matter for PostgreSQL logs (see
    ``schemas.decoders.pgaudit``). Stateless: PostgreSQL records sent in pieces
    need ``AuditDecoder.feed``.
    """
    cfg = pg or PgLogConfig(log_line_prefix, log_timezone)
    try:
        stripped = payload.strip()
        if not stripped:
            return _failure(payload, "empty record", SOURCE_UNKNOWN)
        if stripped[:1] in (b"{", b"["):
            return _decode_json(payload, _Ctx(origin, tenant, cfg))
        text = stripped.decode("utf-8", errors="replace")
        if looks_like_pg_text(text, cfg):
            return decode_pgaudit(text, origin=origin, tenant=tenant, received_at=received_at, config=cfg)
        return _failure(
            payload, "unrecognised audit record: not JSON and not a PostgreSQL log line with an AUDIT: record", SOURCE_UNKNOWN
        )
    except Exception as e:  # the contract: a bad record never stops the pipeline
        return _failure(payload, f"audit decoder error ({type(e).__name__}: {e})", SOURCE_UNKNOWN)


class AuditDecoder:
    """``decode_audit`` with the deployment's configuration, and the stitching buffer
    for PostgreSQL text logs shipped in pieces (one line, or one record, per message).

    ``__call__`` is the stateless decoder. ``feed`` takes one Kafka message of a
    stream (partition and key) and returns what could be decoded so far, each
    with the offset of the message it started in; ``flush`` decodes records whose
    rest did not come within ``pg.stitch_s``. JSON and other formats pass straight
    through ``feed``.
    """

    def __init__(self, pg: PgLogConfig | None = None) -> None:
        self.pg = pg or PgLogConfig()
        self.stitcher = PgStitcher(self.pg)

    def __call__(self, payload: bytes, *, origin: str = "", tenant: str = "default",
                 received_at: datetime | None = None) -> DecodeResult:
        return decode_audit(payload, origin=origin, tenant=tenant, received_at=received_at, pg=self.pg)

    def feed(self, payload: bytes, *, stream: Hashable, offset: int, origin: str = "", tenant: str = "default",
             received_at: datetime | None = None, wall: float = 0.0) -> list[Stitched]:
        head = payload.lstrip()[:1]
        if head in (b"{", b"[") or not head:
            return [Stitched(self(payload, origin=origin, tenant=tenant, received_at=received_at), offset)]
        text = payload.decode("utf-8", errors="replace")
        # continuation lines (TAB first) only make sense after an open record: let the stitcher judge
        if not (text[:1] == "\t" or looks_like_pg_text(text, self.pg)):
            return [Stitched(self(payload, origin=origin, tenant=tenant, received_at=received_at), offset)]
        try:
            return self.stitcher.feed(stream, text.rstrip("\n"), offset=offset, origin=origin, tenant=tenant,
                                      wall=wall, received_at=received_at)
        except Exception as e:  # never raise, whatever the input
            return [Stitched(_failure(payload, f"pgaudit: stitching error ({type(e).__name__}: {e})",
                                      SOURCE_PGAUDIT), offset)]

    def flush(self, wall: float, *, force: bool = False) -> list[tuple[Hashable, Stitched]]:
        return self.stitcher.flush(wall, force=force)
