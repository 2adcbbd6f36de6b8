"""The control publisher: signs kill-switch commands, puts them on the control topic, records them.

Used by ``agentwatch killswitch issue|lift`` (the worker publishes its own
enforce-mode halts through its faust topic with the same key and value, see
``command_record``). The Kafka key is the command's target key
(``agent:<id>``, ``tenant:<name>``, ``all``) so every command for one target
lands on one partition, in issue order: an agent replaying the topic sees the
halt before its lift.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from schemas.control import KillSwitchCommand, sign
from schemas.errors import BrokerError
from sinks.clickhouse import ClickHouseStore

log = logging.getLogger("agentwatch.sinks.control")


def command_record(cmd: KillSwitchCommand) -> tuple[bytes, bytes]:
    """(key, value) of a command's Kafka record."""
    return cmd.target.key.encode(), cmd.to_json()


class ControlPublisher:
    """Signs (if given a key) and publishes commands, waiting for the broker's acknowledgement.

    ``store``, when given, also records each command in ``agentwatch.killswitches``
    after it is on the topic (a command recorded but never sent would show a halt
    that no agent received).
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        *,
        private_key: Ed25519PrivateKey | None = None,
        store: ClickHouseStore | None = None,
        timeout_s: float = 15.0,
        security: Mapping[str, Any] | None = None,
    ) -> None:
        self.bootstrap = bootstrap
        self._security = dict(security or {})  # aiokafka SASL/TLS keyword arguments
        self.topic = topic
        self._key = private_key
        self.store = store
        self._timeout_ms = int(timeout_s * 1000)
        self._producer: AIOKafkaProducer | None = None

    async def start(self) -> None:
        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap,
            acks="all",  # a kill switch must survive a broker failover before we say it was sent
            enable_idempotence=True,
            request_timeout_ms=self._timeout_ms,
            **self._security,
        )
        try:
            await producer.start()
        except (KafkaError, OSError) as exc:
            await producer.stop()
            raise BrokerError(f"Kafka broker unreachable at {self.bootstrap}: {exc or type(exc).__name__}") from None
        self._producer = producer

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    async def __aenter__(self) -> ControlPublisher:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def publish(self, commands: Sequence[KillSwitchCommand]) -> list[KillSwitchCommand]:
        """Publish ``commands`` (signed here when unsigned and a key was given); return what was sent."""
        if self._producer is None:
            raise BrokerError("ControlPublisher.publish before start()")
        sent: list[KillSwitchCommand] = []
        for cmd in commands:
            if not cmd.signature and self._key is not None:
                cmd = sign(cmd, self._key)
            key, value = command_record(cmd)
            try:
                await self._producer.send_and_wait(self.topic, value, key=key)
            except KafkaError as exc:
                raise BrokerError(f"could not publish command {cmd.command_id} to {self.topic}: {exc}") from None
            log.info("kill-switch command published", extra={
                "command_id": cmd.command_id, "action": cmd.action.value, "target": cmd.target.key,
                "issued_by": cmd.issued_by})
            sent.append(cmd)
        if self.store is not None and sent:
            self.store.insert_killswitches(sent)
        return sent
