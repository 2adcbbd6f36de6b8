"""The span/audit join: which tool call of which agent caused this audit record.

Two streams meet here, in event time: spans (what agents say they did) and
audit events (what the systems they act on recorded). They are matched by the
ids both sides carry:

==================  =====================================  ==========================
key                 audit side                             span side
==================  =====================================  ==========================
trace + span id     W3C traceparent (k8s auditID, SQL      the span with that span id
                    comment, OCSF trace.uid/span.uid,      (its nearest tool-call
                    native trace_id/span_id)               ancestor is the cause)
trace id alone      OCSF trace.uid without a span          the tool call whose time
                                                           span contains the audit ts,
                                                           else the nearest span
``aws.request_id``  CloudTrail requestID                   span attribute aws.request_id
tool call id        ``gen_ai.tool.call.id``                ``tool_call_id``
==================  =====================================  ==========================

Partitioning (the live worker runs this per partition, so both inputs must be
partitioned by the same key; :func:`join_partition_key` is that key): events
with a trace id are keyed by trace. An audit record with no trace id
(CloudTrail) is keyed by a bucket of its best secondary key, and every span
that carries a secondary key also sends a small *index copy* of itself
(:func:`index_copies`) keyed by the same bucket. Where the two meet, the audit
event learns its span's trace and span id and is **re-keyed** to the trace
(``take_rekeyed``: the worker sends it back to the trace-keyed topic, replay
feeds it straight back), so the agent identity and the tool call's
confirmation are decided in one place, the trace, by the same code whatever
key found the match. A tool call id the identity resolver recovers later
(from the calls a model or chain span offered) sends its index copy then, the
same way round (``take_rekeyed``, keyed by its bucket). A bucket rather than
the raw id keys the index: every tool call id is distinct, and one Kafka
message per id would cost faust far more than the copies themselves.

Timing: either side may arrive first and out of order. An audit event waits
up to ``join.window_s`` of event time (past the watermark, i.e. plus the join's
allowed lateness) for its span; an auditable tool call (policy
``detectors.unconfirmed_action.tools``) that succeeded waits as long for its
audit record. Decisions are annotations on the events themselves,
``attributes["join"]``:

* ``matched``      audit: joined; gains ``agent_id`` (identity ``join``), the causing
                   ``tool_call_id`` and ``correlation["joined_span_id" / "joined_event_id" /
                   "join.via"]``. Tool call: its audit record arrived
                   (``correlation["join.audit_event_id"]``).
* ``unattributed`` audit: no span explains it; its agent comes from the identity map.
* ``unconfirmed``  auditable tool call reported success and no audit record came.
* ``late``         arrived after the watermark: matched at once if the other side is
                   still known, else passed on marked, never dropped (and counted).
* ``not_final``    Kubernetes stages before ResponseComplete: stored, never joined.

``attributes["agent_principal"] = "true"`` marks audit principals that are
agents (the identity map or ``join.agent_principals``): the join-derived
detectors (detectors/join_detectors.py) turn annotations into findings in the
agent-keyed stage.

Auditable tool calls are *held* until confirmed or timed out, as the identity
resolver holds spans awaiting their agent: the verdict then travels on the
event itself (one stored row, one event for the detectors) instead of a second
copy that at-least-once deduplication by event id would discard.

State snapshots: ``joiner.snapshot() -> bytes`` and ``Joiner.restore(policy,
data)`` carry the span index of each trace, audits and tool calls waiting for
the other side, the secondary-key index, the timers, the watermark and any
output not yet drained; the format and its errors are those of
detectors/state.py (JSON with a version, ``StateError`` on anything
unreadable). Take it between calls (after ``drain`` and ``take_rekeyed``).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

from detectors import state as st
from detectors.policy import MATCH_CACHE_SIZE, Policy
from detectors.windows import FOREVER, DeadlineQueue, ExpirySet, TimerQueue, Watermark
from schemas.events import Event, EventKind, IdentitySource, stable_id

# annotation keys and values
JOIN = "join"
MATCHED = "matched"
UNATTRIBUTED = "unattributed"
UNCONFIRMED = "unconfirmed"
LATE = "late"
NOT_FINAL = "not_final"
AGENT_PRINCIPAL = "agent_principal"
INDEX = "join.index"  # marks an index copy: join state only, never forwarded or stored
INDEX_VALUE = "join.key"
VIA = "join.via"
JOINED_SPAN = "joined_span_id"
JOINED_EVENT = "joined_event_id"
AUDIT_EVENT = "join.audit_event_id"

# secondary keys, in order of preference; each names the span attribute that
# carries the same id (schemas/decoders/audit_base.py CORR_* constants)
KEY_AWS_REQUEST_ID = "aws.request_id"
KEY_TOOL_CALL_ID = "gen_ai.tool.call.id"
SECONDARY_KEYS = (KEY_AWS_REQUEST_ID, KEY_TOOL_CALL_ID)
VIA_SPAN = "span_id"
VIA_TRACE = "trace_id"

# partitions a secondary-key bucket can spread over: more than any topic will have
JOIN_BUCKETS = 64

# the span attribute whose id a (slow) audit source's records carry: a span with it
# may be confirmed by that source, so it waits that source's allowed lateness
SOURCE_SPAN_KEYS = {"cloudtrail": KEY_AWS_REQUEST_ID, "ocsf": KEY_AWS_REQUEST_ID}


_AUDIT, _TOOL_CALL = EventKind.AUDIT, EventKind.TOOL_CALL

# --------------------------------------------------------------------------- keys


def bucket_key(name: str, value: str) -> str:
    return f"join-bucket-{zlib.crc32(f'{name}={value}'.encode()) % JOIN_BUCKETS}"


def span_secondary_keys(ev: Event) -> list[tuple[str, str]]:
    keys = []
    rid = ev.attributes.get(KEY_AWS_REQUEST_ID)
    if rid:
        keys.append((KEY_AWS_REQUEST_ID, rid))
    if ev.tool_call_id:
        keys.append((KEY_TOOL_CALL_ID, ev.tool_call_id))
    return keys


def audit_secondary_key(ev: Event) -> tuple[str, str] | None:
    for name in SECONDARY_KEYS:
        value = ev.correlation.get(name) or (ev.tool_call_id if name == KEY_TOOL_CALL_ID else "")
        if value:
            return name, value
    return None


def join_partition_key(ev: Event) -> str | None:
    """The key the correlate stage needs this event partitioned by, or None when
    it skips the trace-keyed stage (no trace, not an audit record)."""
    if ev.trace_id:
        return ev.trace_id
    if ev.kind is EventKind.AUDIT:
        key = audit_secondary_key(ev)
        # no key at all: any partition will do (only the identity map applies);
        # the principal keeps one principal's records in order
        return bucket_key(*key) if key else bucket_key("principal", ev.principal)
    return None


def index_copies(ev: Event) -> list[tuple[str, Event]]:
    """(partition key, copy) for each secondary key a span carries: just what the
    join needs to point an audit record at this span's trace."""
    if ev.kind is EventKind.AUDIT or not ev.trace_id or not ev.span_id:
        return []
    out = []
    for name, value in span_secondary_keys(ev):
        copy = Event(
            event_id=stable_id("join.index", ev.event_id, name),
            kind=ev.kind,
            ts=ev.ts,
            duration_ms=ev.duration_ms,
            trace_id=ev.trace_id,
            span_id=ev.span_id,
            source=ev.source,
            attributes={INDEX: name, INDEX_VALUE: value},
        )
        out.append((bucket_key(name, value), copy))
    return out


