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

import csv
import hashlib
import io
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from typing import Any
from urllib.parse import unquote

import orjson
from pydantic import ValidationError

from schemas.decoders import DecodeResult, Failure
from schemas.errors import DecodeError
from schemas.events import AUDIT_OUTCOMES, Event, EventKind, IdentitySource, stable_id

SOURCE_K8S = "k8s_audit"
SOURCE_CLOUDTRAIL = "cloudtrail"
SOURCE_OCSF = "ocsf"
SOURCE_PGAUDIT = "pgaudit"
SOURCE_NATIVE = "native_audit"
SOURCE_UNKNOWN = "audit"  # Failure.source when no format matched

# Correlation keys. Where a span attribute carries the same id the key IS that
# attribute's name, so the join is a plain key lookup on both sides.
CORR_AWS_REQUEST_ID = "aws.request_id"  # CloudTrail requestID == span attribute aws.request_id
CORR_AWS_ACCESS_KEY_ID = "aws.access_key_id"
CORR_CLOUDTRAIL_EVENT_ID = "cloudtrail.event_id"
CORR_CLOUDTRAIL_SHARED_EVENT_ID = "cloudtrail.shared_event_id"
CORR_K8S_AUDIT_ID = "k8s.audit_id"
CORR_K8S_USER_UID = "k8s.user.uid"
CORR_K8S_OBJECT_UID = "k8s.object.uid"
CORR_K8S_POD_NAME = "k8s.pod.name"  # OTel resource attribute of the caller's pod
CORR_K8S_POD_UID = "k8s.pod.uid"
CORR_K8S_CREDENTIAL_ID = "k8s.credential_id"
CORR_REQUEST_ID = "request_id"  # OCSF api.request.uid (any provider)
CORR_OCSF_UID = "ocsf.uid"
CORR_OCSF_CORRELATION_UID = "ocsf.correlation_uid"
CORR_SESSION_ID = "session_id"
CORR_TOOL_CALL_ID = "gen_ai.tool.call.id"  # the GenAI span attribute of the tool call
CORR_PG_PID = "db.postgresql.pid"
CORR_PG_SESSION_ID = "db.postgresql.session_id"
CORR_PG_STATEMENT_ID = "db.postgresql.statement_id"

_K8S_FINAL_STAGES = frozenset({"ResponseComplete", "Panic"})


# --------------------------------------------------------------------------- helpers


@dataclass(frozen=True, slots=True)
class _Ctx:
    origin: str
    tenant: str


def _get(obj: Any, path: str) -> Any:
    """``obj["a"]["b"]`` for ``"a.b"``; None when any level is missing or not an object."""
    for key in path.split("."):
        if not isinstance(obj, Mapping):
            return None
        obj = obj.get(key)
    return obj


def _str(obj: Any, *paths: str) -> str:
    """The first of ``paths`` holding a non-empty scalar, as text ("" if none)."""
    for path in paths:
        value = _get(obj, path)
        if value is not None and value != "" and not isinstance(value, (Mapping, list)):
            return str(value)
    return ""


def _require(obj: Any, path: str, fmt: str) -> str:
    value = _str(obj, path)
    if not value:
        raise DecodeError(f"{fmt}: missing required field '{path}'")
    return value


def _compact(items: Iterable[tuple[str, Any]]) -> dict[str, str]:
    """A str->str dict without empty values (Event attributes and correlation are str->str)."""
    return {k: str(v) for k, v in items if v is not None and v != "" and v != []}


_TRACEPARENT = re.compile(r"(?<![0-9a-f])([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(?![0-9a-f])", re.I)


