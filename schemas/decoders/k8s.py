"""Kubernetes ``audit.k8s.io/v1`` audit Events (log or webhook backend).

Every stage decodes, but only ResponseComplete and Panic carry an outcome. The
others get ``attributes["stage"]`` and ``attributes["final"] = "false"`` and an
empty outcome unless the authorizer already forbade the request; joins and
detectors must use final events only. Keeping them (rather than dropping them)
keeps a watch that never completes visible and never discards input silently.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from schemas.decoders.audit_base import (
    _audit_event,
    _compact,
    CORR_K8S_AUDIT_ID,
    CORR_K8S_CREDENTIAL_ID,
    CORR_K8S_OBJECT_UID,
    CORR_K8S_POD_NAME,
    CORR_K8S_POD_UID,
    CORR_K8S_USER_UID,
    _Ctx,
    find_traceparent,
    _get,
    _K8S_FINAL_STAGES,
    _parse_ts,
    _require,
    SOURCE_K8S,
    _str,
)
from schemas.errors import DecodeError
from schemas.events import Event, stable_id


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
