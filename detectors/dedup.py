"""Redelivery memory: which ids were seen recently, exactly, in a few bytes each.

At-least-once input means a batch can come twice (a stage that crashed re-reads
what it had not committed), so the engines skip an id they have seen within the
policy's ``dedup_window_s`` (plus twice the allowed lateness) of event time. At
a few thousand events a second that window holds millions of ids: as Python
strings in sets, about 110 bytes each, hundreds of MB, and a state snapshot of
about 35 bytes of JSON per id written every few seconds.

Ids are kept by event-time bucket (a redelivered item has its original time,
so one bucket is the only place to look), as 64-bit keys:

* the bucket still being filled (the watermark not yet past its end plus the
  allowed lateness) is a ``set`` of keys, as before;
* a bucket the watermark has passed is frozen into a sorted ``array('Q')``, 8
  bytes a key, searched by bisection; ids that still arrive for it (late
  events, redeliveries that are not duplicates) go to a small set beside it.
  A snapshot writes the array's bytes (base64), not a list of strings.

A key is the id itself read as hex when it is 32 hex digits (every id
agentwatch derives, and UUIDs), its two halves xored so that UUIDs that share
a time prefix stay apart; any other id is hashed (blake2b, 8 bytes). Two ids
of one minute sharing a key is about as likely as 2 in 10^9 at 270,000 ids a
minute; it would make the later one count as a duplicate, as a client sending
an id twice does.
"""

from __future__ import annotations

import base64
import binascii
import heapq
from array import array
from bisect import bisect_left
from hashlib import blake2b
from typing import Any

from detectors import state as st
from schemas.errors import StateError

_WORD = 8  # bytes per frozen key


def dedup_key(item_id: str) -> int:
    """The 64-bit key of an id (see the module doc)."""
    if len(item_id) == 32:
        try:
            return int(item_id[:16], 16) ^ int(item_id[16:], 16)
        except ValueError:
            pass
    return int.from_bytes(blake2b(item_id.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


class _Frozen:
    """A past bucket: its keys sorted, and those added since it was frozen."""

    __slots__ = ("keys", "added")

    def __init__(self, keys: array, added: set[int] | None = None) -> None:
        self.keys = keys
        self.added = added if added is not None else set()

    def __contains__(self, key: int) -> bool:
        if key in self.added:
            return True
        keys = self.keys
        i = bisect_left(keys, key)
        return i < len(keys) and keys[i] == key

    def __len__(self) -> int:
        return len(self.keys) + len(self.added)


class RedeliveryMemory:
    """Ids seen within the last buckets of event time."""

    __slots__ = ("bucket_s", "_hot", "_frozen", "_order")

    def __init__(self, bucket_s: float = 60.0) -> None:
        self.bucket_s = bucket_s
        self._hot: dict[int, set[int]] = {}
        self._frozen: dict[int, _Frozen] = {}
        self._order: list[int] = []  # a heap of every bucket held, oldest first

    def first_time(self, item_id: str, ts: float) -> bool:
        """Record ``item_id`` at event time ``ts``; False when it was seen before."""
        bucket = int(ts // self.bucket_s)
        key = dedup_key(item_id)
        keys = self._hot.get(bucket)
        if keys is not None:
            if key in keys:
                return False
            keys.add(key)
            return True
        frozen = self._frozen.get(bucket)
        if frozen is not None:
            if key in frozen:
                return False
            frozen.added.add(key)
            return True
        self._hot[bucket] = {key}
        heapq.heappush(self._order, bucket)
        return True

    def advance(self, watermark: float, *, closed_after_s: float, forget_before: float) -> None:
        """Freeze the buckets the watermark passed by ``closed_after_s`` (the allowed
        lateness: only late and redelivered ids still come for them) and forget those that
        ended before ``forget_before``."""
        order = self._order
        while order and (order[0] + 1) * self.bucket_s < forget_before:
            b = heapq.heappop(order)
            self._hot.pop(b, None)
            self._frozen.pop(b, None)
        size = self.bucket_s
        for b in [b for b in self._hot if (b + 1) * size + closed_after_s < watermark]:
            self._frozen[b] = _Frozen(array("Q", sorted(self._hot.pop(b))))

    def __len__(self) -> int:
        """Ids held."""
        return sum(map(len, self._hot.values())) + sum(map(len, self._frozen.values()))

    @property
    def buckets(self) -> int:
        return len(self._order)

    # -- snapshots (detectors/state.py) ---------------------------------------------------

    def to_state(self) -> dict[str, Any]:
        return {
            "bucket_s": self.bucket_s,
            "hot": [[b, list(keys)] for b, keys in self._hot.items()],
            "frozen": [[b, base64.b64encode(f.keys.tobytes()).decode("ascii"), list(f.added)]
                       for b, f in self._frozen.items()],
        }

    def load_state(self, data: Any) -> None:
        d = st.mapping(data)
        self._hot.clear()
        self._frozen.clear()
        for b, keys in st.seq(d.get("hot", [])):
            self._hot[st.integer(b)] = {_key(k) for k in st.seq(keys)}
        for b, blob, added in st.seq(d.get("frozen", [])):
            try:
                raw = base64.b64decode(st.text(blob), validate=True)
            except (binascii.Error, ValueError) as exc:
                raise StateError(f"redelivery memory: bucket {b!r} is not base64 ({exc})") from None
            if len(raw) % _WORD:
                raise StateError(f"redelivery memory: bucket {b!r} holds {len(raw)} bytes, not whole keys")
            keys = array("Q")
            keys.frombytes(raw)
            # sorted again: a snapshot is hostile input, and bisection needs order to be right
            self._frozen[st.integer(b)] = _Frozen(array("Q", sorted(keys)), {_key(k) for k in st.seq(added)})
        self._order = sorted({*self._hot, *self._frozen})

    def load_ids(self, buckets: Any) -> None:
        """Buckets of ids as earlier snapshots wrote them: ``[[bucket, [id, ...]], ...]``."""
        for b, ids in st.seq(buckets):
            bucket = st.integer(b)
            keys = self._hot.setdefault(bucket, set())
            keys.update(dedup_key(i) for i in st.texts(ids))
        self._order = sorted({*self._hot, *self._frozen})


def _key(v: Any) -> int:
    k = st.integer(v)
    if not 0 <= k < 1 << 64:
        raise StateError(f"redelivery memory: key {k} is not 64 bits")
    return k