def find_traceparent(text: str) -> tuple[str, str] | None:
    """``(trace_id, span_id)`` of the first valid W3C traceparent inside ``text``.

    The id may be embedded (an Audit-ID that is or contains a traceparent, a SQL
    comment), so this searches rather than matches; version ff and all-zero ids
    are invalid per the W3C spec and are skipped.
    """
    for m in _TRACEPARENT.finditer(text or ""):
        version, trace_id, span_id = m.group(1).lower(), m.group(2).lower(), m.group(3).lower()
        if version != "ff" and trace_id.strip("0") and span_id.strip("0"):
            return trace_id, span_id
    return None


_FRACTION = re.compile(r"(\.\d{6})\d+")


def _parse_ts(value: Any, field: str, fmt: str) -> datetime:
    """ISO-8601 text or a Unix epoch number (s, ms, us or ns, told apart by magnitude)."""
    if isinstance(value, bool) or value is None or value == "":
        raise DecodeError(f"{fmt}: missing required field '{field}'")
    if isinstance(value, (int, float)):
        magnitude = abs(value)
        # 1e11 s is the year 5138, so anything larger is ms, us or ns
        divisor = 1e9 if magnitude >= 1e17 else 1e6 if magnitude >= 1e14 else 1e3 if magnitude >= 1e11 else 1
        return datetime.fromtimestamp(value / divisor, tz=timezone.utc)
    if isinstance(value, str):
        try:
            # fromisoformat of 3.11 takes "Z" but not more than 6 fractional digits
            ts = datetime.fromisoformat(_FRACTION.sub(r"\1", value.strip()))
        except ValueError:
            raise DecodeError(f"{fmt}: field '{field}' is not an ISO-8601 time: {value!r}") from None
        return ts if ts.tzinfo else ts.replace(tzinfo=timezone.utc)
    raise DecodeError(f"{fmt}: field '{field}' is not a time: {value!r}")


def _content_id(record: Any) -> str:
    """A stable id for a record whose source has no id: hash of its canonical JSON."""
    canonical = orjson.dumps(record, option=orjson.OPT_SORT_KEYS, default=str)
    return hashlib.blake2b(canonical, digest_size=16).hexdigest()


def _audit_event(ctx: _Ctx, source: str, **fields: Any) -> Event:
    fields.setdefault("tenant", ctx.tenant)
    return Event(kind=EventKind.AUDIT, source=source, origin=ctx.origin, **fields)


def _failure(raw: bytes, reason: str, source: str) -> DecodeResult:
    return DecodeResult(failures=[Failure(raw=raw, reason=reason, source=source)])


def _guarded(raw: bytes, source: str, build: Callable[[], list[Event]]) -> DecodeResult:
    """Run one record's decoding; any problem becomes that record's Failure, never an exception."""
    try:
        return DecodeResult(events=build())
    except DecodeError as e:
        return _failure(raw, e.reason, source)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        return _failure(raw, f"{source}: decoded event invalid at '{loc}': {first['msg']}", source)
    except Exception as e:  # a shape no check foresaw (a string where an object belongs ...)
        return _failure(raw, f"{source}: malformed record ({type(e).__name__}: {e})", source)


