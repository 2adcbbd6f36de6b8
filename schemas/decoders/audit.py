"""Audit records: detect the format of one record and decode it with its module
(``k8s``, ``cloudtrail``, ``ocsf``, ``pgaudit``, ``native_audit``).

``decode_audit`` takes one record (a Kafka message value, one line or one file)
and detects its format; the per-format functions are public for callers that
already know what they read. Every decoded record becomes one
``Event(kind=AUDIT)`` with ``principal`` / ``action`` / ``resource`` /
``outcome`` (allow | deny | error), a stable ``event_id`` derived from the
source's own id, and every id that can join it with the span that caused it:
W3C trace context in ``trace_id`` / ``span_id``, the rest in ``correlation``
under the keys named by the ``CORR_*`` constants (``audit_base``).

Detection order (first match wins, so it is unambiguous):

1. JSON ``apiVersion: audit.k8s.io/*`` with kind Event / EventList -> k8s_audit
2. JSON ``Records`` list, or ``eventVersion`` + ``eventSource``      -> cloudtrail
3. JSON ``class_uid``                                                -> ocsf
4. JSON PostgreSQL ``jsonlog`` (``error_severity`` + ``message``)    -> pgaudit
5. JSON ``kind: audit``                                              -> native_audit
6. text shaped like a PostgreSQL server log (any log_line_prefix)    -> pgaudit

Kubernetes stages and PostgreSQL's server records: see those modules. A
PostgreSQL record that is not an audit record is *skipped* (counted in
``DecodeResult.skipped``), never a failure; ``AuditDecoder.feed`` puts records
shipped in pieces back together.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from schemas.decoders import DecodeResult
from schemas.decoders.audit_base import (
    SOURCE_CLOUDTRAIL,
    SOURCE_K8S,
    SOURCE_NATIVE,
    SOURCE_OCSF,
    SOURCE_PGAUDIT,
    SOURCE_UNKNOWN,
    _Ctx,
    _failure,
    _guarded,
    _raw_of,
    find_traceparent,
)
from schemas.decoders.cloudtrail import _cloudtrail_event, _cloudtrail_records
from schemas.decoders.k8s import _k8s_event, _k8s_records
from schemas.decoders.native_audit import _native_event
from schemas.decoders.ocsf import _ocsf_event
from schemas.decoders.pgaudit import (
    AUTO_PREFIX,
    Headers,
    PgLogConfig,
    PgStitcher,
    Stitched,
    decode_pgaudit,
    looks_like_pg_text,
    pg_jsonlog_event,
    pg_prefix_regex,
)
from schemas.errors import DecodeError
from schemas.events import Event

# the names callers take from here, whichever module defines them
__all__ = [
    "AuditDecoder",
    "PgLogConfig",
    "Stitched",
    "decode_audit",
    "decode_cloudtrail",
    "decode_k8s_audit",
    "decode_native_audit",
    "decode_ocsf",
    "decode_pgaudit",
    "find_traceparent",
    "pg_prefix_regex",
]



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
             received_at: datetime | None = None, wall: float = 0.0, headers: Headers = ()) -> list[Stitched]:
        head = payload.lstrip()[:1]
        if head in (b"{", b"[") or not head:
            return [Stitched(self(payload, origin=origin, tenant=tenant, received_at=received_at), offset)]
        text = payload.decode("utf-8", errors="replace")
        # text without a prefix continues the stream's open record (some shippers trim the TAB)
        if not (text[:1] == "\t" or self.stitcher.is_open(stream) or looks_like_pg_text(text, self.pg)):
            return [Stitched(self(payload, origin=origin, tenant=tenant, received_at=received_at), offset)]
        try:
            return self.stitcher.feed(stream, text.rstrip("\n"), offset=offset, origin=origin, tenant=tenant,
                                      wall=wall, received_at=received_at, headers=headers)
        except Exception as e:  # never raise, whatever the input
            return [Stitched(_failure(payload, f"pgaudit: stitching error ({type(e).__name__}: {e})",
                                      SOURCE_PGAUDIT), offset)]

    def flush(self, wall: float, *, force: bool = False) -> list[tuple[Hashable, Stitched]]:
        return self.stitcher.flush(wall, force=force)

    def open_offsets(self) -> dict[Hashable, int]:
        return self.stitcher.open_offsets()

    def forget(self, streams: Callable[[Hashable], bool]) -> None:
        self.stitcher.forget(streams)
