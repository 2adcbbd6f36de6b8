"""Detector state snapshots: a restored engine/resolver/joiner carries on exactly where the
original was, and a corrupt snapshot is refused with StateError, never executed."""

from __future__ import annotations

import pickle
import random
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson
import pytest

from detectors.engine import DetectionEngine
from detectors.identity import IdentityResolver
from detectors.join import Joiner
from detectors.policy import Policy, parse_policy
from schemas.alerts import Alert
from schemas.errors import StateError
from schemas.events import Event, EventKind
from schemas.internal_wire import from_columns
from streams.replay import decode_any, records_in_event_time
from streams.scorecard import load_scenarios
from streams.stages import CorrelateStage, DetectStage, IngestStage

CORPUS = Path(__file__).parent / "scenarios"
SCENARIOS = load_scenarios(CORPUS)
T0 = datetime(2026, 11, 1, 12, 0, tzinfo=timezone.utc)


def _restored(policy: Policy, correlate: CorrelateStage, detect: DetectStage) -> None:
    """Swap every stateful object for one restored from its own snapshot (as a worker that
    died right here and came back from the snapshot topic would run)."""
    correlate.resolver = IdentityResolver.restore(policy.allowed_lateness_s, correlate.resolver.snapshot())
    correlate.joiner = Joiner.restore(policy, correlate.joiner.snapshot())
    detect.engine = DetectionEngine.restore(policy, detect.engine.snapshot())


def _run(paths: list[Path], policy: Policy, *, restore_at: set[int] | None) -> list[tuple[Any, ...]]:
    """The replay loop, restoring from snapshots before the records in ``restore_at``;
    returns every alert emission in order (id, count, severity, summary, evidence), then
    the ids of the alerts resolved (their episodes closed by timers)."""
    ingest = IngestStage({}, default=decode_any)
    correlate, detect = CorrelateStage(policy), DetectStage(policy)
    emitted: list[Alert] = []
    for i, rec in enumerate(records_in_event_time(paths)):
        if restore_at is None or i in restore_at:
            _restored(policy, correlate, detect)
        routed = ingest.process([rec])
        batch = [ev for evs in routed.by_trace.values() for ev in evs]
        attributed = correlate.process_local(batch)
        attributed += [ev for evs in routed.by_agent.values() for ev in evs]
        emitted += detect.process(attributed)
    if restore_at is None:
        _restored(policy, correlate, detect)
    emitted += detect.process(correlate.finish_local())
    emitted += detect.finish()
    return [(a.alert_id, a.count, a.severity, a.summary, a.last_seen, [e.event_id for e in a.evidence])
            for a in emitted] + [("resolved", detect.engine.resolved)]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_restoring_at_every_record_emits_what_an_uninterrupted_run_does(scenario):
    policy = scenario.policy()
    straight = _run(scenario.inputs, policy, restore_at=set())
    assert _run(scenario.inputs, policy, restore_at=None) == straight  # restored before every record
    n = len(records_in_event_time(scenario.inputs))
    rnd = random.Random(scenario.name)
    assert _run(scenario.inputs, policy, restore_at={rnd.randrange(n + 1)}) == straight
    if scenario.expected:
        assert straight


def tool(at: float, name: str = "delete_database", outcome: str = "ok", **kw: Any) -> Event:
    return Event(event_id=f"t{at}-{name}", kind=EventKind.TOOL_CALL, ts=T0 + timedelta(seconds=at),
                 agent_id="a1", source="native", tool_name=name, outcome=outcome, tool_call_id=f"c{at}", **kw)


def test_timers_are_state_and_fire_after_a_restore_with_no_new_traffic():
    policy = parse_policy({"high_risk": {"tools": ["delete_database"]}})
    eng = DetectionEngine(policy)
    wall = 1_000_000.0
    assert eng.process([tool(0)], wall=wall) == []  # the decision waits for the allowed lateness
    restored = DetectionEngine.restore(policy, eng.snapshot())
    fired = restored.tick(wall + policy.allowed_lateness_s + 1)
    assert [a.detector for a in fired] == ["escalation_bypass"]
    assert fired == eng.tick(wall + policy.allowed_lateness_s + 1)
    # and the restored redelivery memory still knows the event
    assert restored.process([tool(0)], wall=wall + 40) == [] and restored.duplicates_skipped == 1


