"""Keys land where Kafka's default partitioner puts them: agentwatch packs each internal
message per destination partition itself, so its hash must be Kafka's murmur2 exactly."""

from __future__ import annotations

import random

from aiokafka.partitioner import murmur2 as kafka_murmur2

from streams.kafka import murmur2, partition_for


def test_murmur2_is_kafkas_for_every_key_length_and_byte():
    rng = random.Random(3)
    keys = [rng.randbytes(n) for n in range(300) for _ in range(20)]
    keys += [bytes([b]) * n for b in (0, 0x7F, 0x80, 0xFF) for n in range(1, 12)]
    assert [murmur2(k) for k in keys] == [kafka_murmur2(k) for k in keys]


def test_partition_for_matches_the_default_partitioner():
    rng = random.Random(4)
    for _ in range(2000):
        key = rng.randbytes(16).hex()
        for n in (1, 2, 3, 4, 7, 12):
            assert partition_for(key, n) == (kafka_murmur2(key.encode()) & 0x7FFFFFFF) % n
