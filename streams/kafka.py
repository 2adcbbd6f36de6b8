"""Finding the broker, checking it answers, and creating agentwatch's topics."""

from __future__ import annotations

import asyncio
import logging
import struct
import sys
from collections.abc import Callable, Mapping
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from agentwatch_client.errors import LastLibraryError
from schemas.errors import BrokerError
from streams.settings import Settings

log = logging.getLogger(__name__)


def resolve_bootstrap(settings: Settings) -> str:
    """The configured bootstrap, else the local broker recorded under AGENTWATCH_HOME."""
    if settings.bootstrap:
        return settings.bootstrap
    from deploy.broker import status

    info = status(settings.broker_dir)
    if info is None:
        raise BrokerError(
            "no Kafka broker: set AGENTWATCH_BOOTSTRAP=host:port or start the local one "
            "with `agentwatch broker up`"
        )
    return info.bootstrap


def all_topics(settings: Settings) -> list[str]:
    return [
        settings.topic_otlp,
        settings.topic_events_in,
        settings.topic_audit_in,
        settings.topic_dlq,
        settings.topic_alerts,
        settings.topic_shadow_alerts,
        settings.topic_control,
        settings.topic_canary,
        settings.topic_acks,
        settings.topic_by_trace,
        settings.topic_by_agent,
        settings.topic_by_tenant,
        settings.topic_state,
    ]


def input_topics(settings: Settings) -> dict[str, str]:
    """The topics others write and agentwatch only reads, each with the variable that names it.

    agentwatch never creates these: a misspelt name would otherwise become a new,
    empty topic that the worker reads forever while the real one goes unwatched.
    """
    return {
        settings.topic_otlp: "AGENTWATCH_TOPIC_OTLP",
        settings.topic_events_in: "AGENTWATCH_TOPIC_EVENTS_IN",
        settings.topic_audit_in: "AGENTWATCH_TOPIC_AUDIT_IN",
    }


def owned_topics(settings: Settings) -> list[str]:
    """The internal and output topics agentwatch creates when they are missing."""
    inputs = input_topics(settings)
    return [t for t in all_topics(settings) if t not in inputs]


async def missing_topics(bootstrap: str, topics: list[str], *, timeout_s: float = 15,
                         security: Mapping[str, Any] | None = None) -> list[str]:
    """Which of ``topics`` do not exist on the broker (a BrokerError if it does not answer)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout_s * 1000),
                                **(security or {}))
    try:
        await _start(admin, bootstrap, timeout_s)
        existing = set(await admin.list_topics())
    except KafkaError as exc:
        raise BrokerError(f"Kafka broker at {bootstrap}: {exc or type(exc).__name__}") from None
    finally:
        await _close(admin)
    return [t for t in topics if t not in existing]


def warn_missing_inputs(bootstrap: str, settings: Settings) -> list[str]:
    """Say on stderr, one line each, which input topics do not exist (and return them)."""
    names = input_topics(settings)
    missing = asyncio.run(missing_topics(bootstrap, list(names), security=topic_options(settings)["security"]))
    for topic in missing:
        print(f"agentwatch: warning: input topic {topic!r} ({names[topic]}) does not exist on {bootstrap}; "
              "nothing is read from it until it is created (agentwatch creates only its own topics)",
              file=sys.stderr, flush=True)
        log.warning("input topic missing", extra={"topic": topic, "setting": names[topic]})
    return missing


def topic_options(settings: Settings) -> dict[str, Any]:
    """ensure_topics' keyword arguments from the settings: security, replication, min ISR."""
    from streams.kafka_security import kafka_options

    return {"security": kafka_options(settings), "replication_factor": settings.kafka_replication_factor,
            "min_insync_replicas": settings.kafka_min_insync_replicas}


def partition_for(key: str, partitions: int) -> int:
    """The partition Kafka's default partitioner picks for ``key`` (murmur2)."""
    if partitions == 1:
        return 0
    return (murmur2(key.encode()) & 0x7FFFFFFF) % partitions