def test_snapshot_is_plain_json_with_a_version_and_shares_held_events():
    eng = DetectionEngine(parse_policy({}))
    eng.process([tool(i, "search", args_fingerprint="f", outcome="error") for i in range(3)])
    doc = orjson.loads(eng.snapshot())
    assert doc["format"] == "agentwatch.state" and doc["version"] == 3 and doc["kind"] == "engine"
    # each failed call sits in the same-call window and the failure run: written once
    assert len(from_columns(*doc["events"])) == 3


def _held(doc: dict[str, Any]) -> list[Event]:
    return from_columns(*doc["events"])


@pytest.mark.parametrize("version", [1, 2])
def test_snapshots_of_earlier_versions_still_restore(version):
    eng = DetectionEngine(parse_policy({}))
    eng.process([tool(i, "search", args_fingerprint="f", outcome="error") for i in range(3)])
    doc = orjson.loads(eng.snapshot())
    held = _held(doc)
    doc["version"] = version
    if version == 1:  # events as JSON objects
        doc["events"] = [e.model_dump(mode="json") for e in held]
    else:  # every event a row of all fields under one header
        doc["fields"] = list(Event.model_fields)
        doc["events"] = [list(e.model_dump(mode="json").values()) for e in held]
    restored = DetectionEngine.restore(parse_policy({}), orjson.dumps(doc))
    assert _held(orjson.loads(restored.snapshot())) == held
    # and it goes on detecting where the original left off (the failure run continues)
    more = [tool(i, "search", args_fingerprint="f", outcome="error") for i in range(3, 8)]
    assert [a.alert_id for a in restored.process(more)] == [a.alert_id for a in eng.process(more)]


def test_a_held_event_of_the_wrong_type_is_refused_by_field():
    doc = orjson.loads(_engine_snapshot())
    kind, shared, names, columns = doc["events"][1][0]
    if "tool_name" in shared:
        shared["tool_name"] = 7
    else:
        columns[names.index("tool_name")][0] = 7
    with pytest.raises(StateError, match="tool_name"):
        DetectionEngine.restore(parse_policy({}), orjson.dumps(doc))


def _engine_snapshot() -> bytes:
    policy = parse_policy({"high_risk": {"tools": ["delete_database"]}})
    eng = DetectionEngine(policy)
    eng.process([tool(i, "search", args_fingerprint="f") for i in range(6)] + [tool(10)])
    return eng.snapshot()


@pytest.mark.parametrize("data", [
    b"", b"not json", b"[]", b"{}", b'{"format": "agentwatch.state", "version": 99, "kind": "engine"}',
    b'{"format": "agentwatch.state", "version": 1, "kind": "join", "events": [], "state": {}}',
    b'{"format": "agentwatch.state", "version": 1, "kind": "engine", "events": [], "state": {}}',
    pickle.dumps({"format": "agentwatch.state"}), b"[" * 100_000,
])
def test_unreadable_snapshots_raise_state_error(data):
    with pytest.raises(StateError):
        DetectionEngine.restore(parse_policy({}), data)
    with pytest.raises(StateError):
        Joiner.restore(parse_policy({}), data)
    with pytest.raises(StateError):
        IdentityResolver.restore(30.0, data)


def _paths(node: Any, at: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [at]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, at + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, at + (i,))
    return out


def test_mangled_snapshots_restore_or_raise_state_error_nothing_else():
    good = orjson.loads(_engine_snapshot())
    paths = [p for p in _paths(good) if p]
    rnd = random.Random(7)
    refused = 0
    for _ in range(400):
        doc = orjson.loads(orjson.dumps(good))
        path = rnd.choice(paths)
        node = doc
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = rnd.choice([None, "x", -1, 2**62, 1.5, [], {}, True, [[1]], "inf", {"a": [1]}])
        try:
            eng = DetectionEngine.restore(parse_policy({"high_risk": {"tools": ["delete_database"]}}),
                                          orjson.dumps(doc))
        except StateError:
            refused += 1
            continue
        assert isinstance(eng, DetectionEngine)
    assert refused > 100