def is_index_copy(ev: Event) -> bool:
    return INDEX in ev.attributes


# --------------------------------------------------------------------------- state


def _start(ev: Event) -> float:
    return ev.ts_seconds - (ev.duration_ms or 0.0) / 1000.0


@dataclass(slots=True)
class _Span:
    start: float
    end: float
    parent: str
    event_id: str
    is_tool: bool
    tool_call_id: str
    resolved: bool = False
    agent_id: str = ""
    tenant: str = "default"
    agent_version: str = ""

    def distance(self, ts: float) -> float:
        return 0.0 if self.start <= ts <= self.end else min(abs(ts - self.start), abs(ts - self.end))


_new_object = object.__new__


def _new_span(start: float, end: float, parent: str, event_id: str, is_tool: bool, tool_call_id: str) -> _Span:
    """``_Span(start, end, parent, event_id, is_tool, tool_call_id)``, for the one span per event:
    a dataclass's __init__ runs through type.__call__, several times the cost of setting its
    slots here."""
    s = _new_object(_Span)
    s.start, s.end, s.parent, s.event_id, s.is_tool, s.tool_call_id = start, end, parent, event_id, is_tool, tool_call_id
    s.resolved, s.agent_id, s.tenant, s.agent_version = False, "", "default", ""
    return s