def _raw_of(record: Any) -> bytes:
    try:
        return orjson.dumps(record)
    except TypeError:
        return repr(record).encode()


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
    """``resource[.group]/namespace/name[/subresource]`` (empty parts left out);
    the requestURI path for non-resource requests such as /healthz."""
    ref = event.get("objectRef")
    if not isinstance(ref, Mapping) or not ref.get("resource"):
        return str(event.get("requestURI") or "").split("?", 1)[0]
    kind = str(ref["resource"]) + (f".{ref['apiGroup']}" if ref.get("apiGroup") else "")
    parts = [kind, _str(ref, "namespace"), _str(ref, "name"), _str(ref, "subresource")]
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
    return _audit_event(
        ctx,
        SOURCE_K8S,
        event_id=stable_id(SOURCE_K8S, audit_id, stage),
        ts=ts,
        name=f"{verb} {_k8s_resource(event)}",
        principal=username,
        action=verb,
        resource=_k8s_resource(event),
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


# --------------------------------------------------------------------------- pgaudit

# log_line_prefix escapes -> regex. Text fields are lazy so the literal text
# around them (" ", "@", "[") decides where they end.
_PG_TS = r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}(?:\.\d+)?(?: [A-Za-z][A-Za-z0-9/_+-]*|[+-]\d{2}(?::?\d{2})?)?"
_PG_ESCAPES: dict[str, tuple[str, str]] = {
    "m": ("ts", _PG_TS),
    "t": ("ts", _PG_TS),
    "n": ("epoch", r"\d+(?:\.\d+)?"),
    "p": ("pid", r"\d+"),
    "u": ("user", r".*?"),
    "d": ("db", r".*?"),
    "a": ("app", r".*?"),
    "h": ("host", r".*?"),
    "r": ("remote", r".*?"),
    "c": ("session", r"[0-9a-f]+\.[0-9a-f]+"),
    "l": ("line", r"\d+"),
    "s": ("session_start", _PG_TS),
    "v": ("vxid", r"[-\d/]*"),
    "x": ("xid", r"\d*"),
    "e": ("sqlstate", r"[0-9A-Z]{5}"),
    "i": ("tag", r".*?"),
    "b": ("backend", r".*?"),
    "Q": ("query_id", r"-?\d+"),
    "L": ("local", r".*?"),
    "P": ("leader", r"\d*"),
}
_PG_SEVERITY = r"(?P<severity>DEBUG[1-5]?|INFO|NOTICE|WARNING|ERROR|LOG|FATAL|PANIC|STATEMENT|DETAIL|HINT|CONTEXT|QUERY|LOCATION):\s+"
_PG_BARE = re.compile(_PG_SEVERITY + r"(?P<message>.*)\Z", re.S)
DEFAULT_PG_LOG_LINE_PREFIX = "%m [%p] %q%u@%d "


@lru_cache(maxsize=32)  # called per record with the same setting
def pg_prefix_regex(log_line_prefix: str = DEFAULT_PG_LOG_LINE_PREFIX) -> re.Pattern[str]:
    """A regex for whole PostgreSQL log records written with ``log_line_prefix``.

    Takes the server's own setting (``SHOW log_line_prefix``) so operators do
    not write regexes; groups: ts/epoch, pid, user, db, app, host, session ...,
    severity and message. ``%q`` only matters for non-session processes, which
    never write audit records, so it is dropped.
    """
    out, seen, i = ["^"], set(), 0
    while i < len(log_line_prefix):
        ch = log_line_prefix[i]
        if ch == "%" and i + 1 < len(log_line_prefix):
            i += 1
            esc = log_line_prefix[i]
            while esc.isdigit() or esc == "-":  # padding such as %-10u
                i += 1
                esc = log_line_prefix[i]
            if esc == "%":
                out.append("%")
            elif esc in _PG_ESCAPES:
                group, pattern = _PG_ESCAPES[esc]
                out.append(f"(?P<{group}>{pattern})" if group not in seen else f"(?:{pattern})")
                seen.add(group)
        else:
            out.append(re.escape(ch))
        i += 1
    return re.compile("".join(out) + r"\s*" + _PG_SEVERITY + r"(?P<message>.*)\Z", re.S)


_PG_AUDIT_FIELDS = ("audit_type", "statement_id", "substatement_id", "class", "command", "object_type", "object_name")
_PG_ERROR_SEVERITIES = frozenset({"ERROR", "FATAL", "PANIC"})
_PG_FOLLOWERS = frozenset({"STATEMENT", "DETAIL", "HINT", "CONTEXT", "QUERY", "LOCATION"})
_PG_DENIED = re.compile(
    r"permission denied for (?:table|relation|view|sequence|schema|database|function|column|materialized view) (\S+)"
)
_SQL_COMMENT = re.compile(r"/\*(.*?)\*/", re.S)
_SQLCOMMENTER_PAIR = re.compile(r"([\w.-]+)\s*=\s*'([^']*)'")
_SQL_VERB = re.compile(r"^\s*(?:/\*.*?\*/\s*)*([A-Za-z]+(?: TABLE| INDEX| VIEW| ROLE| SCHEMA| FUNCTION)?)", re.S)