def test_snapshots_are_spaced_by_what_they_cost(monkeypatch):
    """A state that takes long to snapshot is snapshotted less often (at most 1/20 of the
    time), a cheap one every ``snapshot_s``."""
    import streams.state as state_mod

    class Clock:
        now = 1000.0

        @classmethod
        def monotonic(cls) -> float:
            return cls.now

        perf_counter = monotonic

    class Slow:
        cost = 0.01

        def snapshot(self) -> bytes:
            Clock.now += self.cost
            return b"{}"

    monkeypatch.setattr(state_mod, "time", Clock)
    ps = state_mod.PartitionedState("detect", "t", make=Slow, restore=None, replay=None, bootstrap="-",
                                    state_topic="s", snapshot_s=2.0, fork_above_s=None)  # in the stage
    ps.states[0] = Slow()

    def snapshots_over(seconds: float) -> int:
        n, end = 0, Clock.now + seconds
        while Clock.now < end:
            ps.advanced(0, 1)
            n += len(ps.due())
            Clock.now += 0.25
        return n

    assert 9 <= snapshots_over(20) <= 11  # cheap: every 2 s
    Slow.cost = 1.0
    assert 2 <= snapshots_over(60) <= 4  # 1 s each: every 20 s
    assert [r.key for r in ps.due(force=True)] == [b"detect/t/0"]  # a revoke's final one still goes


class _SlowState:
    """A state whose snapshot takes ``cost`` seconds and says what it held then."""

    def __init__(self, cost: float) -> None:
        self.cost, self.value, self.fail = cost, "before", False

    def snapshot(self) -> bytes:
        import time

        if self.fail:
            raise RuntimeError("cannot serialise")
        time.sleep(self.cost)
        return orjson.dumps({"value": self.value})


def _poll(ps, seconds: float = 10.0) -> list[Any]:
    import time

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if out := ps.due():
            return out
        time.sleep(0.02)
    return []


def _forking(monkeypatch, cost: float):
    import streams.state as state_mod

    monkeypatch.setattr(state_mod, "SNAPSHOT_COST_RATIO", 0.0)  # every call may snapshot again
    ps = state_mod.PartitionedState("detect", "t", make=None, restore=None, replay=None, bootstrap="-",
                                    state_topic="s", snapshot_s=0.0)
    ps.states[0] = state = _SlowState(cost)
    ps.advanced(0, 5)
    (first,) = ps.due()  # no cost known yet: taken in the stage, and found slow
    assert orjson.loads(first.value) == {"value": "before"} and ps.taken[-1][3] is False
    return ps, state


def test_a_slow_snapshot_is_taken_in_a_forked_child_while_the_stage_goes_on(monkeypatch):
    import time

    ps, state = _forking(monkeypatch, cost=0.3)
    ps.advanced(0, 9)
    started = time.perf_counter()
    assert ps.due() == []  # forked: the stage is not held for the snapshot
    assert time.perf_counter() - started < 0.2
    state.value = "after"  # the stage changes its state while the child writes the image
    ps.advanced(0, 12)
    (rec,) = _poll(ps)
    # the image is the state at the fork, at the offset it had then
    assert orjson.loads(rec.value) == {"value": "before"}
    assert dict(rec.headers)["agentwatch.state.offset"] == b"9"
    seconds, held, size, forked = ps.taken[-1]
    assert forked and seconds >= 0.3 and held < 0.2 and size == len(rec.value)
    (rec,) = _poll(ps)  # dirty again since: the next child has the change
    assert orjson.loads(rec.value) == {"value": "after"}
    assert dict(rec.headers)["agentwatch.state.offset"] == b"12"


