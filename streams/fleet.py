"""A simulated fleet of agents for the demo and the benchmarks.

Agents emit real OpenTelemetry spans through the OTel SDK (GenAI semantic
conventions), encoded by the SDK's own OTLP encoder and published to the OTLP
topic the way the Collector's Kafka exporter does: ``otlp_proto`` for some,
``otlp_json`` for others. Children are published before their ``invoke_agent``
span, as real exporters do. Others use native JSON arrays on the events topic.
Most agents are healthy; a few misbehave.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import orjson
from aiokafka import AIOKafkaProducer
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Status, StatusCode

from agentwatch_client import AgentClient
from schemas.otlp_json import request_to_otlp_json


@dataclass
class SimAgent:
    agent_id: str
    service: str
    wire: str  # otlp_proto | otlp_json | native
    behaviour: str  # healthy | retry_loop | failing
    period_s: float
    tenant: str = "acme"
    rng: random.Random = field(default_factory=random.Random)


HEALTHY_TOOLS = {
    "search_docs": lambda r: {"query": r.choice(["refund policy", "sla", "pricing", "gdpr", "onboarding"]),
                              "limit": r.randint(3, 10)},
    "create_ticket": lambda r: {"title": f"issue #{r.randint(1, 99999)}", "priority": r.choice(["p2", "p3"])},
    "send_email": lambda r: {"to": f"user{r.randint(1, 5000)}@example.com", "template": "followup"},
    "query_db": lambda r: {"sql": f"SELECT * FROM orders WHERE id = {r.randint(1, 10**6)}"},
}


def default_fleet(seed: int = 7) -> list[SimAgent]:
    return [
        SimAgent("billing-assistant", "billing-svc", "otlp_proto", "healthy", 1.5, rng=random.Random(seed)),
        SimAgent("support-triage", "support-svc", "otlp_json", "healthy", 2.0, rng=random.Random(seed + 1)),
        SimAgent("docs-writer", "docs-svc", "native", "healthy", 2.5, rng=random.Random(seed + 2)),
        SimAgent("ops-bot-7", "ops-svc", "otlp_proto", "retry_loop", 2.0, rng=random.Random(seed + 3)),
        SimAgent("research-agent-3", "research-svc", "native", "failing", 1.5, rng=random.Random(seed + 4)),
    ]


def _tool_call(agent: SimAgent) -> tuple[str, dict[str, object], bool]:
    """(tool, arguments, failed) for the agent's next step."""
    r = agent.rng
    if agent.behaviour == "retry_loop":
        # the same deployment retried with the same arguments, key order shuffled
        args = {"manifest": "deploy/payments.yaml", "namespace": "prod", "force": True}
        items = list(args.items())
        r.shuffle(items)
        return "kubectl_apply", dict(items), r.random() < 0.5
    if agent.behaviour == "failing":
        return "web_fetch", {"url": f"https://example.org/page/{r.randint(1, 10**6)}"}, True
    tool = r.choice(list(HEALTHY_TOOLS))
    return tool, HEALTHY_TOOLS[tool](r), r.random() < 0.05


class OtelEmitter:
    """One agent's tracer: real SDK spans, collected and handed over as OTLP batches."""

    def __init__(self, agent: SimAgent) -> None:
        self.agent = agent
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider(resource=Resource.create({
            "service.name": agent.service,
            "service.instance.id": f"{agent.service}-{uuid.uuid4().hex[:6]}",
            "tenant": agent.tenant,
        }))
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer = self.provider.get_tracer("agentwatch.fleet")

    def turn(self) -> tuple[list[ReadableSpan], list[ReadableSpan]]:
        """One agent turn; returns (children, agent span) as exported, children first."""
        a = self.agent
        tool, args, failed = _tool_call(a)
        with self.tracer.start_as_current_span(f"invoke_agent {a.agent_id}") as root:
            root.set_attributes({"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.id": a.agent_id,
                                 "gen_ai.agent.name": a.agent_id, "gen_ai.conversation.id": uuid.uuid4().hex})
            with self.tracer.start_as_current_span("chat gpt-4o-mini") as chat:
                chat.set_attributes({"gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o-mini",
                                     "gen_ai.usage.input_tokens": a.rng.randint(200, 900),
                                     "gen_ai.usage.output_tokens": a.rng.randint(20, 200)})
            with self.tracer.start_as_current_span(f"execute_tool {tool}") as span:
                span.set_attributes({"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": tool,
                                     "gen_ai.tool.call.id": "call_" + uuid.uuid4().hex[:12],
                                     "gen_ai.tool.call.arguments": orjson.dumps(args).decode()})
                if failed:
                    span.set_attribute("error.type", "TimeoutError")
                    span.set_status(Status(StatusCode.ERROR, "tool timed out"))
        spans = list(self.exporter.get_finished_spans())
        self.exporter.clear()
        children = [s for s in spans if s.parent is not None]
        roots = [s for s in spans if s.parent is None]
        return children, roots

    def encode(self, spans: list[ReadableSpan]) -> bytes:
        req = encode_spans(spans)
        return req.SerializeToString() if self.agent.wire == "otlp_proto" else request_to_otlp_json(req)


