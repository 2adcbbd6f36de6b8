"""Every compression codec a Collector may use reaches the worker and is decoded.

The OpenTelemetry Collector's Kafka exporter (``producer.compression``) and
other producers compress record batches with gzip, snappy, lz4 or zstd; the
worker must read all four. Each codec's records are produced to the real
broker compressed and read back as stored events.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from tests.live import LiveWorker

pytestmark = pytest.mark.kafka

CODECS = ("gzip", "snappy", "lz4", "zstd")


async def produce_compressed(bootstrap: str, topic: str, codec: str, values: list[bytes]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, compression_type=codec, linger_ms=50)
    await producer.start()
    try:
        # sent together, so they share one compressed record batch
        futures = [await producer.send(topic, v) for v in values]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def test_each_codec_is_decoded_by_the_worker(kafka_bootstrap, tmp_path):
    with LiveWorker(kafka_bootstrap, tmp_path) as w:
        topic = w.settings.topic_events_in
        ts = datetime(2026, 1, 15, 11, 0, tzinfo=timezone.utc).isoformat()
        for codec in CODECS:
            values = [orjson.dumps({"kind": "tool_call", "agent_id": f"agent-{codec}", "ts": ts,
                                    "tool_name": "lookup", "arguments": {"i": i}, "outcome": "ok"})
                      for i in range(20)]
            asyncio.run(produce_compressed(kafka_bootstrap, topic, codec, values))
        rows = w.wait_rows(
            "SELECT agent_id, count() FROM agentwatch.events FINAL GROUP BY agent_id ORDER BY agent_id",
            lambda r: len(r) == len(CODECS) and all(n == 20 for _, n in r), timeout=120,
        )
        assert dict(rows) == {f"agent-{c}": 20 for c in CODECS}, w.log_tail()
        assert w.proc is not None and w.proc.poll() is None
