"""Agent identity across a trace, in event time.

In real traces the agent attributes sit on the ``invoke_agent`` (or
OpenInference AGENT) span, not on its LLM and tool children, and that parent
ends last, so it is often exported in a later batch than its children. A span
therefore takes the identity of its nearest agent ancestor in the same trace;
while an ancestor is still missing the span waits, up to the allowed lateness,
before falling back to its resource identity (``service.instance.id`` /
``service.name``).

The resolver is fed events of any traces (the live worker keys this stage by
trace id) and returns events whose ``agent_id`` is decided.

State snapshots: ``resolver.snapshot() -> bytes`` and
``IdentityResolver.restore(allowed_lateness_s, data)`` (the same argument as the
constructor) carry the span trees, the spans still waiting for their agent and
the watermark; the format and its errors are those of detectors/state.py (JSON
with a version, ``StateError`` on anything unreadable). Take it between calls.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from detectors import state as st
from detectors.windows import FOREVER, ExpiryQueue, Watermark
from schemas.events import Event, IdentitySource


@dataclass(slots=True)
class _Trace:
    parent: dict[str, str] = field(default_factory=dict)  # span -> parent span ("" = root)
    agent: dict[str, str] = field(default_factory=dict)  # agent span -> agent id
    tenant: dict[str, str] = field(default_factory=dict)  # agent span -> tenant
    pending: list[Event] = field(default_factory=list)
    last_ts: float = 0.0
    seq: int = 0  # first-seen order: due traces are decided in it


class IdentityResolver:
    def __init__(self, allowed_lateness_s: float) -> None:
        self.watermark = Watermark(allowed_lateness_s)
        self._traces: dict[str, _Trace] = {}
        # a trace is due for its final decision at its newest span's time, and forgotten
        # the allowed lateness later: deadlines in a heap, so expiring visits due traces only
        self._due: ExpiryQueue[str] = ExpiryQueue()
        self._seq = 0
        self.resolved_by_ancestor = 0
        self.fell_back = 0

    @property
    def pending_count(self) -> int:
        return sum(len(t.pending) for t in self._traces.values())

    def process(self, events: Iterable[Event], *, wall: float | None = None) -> list[Event]:
        out: list[Event] = []
        touched: set[str] = set()
        for ev in events:
            ts = ev.ts_seconds
            self.watermark.observe(ts, wall)
            if not ev.trace_id or not ev.span_id:
                out.append(self._fallback(ev) if not ev.agent_id else ev)
                continue
            tr = self._traces.get(ev.trace_id)
            if tr is None:
                self._seq += 1
                tr = self._traces[ev.trace_id] = _Trace(seq=self._seq)
            if ts > tr.last_ts:
                tr.last_ts = ts
            self._due.touch(ev.trace_id, tr.last_ts)
            tr.parent[ev.span_id] = ev.parent_span_id
            if ev.is_agent_span and ev.agent_id:
                tr.agent[ev.span_id] = ev.agent_id
                tr.tenant[ev.span_id] = ev.tenant
            if ev.agent_id:
                # carries its own identity; its descendants may still be waiting on it
                out.append(ev)
            else:
                tr.pending.append(ev)
            touched.add(ev.trace_id)
        for trace_id in touched:
            out.extend(self._resolve(self._traces[trace_id], final=False))
        out.extend(self._expire())
        return out

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
        traces = [[tid, tr.parent, tr.agent, tr.tenant, [enc.event(e) for e in tr.pending], tr.last_ts]
                  for tid, tr in self._traces.items()]
        return enc.dumps("identity", {"watermark": self.watermark.to_state(), "traces": traces,
                                      "resolved_by_ancestor": self.resolved_by_ancestor,
                                      "fell_back": self.fell_back})

    @classmethod
    def restore(cls, allowed_lateness_s: float, data: bytes) -> "IdentityResolver":
        """A fresh resolver holding the state ``snapshot`` wrote (StateError if unreadable)."""
        r = cls(allowed_lateness_s)
        with st.reading("identity", data) as (state, dec):
            r.watermark.load_state(st.mapping(state["watermark"]))
            r.resolved_by_ancestor = st.integer(state["resolved_by_ancestor"])
            r.fell_back = st.integer(state["fell_back"])
            for tid, parent, agent, tenant, pending, last_ts in st.seq(state["traces"]):
                r._seq += 1
                tr = r._traces[st.text(tid)] = _Trace(
                    parent=_strings(parent), agent=_strings(agent), tenant=_strings(tenant),
                    pending=[dec.event(ref) for ref in st.seq(pending)], last_ts=st.num(last_ts), seq=r._seq)
                r._due.touch(st.text(tid), tr.last_ts)
        return r

    # -- internals -----------------------------------------------------------------------

    def _ancestor(self, tr: _Trace, ev: Event) -> tuple[str, str] | None | bool:
        """(agent, span) of the nearest agent ancestor; None when the chain is
        complete without one; False while part of the chain is still missing."""
        span = ev.parent_span_id
        hops = 0
        while span and hops < 256:
            agent = tr.agent.get(span)
            if agent:
                return agent, span
            if span not in tr.parent:
                return False
            span = tr.parent[span]
            hops += 1
        return None

    def _resolve(self, tr: _Trace, *, final: bool) -> list[Event]:
        out: list[Event] = []
        still: list[Event] = []
        for ev in tr.pending:
            found = self._ancestor(tr, ev)
            if found:
                agent, span = found  # type: ignore[misc]
                ev.agent_id = agent
                ev.identity = IdentitySource.ANCESTOR
                if ev.tenant == "default":
                    ev.tenant = tr.tenant.get(span, ev.tenant)
                self.resolved_by_ancestor += 1
                out.append(ev)
            elif found is None or final:
                out.append(self._fallback(ev))
            else:
                still.append(ev)
        tr.pending = still
        return out

    def _fallback(self, ev: Event) -> Event:
        if not ev.agent_id:
            self.fell_back += 1
            ev.agent_id = ev.fallback_agent_id or "unknown"
            ev.identity = IdentitySource.RESOURCE if ev.fallback_agent_id else IdentitySource.UNKNOWN
        return ev

    def _expire(self) -> list[Event]:
        wm = self.watermark.value
        out: list[Event] = []
        due = self._due.due(wm)
        if not due:
            return out
        traces, lateness = self._traces, self.watermark.allowed_lateness_s
        for trace_id in sorted(due, key=lambda t: traces[t].seq):
            tr = traces[trace_id]
            # waited the allowed lateness past the trace's newest span: decide now
            out.extend(self._resolve(tr, final=True))
            # keep the span tree a while longer so a straggler still finds its ancestor
            if tr.last_ts <= wm - lateness:
                del traces[trace_id]
            else:
                self._due.touch(trace_id, tr.last_ts + lateness)
        return out


def _strings(v: object) -> dict[str, str]:
    return {st.text(k): st.text(x) for k, x in st.mapping(v).items()}