@dataclass(slots=True)
class _PgRecord:
    """One log record: its fields from the prefix, severity, message, and follow-up lines."""

    raw: str
    fields: dict[str, str]
    severity: str
    message: str
    statement: str = ""  # STATEMENT: line that followed an ERROR


def _pg_ts(fields: Mapping[str, str]) -> tuple[datetime | None, str]:
    """Time from %m/%t (zone abbreviations other than UTC/GMT are kept, not resolved) or %n."""
    if fields.get("epoch"):
        return datetime.fromtimestamp(float(fields["epoch"]), tz=timezone.utc), ""
    text = fields.get("ts") or ""
    if not text:
        return None, ""
    m = re.match(r"(\S+ [\d:.]+)\s*(.*)$", text)
    if not m:
        return None, ""
    base = datetime.fromisoformat(m.group(1)).replace(tzinfo=timezone.utc)
    zone = m.group(2)
    offset = re.fullmatch(r"([+-])(\d{2}):?(\d{2})?", zone)
    if offset:
        sign = -1 if offset.group(1) == "-" else 1
        delta = timedelta(hours=int(offset.group(2)), minutes=int(offset.group(3) or 0))
        return base - sign * delta, ""
    return base, "" if zone in ("", "UTC", "GMT", "Z") else zone


def _sqlcommenter(statement: str) -> dict[str, str]:
    """key='value' pairs of SQL comments (sqlcommenter style, values URL-encoded)."""
    pairs: dict[str, str] = {}
    for comment in _SQL_COMMENT.findall(statement):
        for key, value in _SQLCOMMENTER_PAIR.findall(comment):
            pairs[key] = unquote(value)
    return pairs


def _pg_statement_context(statement: str) -> tuple[str, str, str, dict[str, str]]:
    """(trace_id, span_id, tool_call_id, sqlcommenter attributes) carried by a statement."""
    comment = _sqlcommenter(statement)
    trace = find_traceparent(comment.get("traceparent", "")) or find_traceparent(
        " ".join(_SQL_COMMENT.findall(statement))
    )
    tool_call_id = comment.get(CORR_TOOL_CALL_ID) or comment.get("tool_call_id", "")
    attrs = {f"sqlcommenter.{k}": v for k, v in comment.items() if k not in ("traceparent", "tracestate")}
    return (*(trace or ("", "")), tool_call_id, attrs)


def _parse_pgaudit_csv(text: str) -> dict[str, str]:
    """The AUDIT CSV: 7 fixed fields, then STATEMENT, PARAMETER and (log_rows) ROWS.

    pgaudit quotes a field only when it holds a comma, quote or newline, doubling
    inner quotes: exactly what the csv module reads, embedded newlines included.
    """
    row = next(csv.reader(io.StringIO(text, newline="")), [])
    if len(row) < len(_PG_AUDIT_FIELDS):
        raise DecodeError(
            f"pgaudit: AUDIT record has {len(row)} fields, expected at least 7 "
            "(AUDIT_TYPE,STATEMENT_ID,SUBSTATEMENT_ID,CLASS,COMMAND,OBJECT_TYPE,OBJECT_NAME)"
        )
    fields = dict(zip(_PG_AUDIT_FIELDS, row))
    if fields["audit_type"] not in ("SESSION", "OBJECT"):
        raise DecodeError(f"pgaudit: AUDIT_TYPE is {fields['audit_type']!r}, expected SESSION or OBJECT")
    for key in ("statement_id", "substatement_id"):
        if not fields[key].isdigit():
            raise DecodeError(f"pgaudit: {key.upper()} is {fields[key]!r}, expected an integer")
    if not fields["command"]:
        raise DecodeError("pgaudit: COMMAND field is empty")
    rest = row[len(_PG_AUDIT_FIELDS) :]
    fields["statement"] = rest[0] if rest else ""
    fields["parameter"] = rest[1] if len(rest) > 1 else ""
    fields["rows"] = rest[2] if len(rest) > 2 else ""
    return fields


