"""AWS CloudTrail records: a log file (``{"Records": [...]}``) or one record
(EventBridge, CloudWatch Logs). ``requestID`` joins the span attribute
``aws.request_id``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from schemas.decoders.audit_base import (
    _audit_event,
    _compact,
    CORR_AWS_ACCESS_KEY_ID,
    CORR_AWS_REQUEST_ID,
    CORR_CLOUDTRAIL_EVENT_ID,
    CORR_CLOUDTRAIL_SHARED_EVENT_ID,
    _Ctx,
    _get,
    _parse_ts,
    _require,
    SOURCE_CLOUDTRAIL,
    _str,
)
from schemas.errors import DecodeError
from schemas.events import Event, stable_id


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