# a field added to _Span without its default above would make spans built here lack it
if _new_span(0.0, 1.0, "p", "e", True, "c") != _Span(0.0, 1.0, "p", "e", True, "c"):
    raise RuntimeError("_new_span is out of step with _Span's fields")


@dataclass(slots=True)
class _Trace:
    spans: dict[str, _Span] = field(default_factory=dict)
    # audit event id -> audit waiting for a span (its timer is armed)
    unmatched: dict[str, Event] = field(default_factory=dict)
    # span id -> matched audits waiting for that span's agent to be decided
    waiting: dict[str, list[Event]] = field(default_factory=dict)
    last_ts: float = 0.0
    extra: float = 0.0  # extra lateness of the slowest audit source a span of this trace expects
    # when it may next be forgotten: its deadline in the joiner's queue, None while not
    # queued. Not state: restore re-queues.
    due_at: float | None = None


def _new_trace() -> _Trace:
    """``_Trace()``, for the first span of each trace: a dataclass's __init__ runs through
    type.__call__ and a default factory per field."""
    tr = _new_object(_Trace)
    tr.spans, tr.unmatched, tr.waiting = {}, {}, {}
    tr.last_ts, tr.extra, tr.due_at = 0.0, 0.0, None
    return tr


# a field added to _Trace without its default above would make traces built here lack it
if _new_trace() != _Trace():
    raise RuntimeError("_new_trace is out of step with _Trace's fields")


@dataclass(slots=True)
class _IndexEntry:
    start: float
    end: float
    trace_id: str
    span_id: str


@dataclass(slots=True)
class _Confirm:
    """An auditable tool call waiting for its audit record."""

    held: Event | None = None  # the resolved tool call, held until decided
    audit_event_id: str = ""
    fired: bool = False


@dataclass(slots=True)
class JoinStats:
    matched: int = 0
    unattributed: int = 0
    confirmed: int = 0
    unconfirmed: int = 0
    late: int = 0
    rekeyed: int = 0


