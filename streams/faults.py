"""Fault injection for the fault-injection test suite, and nothing else.

``AGENTWATCH_FAULTS`` names points of the worker and the batch at which each
fails once, e.g. ``ingest@3,producer@5,store@2`` (the third ingest batch raises,
the fifth producer delivery raises, the second store flush raises; ``store@2-50``
fails the second to fiftieth). Unset (the
default, and always in production) every check is one dictionary lookup that
finds nothing. The points:

* ``ingest``, ``correlate``, ``detect``: the stage raises at the start of a batch
  (before any state changed), as a bug triggered by that batch would;
* ``producer``: delivering a batch's outputs to Kafka fails (transient);
* ``store``: a ClickHouse flush fails (transient);
* ``periodic_commit`` (no count): faust's periodic offset commit never runs, as
  for a worker killed before its timer fires; only each batch's checkpoint commits.
"""

from __future__ import annotations

import os
from collections import Counter

from schemas.errors import AgentwatchError, StoreUnavailable

ENV = "AGENTWATCH_FAULTS"


class InjectedFault(AgentwatchError):
    """Raised by :func:`hit` at a configured point; never raised in production."""


class InjectedStoreFault(InjectedFault, StoreUnavailable):
    """An injected transient store failure: handled as a real one would be."""


def _parse(spec: str) -> dict[str, set[int]]:
    plan: dict[str, set[int]] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        point, _, nth = item.partition("@")
        first, _, last = (nth or "1").partition("-")
        plan.setdefault(point, set()).update(range(int(first), int(last or first) + 1))
    return plan


_plan = _parse(os.environ.get(ENV, ""))
_calls: Counter[str] = Counter()


def hit(point: str) -> None:
    """Raise if ``point`` is configured to fail at this call (counted per point)."""
    if not _plan:
        return
    wanted = _plan.get(point)
    if wanted is None:
        return
    _calls[point] += 1
    if _calls[point] in wanted:
        cls = InjectedStoreFault if point == "store" else InjectedFault
        raise cls(f"injected fault at {point} call {_calls[point]}")


def active(point: str) -> bool:
    """Whether ``point`` is configured at all (for faults that are a mode, not a call)."""
    return point in _plan