_M = 0x5BD1E995
_MASK = 0xFFFFFFFF
_WORDS: dict[int, Callable[[bytes], tuple[int, ...]]] = {}  # word count -> its unpacker


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 (org.apache.kafka.common.utils.Utils.murmur2), the same values as
    aiokafka's: its version reads the key a byte at a time, and ingest hashes one trace id per
    trace (about 5 us each); this one reads four-byte words in one ``struct`` call (about 1 us)."""
    length = len(data)
    h = 0x9747B28C ^ length
    n = length >> 2
    words = _WORDS.get(n)
    if words is None:
        words = struct.Struct(f"<{n}I").unpack_from
        if n <= 64:  # ids and names; a key of any other length is unpacked without caching
            _WORDS[n] = words
    m, mask = _M, _MASK
    for k in words(data):
        k = (k * m) & mask
        h = ((h * m) & mask) ^ (((k ^ (k >> 24)) * m) & mask)
    tail = length & 3
    if tail:
        i = n << 2
        if tail == 3:
            h ^= data[i + 2] << 16
        if tail >= 2:
            h ^= data[i + 1] << 8
        h = ((h ^ data[i]) * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    return h ^ (h >> 15)


async def ensure_topics(
    bootstrap: str, topics: list[str], partitions: int, *, timeout_s: float = 15,
    overrides: dict[str, int] | None = None, security: Mapping[str, Any] | None = None,
    replication_factor: int = 1, min_insync_replicas: int = 0,
    topic_configs: dict[str, dict[str, str]] | None = None,
) -> dict[str, int]:
    """Create missing topics (existing ones are left as they are); return each
    topic's actual partition count.

    Fails with a one-line BrokerError when the broker does not answer, so the
    CLI never hangs on a wrong bootstrap address.
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout_s * 1000),
                                **(security or {}))
    try:
        await _start(admin, bootstrap, timeout_s)
    except BrokerError:
        await _close(admin)
        raise
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in topics if t not in existing]
        configs = {"min.insync.replicas": str(min_insync_replicas)} if min_insync_replicas else {}
        if missing:
            try:
                response = await admin.create_topics(
                    [NewTopic(t, num_partitions=(overrides or {}).get(t, partitions),
                              replication_factor=replication_factor,
                              topic_configs={**configs, **(topic_configs or {}).get(t, {})})
                     for t in missing]
                )
                # the broker answers per topic: an error code is not raised (36: already exists)
                failed = [(err[0], err[2] if len(err) > 2 else err[1]) for err in response.topic_errors
                          if err[1] not in (0, 36)]
            except TopicAlreadyExistsError:
                failed = []
            except KafkaError as exc:
                failed = [(", ".join(missing), str(exc))]
            if failed:  # e.g. a replication factor larger than the cluster
                raise BrokerError(
                    f"creating topics at {bootstrap} (replication factor {replication_factor}, min.insync.replicas "
                    f"{min_insync_replicas or 'default'}): " + "; ".join(f"{t}: {why}" for t, why in failed)
                )
            log.info("created topics", extra={"topics": missing})
        # just-created topics can show no partitions until the metadata settles
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            counts = {t["topic"]: len(t["partitions"]) for t in await admin.describe_topics(topics)}
            if all(counts.get(t, 0) > 0 for t in topics):
                return counts
            if asyncio.get_running_loop().time() > deadline:
                raise BrokerError(f"topics without partitions after {timeout_s:.0f}s: "
                                  f"{[t for t in topics if not counts.get(t)]}")
            await asyncio.sleep(0.2)
    finally:
        await _close(admin)


async def _start(admin: AIOKafkaAdminClient, bootstrap: str, timeout_s: float) -> None:
    """Start an admin client; a BrokerError saying why on one line if it cannot connect."""
    aiokafka_log = logging.getLogger("aiokafka")
    caught = LastLibraryError()
    aiokafka_log.addHandler(caught)
    propagate, aiokafka_log.propagate = aiokafka_log.propagate, False
    try:
        await asyncio.wait_for(admin.start(), timeout_s)
    except (KafkaError, OSError, asyncio.TimeoutError) as exc:
        why = caught.message or str(exc) or type(exc).__name__
        raise BrokerError(f"Kafka broker unreachable at {bootstrap}: {' '.join(why.split())[:400]}") from None
    finally:
        aiokafka_log.removeHandler(caught)
        aiokafka_log.propagate = propagate


async def _close(admin: AIOKafkaAdminClient) -> None:
    try:
        await admin.close()
    except Exception:  # closing a client that never connected can raise; nothing to do
        pass
