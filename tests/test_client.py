"""The agent client on the real broker: it obeys signed commands, refuses every bad one, and batches telemetry."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import orjson
import pytest
from aiokafka import AIOKafkaConsumer

from schemas.control import (
    AckStatus,
    ControlAck,
    KillSwitchCommand,
    Target,
    generate_keypair,
    load_private_key,
    sign,
)
from schemas.decoders.native import decode_native
from schemas.events import EventKind
from sinks.control import ControlPublisher
from agentwatch_client import SyncAgentClient
from streams.client import AgentClient
from streams.kafka import ensure_topics

pytestmark = pytest.mark.kafka

PRIV, PUB = generate_keypair()
KEY = load_private_key(PRIV)


@dataclass
class Topics:
    events: str
    control: str
    acks: str


@dataclass
class Agent:
    client: AgentClient
    halts: list[KillSwitchCommand] = field(default_factory=list)
    resumes: list[KillSwitchCommand] = field(default_factory=list)
    halted: asyncio.Event = field(default_factory=asyncio.Event)


@pytest.fixture
async def topics(kafka_bootstrap: str) -> Topics:
    run = uuid.uuid4().hex[:8]
    t = Topics(f"c{run}.events", f"c{run}.control", f"c{run}.acks")
    await ensure_topics(kafka_bootstrap, [t.events, t.control, t.acks], partitions=2)
    return t


def _client(bootstrap: str, topics: Topics, agent_id: str = "ops-bot-7", **kw: object) -> Agent:
    agent = Agent(client=None)  # type: ignore[arg-type]

    def on_halt(cmd: KillSwitchCommand) -> None:
        agent.halts.append(cmd)
        agent.halted.set()

    async def on_resume(cmd: KillSwitchCommand) -> None:  # async callbacks work too
        agent.resumes.append(cmd)

    agent.client = AgentClient(agent_id, bootstrap, tenant="acme", public_keys=PUB, on_halt=on_halt,
                               on_resume=on_resume, events_topic=topics.events, control_topic=topics.control,
                               acks_topic=topics.acks, batch_interval_s=0.1, **kw)  # type: ignore[arg-type]
    return agent


@pytest.fixture
async def agent(kafka_bootstrap: str, topics: Topics) -> AsyncIterator[Agent]:
    a = _client(kafka_bootstrap, topics)
    await a.client.start()
    yield a
    await a.client.stop()


@pytest.fixture
async def publisher(kafka_bootstrap: str, topics: Topics) -> AsyncIterator[ControlPublisher]:
    async with ControlPublisher(kafka_bootstrap, topics.control) as p:
        yield p


def _cmd(action: str = "halt", target: str = "agent:ops-bot-7", *, scope: list[str] | None = None,
         issued_at: datetime | None = None, ttl_s: float = 3600, command_id: str | None = None) -> KillSwitchCommand:
    at = issued_at or datetime.now(timezone.utc)
    return KillSwitchCommand(command_id=command_id or uuid.uuid4().hex, action=action,  # type: ignore[arg-type]
                             target=Target.parse(target), scope=scope or [], reason="test",
                             issued_by="pytest", issued_at=at, expires_at=at + timedelta(seconds=ttl_s))


async def _read(bootstrap: str, topic: str, until: Callable[[list[bytes]], bool], timeout: float = 20) -> list[bytes]:
    c = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False)
    await c.start()
    got: list[bytes] = []
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not until(got):
            for recs in (await c.getmany(timeout_ms=300)).values():
                got.extend(r.value for r in recs)
        return got
    finally:
        await c.stop()


async def _acks(bootstrap: str, topics: Topics, n: int) -> list[ControlAck]:
    raw = await _read(bootstrap, topics.acks, lambda got: len(got) >= n)
    return [ControlAck.from_json(v) for v in raw]


async def test_signed_halt_is_obeyed_and_acknowledged(kafka_bootstrap: str, topics: Topics, agent: Agent,
                                                      publisher: ControlPublisher) -> None:
    assert agent.client.allowed("kubectl_apply") and not agent.client.halted
    started = time.perf_counter()
    (cmd,) = await publisher.publish([sign(_cmd(), KEY)])
    await asyncio.wait_for(agent.halted.wait(), 15)
    print(f"\nhalt published -> on_halt called: {(time.perf_counter() - started) * 1000:.0f} ms")
    assert agent.halts[0].command_id == cmd.command_id
    assert agent.client.halted and not agent.client.allowed("anything")
    (ack,) = await _acks(kafka_bootstrap, topics, 1)
    assert (ack.command_id, ack.agent_id, ack.status, ack.action) == (cmd.command_id, "ops-bot-7", "obeyed", "halt")

    # a resume for the same target lifts it
    await publisher.publish([sign(_cmd("resume"), KEY)])
    acks = await _acks(kafka_bootstrap, topics, 2)
    assert acks[1].status is AckStatus.OBEYED and agent.resumes
    assert agent.client.allowed("kubectl_apply") and not agent.client.halted


async def test_forged_unsigned_expired_and_replayed_commands_are_refused_and_reported(
    kafka_bootstrap: str, topics: Topics, agent: Agent, publisher: ControlPublisher
) -> None:
    genuine = sign(_cmd(), KEY)
    other_key = load_private_key(generate_keypair()[0])
    tampered = genuine.model_copy(update={"command_id": "tampered", "scope": ["x"]})
    bad = [
        sign(_cmd(command_id="forged"), other_key),
        _cmd(command_id="unsigned"),
        sign(_cmd(command_id="expired", issued_at=datetime.now(timezone.utc) - timedelta(hours=2)), KEY),
        tampered,
    ]
    await publisher.publish(bad)
    await publisher.publish([genuine, genuine])  # the second copy is a replay
    await publisher.publish([sign(_cmd(target="agent:someone-else"), other_key)])  # not ours: ignored
    acks = await _acks(kafka_bootstrap, topics, 6)
    by_id = {(a.command_id, a.status.value): a.reason.partition(":")[0] for a in acks}
    assert by_id == {
        ("forged", "refused"): "unknown_key",
        ("unsigned", "refused"): "unsigned",
        ("expired", "refused"): "expired",
        ("tampered", "refused"): "forged",
        (genuine.command_id, "obeyed"): "test",
        (genuine.command_id, "refused"): "replayed",
    }
    assert len(acks) == 6
    assert [h.command_id for h in agent.halts] == [genuine.command_id]  # nothing bad was obeyed

    # every refusal is also a control_ack event in the agent's telemetry
    def refused_events(raw: list[bytes]) -> list[str]:
        out = []
        for v in raw:
            for e in decode_native(v).events:
                if e.kind is EventKind.CONTROL_ACK and e.outcome == "refused":
                    out.append(e.command_id)
        return out

    raw = await _read(kafka_bootstrap, topics.events, lambda got: len(refused_events(got)) >= 5)
    assert sorted(refused_events(raw)) == sorted(["forged", "unsigned", "expired", "tampered", genuine.command_id])


async def test_scope_blocks_only_the_named_tools(kafka_bootstrap: str, topics: Topics, agent: Agent,
                                                 publisher: ControlPublisher) -> None:
    await publisher.publish([sign(_cmd(scope=["kubectl_apply", "shell"]), KEY)])
    await asyncio.wait_for(agent.halted.wait(), 15)
    c = agent.client
    assert not c.allowed("kubectl_apply") and not c.allowed("shell") and c.allowed("search_docs")
    assert not c.halted
    await publisher.publish([sign(_cmd("resume", scope=["shell"]), KEY)])
    await _acks(kafka_bootstrap, topics, 2)
    assert not c.allowed("kubectl_apply") and c.allowed("shell")
    # a tenant-wide halt reaches this agent too
    await publisher.publish([sign(_cmd(target="tenant:acme"), KEY)])
    await _acks(kafka_bootstrap, topics, 3)
    assert c.halted


async def test_a_restarted_agent_comes_up_halted(kafka_bootstrap: str, topics: Topics,
                                                 publisher: ControlPublisher) -> None:
    old = sign(_cmd(issued_at=datetime.now(timezone.utc) - timedelta(hours=3), ttl_s=60), KEY)  # long expired
    halt = sign(_cmd(target="all"), KEY)
    await publisher.publish([old, halt])
    a = _client(kafka_bootstrap, topics, "fresh-agent")
    await a.client.start()
    try:
        await asyncio.wait_for(a.halted.wait(), 15)
        assert [h.command_id for h in a.halts] == [halt.command_id] and a.client.halted
        acks = await _acks(kafka_bootstrap, topics, 1)
        assert [(x.command_id, x.status.value) for x in acks] == [(halt.command_id, "obeyed")]
    finally:
        await a.client.stop()


async def test_telemetry_goes_out_in_batches_with_the_agents_identity(kafka_bootstrap: str, topics: Topics,
                                                                      agent: Agent) -> None:
    c = agent.client
    for i in range(5):
        c.record_tool_call("search_docs", {"q": "sla", "n": i}, tool_call_id=f"call-{i}")
    c.record_llm_call("gpt-4o-mini", 300, 40, cost_usd=0.001)
    c.emit({"kind": "agent", "lifecycle": "start"})
    raw = await _read(kafka_bootstrap, topics.events, lambda got: sum(len(orjson.loads(v)) for v in got) >= 7)
    assert len(raw) <= 2  # batched: not one message per event
    events = [e for v in raw for e in decode_native(v).events]
    assert len(events) == 7 and len({e.event_id for e in events}) == 7
    assert {(e.agent_id, e.tenant) for e in events} == {("ops-bot-7", "acme")}
    tools = [e for e in events if e.kind is EventKind.TOOL_CALL]
    assert len({e.args_fingerprint for e in tools}) == 5 and tools[0].tool_call_id == "call-0"
    assert c.published_events == 7


def test_the_sync_client_records_and_obeys_from_plain_threads(kafka_bootstrap: str) -> None:
    """SyncAgentClient for code that is not asyncio: recording from several threads, flush,
    a signed halt obeyed (on_halt in the client's thread), acknowledged, and a clean stop."""
    run = uuid.uuid4().hex[:8]
    t = Topics(f"s{run}.events", f"s{run}.control", f"s{run}.acks")
    asyncio.run(ensure_topics(kafka_bootstrap, [t.events, t.control, t.acks], partitions=2))
    halted, halts, callers = threading.Event(), [], set()

    def on_halt(cmd: KillSwitchCommand) -> None:
        halts.append(cmd.command_id)
        callers.add(threading.current_thread().name)
        halted.set()

    client = SyncAgentClient("sync-bot", kafka_bootstrap, tenant="acme", public_keys=PUB, on_halt=on_halt,
                             events_topic=t.events, control_topic=t.control, acks_topic=t.acks, batch_interval_s=0.1)
    with client:
        assert client.allowed("kubectl_apply") and not client.halted
        workers = [threading.Thread(target=lambda i=i: client.record_tool_call("search_docs", {"n": i},
                                                                              tool_call_id=f"sync-{i}"))
                   for i in range(4)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        client.record_llm_call("gpt-4o-mini", 100, 10)
        client.flush()
        assert client.published_events == 5

        async def _halt() -> KillSwitchCommand:
            async with ControlPublisher(kafka_bootstrap, t.control) as p:
                (sent,) = await p.publish([sign(_cmd(target="agent:sync-bot"), KEY)])
                return sent

        cmd = asyncio.run(_halt())
        assert halted.wait(20), "on_halt was not called"
        assert halts == [cmd.command_id] and callers == {"agentwatch-sync-bot"}
        assert client.halted and not client.allowed("kubectl_apply")
        (ack,) = asyncio.run(_acks(kafka_bootstrap, t, 1))
        assert (ack.command_id, ack.agent_id, ack.status) == (cmd.command_id, "sync-bot", AckStatus.OBEYED)
    assert client._loop is None  # noqa: SLF001 - stopped: its thread and loop are gone
    raw = asyncio.run(_read(kafka_bootstrap, t.events, lambda got: sum(len(orjson.loads(v)) for v in got) >= 5))
    events = [e for v in raw for e in decode_native(v).events if e.kind in (EventKind.TOOL_CALL, EventKind.LLM_CALL)]
    assert sorted(e.tool_call_id for e in events if e.kind is EventKind.TOOL_CALL) == [f"sync-{i}" for i in range(4)]
    assert {e.agent_id for e in events} == {"sync-bot"}


async def test_stop_returns_when_called_as_a_full_batch_wakes_the_sender(kafka_bootstrap: str,
                                                                          topics: Topics) -> None:
    # The event that fills a batch wakes the sender; stop() called in the same turn of the event
    # loop cancels the sender just as its wait ends. Python 3.11's asyncio.wait_for swallowed that
    # cancel and stop() then waited for the sender forever (seen as a hung test teardown).
    for round_ in range(3):
        a = _client(kafka_bootstrap, topics, f"stopper-{round_}", batch_max=1)
        await a.client.start()
        await asyncio.sleep(0.3)  # the sender is now waiting for a full batch or its interval

        async def emit_then_stop(client: AgentClient = a.client, n: int = round_) -> None:
            client.record_tool_call("search_docs", {"q": "stop", "round": n})  # wakes the sender
            await client.stop()  # runs up to its first wait in this same turn of the loop

        stopping = asyncio.create_task(emit_then_stop())
        done, _ = await asyncio.wait({stopping}, timeout=15)
        if not done:
            stopping.cancel()
        assert done, "stop() did not return"
        assert a.client.published_events == 1
