"""``agentwatch replay``: the live detectors, offline, over recorded files.

Accepted files: OTLP JSON lines as the OpenTelemetry Collector's file exporter
writes them (one ExportTraceServiceRequest per line), native JSON events (an
object, an array, or JSON lines), and audit records (Kubernetes audit JSON
lines, a CloudTrail ``{"Records": [...]}`` file, OCSF, PostgreSQL logs holding
pgaudit records: stderr text with any known prefix, or jsonlog).
Each record goes through the same ingest, correlate and detect stages as in
the worker, in event time; at end of input every window closes and every
timer fires. Each alert is written once, in its final state, as one JSON line.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Hashable, Iterator
from datetime import datetime
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from detectors.policy import Policy
from schemas.alerts import Alert
from schemas.decoders import DecodeResult
from schemas.decoders.audit import AuditDecoder, Stitched, decode_audit
from schemas.decoders.native import decode_native
from schemas.decoders.otlp import decode_otlp
from schemas.decoders.pgaudit import Headers, PgLogConfig, looks_like_pg_text, pg_log_records
from schemas.errors import AgentwatchError
from streams.stages import CorrelateStage, DeadLetter, DetectStage, IngestStage, RawRecord

_OTLP_MARKERS = (b'"resourceSpans"', b'"resource_spans"')
_AUDIT_MARKERS = (b'"audit.k8s.io/', b'"Records"', b'"eventSource"', b'"class_uid"', b"AUDIT:", b'"kind":"audit"',
                  b'"kind": "audit"', b'"error_severity"')


def classify(payload: bytes, pg: PgLogConfig = PgLogConfig()) -> str:
    """Which input a recorded record belongs to: "otlp", "audit" or "native" (the
    live worker reads them from three topics; a file mixes them)."""
    head = payload.lstrip()[:1]
    if head not in (b"{", b"["):
        # a PostgreSQL server log (any record, by its shape), else binary: an otlp_proto dump
        return "audit" if _is_pg_text(payload, pg) else "otlp"
    if any(m in payload for m in _OTLP_MARKERS):
        return "otlp"
    if any(m in payload for m in _AUDIT_MARKERS):
        return "audit"
    return "native"


def decode_any(payload: bytes, *, origin: str = "", pg: PgLogConfig = PgLogConfig()) -> DecodeResult:
    """Pick the decoder for one recorded record by what it contains; PostgreSQL logs
    are read as the server described by ``pg`` writes them (prefix, log_timezone)."""
    kind = classify(payload, pg)
    if kind == "audit":
        return decode_audit(payload, origin=origin, pg=pg)
    return (decode_otlp if kind == "otlp" else decode_native)(payload, origin=origin)


class _ReplayDecoder:
    """``decode_any`` with every PostgreSQL record of a file fed through one audit
    decoder, so a backend's connection record names the user of its later records
    (prefixes without %u) as it does in the worker."""

    def __init__(self, pg: PgLogConfig = PgLogConfig()) -> None:
        self.pg = pg
        self.audit = AuditDecoder(pg)

    def __call__(self, payload: bytes, *, origin: str = "") -> DecodeResult:
        return decode_any(payload, origin=origin, pg=self.pg)

    def feed(self, payload: bytes, *, stream: Hashable, offset: int, origin: str = "",
             received_at: datetime | None = None, wall: float = 0.0, headers: Headers = ()) -> list[Stitched]:
        if classify(payload, self.pg) != "audit":
            return [Stitched(decode_any(payload, origin=origin, pg=self.pg), offset)]
        return self.audit.feed(payload, stream=stream, offset=offset, origin=origin, received_at=received_at,
                               wall=wall, headers=headers)

    def flush(self, wall: float, *, force: bool = False) -> list[tuple[Hashable, Stitched]]:
        return self.audit.flush(wall, force=force)


def _is_pg_text(payload: bytes, pg: PgLogConfig = PgLogConfig()) -> bool:
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return looks_like_pg_text(text, pg)


def read_records(path: Path, pg: PgLogConfig = PgLogConfig()) -> Iterator[RawRecord]:
    """A whole-file JSON document is one record; otherwise each line is one."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise AgentwatchError(f"{path}: cannot read ({exc.strerror})") from None
    name = str(path)
    stripped = data.strip()
    if stripped[:1] in (b"{", b"[") and b"\n" in stripped:
        try:
            orjson.loads(stripped)
        except orjson.JSONDecodeError:
            pass
        else:
            yield RawRecord(name, -1, 0, stripped)
            return
    if _is_pg_text(stripped.split(b"\n", 1)[0], pg):
        # a PostgreSQL log: a record is its line, its continuation lines and its STATEMENT/DETAIL records
        for n, record in enumerate(pg_log_records(data.decode("utf-8", errors="replace"), pg), start=1):
            yield RawRecord(name, -1, n, record.encode())
        return
    for lineno, line in enumerate(data.splitlines(), start=1):
        if line.strip():
            yield RawRecord(name, -1, lineno, line)