class Joiner:
    """Matches spans and audit events of the traces (and index buckets) it is fed.

    Feed order per batch, as CorrelateStage does: ``accept`` (all events; returns
    those for the identity resolver), then ``resolved`` (the resolver's output),
    then ``fire`` (timers at the watermark). Output events accumulate and are
    taken with ``drain``; audits matched through a secondary key with
    ``take_rekeyed`` (to be fed back keyed by their trace).
    """

    def __init__(self, policy: Policy) -> None:
        cfg = policy.join
        self.window_s = cfg.window_s
        lateness = cfg.allowed_lateness_s if cfg.allowed_lateness_s is not None else policy.allowed_lateness_s
        self.watermark = Watermark(lateness)
        # per-source lateness, as extra time past the watermark: only that source's records
        # (and the spans waiting for them) get it, everything else keeps the base lateness
        self._source_extra = cfg.extra_lateness(lateness)
        self._key_extra: dict[str, float] = {}
        for src, extra in self._source_extra.items():
            if src in SOURCE_SPAN_KEYS:
                key = SOURCE_SPAN_KEYS[src]
                self._key_extra[key] = max(self._key_extra.get(key, 0.0), extra)
        self._identity = [(e.principal, e.agent_id) for e in policy.identity_map]
        self._agent_principals = [e.principal for e in policy.identity_map] + list(cfg.agent_principals)
        self._auditable = list(policy.detectors.unconfirmed_action.tools)
        self._auditable_known: dict[str, bool] = {}  # tool name -> auditable (bounded)
        self._traces: dict[str, _Trace] = {}
        self._index: dict[tuple[str, str], list[_IndexEntry]] = {}
        self._index_waiting: dict[tuple[str, str], dict[str, Event]] = {}
        self._confirm: dict[tuple[str, str], _Confirm] = {}
        self._timers = TimerQueue()
        # when traces and index keys may be forgotten (their newest span plus the window):
        # deadlines in queues (ExpirySet), so expiring visits only what is due
        self._trace_due: DeadlineQueue[str] = DeadlineQueue()  # with _Trace.due_at
        self._index_due: ExpirySet[tuple[str, str]] = ExpirySet()
        self._out: list[Event] = []
        self._rekeyed: dict[str, list[Event]] = {}
        self.stats = JoinStats()

    # -- feeding -------------------------------------------------------------------------

    def accept(self, events: Iterable[Event], *, wall: float | None = None) -> list[Event]:
        """Take in a batch; return the events the identity resolver must see
        (everything but audit records and index copies)."""
        onward: list[Event] = []
        # the watermark, read once (Watermark.observe inline): within a batch only this loop
        # moves it, so its value changes only when an event raises the newest event time
        wm = self.watermark
        lateness, floor = wm.allowed_lateness_s, wm.floor
        newest = wm.max_event_ts
        value = wm.value
        for ev in events:
            # fields read from the event's __dict__: an Event's attribute reads go through
            # pydantic's __getattr__ hook, several times the cost of a dict lookup
            d = ev.__dict__
            ts = ev.ts_seconds
            on_time = ts >= value
            if not on_time:
                wm.late_events += 1
            if ts >= newest:
                wm.max_event_ts = newest = ts
                wm.wall_at_max = wall
                value = ts - lateness
                if floor > value:
                    value = floor
            kind = d["kind"]
            index_copy = INDEX in d["attributes"]
            if not on_time and kind is _AUDIT and not index_copy:
                extra = self._source_extra.get(d["source"], 0.0)
                on_time = extra > 0 and ts >= value - extra
            if not on_time:
                self.stats.late += 1
            if index_copy:
                self._accept_index(ev)
            elif kind is _AUDIT:
                self._accept_audit(ev, on_time)
            else:
                if d["trace_id"] and d["span_id"]:
                    self._accept_span(ev, d, ts, on_time)
                onward.append(ev)
        return onward

    def resolved(self, events: Iterable[Event]) -> None:
        """Spans whose agent is now decided: release what waited on them."""
        traces, confirm, out = self._traces, self._confirm, self._out
        for ev in events:
            d = ev.__dict__
            trace_id, span_id = d["trace_id"], d["span_id"]
            tr = traces.get(trace_id) if trace_id else None
            sp = tr.spans.get(span_id) if tr is not None else None
            if tr is not None and sp is not None:
                call_id = d["tool_call_id"]
                if call_id and call_id != sp.tool_call_id:
                    self._recovered_call_id(sp, ev)
                sp.resolved, sp.agent_id, sp.tenant = True, d["agent_id"], d["tenant"]
                sp.agent_version = d["agent_version"]
                if tr.waiting:
                    for audit in tr.waiting.pop(span_id, []):
                        self._release_matched(tr, audit, span_id)
            c = confirm.get((trace_id, span_id)) if confirm else None
            if c is None:
                out.append(ev)
            elif c.audit_event_id or c.fired:
                self._decide_tool(ev, c)
            else:
                c.held = ev

    def _recovered_call_id(self, sp: _Span, ev: Event) -> None:
        """A tool span whose call id the identity resolver found after the span came in
        (from the calls a model or chain span offered, detectors/identity.py): its
        audit records carry that id, and one that names the call by its id alone must
        find the span through the index, so an index copy goes round as ingest would
        have sent it had the id been on the span."""
        sp.tool_call_id = ev.tool_call_id
        for key, copy in index_copies(ev):
            if copy.attributes[INDEX] == KEY_TOOL_CALL_ID:
                self._rekeyed.setdefault(key, []).append(copy)

    def fire(self) -> None:
        """Fire the timers the watermark has passed; forget state nobody can need."""
        wm = self.watermark.value
        for t in self._timers.due(wm):
            kind = t.key[0]  # type: ignore[index]
            if kind == "audit":
                self._audit_timeout(t.key[1], t.payload)  # type: ignore[index,arg-type]
            elif kind == "confirm":
                self._confirm_timeout((t.key[1], t.key[2]))  # type: ignore[index]
        self._expire(wm)

    def drain(self) -> list[Event]:
        out, self._out = self._out, []
        return out

    def take_rekeyed(self) -> dict[str, list[Event]]:
        out, self._rekeyed = self._rekeyed, {}
        return out

    @property
    def pending_count(self) -> int:
        return (
            sum(len(t.unmatched) + sum(map(len, t.waiting.values())) for t in self._traces.values())
            + sum(len(w) for w in self._index_waiting.values())
            + sum(1 for c in self._confirm.values() if c.held is not None)
        )

    # -- state snapshots -----------------------------------------------------------------

    def snapshot(self) -> bytes:
        enc = st.Encoder()
        ev = enc.event
        traces = [[tid,
                   [[sid, s.start, s.end, s.parent, s.event_id, s.is_tool, s.tool_call_id, s.resolved, s.agent_id,
                     s.tenant, s.agent_version] for sid, s in tr.spans.items()],
                   [ev(a) for a in tr.unmatched.values()],
                   [[sid, [ev(a) for a in audits]] for sid, audits in tr.waiting.items()],
                   tr.last_ts, tr.extra] for tid, tr in self._traces.items()]
        state = {
            "watermark": self.watermark.to_state(),
            "traces": traces,
            "index": [[list(k), [[e.start, e.end, e.trace_id, e.span_id] for e in entries]]
                      for k, entries in self._index.items()],
            "index_waiting": [[list(k), [ev(a) for a in w.values()]] for k, w in self._index_waiting.items()],
            "confirm": [[list(k), ev(c.held) if c.held is not None else None, c.audit_event_id, c.fired]
                        for k, c in self._confirm.items()],
            "timers": self._timers.to_state(lambda p: p),
            "out": [ev(e) for e in self._out],
            "rekeyed": [[tid, [ev(e) for e in evs]] for tid, evs in self._rekeyed.items()],
            "stats": [self.stats.matched, self.stats.unattributed, self.stats.confirmed, self.stats.unconfirmed,
                      self.stats.late, self.stats.rekeyed],
        }
        return enc.dumps("join", state)

    @classmethod
    def restore(cls, policy: Policy, data: bytes) -> "Joiner":
        """A fresh joiner for ``policy`` holding the state ``snapshot`` wrote (StateError if unreadable)."""
        j = cls(policy)
        with st.reading("join", data) as (state, dec):
            j.watermark.load_state(st.mapping(state["watermark"]))
            for tid, spans, unmatched, waiting, last_ts, extra in st.seq(state["traces"]):
                tr = j._trace(st.text(tid))
                tr.last_ts, tr.extra = st.num(last_ts), st.num(extra)
                j._trace_due.schedule(st.text(tid), tr, tr.last_ts + j.window_s)
                for row in st.seq(spans):
                    sid, start, end, parent, event_id, is_tool, call_id, resolved, agent, tenant = row[:10]
                    version = row[10] if len(row) > 10 else ""  # snapshots before agent versions: ten fields
                    tr.spans[st.text(sid)] = _Span(st.num(start), st.num(end), st.text(parent), st.text(event_id),
                                                   st.boolean(is_tool), st.text(call_id), st.boolean(resolved),
                                                   st.text(agent), st.text(tenant), st.text(version))
                for ref in st.seq(unmatched):
                    a = dec.event(ref)
                    tr.unmatched[a.event_id] = a
                for sid, refs in st.seq(waiting):
                    tr.waiting[st.text(sid)] = [dec.event(r) for r in st.seq(refs)]
            for k, entries in st.seq(state["index"]):
                key = st.key(k)
                j._index[key] = [_IndexEntry(st.num(a), st.num(b), st.text(t), st.text(s))
                                 for a, b, t, s in st.seq(entries)]
                for e in j._index[key]:
                    j._index_due.touch(key, e.end + j.window_s)
            for k, refs in st.seq(state["index_waiting"]):
                j._index_waiting[st.key(k)] = {a.event_id: a for a in (dec.event(r) for r in st.seq(refs))}
            for k, held, audit_id, fired in st.seq(state["confirm"]):
                j._confirm[st.key(k)] = _Confirm(None if held is None else dec.event(held), st.text(audit_id),
                                                 st.boolean(fired))
            j._timers.load_state(state["timers"], lambda p: None if p is None else st.key(p))
            j._out = [dec.event(r) for r in st.seq(state["out"])]
            for tid, refs in st.seq(state["rekeyed"]):
                j._rekeyed[st.text(tid)] = [dec.event(r) for r in st.seq(refs)]
            j.stats = JoinStats(*(st.integer(n) for n in st.seq(state["stats"])))
        return j

    # -- spans ---------------------------------------------------------------------------

    def _trace(self, trace_id: str) -> _Trace:
        tr = self._traces.get(trace_id)
        if tr is None:
            tr = self._traces[trace_id] = _new_trace()
            self._trace_due.schedule(trace_id, tr, tr.last_ts + self.window_s)
        return tr

    def _accept_span(self, ev: Event, d: dict[str, Any], ts: float, on_time: bool) -> None:
        """A span (``d`` its fields, ``ts`` its time) into its trace's index."""
        trace_id, span_id = d["trace_id"], d["span_id"]
        tr = self._traces.get(trace_id)
        if tr is None:
            tr = self._trace(trace_id)
        if ts > tr.last_ts:
            tr.last_ts = ts
            self._trace_due.schedule(trace_id, tr, ts + self.window_s)
        is_tool = d["kind"] is _TOOL_CALL
        duration = d["duration_ms"]
        tr.spans[span_id] = _new_span(ts - (duration or 0.0) / 1000.0, ts, d["parent_span_id"], d["event_id"],
                                      is_tool, d["tool_call_id"])
        if self._key_extra:  # a slow audit source is configured (its records carry a span key)
            extra = max((self._key_extra.get(name, 0.0) for name, _ in span_secondary_keys(ev)), default=0.0)
            if extra > tr.extra:
                # this trace's requests are audited by a slow source: its auditable tool calls wait for it
                tr.extra = extra
                for sid, s in tr.spans.items():
                    if self._timers.armed(("confirm", trace_id, sid)):
                        self._timers.arm(("confirm", trace_id, sid), s.end + self.window_s + extra)
        if is_tool and self._auditable and d["outcome"] == "ok" and self._is_auditable(d["tool_name"]):
            if on_time:
                key = (trace_id, span_id)
                self._confirm.setdefault(key, _Confirm())
                self._timers.arm(("confirm", *key), ts + self.window_s + tr.extra)
            else:
                d["attributes"][JOIN] = LATE  # too late to wait for its audit record: say so
        # audits of this trace that were waiting for a span
        if tr.unmatched:
            for audit_id, audit in list(tr.unmatched.items()):
                sid = self._match_in_trace(tr, audit, final=False)
                if sid:
                    del tr.unmatched[audit_id]
                    self._timers.cancel(("audit", audit_id))
                    self._attach(tr, audit, sid, VIA_SPAN if sid == audit.span_id else VIA_TRACE)

    def _accept_index(self, ev: Event) -> None:
        key = (ev.attributes[INDEX], ev.attributes[INDEX_VALUE])
        entry = _IndexEntry(_start(ev), ev.ts_seconds, ev.trace_id, ev.span_id)
        self._index.setdefault(key, []).append(entry)
        self._index_due.touch(key, entry.end + self.window_s)
        for audit_id, audit in list(self._index_waiting.get(key, {}).items()):
            del self._index_waiting[key][audit_id]
            self._timers.cancel(("audit", audit_id))
            self._rekey(audit, entry, key[0])
        if not self._index_waiting.get(key, True):
            del self._index_waiting[key]

    # -- audits --------------------------------------------------------------------------

    def _accept_audit(self, ev: Event, on_time: bool) -> None:
        if self._is_agent_principal(ev.principal):
            ev.attributes[AGENT_PRINCIPAL] = "true"
        if ev.attributes.get("final") == "false":
            # an earlier stage of a Kubernetes request: its ResponseComplete is what joins
            self._unjoined(ev, NOT_FINAL)
            return
        if ev.trace_id:
            tr = self._trace(ev.trace_id)
            sid = self._match_in_trace(tr, ev, final=not on_time)
            if sid:
                via = ev.correlation.get(VIA) or (VIA_SPAN if sid == ev.span_id else VIA_TRACE)
                self._attach(tr, ev, sid, via)
            elif not on_time:
                self._unjoined(ev, LATE)
            else:
                tr.unmatched[ev.event_id] = ev
                self._timers.arm(("audit", ev.event_id), ev.ts_seconds + self.window_s, ("trace", ev.trace_id))
            return
        key = audit_secondary_key(ev)
        if key is None:
            # nothing on it can ever point at a span: decide now
            self._unattributed(ev)
            return
        entries = self._index.get(key)
        if entries:
            ts = ev.ts_seconds
            best = min(entries, key=lambda e: 0.0 if e.start <= ts <= e.end else min(abs(ts - e.start), abs(ts - e.end)))
            self._rekey(ev, best, key[0])
        elif not on_time:
            self._unjoined(ev, LATE)
        else:
            self._index_waiting.setdefault(key, {})[ev.event_id] = ev
            self._timers.arm(("audit", ev.event_id), ev.ts_seconds + self.window_s, ("index", key))

    def _match_in_trace(self, tr: _Trace, audit: Event, *, final: bool) -> str:
        """The span id this audit joins in ``tr``, or "" (not yet / none)."""
        if audit.span_id and audit.span_id in tr.spans:
            return audit.span_id  # the same ids: the same request, whatever the distance
        ts = audit.ts_seconds
        tools = [(sid, s) for sid, s in tr.spans.items() if s.is_tool and s.start <= ts <= s.end]
        if tools and not audit.span_id:
            # the innermost tool call running when the audited request happened
            return min(tools, key=lambda p: p[1].end - p[1].start)[0]
        if not final:
            return ""
        # waited the whole window: the exact span never came (unsampled, dropped);
        # the trace still tells whose request it was
        near = [(s.distance(ts), not s.is_tool, sid) for sid, s in tr.spans.items() if s.distance(ts) <= self.window_s]
        return min(near)[2] if near else ""

    def _attach(self, tr: _Trace, audit: Event, sid: str, via: str) -> None:
        audit.correlation.setdefault(VIA, via)
        if tr.spans[sid].resolved:
            self._release_matched(tr, audit, sid)
        else:
            tr.waiting.setdefault(sid, []).append(audit)

    def _release_matched(self, tr: _Trace, audit: Event, sid: str) -> None:
        span = tr.spans[sid]
        cause_id = self._tool_ancestor(tr, sid) or sid
        cause = tr.spans[cause_id]
        audit.agent_id = span.agent_id or audit.agent_id or "unknown"
        audit.identity = IdentitySource.JOIN
        audit.agent_version = span.agent_version or audit.agent_version
        if audit.tenant == "default":
            audit.tenant = span.tenant
        if cause.is_tool:
            audit.tool_call_id = cause.tool_call_id
        audit.correlation[JOINED_SPAN] = cause_id
        audit.correlation[JOINED_EVENT] = cause.event_id
        audit.attributes[JOIN] = MATCHED
        self.stats.matched += 1
        self._out.append(audit)
        c = self._confirm.get((audit.trace_id, cause_id))
        if c is None:  # not an auditable tool call, or already decided
            return
        c.audit_event_id = c.audit_event_id or audit.event_id
        self._timers.cancel(("confirm", audit.trace_id, cause_id))
        if c.held is not None:
            self._decide_tool(c.held, c)

    @staticmethod
    def _tool_ancestor(tr: _Trace, sid: str) -> str:
        hops = 0
        while sid and sid in tr.spans and hops < 256:
            if tr.spans[sid].is_tool:
                return sid
            sid = tr.spans[sid].parent
            hops += 1
        return ""

    def _rekey(self, audit: Event, entry: _IndexEntry, via: str) -> None:
        """Found through a secondary key: send it on to its trace, where the span is."""
        audit.trace_id, audit.span_id = entry.trace_id, entry.span_id
        audit.correlation[VIA] = via
        self.stats.rekeyed += 1
        self._rekeyed.setdefault(entry.trace_id, []).append(audit)

    def _audit_timeout(self, audit_id: str, where: tuple[str, object]) -> None:
        scope, key = where
        if scope == "trace":
            tr = self._traces.get(key)  # type: ignore[arg-type]
            audit = tr.unmatched.pop(audit_id, None) if tr is not None else None
            if tr is None or audit is None:
                return
            sid = self._match_in_trace(tr, audit, final=True)
            if sid:
                self._attach(tr, audit, sid, VIA_TRACE)
                return
        else:
            waiting = self._index_waiting.get(key, {})  # type: ignore[arg-type]
            audit = waiting.pop(audit_id, None)
            if not waiting:
                self._index_waiting.pop(key, None)  # type: ignore[arg-type]
            if audit is None:
                return
        self._unattributed(audit)

    def _unattributed(self, audit: Event) -> None:
        self.stats.unattributed += 1
        self._unjoined(audit, UNATTRIBUTED)

    def _unjoined(self, audit: Event, verdict: str) -> None:
        audit.attributes[JOIN] = verdict
        if not audit.agent_id:
            agent = next((a for pat, a in self._identity if fnmatchcase(audit.principal, pat)), "")
            audit.agent_id = agent or "unknown"
            audit.identity = IdentitySource.IDENTITY_MAP if agent else IdentitySource.UNKNOWN
        self._out.append(audit)

    # -- tool calls ----------------------------------------------------------------------

    def _confirm_timeout(self, key: tuple[str, str]) -> None:
        c = self._confirm.get(key)
        if c is None or c.audit_event_id:
            return
        c.fired = True
        if c.held is not None:
            self._decide_tool(c.held, c)
        # else: still waiting for its agent; ``resolved`` decides it

    def _decide_tool(self, ev: Event, c: _Confirm) -> None:
        if c.audit_event_id:
            ev.attributes[JOIN] = MATCHED
            ev.correlation[AUDIT_EVENT] = c.audit_event_id
            self.stats.confirmed += 1
        else:
            ev.attributes[JOIN] = UNCONFIRMED
            self.stats.unconfirmed += 1
        c.held = None
        self._confirm.pop((ev.trace_id, ev.span_id), None)
        self._out.append(ev)

    # -- housekeeping --------------------------------------------------------------------

    def _expire(self, wm: float) -> None:
        horizon = wm - self.window_s
        if wm == FOREVER:
            for tid in list(self._traces):
                tr = self._traces[tid]
                for sid, audits in tr.waiting.items():
                    # replay's end: the span never got an agent decided; say who we know
                    for a in audits:
                        tr.spans[sid].resolved = True
                        self._release_matched(tr, a, sid)
                tr.waiting.clear()
                if not tr.unmatched:
                    del self._traces[tid]
            self._index.clear()
            self._trace_due.clear()
            for tr in self._traces.values():  # the ones still awaited: no longer queued
                tr.due_at = None
            self._index_due.clear()
            return
        due = self._trace_due.pop_due_items(wm, self._traces)
        for tid in due:
            tr = self._traces[tid]
            if tr.last_ts + tr.extra < horizon and not tr.unmatched and not tr.waiting:
                del self._traces[tid]
            else:  # still awaited by an audit (its own timer ends that), or due at the edge
                self._trace_due.schedule(tid, tr, max(tr.last_ts + tr.extra + self.window_s, wm) + 1.0)
        for key in self._index_due.due(wm):
            extra = self._key_extra.get(key[0], 0.0)  # a slow source's index lives longer
            alive = [e for e in self._index.get(key, ()) if e.end >= horizon - extra]
            if alive:
                self._index[key] = alive
                self._index_due.touch(key, max(max(e.end for e in alive) + self.window_s + extra, wm + 1.0))
            else:
                self._index.pop(key, None)

    # -- policy --------------------------------------------------------------------------

    def _is_auditable(self, tool: str) -> bool:
        known = self._auditable_known.get(tool)
        if known is None:
            known = any(fnmatchcase(tool, p) for p in self._auditable)
            if len(self._auditable_known) >= MATCH_CACHE_SIZE:
                self._auditable_known.clear()
            self._auditable_known[tool] = known
        return known

    def _is_agent_principal(self, principal: str) -> bool:
        return bool(principal) and any(fnmatchcase(principal, p) for p in self._agent_principals)
