"""Kill switches issued and lifted by people: published signed on the real broker, recorded in real chDB.

One chDB directory for the whole module (chDB allows one per process).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer

from schemas.control import KillSwitchCommand, verify
from sinks.clickhouse import KillSwitchSink, open_store
from streams.control_plane import ControlPlane, control_settings, trusted_keys
from streams.killswitch import format_active, issue, lift, list_active
from streams.settings import Settings, load_settings
from tests.test_control_plane import _alert

pytestmark = pytest.mark.kafka


@pytest.fixture(scope="module")
def settings(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    home = tmp_path_factory.mktemp("killswitch")
    yield load_settings(home=home, bootstrap=kafka_bootstrap, clickhouse_dsn=f"chdb://{home / 'clickhouse'}",
                        topic_control=f"ks{uuid.uuid4().hex[:8]}.control", partitions=2)


def _published(settings: Settings, n: int) -> list[KillSwitchCommand]:
    async def go() -> list[KillSwitchCommand]:
        c = AIOKafkaConsumer(settings.topic_control, bootstrap_servers=settings.bootstrap,
                             auto_offset_reset="earliest", enable_auto_commit=False)
        await c.start()
        got: list[KillSwitchCommand] = []
        try:
            deadline = time.monotonic() + 20
            while len(got) < n and time.monotonic() < deadline:
                for recs in (await c.getmany(timeout_ms=300)).values():
                    got.extend(KillSwitchCommand.from_json(r.value) for r in recs)
        finally:
            await c.stop()
        return got

    return asyncio.run(go())


def test_issue_lift_and_list_active_kill_switches(settings: Settings) -> None:
    a = issue(settings, "agent:ops-bot-7", reason="retry storm on prod", issued_by="alice")
    t = issue(settings, "tenant:acme", reason="contain acme", scope=["kubectl_apply"], ttl_s=600, issued_by="bob")
    short = issue(settings, "agent:short-lived", reason="brief", ttl_s=1, issued_by="carol")

    # on the topic: signed with the configured key, keyed by target, verifiable by agents
    sent = {c.command_id: c for c in _published(settings, 3)}
    assert set(sent) == {a.command_id, t.command_id, short.command_id}
    keys = trusted_keys(control_settings(settings), settings.home_dir)
    for c in sent.values():
        verify(c, keys, now=c.issued_at)

    time.sleep(1.2)  # let the short one expire
    active = list_active(settings)
    assert [(r.target, r.issued_by, r.scope) for r in active] == [
        ("agent:ops-bot-7", "alice", []), ("tenant:acme", "bob", ["kubectl_apply"])]
    print("\n" + format_active(active))

    lifted = lift(settings, "agent:ops-bot-7", reason="fixed", issued_by="alice")
    assert lifted.action == "resume"
    assert [r.target for r in list_active(settings)] == ["tenant:acme"]

    # a halt issued again after the lift is in force again: the latest command per target wins
    again = issue(settings, "agent:ops-bot-7", reason="again", issued_by="dave")
    assert {r.command_id for r in list_active(settings)} == {t.command_id, again.command_id}


def test_enforce_halts_recorded_by_the_worker_sink_collapse_by_command_id(settings: Settings,
                                                                         tmp_path: Path) -> None:
    plane = ControlPlane.from_settings(control_settings(settings), settings.home_dir)
    (cmd,) = plane.on_alerts([_alert(agent="enforced-agent", alert_id=uuid.uuid4().hex)])
    store = open_store(settings.dsn)
    try:
        store.apply_schema()
        sink = KillSwitchSink(store)
        sink.extend([cmd])
        sink.flush()
        sink.extend([cmd])  # recorded again (read back from the control topic, a replay)
        sink.flush()
        rows = store.query("SELECT count() FROM agentwatch.killswitches FINAL WHERE command_id = {c:String}",
                           {"c": cmd.command_id}).rows
        assert rows[0][0] == 1
        active = store.query("SELECT alert_id, issued_by FROM agentwatch.killswitches_active "
                             "WHERE target_value = 'enforced-agent'").rows
        assert active == [(cmd.alert_id, "agentwatch")]
    finally:
        store.close()