def native_turn(agent: SimAgent) -> bytes:
    """A native JSON array: one LLM call and one tool call."""
    tool, args, failed = _tool_call(agent)
    now = datetime.now(timezone.utc).isoformat()
    base = {"agent_id": agent.agent_id, "tenant": agent.tenant, "ts": now}
    return orjson.dumps([
        {**base, "kind": "llm_call", "model": "claude-haiku", "input_tokens": agent.rng.randint(100, 800),
         "output_tokens": agent.rng.randint(10, 100)},
        {**base, "kind": "tool_call", "tool_name": tool, "arguments": args,
         "outcome": "error" if failed else "ok", "error_type": "HTTPError" if failed else "",
         "tool_call_id": "call_" + uuid.uuid4().hex[:12]},
    ])


MALFORMED = [
    ("otlp", b"\x0a\xff\xff this is not an OTLP request"),
    ("native", b'{"kind": "tool_call", "agent_id": "x"'),
    ("native", orjson.dumps([{"kind": "tool_call", "agent_id": "docs-writer", "ts": "yesterday-ish"}])),
]


async def run_fleet(
    producer: AIOKafkaProducer,
    *,
    otlp_topic: str,
    events_topic: str,
    duration_s: float,
    fleet: list[SimAgent] | None = None,
    on_send: Callable[[str], None] | None = None,
    clients: dict[str, AgentClient] | None = None,
) -> int:
    """Publish the fleet's traffic for ``duration_s``; return the messages sent.

    With ``clients`` (agent id -> started AgentClient), each agent obeys the kill
    switch the way a real one would: it checks ``allowed(tool)`` before every
    step and stays idle while halted.
    """
    fleet = fleet or default_fleet()
    clients = clients or {}
    emitters = {a.agent_id: OtelEmitter(a) for a in fleet if a.wire != "native"}
    deadline = time.monotonic() + duration_s
    sent = 0

    for which, raw in MALFORMED:
        await producer.send_and_wait(otlp_topic if which == "otlp" else events_topic, raw)
        sent += 1

    async def drive(agent: SimAgent) -> None:
        nonlocal sent
        client = clients.get(agent.agent_id)
        while time.monotonic() < deadline:
            if client is not None and client.halted:
                await asyncio.sleep(0.5)  # obeying a halt: no tool calls, no LLM calls
                continue
            key = agent.agent_id.encode()
            if agent.wire == "native":
                await producer.send_and_wait(events_topic, native_turn(agent), key=key)
                sent += 1
            else:
                em = emitters[agent.agent_id]
                children, roots = em.turn()
                # the agent span ends last and so is exported in a later batch
                await producer.send_and_wait(otlp_topic, em.encode(children), key=key)
                await producer.send_and_wait(otlp_topic, em.encode(roots), key=key)
                sent += 2
            if on_send:
                on_send(agent.agent_id)
            await asyncio.sleep(agent.period_s * (0.8 + 0.4 * agent.rng.random()))

    await asyncio.gather(*(drive(a) for a in fleet))
    return sent


# --- a canary rollout ----------------------------------------------------------------------------
# triage-bot runs version 3.1 and, as a canary, 3.2. Both take a task a second; 3.2 repeats each
# search twice more. Under the demo policy's canary section 3.2 fails and is halted, 3.1 is not.

CANARY_AGENT = "triage-bot"
CANARY_BASELINE, CANARY_CANDIDATE = "3.1", "3.2"


