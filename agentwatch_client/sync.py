"""``SyncAgentClient``: the agent client for code that is not asyncio.

It runs an :class:`~agentwatch_client.client.AgentClient` on an event loop in a
daemon thread of its own. Recording calls never block (they hand the event to
the loop thread); ``halted`` / ``allowed()`` read the state the loop thread
keeps. ``on_halt`` / ``on_resume`` run in the client's thread, so they must be
thread-safe: setting a ``threading.Event`` the agent checks is the usual way.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, TypeVar

from agentwatch_client.client import AgentClient
from agentwatch_client.errors import BrokerError
from agentwatch_client.wire import ControlAck, KillSwitchCommand

T = TypeVar("T")


class SyncAgentClient:
    """The same arguments as :class:`AgentClient`; use ``with`` or ``start()`` / ``stop()``."""

    def __init__(self, agent_id: str, bootstrap: str, *, start_timeout_s: float = 30.0, **kwargs: Any) -> None:
        # built here, in the caller's thread, so a bad argument raises where it was given
        self._client = AgentClient(agent_id, bootstrap, **kwargs)
        self._start_timeout_s = start_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def client(self) -> AgentClient:
        """The asyncio client underneath (its coroutines must run on the client's loop)."""
        return self._client

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Connect and read back recent commands; returns once the client is listening."""
        if self._loop is not None:
            return
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name=f"agentwatch-{self._client.agent_id}", daemon=True)
        thread.start()
        self._loop, self._thread = loop, thread
        try:
            self._run(self._client.start(), self._start_timeout_s)
        except BaseException:
            self._shutdown_loop()
            raise

    def stop(self, timeout_s: float = 30.0) -> None:
        """Publish what is buffered, disconnect, and end the client's thread."""
        if self._loop is None:
            return
        try:
            self._run(self._client.stop(), timeout_s)
        finally:
            self._shutdown_loop()

    def __enter__(self) -> SyncAgentClient:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self, coro: Coroutine[Any, Any, T], timeout_s: float) -> T:
        assert self._loop is not None
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout_s)
        except TimeoutError:
            future.cancel()
            raise BrokerError(f"agentwatch client: no answer from Kafka within {timeout_s:.0f} s") from None

    def _shutdown_loop(self) -> None:
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(10)
        loop.close()

    # -- telemetry: never blocks, the loop thread buffers and publishes ------------------------

    def _call(self, fn: Callable[..., None], *args: Any, **kwargs: Any) -> None:
        if self._loop is None:
            raise BrokerError("agentwatch client: record before start()")
        self._loop.call_soon_threadsafe(lambda: fn(*args, **kwargs))

    def emit(self, event: Mapping[str, Any]) -> None:
        self._call(self._client.emit, dict(event))

    def record_tool_call(self, tool: str, arguments: Any = None, **kwargs: Any) -> None:
        self._call(self._client.record_tool_call, tool, arguments, **kwargs)

    def record_llm_call(self, model: str, input_tokens: int, output_tokens: int, **kwargs: Any) -> None:
        self._call(self._client.record_llm_call, model, input_tokens, output_tokens, **kwargs)

    def flush(self, timeout_s: float = 30.0) -> None:
        """Publish everything recorded so far, and wait until Kafka has it."""
        async def _flush() -> None:  # runs after the recordings queued before it, in order
            await self._client.flush()

        self._run(_flush(), timeout_s)

    # -- kill switch ---------------------------------------------------------------------------

    @property
    def halted(self) -> bool:
        return self._client.halted

    def allowed(self, tool: str) -> bool:
        """Whether the agent may call ``tool`` now. Check it before every tool call."""
        return self._client.allowed(tool)

    @property
    def active_halts(self) -> list[KillSwitchCommand]:
        return self._client.active_halts

    @property
    def acks(self) -> list[ControlAck]:
        return list(self._client.acks)

    @property
    def dropped_events(self) -> int:
        return self._client.dropped_events

    @property
    def published_events(self) -> int:
        return self._client.published_events