def test_a_revoke_stops_the_child_and_takes_its_final_snapshot_in_the_stage(monkeypatch):
    import os

    ps, state = _forking(monkeypatch, cost=2.0)
    ps.advanced(0, 9)
    assert ps.due() == []
    child = ps._background.pid
    state.value = "final"
    (rec,) = ps.due(force=True, partitions={0})  # a revoke's final snapshot: the newest state
    assert orjson.loads(rec.value) == {"value": "final"}
    with pytest.raises(ChildProcessError):  # the child was stopped and reaped
        os.waitpid(child, os.WNOHANG)
    ps.advanced(0, 10)
    assert ps.due() == [] and ps._background is not None
    child = ps._background.pid
    ps.drop({0})
    with pytest.raises(ChildProcessError):
        os.waitpid(child, os.WNOHANG)
    assert ps._background is None and ps.due() == []


def test_a_child_that_hangs_is_stopped_and_the_next_snapshot_is_taken_in_the_stage(monkeypatch, caplog):
    import os
    import time

    import streams.state as state_mod

    ps, state = _forking(monkeypatch, cost=0.06)
    state.cost = 30.0  # the child sleeps far past its time limit
    monkeypatch.setattr(state_mod, "CHILD_TIMEOUT_S", 0.5)
    ps.advanced(0, 9)
    assert ps.due() == []
    child = ps._background.pid
    state.cost, state.value = 0.0, "after"  # the parent's state; the child hangs on its image
    time.sleep(0.8)
    # the hung child is stopped and reaped, nothing of it written; the snapshot is taken again
    # at once, in the stage
    (rec,) = ps.due()
    assert orjson.loads(rec.value) == {"value": "after"}
    with pytest.raises(ChildProcessError):
        os.waitpid(child, os.WNOHANG)
    assert any(str(getattr(r, "error", "")).startswith("snapshot child stopped after") for r in caplog.records)


def test_a_failing_child_writes_nothing_and_the_next_snapshot_is_taken_in_the_stage(monkeypatch, caplog):
    ps, state = _forking(monkeypatch, cost=0.1)
    state.fail = True
    ps.advanced(0, 9)
    assert ps.due() == []
    ps._background._thread.join(5.0)
    # nothing from the child; the snapshot is taken again at once, in the stage, whose error it is
    with pytest.raises(RuntimeError, match="cannot serialise"):
        ps.due()
    assert "state snapshot in a child failed" in caplog.text
    state.fail = False
    (rec,) = ps.due()
    assert orjson.loads(rec.value) == {"value": "before"}


def test_snapshot_over_a_chunk_is_written_in_chunks_not_skipped(caplog):
    """Once skipped over the topic's 64 MiB message limit (the partition restored by replay);
    now split over messages of ``chunk_bytes`` (tests/test_state_chunks.py has the rest)."""
    import streams.state as state_mod

    class Big:
        def snapshot(self) -> bytes:
            return b"x" * 2000

    ps = state_mod.PartitionedState("correlate", "t", make=Big, restore=None, replay=None, bootstrap="-",
                                    state_topic="s", snapshot_s=0.0, chunk_bytes=1000)
    ps.states[0] = Big()
    ps.advanced(0, 5)
    records = ps.due(force=True)
    assert [r.key.decode().count("/") for r in records] == [4, 4, 2]  # two chunks, then the manifest
    assert [r.headers[state_mod.OFFSET_HEADER] for r in records] == [b"5"] * 3
    assert b"".join(r.value for r in records[:2]) == b"x" * 2000  # type: ignore[misc]
    assert caplog.text == ""


def test_batches_are_sliced_to_a_target_time_from_the_stage_cost():
    from streams.app import SLICE_TARGET_S, _SliceSizer

    sizer = _SliceSizer()
    assert sizer.size(500) == 10  # nothing measured: a small first slice
    sizer.observe(10, 10 * 0.001)  # 1 ms a message (an OTLP message of 100 spans, decoded)
    assert sizer.size(500) == round(SLICE_TARGET_S / 0.001)
    assert sizer.size(7) == 7
    sizer.observe(50, 50 * 0.02)  # much slower messages now: slices shrink at once, never to 0
    assert 1 <= sizer.size(500) < 10
    for _ in range(40):
        sizer.observe(100, 100 * 1e-6)
    assert sizer.size(500) == 500  # cheap messages: the whole batch is one slice
