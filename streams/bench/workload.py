"""The bench's input: OTLP protobuf batches shaped like an agent fleet, with planted incidents.

Every message holds whole traces (an ``invoke_agent`` span and its tool/LLM
children), the way a Collector's batch processor exports them, so any
consumer can name a tool call's agent from its parent in the same message.
Traffic is round-robin over the agents at a steady rate of event time, so
nothing fires by accident; the planted incidents are what must fire:

* ``loops`` agents each repeat one tool call with identical arguments
  ``LOOP_CALLS`` times within a second (retry_loop; with retry_loop in enforce
  mode nobody acknowledges their halts, so each also escalates once);
* one agent with a steady 375 tokens a minute bursts to 15,000 in minute
  ``SPIKE_MINUTE``, over its hourly budget of 9,000 (token_spike);
* ``kubectl_apply`` calls are confirmed by native audit records naming their
  span (the join matches them: no alert), and ``rogues`` audit records of
  agent principals name a trace nobody sent (unattributed_side_effect, one per
  principal).

This module imports only the OTLP protobuf classes, so the Quix Streams peer
(its own virtualenv) can import ``tool_calls`` from it.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

TOOLS = ("search_docs", "create_ticket", "send_email", "query_db", "kubectl_apply")
AUDITED_TOOL = "kubectl_apply"
CHILDREN = 9  # spans under each agent span: 6 tool calls, 3 LLM calls
LOOP_CALLS = 6  # identical calls of a looping agent; the 5th decides (same_call_threshold)
LOOP_THRESHOLD = 5  # retry_loop's default same_call_threshold, which the peers use too
WINDOW_S = 60.0
MINUTES = 14  # event time of the throughput input
SPIKE_MINUTE = 6
SPIKE_AGENT = "agent-spiky"
AGENT_PRINCIPAL = "system:serviceaccount:agents:{}"
NS = 1_000_000_000

# The bench's policy: retry_loop enforces (the kill switch is timed end to end); the
# join waits long enough that no audit record of a backlog read out of step with its
# spans is late; agents' service accounts are agent principals. token_spike judges the
# spiky agent by its hourly budget, decided as tokens arrive: a per-minute baseline
# needs minutes of event time to close, which a backlog read in bulk does not give
# reliably (the worker counts backlog events as late; the bench prints how many).
JOIN_LATENESS_S = 900
POLICY = f"""\
version: bench-1
join:
  window_s: 30
  allowed_lateness_s: {JOIN_LATENESS_S}
  agent_principals: ["system:serviceaccount:agents:*"]
budgets:
  agent_tokens_per_hour: {{"agent-spiky": 9000}}
detectors:
  retry_loop:
    mode: enforce
  token_spike:
    min_tokens_per_minute: 100000000