def _pg_common(rec: _PgRecord, ctx: _Ctx, received_at: datetime | None) -> dict[str, Any]:
    """Event fields every pg record shares: principal, time, correlation from the prefix."""
    ts, zone = _pg_ts(rec.fields)
    if ts is None:
        if received_at is None:
            raise DecodeError("pgaudit: record has no timestamp (log_line_prefix without %m/%t/%n) and no receive time")
        ts = received_at
    user = rec.fields.get("user", "")
    return {
        "ts": ts,
        "principal": "" if user == "[unknown]" else user,
        "correlation": _compact(
            [(CORR_PG_PID, rec.fields.get("pid")), (CORR_PG_SESSION_ID, rec.fields.get("session"))]
        ),
        "attributes": _compact(
            [
                ("pg.database", rec.fields.get("db")),
                ("pg.application", rec.fields.get("app")),
                ("pg.client", rec.fields.get("host") or rec.fields.get("remote")),
                ("pg.severity", rec.severity),
                ("pg.timezone", zone),
                ("ts_source", "received" if not (rec.fields.get("ts") or rec.fields.get("epoch")) else ""),
            ]
        ),
    }


def _line_hash(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def _pg_audit_event(rec: _PgRecord, ctx: _Ctx, received_at: datetime | None) -> Event:
    audit = _parse_pgaudit_csv(rec.message[len("AUDIT:") :].lstrip())
    common = _pg_common(rec, ctx, received_at)
    trace_id, span_id, tool_call_id, comment_attrs = _pg_statement_context(audit["statement"])
    correlation = common["correlation"] | _compact(
        [(CORR_PG_STATEMENT_ID, f"{audit['statement_id']}.{audit['substatement_id']}"), (CORR_TOOL_CALL_ID, tool_call_id)]
    )
    attributes = common["attributes"] | comment_attrs | _compact(
        [
            ("pg.audit_type", audit["audit_type"]),
            ("pg.class", audit["class"]),
            ("pg.object_type", audit["object_type"]),
            ("pg.rows", audit["rows"]),
            ("statement", audit["statement"][:2048]),
        ]
    )
    return _audit_event(
        ctx,
        SOURCE_PGAUDIT,
        # statement ids are per backend: the line hash (timestamp, pid, text) makes them global
        event_id=stable_id(SOURCE_PGAUDIT, audit["statement_id"], audit["substatement_id"], _line_hash(rec.raw)),
        ts=common["ts"],
        name=audit["command"],
        principal=common["principal"],
        action=audit["command"],
        resource=audit["object_name"] or audit["object_type"] or audit["class"],
        # pgaudit logs statements it let run; a record at error severity is the exception
        outcome="error" if rec.severity in _PG_ERROR_SEVERITIES else "allow",
        trace_id=trace_id,
        span_id=span_id,
        tool_call_id=tool_call_id,
        correlation=correlation,
        attributes=attributes,
    )


def _pg_error_event(rec: _PgRecord, ctx: _Ctx, received_at: datetime | None) -> Event:
    """A statement PostgreSQL refused (ERROR + its STATEMENT line): deny for missing privilege."""
    common = _pg_common(rec, ctx, received_at)
    denied = _PG_DENIED.search(rec.message)
    verb = _SQL_VERB.match(rec.statement)
    trace_id, span_id, tool_call_id, comment_attrs = _pg_statement_context(rec.statement)
    denial = denied or rec.message.startswith(("permission denied", "must be owner"))
    return _audit_event(
        ctx,
        SOURCE_PGAUDIT,
        event_id=stable_id(SOURCE_PGAUDIT, "error", _line_hash(rec.raw)),
        ts=common["ts"],
        name=rec.message[:200],
        principal=common["principal"],
        action=verb.group(1).upper() if verb else rec.severity,
        resource=denied.group(1).strip('"') if denied else "",
        outcome="deny" if denial else "error",
        error_type=rec.fields.get("sqlstate", ""),
        trace_id=trace_id,
        span_id=span_id,
        tool_call_id=tool_call_id,
        correlation=common["correlation"] | _compact([(CORR_TOOL_CALL_ID, tool_call_id)]),
        attributes=common["attributes"] | comment_attrs | _compact([("error", rec.message), ("statement", rec.statement[:2048])]),
    )


def _pg_parse(text: str, line: re.Pattern[str]) -> _PgRecord | None:
    m = line.match(text)
    if m:
        groups = {k: v for k, v in m.groupdict().items() if v is not None and k not in ("severity", "message")}
        return _PgRecord(text, groups, m.group("severity"), m.group("message"))
    if text.startswith("AUDIT:"):  # prefixless, as pgaudit's README shows it
        return _PgRecord(text, {}, "LOG", text)
    m = _PG_BARE.match(text)
    return _PgRecord(text, {}, m.group("severity"), m.group("message")) if m else None


def _pg_records(text: str, line: re.Pattern[str]) -> list[_PgRecord | str]:
    """Split a log chunk into records; a line that starts no record continues the previous
    one (multi-line statements). Unparseable leading text is returned as a plain string."""
    out: list[_PgRecord | str] = []
    for physical in text.splitlines():
        rec = _pg_parse(physical, line)
        if rec is not None:
            out.append(rec)
        elif out and isinstance(out[-1], _PgRecord):
            prev = out[-1]
            prev.raw += "\n" + physical
            prev.message += "\n" + physical
        elif physical.strip():
            out.append(physical)
    return out


def _attach_followers(records: list[_PgRecord | str]) -> list[_PgRecord | str]:
    """Fold STATEMENT/DETAIL/... lines into the ERROR they explain (same backend)."""
    out: list[_PgRecord | str] = []
    for rec in records:
        prev = out[-1] if out else None
        if (
            isinstance(rec, _PgRecord)
            and rec.severity in _PG_FOLLOWERS
            and isinstance(prev, _PgRecord)
            and prev.severity in _PG_ERROR_SEVERITIES
            and prev.fields.get("pid") == rec.fields.get("pid")
        ):
            if rec.severity == "STATEMENT":
                prev.statement = rec.message
            prev.raw += "\n" + rec.raw
            continue
        out.append(rec)
    return out


def _decode_pg_record(rec: _PgRecord | str, ctx: _Ctx, received_at: datetime | None) -> DecodeResult:
    if isinstance(rec, str):
        return _failure(rec.encode(), "pgaudit: line does not match log_line_prefix and is not an AUDIT: record", SOURCE_PGAUDIT)
    raw = rec.raw.encode()
    if rec.message.startswith("AUDIT:"):
        return _guarded(raw, SOURCE_PGAUDIT, lambda: [_pg_audit_event(rec, ctx, received_at)])
    if rec.severity in _PG_ERROR_SEVERITIES:
        return _guarded(raw, SOURCE_PGAUDIT, lambda: [_pg_error_event(rec, ctx, received_at)])
    return _failure(raw, f"pgaudit: {rec.severity} record is neither a pgaudit AUDIT record nor an error", SOURCE_PGAUDIT)


def decode_pgaudit(
    payload: bytes | str,
    *,
    origin: str = "",
    tenant: str = "default",
    log_line_prefix: str | re.Pattern[str] = DEFAULT_PG_LOG_LINE_PREFIX,
    received_at: datetime | None = None,
) -> DecodeResult:
    """PostgreSQL log text holding pgaudit records (one line or a chunk of a log file).

    ``log_line_prefix`` is the server setting (translated by ``pg_prefix_regex``)
    or a compiled regex with the same group names. Records with no time in their
    prefix take ``received_at`` (the Kafka timestamp, say).
    """
    text = payload.decode("utf-8", errors="replace") if isinstance(payload, bytes) else payload
    line = log_line_prefix if isinstance(log_line_prefix, re.Pattern) else pg_prefix_regex(log_line_prefix)
    ctx = _Ctx(origin, tenant)
    result = DecodeResult()
    for rec in _attach_followers(_pg_records(text, line)):
        result.extend(_decode_pg_record(rec, ctx, received_at))
    if not result.events and not result.failures:
        return _failure(text.encode(), "pgaudit: empty record", SOURCE_PGAUDIT)
    return result


def _pg_jsonlog_event(doc: Mapping[str, Any], ctx: _Ctx) -> Event:
    """PostgreSQL 15+ ``log_destination = jsonlog``: the prefix fields are JSON keys."""
    fields = _compact(
        [
            ("ts", _str(doc, "timestamp")),
            ("pid", _str(doc, "pid")),
            ("user", _str(doc, "user")),
            ("db", _str(doc, "dbname")),
            ("app", _str(doc, "application_name")),
            ("host", _str(doc, "remote_host")),
            ("session", _str(doc, "session_id")),
            ("sqlstate", _str(doc, "state_code")),
        ]
    )
    rec = _PgRecord(
        raw=orjson.dumps(doc, option=orjson.OPT_SORT_KEYS).decode(),
        fields=fields,
        severity=_str(doc, "error_severity"),
        message=_str(doc, "message"),
        statement=_str(doc, "statement"),
    )
    if rec.message.startswith("AUDIT:"):
        return _pg_audit_event(rec, ctx, None)
    if rec.severity in _PG_ERROR_SEVERITIES:
        return _pg_error_event(rec, ctx, None)
    raise DecodeError(f"pgaudit: jsonlog {rec.severity} record is neither a pgaudit AUDIT record nor an error")


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
    to_event: Callable[[Mapping[str, Any], _Ctx], Event]


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
    SOURCE_PGAUDIT, lambda d: "error_severity" in d and isinstance(d.get("message"), str), _single, _pg_jsonlog_event
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


def _looks_like_pg(text: str, line: re.Pattern[str]) -> bool:
    return "AUDIT:" in text or bool(line.match(text)) or bool(_PG_BARE.match(text))


def decode_audit(
    payload: bytes,
    *,
    origin: str = "",
    tenant: str = "default",
    log_line_prefix: str | re.Pattern[str] = DEFAULT_PG_LOG_LINE_PREFIX,
    received_at: datetime | None = None,
) -> DecodeResult:
    """Detect the format of one audit record (or file) and decode it; never raises.

    ``tenant`` is used when the record names none; ``log_line_prefix`` and
    ``received_at`` only matter for PostgreSQL log text (see ``decode_pgaudit``).
    """
    try:
        stripped = payload.strip()
        if not stripped:
            return _failure(payload, "empty record", SOURCE_UNKNOWN)
        if stripped[:1] in (b"{", b"["):
            return _decode_json(payload, _Ctx(origin, tenant))
        text = stripped.decode("utf-8", errors="replace")
        line = log_line_prefix if isinstance(log_line_prefix, re.Pattern) else pg_prefix_regex(log_line_prefix)
        if _looks_like_pg(text, line):
            return decode_pgaudit(text, origin=origin, tenant=tenant, log_line_prefix=line, received_at=received_at)
        return _failure(
            payload, "unrecognised audit record: not JSON and not a PostgreSQL log line with an AUDIT: record", SOURCE_UNKNOWN
        )
    except Exception as e:  # the contract: a bad record never stops the pipeline
        return _failure(payload, f"audit decoder error ({type(e).__name__}: {e})", SOURCE_UNKNOWN)

