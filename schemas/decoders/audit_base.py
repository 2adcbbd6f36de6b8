"""What every audit decoder shares: source names, correlation keys, field access,
time parsing, and turning one record's problems into a ``Failure``.

One module per audit format (``schemas.decoders.k8s``, ``cloudtrail``, ``ocsf``,
``pgaudit``, ``native_audit``) builds on these; ``schemas.decoders.audit``
detects the format and dispatches.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import orjson
from pydantic import ValidationError

from schemas.decoders import DecodeResult, Failure
from schemas.errors import DecodeError
from schemas.events import Event, EventKind

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
    pg: Any = None  # schemas.decoders.pgaudit.PgLogConfig for PostgreSQL records (None: its defaults)


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
_HEX32 = re.compile(r"^[0-9a-fA-F]{32}$")
_HEX16 = re.compile(r"^[0-9a-fA-F]{16}$")


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


def _guarded(raw: bytes, source: str, build: Callable[[], list[Event | None]]) -> DecodeResult:
    """Run one record's decoding; any problem becomes that record's Failure, never an exception.
    A None from ``build`` is a valid record with nothing to monitor (counted as skipped)."""
    try:
        built = build()
        events = [e for e in built if e is not None]
        return DecodeResult(events=events, skipped=len(built) - len(events))
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