def canary_task(version: str, i: int, at: datetime, *, tenant: str = "acme") -> list[dict[str, object]]:
    """One task (a trace) of triage-bot ``version``: a model call, a search and a ticket; the
    candidate repeats its search twice."""
    trace = uuid.uuid5(uuid.NAMESPACE_OID, f"{CANARY_AGENT}/{version}/{i}").hex
    searches = 3 if version == CANARY_CANDIDATE else 1
    calls = [("search_docs", {"query": f"ticket {i}"})] * searches + [("create_ticket", {"title": f"#{i}"})]
    base = {"agent_id": CANARY_AGENT, "agent_version": version, "tenant": tenant, "trace_id": trace}
    out: list[dict[str, object]] = [{**base, "kind": "llm_call", "ts": at.isoformat(), "span_id": f"{i:08x}00000000",
                                     "model": "claude-haiku", "input_tokens": 400, "output_tokens": 60}]
    for k, (tool, args) in enumerate(calls, 1):
        out.append({**base, "kind": "tool_call", "ts": (at + timedelta(milliseconds=100 * k)).isoformat(),
                    "span_id": f"{i:08x}{k:08x}", "tool_name": tool, "arguments": args, "outcome": "ok"})
    return out


async def run_canary(clients: dict[str, AgentClient], *, duration_s: float, period_s: float = 1.0) -> int:
    """Both versions take a task every ``period_s`` through their clients (``clients`` by version);
    a halted one takes no more. Returns the tasks run."""
    deadline = time.monotonic() + duration_s
    i = 0
    while time.monotonic() < deadline:
        for version, client in clients.items():
            if not client.halted:
                for record in canary_task(version, i, datetime.now(timezone.utc)):
                    client.emit(record)
        i += 1
        await asyncio.sleep(period_s)
    return i


# --- scripted incidents -------------------------------------------------------------------------
# Besides the fleet's steady traffic, the demo plays one incident per detector family at
# a fixed offset, so each shows up within two minutes. The records are built up front
# (ids and event times included) so the same script can be published live (agents'
# events through their AgentClient, approvals and audit records as the systems that
# own them would publish them) or decoded offline (tests, dashboards).


@dataclass
class Step:
    at_s: float  # seconds after the start of the traffic
    topic: str  # "events" (native JSON) or "audit" (Kubernetes audit JSON)
    records: list[dict[str, object]]
    say: str  # what the demo prints when it plays the step
    agent: str = ""  # the agent whose client emits it; "" = another system (approvals, audit logs)


SCRIPTED_AGENTS = ("summarizer-2", "support-bot-2", "finance-agent", "ops-bot-8")


