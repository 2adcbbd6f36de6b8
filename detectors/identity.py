"""Agent identity across a trace, in event time.

Sources, in the order they decide a span's agent (docs/frameworks/README.md):

1. the policy's ``identity_rules`` (first match): attributes the span carries
   (its own, its resource's) mapped to an agent id, for anything unusual;
2. the span's own agent attribute, as its instrumentation profile reads it
   (``gen_ai.agent.id`` only where it is stable, else ``gen_ai.agent.name``,
   ``agent.name``); with W3C baggage and the baggage span processor every
   child span carries it, so nothing has to wait for the agent span;
3. the nearest agent ancestor in the same trace. An agent span named only by
   its span name (OpenInference AGENT spans; LangGraph's model node is one
   named ``agent`` inside the named graph) yields to the outermost such span of
   its subtree, unless an attribute-named agent span is nearer;
4. the resource: ``service.name`` (decided by the decoder; never the SDK's
   per-process random ``service.instance.id``).

In real traces the agent span ends last, so it is often exported in a later
batch than its children: a span whose ancestor chain is incomplete waits, up to
the allowed lateness, before falling back. When an agent span then turns up for
a trace whose spans already fell back (within another allowed lateness), the
resolver emits an ``identified`` notice: an ``agent`` event under the fallback
id, lifecycle ``identified``, ``target_agent_id`` the real agent, same trace.
The detection engine links the fallback's open alerts of that trace to the real
agent and says so in them.

The resolver is fed events of any traces (the live worker keys this stage by
trace id) and returns events whose ``agent_id`` is decided.

State snapshots: ``resolver.snapshot() -> bytes`` and
``IdentityResolver.restore(allowed_lateness_s, data, rules=...)`` (the same
arguments as the constructor) carry the span trees, the spans still waiting
for their agent, the offered tool calls and the watermark; the format and its
errors are those of detectors/state.py (JSON with a version, ``StateError`` on
anything unreadable). Take it between calls.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Protocol

import orjson

from detectors import state as st
from detectors.windows import FOREVER, DeadlineQueue, Watermark
from schemas.decoders.otel_profiles import OFFERED_CALLS_ATTR
from schemas.events import Event, EventKind, IdentitySource, stable_id

_MAX_HOPS = 256


class IdentityRuleLike(Protocol):
    """What the resolver needs of a policy identity rule (detectors.policy.IdentityRule)."""

    match: dict[str, str]
    agent_id: str


_TEMPLATE = re.compile(r"\{([^{}]+)\}")


@dataclass(frozen=True, slots=True)
class _Rule:
    match: tuple[tuple[str, str], ...]
    agent_id: str

    def apply(self, ev: Event) -> str:
        """The agent id this rule gives ``ev``; "" when it does not match (or a template key is missing)."""
        for key, pattern in self.match:
            value = _field(ev, key)
            if value is None or not fnmatchcase(value.lower(), pattern.lower()):
                return ""
        missing = False

        def fill(m: re.Match[str]) -> str:
            nonlocal missing
            value = _field(ev, m.group(1))
            if not value:
                missing = True
                return ""
            return value

        agent = _TEMPLATE.sub(fill, self.agent_id)
        return "" if missing else agent


def _field(ev: Event, key: str) -> str | None:
    """A rule's key: a kept span/resource attribute, or one of the event's own fields."""
    value = ev.attributes.get(key)
    if value is not None:
        return value
    if key in ("span.name", "name"):
        return ev.name
    if key in ("tenant", "source", "origin", "tool_name"):
        return str(getattr(ev, key))
    return None


_SPAN_NAME, _TOOL_CALL = IdentitySource.SPAN_NAME, EventKind.TOOL_CALL

IDENTIFIED = "identified"  # lifecycle of the notice that a fallback identity was really another agent


@dataclass(slots=True)
class _Trace:
    parent: dict[str, str] = field(default_factory=dict)  # span -> parent span ("" = root)
    agent: dict[str, str] = field(default_factory=dict)  # agent span -> agent id (attribute-named)
    weak: dict[str, str] = field(default_factory=dict)  # agent span named only by its span name -> name
    tenant: dict[str, str] = field(default_factory=dict)  # agent span -> tenant
    version: dict[str, str] = field(default_factory=dict)  # agent span -> agent version
    pending: list[Event] = field(default_factory=list)
    # fallback agent id -> events that took it, so a late agent span can be linked to them
    fell_back: dict[str, list[str]] = field(default_factory=dict)
    # tool calls offered by model/chain spans: [tool, fingerprint, alt fingerprint, call id]
    offers: list[list[str]] = field(default_factory=list)
    claimed: set[str] = field(default_factory=set)
    last_ts: float = 0.0
    seq: int = 0  # first-seen order: due traces are decided in it
    # when it is next due (decided at last_ts, forgotten the allowed lateness later): its
    # deadline in the resolver's queue, None while not queued. Not state: restore re-queues.
    due_at: float | None = None

    def claim_call(self, ev: Event) -> None:
        """Match a tool span with the call a model or chain span offered.

        A tool span without a call id takes the id of the first unclaimed offer with
        its tool name and argument fingerprint (the same call made six times is six
        offers with six ids, claimed in order); one with an id finds its offer by
        that id. A tool span that recorded a one-argument call as its bare value
        matches that value and takes the call's full fingerprint.
        """
        for tool, fp, alt, call_id in self.offers:
            if tool != ev.tool_name or ev.args_fingerprint not in (fp, alt):
                continue
            if ev.tool_call_id:
                if call_id == ev.tool_call_id:
                    ev.args_fingerprint = fp or ev.args_fingerprint
                    return
            elif call_id not in self.claimed:
                self.claimed.add(call_id)
                ev.tool_call_id = call_id
                ev.args_fingerprint = fp or ev.args_fingerprint
                return


_new_object = object.__new__


def _new_trace(seq: int) -> _Trace:
    """``_Trace(seq=seq)``, for the first span of each trace: a dataclass's __init__ runs
    through type.__call__ and a default factory per field."""
    tr = _new_object(_Trace)
    tr.parent, tr.agent, tr.weak, tr.tenant, tr.version = {}, {}, {}, {}, {}
    tr.pending, tr.fell_back, tr.offers, tr.claimed = [], {}, [], set()
    tr.last_ts, tr.seq, tr.due_at = 0.0, seq, None
    return tr


# a field added to _Trace without its default above would make traces built here lack it
if _new_trace(7) != _Trace(seq=7):
    raise RuntimeError("_new_trace is out of step with _Trace's fields")


class IdentityResolver:
    def __init__(self, allowed_lateness_s: float, *, rules: Sequence[IdentityRuleLike] = (),
                 version_attribute: str = "") -> None:
        self.watermark = Watermark(allowed_lateness_s)
        self._traces: dict[str, _Trace] = {}
        # a trace is due for its final decision at its newest span's time, and forgotten
        # the allowed lateness later (_Trace.due_at): queued at its deadlines, so expiring
        # visits due traces only (in no particular order: they are decided in first-seen order)
        self._due: DeadlineQueue[str] = DeadlineQueue()
        self._seq = 0
        self._rules = tuple(_Rule(tuple(r.match.items()), r.agent_id) for r in rules)
        # the policy's canary.version_attribute: the agent's version where a deployment puts it
        self._version_attr = version_attribute
        self._notices: list[Event] = []
        self.resolved_by_ancestor = 0
        self.fell_back = 0
        self.mapped_by_rule = 0

    @property
    def pending_count(self) -> int:
        return sum(len(t.pending) for t in self._traces.values())

    def process(self, events: Iterable[Event], *, wall: float | None = None) -> list[Event]:
        out: list[Event] = []
        out_ts: list[float] = []  # the event time of each of ``out``, for the closing sort
        touched: set[str] = set()
        ready: list[tuple[_Trace, Event]] = []  # tool spans decided now that may still need a call id
        traces, rules, version_attr = self._traces, self._rules, self._version_attr
        # the watermark, read once (Watermark.observe inline): within a batch only this loop
        # moves it, so its value changes only when an event raises the newest event time
        wm = self.watermark
        lateness, floor = wm.allowed_lateness_s, wm.floor
        newest = wm.max_event_ts
        value = wm.value
        for ev in events:
            # fields read from the event's __dict__: an Event's attribute reads go through
            # pydantic's __getattr__ hook, several times the cost of a dict lookup (writes still
            # go through the model, as they must)
            d = ev.__dict__
            ts = ev.ts_seconds
            if ts < value:
                wm.late_events += 1
            if ts >= newest:
                wm.max_event_ts = newest = ts
                wm.wall_at_max = wall
                value = ts - lateness
                if floor > value:
                    value = floor
            if rules:
                self._apply_rules(ev)
            if version_attr:
                version = d["attributes"].get(version_attr)
                if version:
                    ev.agent_version = version
            trace_id, span_id = d["trace_id"], d["span_id"]
            if not trace_id or not span_id:
                out.append(self._fallback(ev, None) if not d["agent_id"] else ev)
                out_ts.append(ts)
                continue
            tr = traces.get(trace_id)
            if tr is None:
                self._seq += 1
                tr = traces[trace_id] = _new_trace(self._seq)
            last = tr.last_ts
            if ts > last:
                tr.last_ts = last = ts
            # due at its newest span's time (DeadlineQueue.schedule, inline)
            due_at = tr.due_at
            if due_at is None or last < due_at:
                self._due.push(trace_id, last)
            tr.due_at = last
            tr.parent[span_id] = d["parent_span_id"]
            attributes = d["attributes"]
            if attributes:
                offers = attributes.get(OFFERED_CALLS_ATTR)
                if offers:
                    tr.offers.extend(orjson.loads(offers))
            agent_id = d["agent_id"]
            weak = d["identity"] is _SPAN_NAME
            if agent_id and d["is_agent_span"]:
                if weak:
                    tr.weak[span_id] = agent_id
                else:
                    tr.agent[span_id] = agent_id
                    if tr.fell_back:
                        self._relink(ev, tr)
                tr.tenant[span_id] = d["tenant"]
                if d["agent_version"]:
                    tr.version[span_id] = d["agent_version"]
            if agent_id and not weak:
                # carries its own identity; its descendants may still be waiting on it
                out.append(ev)
                out_ts.append(ts)
                if d["kind"] is _TOOL_CALL:
                    ready.append((tr, ev))
            else:
                tr.pending.append(ev)
            touched.add(trace_id)
        for tr, ev in ready:  # after the whole batch: an offer may come later in it
            if tr.offers:
                tr.claim_call(ev)
        later: list[Event] = []
        for trace_id in touched:
            later.extend(self._resolve(traces[trace_id], final=False))
        later.extend(self._expire())
        if self._notices:
            later.extend(self._notices)
            self._notices = []
        if later:
            out.extend(later)
            out_ts.extend([e.ts_seconds for e in later])
        # in event-time order: a span that waited for its agent span must not reach the detectors
        # after a later one that went straight through, or it would be late there. (A stable
        # sort of the positions by time: the order ``out.sort(key=ts_seconds)`` gives, with
        # each event's time read once.)
        order = sorted(range(len(out)), key=out_ts.__getitem__)
        return [out[i] for i in order]

    def advance(self, now: float) -> list[Event]:
        self.watermark.advance_to(now)
        return self._expire()

    def tick(self, wall_now: float) -> list[Event]:
        self.watermark.idle_advance(wall_now)
        return self._expire()

    def finish(self) -> list[Event]:
        return self.advance(FOREVER)

    def snapshot(self) -> bytes:
        enc = st.Encoder()
        traces = [[tid, tr.parent, tr.agent, tr.tenant, [enc.event(e) for e in tr.pending], tr.last_ts,
                   tr.weak, tr.fell_back, tr.offers, sorted(tr.claimed), tr.version]
                  for tid, tr in self._traces.items()]
        return enc.dumps("identity", {"watermark": self.watermark.to_state(), "traces": traces,
                                      "resolved_by_ancestor": self.resolved_by_ancestor,
                                      "fell_back": self.fell_back})

    @classmethod
    def restore(cls, allowed_lateness_s: float, data: bytes, *, rules: Sequence[IdentityRuleLike] = (),
                version_attribute: str = "") -> "IdentityResolver":
        """A fresh resolver holding the state ``snapshot`` wrote (StateError if unreadable)."""
        r = cls(allowed_lateness_s, rules=rules, version_attribute=version_attribute)
        with st.reading("identity", data) as (state, dec):
            r.watermark.load_state(st.mapping(state["watermark"]))
            r.resolved_by_ancestor = st.integer(state["resolved_by_ancestor"])
            r.fell_back = st.integer(state["fell_back"])
            for row in st.seq(state["traces"]):
                tid, parent, agent, tenant, pending, last_ts = row[:6]
                # snapshots written before span-named agents and offered calls have six fields
                weak, fell_back, offers, claimed = row[6:10] if len(row) >= 10 else ({}, {}, [], [])
                version = row[10] if len(row) >= 11 else {}  # before agent versions: ten fields
                r._seq += 1
                tr = r._traces[st.text(tid)] = _Trace(
                    parent=_strings(parent), agent=_strings(agent), tenant=_strings(tenant),
                    pending=[dec.event(ref) for ref in st.seq(pending)], last_ts=st.num(last_ts),
                    weak=_strings(weak), version=_strings(version),
                    fell_back={st.text(k): st.texts(v) for k, v in st.mapping(fell_back).items()},
                    offers=[st.texts(o) for o in st.seq(offers)], claimed=set(st.texts(claimed)), seq=r._seq)
                r._due.schedule(st.text(tid), tr, tr.last_ts)
        return r

    # -- internals -----------------------------------------------------------------------

    def _apply_rules(self, ev: Event) -> None:
        for rule in self._rules:
            agent = rule.apply(ev)
            if agent:
                ev.agent_id = agent
                ev.identity = IdentitySource.IDENTITY_MAP
                self.mapped_by_rule += 1
                return

    def _ancestor(self, tr: _Trace, ev: Event, *, final: bool) -> tuple[str, str] | None | bool:
        """(agent, span) that names ``ev``'s agent; None when the chain is complete
        without one; False while part of the chain is still missing.

        The nearest attribute-named agent span wins; failing that, the outermost
        span-named agent span (the span itself included, when it is one). On the
        final decision a missing link no longer matters: the outermost span-named
        agent seen so far is taken.
        """
        outer_weak: tuple[str, str] | None = None
        if ev.identity is IdentitySource.SPAN_NAME and ev.is_agent_span:
            outer_weak = (ev.agent_id, ev.span_id)
        span = ev.parent_span_id
        hops = 0
        while span and hops < _MAX_HOPS:
            agent = tr.agent.get(span)
            if agent:
                return agent, span
            name = tr.weak.get(span)
            if name:
                outer_weak = (name, span)
            if span not in tr.parent:
                return outer_weak if final and outer_weak else False
            span = tr.parent[span]
            hops += 1
        return outer_weak

    def _resolve(self, tr: _Trace, *, final: bool) -> list[Event]:
        out: list[Event] = []
        still: list[Event] = []
        for ev in tr.pending:
            found = self._ancestor(tr, ev, final=final)
            if found is not False or final:
                if ev.kind is EventKind.TOOL_CALL and tr.offers:
                    tr.claim_call(ev)
            if found:
                agent, span = found  # type: ignore[misc]
                if span != ev.span_id:
                    ev.identity = IdentitySource.ANCESTOR
                    self.resolved_by_ancestor += 1
                ev.agent_id = agent
                if ev.tenant == "default":
                    ev.tenant = tr.tenant.get(span, ev.tenant)
                version = tr.version.get(span)
                if version:  # else it keeps its own
                    ev.agent_version = version
                out.append(ev)
            elif found is None:  # the whole chain is known and names no agent: the resource
                out.append(self._fallback(ev, None))
            elif final:  # waited long enough for a missing ancestor: may still turn out to be an agent's
                out.append(self._fallback(ev, tr))
            else:
                still.append(ev)
        tr.pending = still
        return out

    def _fallback(self, ev: Event, tr: _Trace | None) -> Event:
        if not ev.agent_id or ev.identity is IdentitySource.SPAN_NAME:
            self.fell_back += 1
            ev.agent_id = ev.fallback_agent_id or "unknown"
            ev.identity = IdentitySource.RESOURCE if ev.fallback_agent_id else IdentitySource.UNKNOWN
            if tr is not None:
                tr.fell_back.setdefault(ev.agent_id, []).append(ev.event_id)
        return ev

    def _relink(self, agent_span: Event, tr: _Trace) -> None:
        for fallback in tr.fell_back:
            if fallback != agent_span.agent_id:
                self._notices.append(Event(
                    event_id=stable_id(IDENTIFIED, agent_span.trace_id, fallback, agent_span.agent_id),
                    kind=EventKind.AGENT, ts=agent_span.ts, agent_id=fallback, identity=IdentitySource.RESOURCE,
                    tenant=agent_span.tenant, trace_id=agent_span.trace_id, source=agent_span.source,
                    name=IDENTIFIED, lifecycle=IDENTIFIED, target_agent_id=agent_span.agent_id))
        tr.fell_back.clear()

    def _expire(self) -> list[Event]:
        wm = self.watermark.value
        out: list[Event] = []
        traces, lateness = self._traces, self.watermark.allowed_lateness_s
        due = self._due.pop_due_items(wm, traces)
        if not due:
            return out
        for trace_id in sorted(due, key=lambda t: traces[t].seq):
            tr = traces[trace_id]
            # waited the allowed lateness past the trace's newest span: decide now
            out.extend(self._resolve(tr, final=True))
            # keep the span tree a while longer so a straggler still finds its ancestor
            # (and a late agent span can still be linked to the spans that fell back)
            if tr.last_ts <= wm - lateness:
                del traces[trace_id]
            else:
                self._due.schedule(trace_id, tr, tr.last_ts + lateness)
        return out


def _event_time(ev: Event) -> float:
    return ev.ts_seconds


def _strings(v: object) -> dict[str, str]:
    return {st.text(k): st.text(x) for k, x in st.mapping(v).items()}