def records_in_event_time(paths: list[Path], pg: PgLogConfig = PgLogConfig()) -> list[RawRecord]:
    """Every record of every file, files interleaved by event time.

    Recorded inputs come as one file per source (spans, approvals, audit logs),
    while the detectors judge in event time with a bounded allowed lateness: an
    approval file read after the whole span file would be "late" by the length
    of the recording. So files are merged by each record's earliest event time,
    as a live broker would have delivered them, while each file keeps its own
    record order (a batch holding an agent span still follows its children).
    """
    streams: list[list[tuple[float, int, RawRecord]]] = []
    for path in paths:
        recs: list[tuple[float, int, RawRecord]] = []
        last = -math.inf
        for rec in read_records(path, pg):
            decoded = decode_any(rec.value, origin=rec.topic, pg=pg)
            # an undecodable record keeps its place after its predecessor
            last = min((e.ts_seconds for e in decoded.events), default=last)
            recs.append((last, len(recs), rec))
        streams.append(recs)
    return [rec for _, _, rec in heapq.merge(*streams, key=lambda t: t[0])]


@dataclass
class ReplayResult:
    alerts: list[Alert] = field(default_factory=list)
    events: int = 0
    dead: list[DeadLetter] = field(default_factory=list)


def replay(paths: list[Path], policy: Policy, pg: PgLogConfig = PgLogConfig()) -> ReplayResult:
    """``pg`` describes the PostgreSQL server that wrote any log among ``paths`` (the
    worker's AGENTWATCH_PG_LOG_* settings): zone abbreviations in its times resolve in
    its log_timezone, so a replay gives the event times the live worker gives."""
    for p in paths:
        if not p.is_file():
            raise AgentwatchError(f"{p}: no such file")
    ingest = IngestStage({}, default=_ReplayDecoder(pg))
    correlate = CorrelateStage(policy)
    detect = DetectStage(policy)
    latest: dict[str, Alert] = {}
    result = ReplayResult()

    def keep(alerts: list[Alert]) -> None:
        for a in alerts:
            latest[a.alert_id] = a

    for rec in [*records_in_event_time(paths, pg), None]:
        # None: the end, where records still open (an ERROR awaiting followers) are decoded
        routed = ingest.process([rec]) if rec is not None else ingest.tick(math.inf)
        result.events += routed.events
        result.dead.extend(routed.dead)
        batch = [ev for evs in routed.by_trace.values() for ev in evs]
        attributed = correlate.process_local(batch)
        attributed += [ev for evs in routed.by_agent.values() for ev in evs]
        keep(detect.process(attributed))
    keep(detect.process(correlate.finish_local()))
    keep(detect.finish())
    result.alerts = sorted(latest.values(), key=lambda a: (a.first_seen, a.alert_id))
    return result