def incident_script(start: datetime, tenant: str = "acme") -> list[Step]:
    """One incident per detector family (the retry loops come from the fleet itself)."""

    def native(at_s: float, agent: str, kind: str, **fields: object) -> dict[str, object]:
        ts = (start + timedelta(seconds=at_s)).isoformat()
        return {"event_id": f"{agent}:{uuid.uuid4().hex}", "kind": kind, "ts": ts, "agent_id": agent,
                "tenant": tenant, "origin": f"{agent}-svc", **fields}

    def llm(at_s: float, agent: str, tokens_in: int, tokens_out: int) -> dict[str, object]:
        return native(at_s, agent, "llm_call", model="gpt-4o", input_tokens=tokens_in, output_tokens=tokens_out,
                      cost_usd=round((tokens_in * 2.5 + tokens_out * 10) / 1e6, 6), outcome="ok")

    def tool(at_s: float, agent: str, name: str, call_id: str, **fields: object) -> dict[str, object]:
        return native(at_s, agent, "tool_call", tool_name=name, tool_call_id=call_id, outcome="ok", **fields)

    steps = [
        Step(4, "events", [llm(4, "summarizer-2", 900, 150), llm(4.5, "summarizer-2", 1100, 180)],
             "summarizer-2 summarises tickets (~1k tokens a call)", agent="summarizer-2"),
        Step(10, "events", [llm(10 + i * 0.2, "summarizer-2", 14000, 800) for i in range(5)],
             "summarizer-2 re-sends its whole growing context: 74k tokens in a second", agent="summarizer-2"),
        Step(12, "events", [tool(12, "support-bot-2", "search_docs", "call_sb_1", attributes={"query": "refund"})],
             "support-bot-2 searches the docs (allowed)", agent="support-bot-2"),
        Step(16, "events", [tool(16, "support-bot-2", "export_customers", "call_sb_2",
                                 attributes={"resource": "db/crm/customers"})],
             "support-bot-2 calls export_customers, outside its allowlist", agent="support-bot-2"),
        Step(18, "events", [native(18, "finance-agent", "approval", approver="", decision="pending",
                                   covers_tool_call_id="call_wt_1")],
             "finance-agent asks for approval of a 9,800 EUR wire transfer (pending)"),
        Step(22, "events", [native(22, "finance-agent", "approval", approver="alice@example.com", decision="granted",
                                   covers_tool_call_id="call_wt_1")],
             "alice@example.com grants it"),
        Step(24, "events", [tool(24, "finance-agent", "wire_transfer", "call_wt_1",
                                 attributes={"amount_eur": "9800"}), llm(24, "finance-agent", 600, 80)],
             "finance-agent makes the approved transfer (covered: no alert)", agent="finance-agent"),
        Step(28, "events", [tool(28, "finance-agent", "wire_transfer", "call_wt_2",
                                 attributes={"amount_eur": "48000"})],
             "finance-agent makes a second transfer that nobody approved", agent="finance-agent"),
        Step(30, "audit", [k8s_audit(start + timedelta(seconds=30), "system:serviceaccount:agents:docs-writer",
                                     "delete", "configmaps", "prod", "feature-flags")],
             "the Kubernetes audit log: docs-writer's service account deletes configmap prod/feature-flags, "
             "and no tool call of docs-writer explains it"),
        Step(36, "events", [tool(36, "ops-bot-8", "kubectl_patch", "call_ob8_1",
                                 attributes={"resource": "configmaps/agentwatch/agentwatch-policy",
                                             "patch": "retry_loop.mode=shadow"})],
             "ops-bot-8 patches agentwatch's own policy to silence the retry_loop detector that halted its peer",
             agent="ops-bot-8"),
    ]
    return steps


def k8s_audit(ts: datetime, principal: str, verb: str, resource: str, namespace: str, name: str) -> dict[str, object]:
    """A Kubernetes audit.k8s.io/v1 event (ResponseComplete, allowed), as the API server writes it."""
    stamp = ts.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return {
        "kind": "Event", "apiVersion": "audit.k8s.io/v1", "level": "Metadata", "auditID": str(uuid.uuid4()),
        "stage": "ResponseComplete", "requestURI": f"/api/v1/namespaces/{namespace}/{resource}/{name}",
        "verb": verb, "user": {"username": principal, "groups": ["system:serviceaccounts", "system:authenticated"]},
        "sourceIPs": ["10.0.3.17"], "userAgent": "python-requests/2.32",
        "objectRef": {"resource": resource, "namespace": namespace, "name": name, "apiVersion": "v1"},
        "responseStatus": {"metadata": {}, "code": 200},
        "requestReceivedTimestamp": stamp, "stageTimestamp": stamp,
        "annotations": {"authorization.k8s.io/decision": "allow", "authorization.k8s.io/reason": ""},
    }


def step_payload(step: Step) -> bytes:
    """What the step puts on its topic: a JSON array of native events, or one audit record."""
    return orjson.dumps(step.records if step.topic == "events" else step.records[0])


async def run_script(
    script: list[Step],
    producer: AIOKafkaProducer,
    *,
    events_topic: str,
    audit_topic: str,
    clients: dict[str, AgentClient],
    say: Callable[[str], None],
) -> None:
    """Play the steps at their offsets: agents' events through their client, the rest as records."""
    started = time.monotonic()
    for step in sorted(script, key=lambda s: s.at_s):
        await asyncio.sleep(max(0.0, started + step.at_s - time.monotonic()))
        client = clients.get(step.agent)
        if client is not None:
            if client.halted:
                say(f"  ...   {step.agent} is halted and does not act")
                continue
            for record in step.records:
                client.emit(record)
            await client.flush()
        else:
            key = str(step.records[0].get("agent_id") or step.records[0].get("auditID", "")).encode()
            topic = events_topic if step.topic == "events" else audit_topic
            await producer.send_and_wait(topic, step_payload(step), key=key)
        say(f"  STEP  +{step.at_s:>4.0f}s {step.say}")
