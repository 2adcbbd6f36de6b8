"""The agentwatch agent client: what an agent imports to be watched, and to be stoppable.

``AgentClient`` is for asyncio agents; ``SyncAgentClient`` (agentwatch_client.sync)
wraps it for threaded or plain synchronous code. It does two things
(docs/client.md has a complete example):

* **Telemetry.** ``record_tool_call``, ``record_llm_call`` and ``emit`` put
  native JSON events, stamped with the agent's identity, into a buffer that a
  background task publishes as JSON arrays (one Kafka message per batch, key =
  agent id) when it holds ``batch_max`` events or every ``batch_interval_s``.
  The pipeline's cost is per Kafka message, so batching is what keeps a busy
  fleet cheap to watch. If the broker is unreachable the buffer keeps the
  events (up to ``buffer_max``; beyond that the oldest are dropped and
  counted in ``dropped_events``, never silently).
* **Kill switch.** A consumer with no consumer group is assigned every
  partition of the control topic (commands are keyed by target, so any
  partition may hold one for this agent). For each command that targets this
  agent (by id, by tenant, or ``all``) it verifies the Ed25519 signature, the
  expiry, the age and that the command is new, then applies it: ``allowed(tool)``
  turns false for the halted scope, and ``on_halt`` / ``on_resume`` are
  called. Every command for this agent is acknowledged on the acks topic and
  as a ``control_ack`` event: ``obeyed``, or ``refused`` with the reason
  (``unsigned``, ``unknown_key``, ``forged``, ``expired``, ``replayed``,
  ``malformed``, ``callback_failed``). A refused command changes nothing.

On start the client reads back ``lookback_s`` of the control topic, so an agent
(re)started while a halt is in force comes up halted. Commands that expired
before the client started are history, not attacks: they are skipped quietly.

State: a halt with an empty scope halts everything (``halted`` is true); a halt
with a scope blocks those tools. A resume lifts the halts of the same target
(``agent:x``, ``tenant:y`` or ``all``; a resume for ``all`` lifts every halt):
all of them when its scope is empty, else only the named tools of scoped halts.
A halt past its ``expires_at`` lifts itself and ``on_resume`` is called with it.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime, timezone
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import ValidationError

from agentwatch_client.errors import BrokerError, ConfigError, LastLibraryError, SignatureError
from agentwatch_client.wire import (
    agent_key,
    DEFAULT_CLOCK_SKEW_S,
    DEFAULT_MAX_AGE_S,
    AckStatus,
    CommandAction,
    ControlAck,
    KillSwitchCommand,
    TargetKind,
    fingerprint_arguments,
    load_public_keys,
    refusal_reason,
    stable_id,
    verify,
)

log = logging.getLogger("agentwatch.client")
# how long stop() waits for the background loops; they notice the stop within one poll (0.2 s)
_STOP_TIMEOUT_S = 5.0

Callback = Callable[[KillSwitchCommand], Awaitable[None] | None]


def _now() -> datetime:
    return datetime.now(timezone.utc)


class AgentClient:
    """One agent instance's connection to agentwatch. Use ``async with`` or ``start()``/``stop()``."""

    def __init__(
        self,
        agent_id: str,
        bootstrap: str,
        *,
        tenant: str = "default",
        agent_version: str = "",
        public_keys: str | Mapping[str, Ed25519PublicKey],
        on_halt: Callback | None = None,
        on_resume: Callback | None = None,
        events_topic: str = "agentwatch.events.in",
        control_topic: str = "agentwatch.control",
        acks_topic: str = "agentwatch.control.acks",
        batch_max: int = 500,
        batch_interval_s: float = 0.5,
        buffer_max: int = 100_000,
        lookback_s: float = DEFAULT_MAX_AGE_S,
        max_age_s: float = DEFAULT_MAX_AGE_S,
        clock_skew_s: float = DEFAULT_CLOCK_SKEW_S,
        service: str = "",
        ack_key: str | Ed25519PrivateKey | None = None,
        kafka_options: Mapping[str, Any] | None = None,
    ) -> None:
        if not agent_id:
            raise ConfigError("agent_id", "required: it is who the events are from and who commands target")
        self.agent_id = agent_id
        self.tenant = tenant
        # the version this instance runs: stamped on its events, and a version-scoped halt
        # (a failed canary's rollback) stops only the instances of that version
        self.agent_version = agent_version
        self.bootstrap = bootstrap
        self.public_keys = load_public_keys(public_keys) if isinstance(public_keys, str) else dict(public_keys)
        if not self.public_keys:
            # without a trusted key every command would be refused: the agent could never be stopped
            raise ConfigError("public_keys", "no trusted kill-switch key: the agent could not obey any halt")
        self.on_halt = on_halt
        self.on_resume = on_resume
        self.events_topic = events_topic
        self.control_topic = control_topic
        self.acks_topic = acks_topic
        self.batch_max = batch_max
        self.batch_interval_s = batch_interval_s
        self.buffer_max = buffer_max
        self.lookback_s = lookback_s
        self.max_age_s = max_age_s
        self.clock_skew_s = clock_skew_s
        self.origin = service or agent_id
        # acks are signed with the agent's own key (its public half registered with the control
        # plane): an ack someone else writes to the acks topic does not count
        self.ack_key = agent_key(ack_key) if isinstance(ack_key, str) else ack_key
        # SASL/TLS settings for aiokafka (security_protocol, sasl_*, ssl_context)
        self.kafka_options = dict(kafka_options or {})

        self._buffer: list[dict[str, Any]] = []
        self._wake = asyncio.Event()
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._started_ms = 0
        self._seen: set[str] = set()
        self._halts: dict[str, KillSwitchCommand] = {}  # in force, by command id
        self.acks: list[ControlAck] = []  # every ack this client sent, newest last (bounded)
        self.dropped_events = 0
        self.published_events = 0

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, read back recent commands, and start the background tasks.

        When it returns, the client is positioned on the control topic: a
        command published from then on will be seen.
        """
        self._started_ms = int(time.time() * 1000)
        self._stopping = False
        self._producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all", linger_ms=5,
                                          **self.kafka_options)
        # no consumer group: aiokafka then assigns this consumer every partition of the topic,
        # which is what we need (any partition may hold a command for us, and every instance
        # of an agent must see every command)
        self._consumer = AIOKafkaConsumer(
            self.control_topic, bootstrap_servers=self.bootstrap, group_id=None, enable_auto_commit=False,
            auto_offset_reset="earliest", **self.kafka_options,
        )
        # aiokafka tells why it could not connect (authentication, certificate) only in its log
        caught = LastLibraryError()
        logging.getLogger("aiokafka").addHandler(caught)
        try:
            await self._producer.start()
            await self._consumer.start()
            await self._assign_control_partitions()
        except (KafkaError, OSError) as exc:
            await self._close_clients()
            why = " ".join((caught.message or str(exc)).split())[:400]
            raise BrokerError(f"agentwatch client: Kafka unreachable at {self.bootstrap}: {why}") from None
        except BaseException:
            await self._close_clients()
            raise
        finally:
            logging.getLogger("aiokafka").removeHandler(caught)
        self._tasks = [
            asyncio.create_task(self._control_loop(), name=f"agentwatch-control-{self.agent_id}"),
            asyncio.create_task(self._flush_loop(), name=f"agentwatch-flush-{self.agent_id}"),
        ]

    async def stop(self) -> None:
        """Publish what is buffered, then disconnect."""
        # The loops also watch this flag: a cancel that lands in the same turn of the event loop
        # as the end of the wait it interrupts is swallowed by Python 3.11's asyncio.wait_for, and
        # awaiting the task then hung forever. asyncio.wait also lets a cancel of stop() itself
        # through, where catching CancelledError around each task swallowed it.
        self._stopping = True
        self._wake.set()
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=_STOP_TIMEOUT_S)
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                log.error("agentwatch client: background task failed", extra={"task": task.get_name(),
                                                                             "error": str(task.exception())})
        try:
            await self.flush()
        except BrokerError as exc:
            log.error("agentwatch client: events not published at stop", extra={"error": str(exc),
                                                                                 "events": len(self._buffer)})
        await self._close_clients()

    async def __aenter__(self) -> AgentClient:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def _close_clients(self) -> None:
        for c in (self._consumer, self._producer):
            if c is not None:
                try:
                    await c.stop()
                except Exception:  # closing a client that never connected can raise; nothing to do
                    pass
        self._consumer = self._producer = None

    async def _assign_control_partitions(self) -> None:
        assert self._consumer is not None
        consumer = self._consumer
        deadline = time.monotonic() + 15
        while not consumer.assignment() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        tps = sorted(consumer.assignment())
        if not tps:
            raise BrokerError(f"agentwatch client: control topic {self.control_topic!r} does not exist")
        since = await consumer.offsets_for_times({tp: self._started_ms - int(self.lookback_s * 1000) for tp in tps})
        ends = await consumer.end_offsets(tps)
        for tp in tps:
            found = since.get(tp)
            # explicit offsets, not seek_to_end(): that is lazy, and a command published
            # between start() returning and the first fetch would be skipped
            consumer.seek(tp, found.offset if found is not None else ends[tp])

    # -- telemetry -----------------------------------------------------------------------------

    def emit(self, event: Mapping[str, Any]) -> None:
        """Queue one native event (schemas.events field names); identity and time are filled in."""
        e = dict(event)
        e.setdefault("agent_id", self.agent_id)
        e.setdefault("tenant", self.tenant)
        if self.agent_version:
            e.setdefault("agent_version", self.agent_version)
        e.setdefault("ts", _now().isoformat())
        e.setdefault("origin", self.origin)
        # a random id given here, not derived by the decoder from the content: two identical
        # calls in the same microsecond are two events, and a redelivered message keeps its ids
        e.setdefault("event_id", f"{self.agent_id}:{uuid.uuid4().hex}")
        if len(self._buffer) >= self.buffer_max:
            del self._buffer[0]
            self.dropped_events += 1
            if self.dropped_events in (1, 1000) or self.dropped_events % 100_000 == 0:
                log.error("agentwatch client: event buffer full, dropping the oldest",
                          extra={"dropped": self.dropped_events})
        self._buffer.append(e)
        if len(self._buffer) >= self.batch_max:
            self._wake.set()

    def record_tool_call(
        self,
        tool: str,
        arguments: Any = None,
        *,
        outcome: str = "ok",
        error_type: str = "",
        tool_call_id: str = "",
        trace_id: str = "",
        span_id: str = "",
        duration_ms: float | None = None,
        attributes: Mapping[str, Any] | None = None,
    ) -> None:
        e: dict[str, Any] = {"kind": "tool_call", "tool_name": tool, "outcome": outcome}
        if arguments is not None:
            # the fingerprint, not the arguments: they may hold secrets or personal data
            e["args_fingerprint"] = fingerprint_arguments(arguments)
        self._optional(e, error_type=error_type, tool_call_id=tool_call_id, trace_id=trace_id,
                       span_id=span_id, duration_ms=duration_ms, attributes=dict(attributes or {}))
        self.emit(e)

    def record_llm_call(
        self,
        model: str,
        input_tokens: int,
        output_tokens: int,
        *,
        cost_usd: float | None = None,
        outcome: str = "ok",
        error_type: str = "",
        trace_id: str = "",
        span_id: str = "",
        duration_ms: float | None = None,
        attributes: Mapping[str, Any] | None = None,
    ) -> None:
        e: dict[str, Any] = {"kind": "llm_call", "model": model, "input_tokens": input_tokens,
                             "output_tokens": output_tokens, "outcome": outcome}
        self._optional(e, cost_usd=cost_usd, error_type=error_type, trace_id=trace_id, span_id=span_id,
                       duration_ms=duration_ms, attributes=dict(attributes or {}))
        self.emit(e)

    @staticmethod
    def _optional(e: dict[str, Any], **values: Any) -> None:
        e.update({k: v for k, v in values.items() if v not in (None, "", {})})

    async def flush(self) -> None:
        """Publish everything buffered now (one JSON array per ``batch_max`` events)."""
        if self._producer is None:
            raise BrokerError("agentwatch client: flush before start()")
        while self._buffer:
            batch = self._buffer[: self.batch_max]
            try:
                await self._producer.send_and_wait(self.events_topic, orjson.dumps(batch),
                                                   key=self.agent_id.encode())
            except KafkaError as exc:
                raise BrokerError(f"agentwatch client: publishing {len(batch)} events failed: {exc}") from None
            # only now: a failed send keeps the events for the next attempt
            del self._buffer[: len(batch)]
            self.published_events += len(batch)

    async def _flush_loop(self) -> None:
        while not self._stopping:
            try:
                async with asyncio.timeout(self.batch_interval_s):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.flush()
            except BrokerError as exc:
                log.warning("agentwatch client: will retry publishing events", extra={"error": str(exc)})
                await asyncio.sleep(min(5.0, self.batch_interval_s * 4))

    # -- kill switch ---------------------------------------------------------------------------

    @property
    def halted(self) -> bool:
        """True while a halt of every tool is in force."""
        return any(not h.scope for h in self._active())

    def allowed(self, tool: str) -> bool:
        """Whether the agent may call ``tool`` now. Check it before every tool call."""
        return not any(h.covers(tool) for h in self._active())

    @property
    def active_halts(self) -> list[KillSwitchCommand]:
        return self._active()

    def _active(self) -> list[KillSwitchCommand]:
        now = _now()
        # a copy first (atomic): the synchronous wrapper reads this from the agent's thread
        # while the client's event loop thread may be changing it
        return [h for h in self._halts.copy().values() if h.expires_at > now]

    async def _control_loop(self) -> None:
        assert self._consumer is not None
        while not self._stopping:
            try:
                batches = await self._consumer.getmany(timeout_ms=200, max_records=500)
            except KafkaError as exc:
                log.warning("agentwatch client: control topic read failed; retrying", extra={"error": str(exc)})
                await asyncio.sleep(1.0)
                continue
            for records in batches.values():
                for record in records:
                    try:
                        await self._handle(record)
                    except Exception:  # one bad command must not stop the agent from hearing the next
                        log.exception("agentwatch client: handling a control record failed",
                                      extra={"offset": record.offset, "partition": record.partition})
            await self._expire()

    async def _handle(self, record: ConsumerRecord) -> None:
        raw: bytes = record.value or b""
        live = record.timestamp >= self._started_ms - 1000  # published since we started (not read back)
        try:
            cmd = KillSwitchCommand.from_json(raw)
        except (ValidationError, ValueError):
            if live:
                cid = _raw_command_id(raw)
                await self._ack(cid, AckStatus.REFUSED, "malformed: not a kill-switch command", "")
            return
        if not cmd.target.matches(self.agent_id, self.tenant, self.agent_version):
            return  # not for us: its own targets report on it
        try:
            verify(cmd, self.public_keys, now=_now(), seen_ids=self._seen,
                   max_age_s=self.max_age_s, clock_skew_s=self.clock_skew_s)
        except SignatureError as exc:
            if not live and refusal_reason(exc) == "expired":
                return  # history read back at start, not something sent to us now
            log.warning("agentwatch client: refused a kill-switch command",
                        extra={"command_id": cmd.command_id, "reason": str(exc)})
            await self._ack(cmd.command_id, AckStatus.REFUSED, str(exc), cmd.action.value)
            return
        # seen only once verified: a forged copy sent first must not make the real one look replayed
        self._seen.add(cmd.command_id)
        failure = await self._apply(cmd)
        if failure:
            await self._ack(cmd.command_id, AckStatus.REFUSED, failure, cmd.action.value)
        else:
            await self._ack(cmd.command_id, AckStatus.OBEYED, cmd.reason[:200], cmd.action.value)

    async def _apply(self, cmd: KillSwitchCommand) -> str:
        """Change the state, then call back; return a refusal reason if the callback failed."""
        if cmd.action is CommandAction.HALT:
            self._halts[cmd.command_id] = cmd
            callback = self.on_halt
        else:
            self._lift(cmd)
            callback = self.on_resume
        log.warning("agentwatch client: kill-switch command obeyed", extra={
            "command_id": cmd.command_id, "action": cmd.action.value, "scope": cmd.scope,
            "issued_by": cmd.issued_by})
        if callback is None:
            return ""
        try:
            result = callback(cmd)
            if inspect.isawaitable(result):
                await result
        except Exception as exc:  # the agent's code: report it, the tool gate (allowed()) still holds
            return f"callback_failed: {type(exc).__name__}: {exc}"[:300]
        return ""

    def _lift(self, resume: KillSwitchCommand) -> None:
        for cid, halt in list(self._halts.items()):
            if resume.target.kind is not TargetKind.ALL and halt.target.key != resume.target.key:
                continue
            if not resume.scope:
                del self._halts[cid]
            elif halt.scope:
                left = [t for t in halt.scope if t not in resume.scope]
                if left:
                    self._halts[cid] = halt.model_copy(update={"scope": left})
                else:
                    del self._halts[cid]

    async def _expire(self) -> None:
        now = _now()
        for cid, halt in list(self._halts.items()):
            if halt.expires_at <= now:
                del self._halts[cid]
                log.warning("agentwatch client: halt expired", extra={"command_id": cid})
                if self.on_resume is not None:
                    try:
                        result = self.on_resume(halt)
                        if inspect.isawaitable(result):
                            await result
                    except Exception:
                        log.exception("agentwatch client: on_resume failed for an expired halt")

    async def _ack(self, command_id: str, status: AckStatus, reason: str, action: str) -> None:
        ack = ControlAck(command_id=command_id, agent_id=self.agent_id, tenant=self.tenant, status=status,
                         reason=reason, action=action, ts=_now())
        if self.ack_key is not None:
            ack = ack.signed(self.ack_key)
        self.acks.append(ack)
        del self.acks[:-1000]
        # the event goes with the telemetry (ClickHouse, detectors); the ack goes out at once:
        # the control plane's deadline is ticking
        self.emit(ack.native_event())
        assert self._producer is not None
        try:
            await self._producer.send_and_wait(self.acks_topic, ack.to_json(), key=self.agent_id.encode())
        except KafkaError as exc:
            log.error("agentwatch client: acknowledgement not published",
                      extra={"command_id": command_id, "error": str(exc)})
        self._wake.set()


def _raw_command_id(raw: bytes) -> str:
    """The command id a malformed record claims, else one derived from its bytes."""
    try:
        doc = orjson.loads(raw)
        if isinstance(doc, dict) and isinstance(doc.get("command_id"), str) and doc["command_id"]:
            return doc["command_id"][:200]
    except orjson.JSONDecodeError:
        pass
    return stable_id("malformed_command", raw.hex())
