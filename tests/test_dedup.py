"""The redelivery memory (detectors/dedup.py): exactly the answers of a set of ids per bucket,
in a few bytes an id once a bucket is past, through snapshots, and never fooled by a snapshot."""

from __future__ import annotations

import base64
import random
import tracemalloc
import uuid
from hashlib import blake2b

import orjson
import pytest

from detectors.dedup import RedeliveryMemory, dedup_key
from detectors.engine import DetectionEngine
from detectors.policy import parse_policy
from schemas.errors import StateError

BUCKET = 60.0


def test_answers_are_a_set_of_ids_per_bucket_whatever_is_frozen_or_forgotten():
    rng = random.Random(9)
    memory, reference = RedeliveryMemory(BUCKET), {}
    ids = [blake2b(str(i).encode(), digest_size=16).hexdigest() for i in range(3000)] + [f"native-{i}" for i in
                                                                                          range(500)]
    watermark = 0.0
    for step in range(20_000):
        watermark += rng.uniform(0, 0.3)
        i = rng.randrange(len(ids))
        ts = watermark - rng.uniform(0, 200)  # late ones too, and redeliveries of old ones
        bucket = int(ts // BUCKET)
        key = (bucket, ids[i])
        forgotten = (bucket + 1) * BUCKET < watermark - 400
        expected = forgotten or key not in reference
        if not forgotten:
            reference[key] = True
        assert memory.first_time(ids[i], ts) is expected or forgotten, step
        if step % 97 == 0:
            memory.advance(watermark, closed_after_s=30, forget_before=watermark - 400)
            reference = {k: v for k, v in reference.items() if (k[0] + 1) * BUCKET >= watermark - 400}
    assert memory.buckets <= 9


def test_a_past_bucket_costs_a_few_bytes_an_id_and_still_knows_them():
    memory = RedeliveryMemory(BUCKET)
    ids = [blake2b(i.to_bytes(4, "little"), digest_size=16).hexdigest() for i in range(200_000)]
    tracemalloc.start()
    for n, item in enumerate(ids):
        memory.first_time(item, 10 * BUCKET + n * 1e-4)  # one bucket
    memory.advance(12 * BUCKET, closed_after_s=30, forget_before=0)
    size, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert size / len(ids) < 12, f"{size / len(ids):.1f} bytes an id"
    assert not any(memory.first_time(item, 10 * BUCKET + 1) for item in ids[::1000])
    assert memory.first_time("one more", 10 * BUCKET + 1) and not memory.first_time("one more", 10 * BUCKET + 2)


def test_snapshot_round_trip_and_the_previous_format():
    memory = RedeliveryMemory(BUCKET)
    for i in range(100):
        memory.first_time(f"id-{i}", i * 3.0)
    memory.advance(200, closed_after_s=30, forget_before=0)
    memory.first_time("added-late", 5.0)
    restored = RedeliveryMemory(BUCKET)
    restored.load_state(orjson.loads(orjson.dumps(memory.to_state())))
    assert len(restored) == len(memory) == 101
    assert not any(restored.first_time(f"id-{i}", i * 3.0) for i in range(100))
    assert not restored.first_time("added-late", 5.0)
    old = RedeliveryMemory(BUCKET)
    old.load_ids([[0, ["a", "b"]], [1, ["c"]]])
    assert not old.first_time("a", 10) and not old.first_time("c", 70) and old.first_time("c", 10)


def test_an_engine_snapshot_from_before_keeps_its_ids():
    policy = parse_policy({})
    doc = orjson.loads(DetectionEngine(policy).snapshot())
    state = doc["state"]
    del state["dedup"]
    state["seen"] = [[0, ["evt-1"]]]
    engine = DetectionEngine.restore(policy, orjson.dumps(doc))
    assert not engine._dedup.first_time("evt-1", 1.0)


@pytest.mark.parametrize("frozen", [
    [[0, "not base64!", []]],
    [[0, base64.b64encode(b"1234567").decode(), []]],  # not whole 8-byte keys
    [[0, "", [-1]]],
    [[0, "", [1 << 64]]],
    [["0", "", []]],
])
def test_a_malformed_snapshot_is_refused(frozen: list):
    with pytest.raises(StateError):
        RedeliveryMemory(BUCKET).load_state({"bucket_s": BUCKET, "hot": [], "frozen": frozen})


def test_keys_of_ids_that_share_a_prefix_differ():
    # time-based UUIDs of one instant on two hosts share their first 16 hex digits
    a, b = uuid.UUID(int=(0xAAAA << 96) | 1), uuid.UUID(int=(0xAAAA << 96) | 2)
    assert a.hex[:16] == b.hex[:16] and dedup_key(a.hex) != dedup_key(b.hex)
    assert dedup_key("x") != dedup_key("y") and 0 <= dedup_key("x") < 1 << 64
