"""OCSF API Activity (class 6003) events, e.g. from Amazon Security Lake."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from schemas.decoders.audit_base import (
    _HEX16,
    _HEX32,
    _audit_event,
    _compact,
    _content_id,
    CORR_AWS_REQUEST_ID,
    CORR_OCSF_CORRELATION_UID,
    CORR_OCSF_UID,
    CORR_REQUEST_ID,
    CORR_SESSION_ID,
    _Ctx,
    _get,
    _parse_ts,
    _require,
    SOURCE_OCSF,
    _str,
)
from schemas.errors import DecodeError
from schemas.events import Event, stable_id


OCSF_API_ACTIVITY = 6003
# disposition_id values meaning the action did not go through because it was not allowed:
# 2 Blocked, 6 Dropped, 24 Access Revoked, 25 Rejected, 26 Unauthorized; 27 is Error.
_OCSF_DENY_DISPOSITIONS = frozenset({2, 6, 24, 25, 26})
_OCSF_ERROR_DISPOSITION = 27
# name before uid: for Kubernetes and IAM sources name is what the native decoders call principal
_OCSF_PRINCIPAL_PATHS = ("actor.user.name", "actor.user.uid", "actor.user.email_addr", "actor.process.name", "actor.app_name")


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