"""
# The live phase's policy: the same with the join's lateness back at the default. 900 s is for
# the backlog alone (read from two topics at different speeds, docs/benchmarks.md); traffic
# produced as it happens does not need it, and a join holding 15 minutes of spans at the live
# rate is memory and snapshot bytes no deployment would choose. The worker hot-reloads it.
LIVE_POLICY = POLICY.replace("version: bench-1\n", "version: bench-1-live\n").replace(
    f"  allowed_lateness_s: {JOIN_LATENESS_S}\n", "")


def _kv(key: str, value: str | int) -> KeyValue:
    v = AnyValue(int_value=value) if isinstance(value, int) else AnyValue(string_value=value)
    return KeyValue(key=key, value=v)


@dataclass
class Message:
    value: bytes
    ts_ms: int  # Kafka record timestamp: event time of the message's last span
    spans: int


@dataclass
class Workload:
    messages: list[Message] = field(default_factory=list)
    audits: list[Message] = field(default_factory=list)
    audit_records: int = 0
    spans: int = 0
    tool_calls: int = 0
    loop_keys: set[tuple[str, str, str]] = field(default_factory=set)
    # detector -> alerts the pipeline must emit for this input
    expected: dict[str, int] = field(default_factory=dict)


class TraceWriter:
    """Builds ExportTraceServiceRequest messages out of whole traces."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.req = ExportTraceServiceRequest()
        self.spans = 0
        self.last_ns = 0
        self.held: list[tuple[str, bytes, bytes, int, int]] = []  # agent spans not written yet
        rs = self.req.resource_spans.add()
        rs.resource.attributes.append(_kv("service.name", f"svc-{rng.randint(1, 50)}"))
        self.scope = rs.scope_spans.add()

    def trace(self, agent: str, t_ns: int, children: list[tuple[str, dict[str, str | int]]], *,
              agent_span: bool = True) -> list[tuple[bytes, bytes]]:
        """One agent span with ``children`` (name, attributes); returns (trace_id, span_id) of each child.

        Without ``agent_span`` only the children are written, and the agent span waits in
        ``held`` for :meth:`add_held` to put it into a later message, as a real exporter
        does when the parent span ends after its children's batch was sent."""
        trace_id, root = self.rng.randbytes(16), self.rng.randbytes(8)
        ids = []
        for i, (name, attrs) in enumerate(children):
            span_id = self.rng.randbytes(8)
            start = t_ns + i * 1_000_000
            s = self.scope.spans.add(trace_id=trace_id, span_id=span_id, parent_span_id=root, name=name, kind=1,
                                     start_time_unix_nano=start, end_time_unix_nano=start + 500_000)
            s.attributes.extend(_kv(k, v) for k, v in attrs.items())
            ids.append((trace_id, span_id))
        end = t_ns + len(children) * 1_000_000 + 1_000_000
        self.spans += len(children)
        self.last_ns = max(self.last_ns, t_ns + len(children) * 1_000_000)
        span = (agent, trace_id, root, t_ns, end)
        if agent_span:
            self.add_held(span)
        else:
            self.held.append(span)
        return ids

    def add_held(self, span: tuple[str, bytes, bytes, int, int]) -> None:
        """An agent span (as ``trace`` holds it back) into this message."""
        agent, trace_id, root, t_ns, end = span
        s = self.scope.spans.add(trace_id=trace_id, span_id=root, name=f"invoke_agent {agent}", kind=1,
                                 start_time_unix_nano=t_ns, end_time_unix_nano=end)
        s.attributes.extend([_kv("gen_ai.operation.name", "invoke_agent"), _kv("gen_ai.agent.id", agent)])
        self.spans += 1
        self.last_ns = max(self.last_ns, end)

    def take(self) -> Message:
        msg = Message(self.req.SerializeToString(), self.last_ns // 1_000_000, self.spans)
        self.__init__(self.rng)  # type: ignore[misc]
        return msg


def tool(name: str, args: str) -> tuple[str, dict[str, str | int]]:
    return f"execute_tool {name}", {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": name,
                                    "gen_ai.tool.call.arguments": args}


def llm(tokens: int) -> tuple[str, dict[str, str | int]]:
    return "chat gpt-4o", {"gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o",
                           "gen_ai.usage.input_tokens": tokens, "gen_ai.usage.output_tokens": tokens // 4}


def audit(principal: str, t_ns: int, trace_id: bytes, span_id: bytes, resource: str) -> dict[str, object]:
    return {"kind": "audit", "principal": principal, "action": "apply", "resource": resource, "outcome": "allow",
            "ts": t_ns / NS, "trace_id": trace_id.hex(), "span_id": span_id.hex()}


def audit_message(docs: list[dict[str, object]]) -> Message:
    """Native audit records as one JSON array: one audit message per spans message keeps both
    topics' event time advancing together when a worker reads a backlog of both."""
    last_s = max(float(d["ts"]) for d in docs)  # type: ignore[arg-type]
    return Message(json.dumps(docs).encode(), int(last_s * 1000), len(docs))


def clock_message(rng: random.Random, t_ns: int) -> Message:
    """One agent span at ``t_ns``: sent after the backlog, it moves event time to now, so the
    join decides the rogue records (the input ends more than its lateness before now)."""
    w = TraceWriter(rng)
    w.trace("bench-clock", t_ns, [])
    return w.take()


def input_end_ns(now_ns: int) -> int:
    """Where the throughput input's event time ends: a minute boundary over the join's
    lateness (plus its window) before now."""
    end = now_ns - (JOIN_LATENESS_S + 90) * NS
    return end - end % (60 * NS)


def loop_trace(w: TraceWriter, agent: str, t_ns: int, *, agent_span: bool = True) -> None:
    w.trace(agent, t_ns, [tool("query_db", '{"sql": "SELECT 1", "retry": true}')] * LOOP_CALLS,
            agent_span=agent_span)


def make_workload(events: int, per_message: int, *, end_ns: int, agents: int = 100, loops: int = 10,
                  rogues: int = 3, seed: int = 42) -> Workload:
    """About ``events`` spans ending at event time ``end_ns``, ``per_message`` spans per message."""
    rng = random.Random(seed)
    wl = Workload()
    span_s = MINUTES * 60
    start_ns = end_ns - span_s * NS
    traces = max(1, events // (CHILDREN + 1))
    step_ns = span_s * NS // traces
    # planted incidents, by the normal trace they follow
    loop_at = {int(traces * (j + 0.5) / loops): j for j in range(loops)}
    minute_traces = max(1, traces // MINUTES)
    names = [f"agent-{i:03d}" for i in range(agents)]
    w = TraceWriter(rng)
    n_calls = 0
    # rogue principals act early, so the join's window closes on them within the input
    pending = [audit(AGENT_PRINCIPAL.format(f"rogue-{k}"), start_ns + (k + 1) * 10 * NS, rng.randbytes(16),
                     rng.randbytes(8), "secrets/prod/db-password") for k in range(rogues)]
    for i in range(traces):
        t = start_ns + i * step_ns
        agent = names[i % agents]
        children = []
        for c in range(6):
            name = TOOLS[(i + c) % len(TOOLS)]
            n_calls += 1
            children.append(tool(name, json.dumps({"q": n_calls, "page": c})))
        children += [llm(20)] * 3
        ids = w.trace(agent, t, children)
        for (name, _), (trace_id, span_id) in zip(children, ids):
            if name == f"execute_tool {AUDITED_TOOL}" and i % 4 == 0:
                pending.append(audit(AGENT_PRINCIPAL.format(agent), t + 2_000_000, trace_id, span_id,
                                     f"deployments.apps/prod/{agent}"))
        if i in loop_at:
            loop_trace(w, f"agent-loop-{loop_at[i]:02d}", t + step_ns // 2)
            wl.loop_keys.add((f"agent-loop-{loop_at[i]:02d}", "query_db", '{"sql": "SELECT 1", "retry": true}'))
        if i % minute_traces == 0:
            # the spiky agent: a steady 300 tokens a minute, 12,000 in its spike minute
            minute = i // minute_traces
            tokens = 4000 if minute == SPIKE_MINUTE else 100
            w.trace(SPIKE_AGENT, t + step_ns // 3, [llm(tokens)] * 3)
        if w.spans >= per_message or i == traces - 1:
            wl.messages.append(w.take())
            last = i == traces - 1
            now_due = [d for d in pending if last or float(d["ts"]) * NS <= t + step_ns]  # type: ignore[arg-type]
            if now_due:
                wl.audits.append(audit_message(now_due))
                pending = [d for d in pending if d not in now_due]
    wl.spans = sum(m.spans for m in wl.messages)
    wl.audit_records = sum(m.spans for m in wl.audits)
    wl.tool_calls = n_calls + LOOP_CALLS * len(loop_at)
    wl.expected = {
        "retry_loop": len(loop_at),
        "killswitch_unacknowledged": len(loop_at),
        "token_spike": 1,
        "unattributed_side_effect": rogues,
    }
    return wl


def tool_calls(payload: bytes) -> Iterator[tuple[str, str, str, int]]:
    """(agent, tool, arguments, end time in ms) of each tool call in one message.

    The plain reading every peer does: attributes by key, the agent from the
    parent agent span in the same message.
    """
    req = ExportTraceServiceRequest()
    req.ParseFromString(payload)
    for rs in req.resource_spans:
        for ss in rs.scope_spans:
            agents: dict[bytes, str] = {}
            calls = []
            for sp in ss.spans:
                op = tool_name = args = agent = ""
                for kv in sp.attributes:
                    k = kv.key
                    if k == "gen_ai.operation.name":
                        op = kv.value.string_value
                    elif k == "gen_ai.tool.name":
                        tool_name = kv.value.string_value
                    elif k == "gen_ai.tool.call.arguments":
                        args = kv.value.string_value
                    elif k == "gen_ai.agent.id":
                        agent = kv.value.string_value
                if op == "execute_tool":
                    calls.append((sp.parent_span_id, tool_name, args, sp.end_time_unix_nano // 1_000_000))
                elif op == "invoke_agent":
                    agents[sp.span_id] = agent
            for parent, tool_name, args, ts_ms in calls:
                yield agents.get(parent, ""), tool_name, args, ts_ms
