"""Alert delivery against a real Alertmanager and a real HTTP webhook receiver."""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from schemas.alerts import Alert, Evidence, Mode, Severity, alert_id_for
from schemas.errors import ConfigError
from sinks.alertmanager import AlertmanagerOutput, _split_credentials
from sinks.delivery import DEFAULT_ROUTES, OVERFLOW_DETECTOR, RetryPolicy, Router, parse_routes
from sinks.webhook import WebhookOutput
from tests.alertmanager_server import AlertmanagerServer, free_port

# short backoff so outage tests take a second, not minutes
FAST_RETRY = RetryPolicy(initial_backoff_s=0.02, max_backoff_s=0.2, max_attempts=4, max_elapsed_s=5)
ALL_SEVERITIES = [s.value for s in Severity]


def make_alert(
    severity: Severity = Severity.HIGH,
    *,
    mode: Mode = Mode.ALERT,
    detector: str = "retry_loop",
    agent_id: str = "agent-7",
    evidence: int = 3,
) -> Alert:
    first = datetime.now(timezone.utc) - timedelta(seconds=30)
    return Alert(
        alert_id=alert_id_for(detector, agent_id, uuid.uuid4().hex, tenant="acme"),
        detector=detector,
        detector_version="1.2.0",
        policy_version="2024-06-01",
        mode=mode,
        severity=severity,
        agent_id=agent_id,
        tenant="acme",
        trace_ids=["4bf92f3577b34da6a3ce929d0e0e4736"],
        first_seen=first,
        last_seen=first + timedelta(seconds=20),
        count=5,
        summary=f"{agent_id} called search_web 5 times with the same arguments",
        evidence=[Evidence(event_id=f"ev-{i}", topic="agentwatch.events.in", partition=0, offset=i) for i in range(evidence)],
        labels={"team": "search", "bad-key": "x"},
    )


# --- real servers -------------------------------------------------------------------------------


class Receiver:
    """A real aiohttp webhook receiver that can fail on purpose."""

    def __init__(self, *, fail_first: int = 0) -> None:
        self.fail_first = fail_first
        self.failing = False
        self.requests = 0
        self.alerts: list[dict[str, object]] = []
        self.headers: list[dict[str, str]] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        self.headers.append(dict(request.headers))
        if self.requests <= self.fail_first or self.failing:
            return web.Response(status=500, text="receiver down on purpose")
        body = orjson.loads(await request.read())
        self.alerts.extend(body["alerts"])
        return web.Response(status=204)

    def ids(self) -> set[str]:
        return {str(a["alert_id"]) for a in self.alerts}

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/hook"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture(scope="module")
def alertmanager(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AlertmanagerServer]:
    with AlertmanagerServer(Path(tmp_path_factory.mktemp("alertmanager"))) as server:
        yield server


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = await Receiver().start()
    yield r
    await r.stop()


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


async def am_alerts(url: str, alert_id: str, *, active_only: bool = False) -> list[dict[str, object]]:
    params = [("filter", f'alert_id="{alert_id}"')]
    if active_only:
        params.append(("active", "true"))
    async with aiohttp.ClientSession() as s, s.get(f"{url}/api/v2/alerts", params=params) as resp:
        assert resp.status == 200, await resp.text()
        return list(await resp.json())


async def eventually(check, timeout_s: float = 10.0):  # type: ignore[no-untyped-def]
    """Poll ``check`` (async, returns a truthy value when done) until it succeeds."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        result = await check()
        if result or asyncio.get_running_loop().time() > deadline:
            return result
        await asyncio.sleep(0.05)


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def all_routes(*names: str) -> dict[str, list[str]]:
    return {s: list(names) for s in ALL_SEVERITIES}


# --- Alertmanager -------------------------------------------------------------------------------


@pytest.mark.alertmanager
async def test_alert_arrives_in_alertmanager_with_labels_and_annotations(
    alertmanager: AlertmanagerServer, registry: CollectorRegistry
) -> None:
    am = AlertmanagerOutput(alertmanager.url, runbook_base_url="https://runbooks.example/agentwatch")
    alert = make_alert(Severity.HIGH, evidence=8)
    async with Router([am], all_routes("alertmanager"), retry=FAST_RETRY, registry=registry) as router:
        assert router.submit(alert) == ["alertmanager"]
        assert await router.flush(10)
        [got] = await am_alerts(alertmanager.url, alert.alert_id)

    assert got["labels"] == {
        "alertname": "retry_loop",
        "agent_id": "agent-7",
        "tenant": "acme",
        "severity": "high",
        "detector_version": "1.2.0",
        "mode": "alert",
        "alert_id": alert.alert_id,
        "team": "search",
        "bad_key": "x",  # sanitised: Alertmanager would reject the whole batch
    }
    notes = got["annotations"]
    assert isinstance(notes, dict)
    assert notes["summary"] == alert.summary
    assert notes["runbook_url"] == "https://runbooks.example/agentwatch/retry_loop.md"
    assert notes["evidence"] == "8 event(s): ev-0, ev-1, ev-2, ev-3, ev-4 (+3 more)"
    assert "agent-7" in notes["description"] and "1.2.0" in notes["description"]
    # Alertmanager keeps milliseconds
    assert abs(datetime.fromisoformat(str(got["startsAt"])) - alert.first_seen) < timedelta(milliseconds=1)
    assert got["status"] == {"state": "active", "silencedBy": [], "inhibitedBy": []}
    assert sample(registry, "agentwatch_alert_deliveries_total", output="alertmanager", result="success") == 1
    assert sample(registry, "agentwatch_alert_delivery_seconds_count", output="alertmanager") == 1
    assert sample(registry, "agentwatch_alert_queue_depth", output="alertmanager") == 0


@pytest.mark.alertmanager
async def test_active_alert_is_resent_then_resolved(alertmanager: AlertmanagerServer, registry: CollectorRegistry) -> None:
    am = AlertmanagerOutput(alertmanager.url, resend_interval_s=0.3)
    alert = make_alert(Severity.CRITICAL)
    async with Router([am], all_routes("alertmanager"), retry=FAST_RETRY, registry=registry) as router:
        router.submit(alert)
        assert await router.flush(10)
        [first] = await am_alerts(alertmanager.url, alert.alert_id)
        assert am.active_ids() == [alert.alert_id]

        async def moved() -> dict[str, object] | None:
            [now] = await am_alerts(alertmanager.url, alert.alert_id)
            return now if now["updatedAt"] != first["updatedAt"] and now["endsAt"] > first["endsAt"] else None

        later = await eventually(moved, 5)
        assert later, "the active alert was not re-sent"
        assert later["startsAt"] == first["startsAt"]  # same alert kept alive, not a new one

        assert await router.resolve(alert.alert_id) == {"alertmanager": True}
        assert am.active_ids() == []
        assert await am_alerts(alertmanager.url, alert.alert_id, active_only=True) == []
        # and the resend loop does not bring it back
        await asyncio.sleep(1.0)
        assert await am_alerts(alertmanager.url, alert.alert_id, active_only=True) == []
    assert await am.resolve("never-sent") is False


@pytest.mark.alertmanager
async def test_shadow_alerts_never_reach_on_call(
    alertmanager: AlertmanagerServer, receiver: Receiver, registry: CollectorRegistry
) -> None:
    topic = await Receiver().start()  # stands in for the alerts topic: not on-call
    outputs = [
        AlertmanagerOutput(alertmanager.url),
        WebhookOutput(receiver.url),
        WebhookOutput(topic.url, name="topic", on_call=False),
    ]
    shadow = make_alert(Severity.CRITICAL, mode=Mode.SHADOW, detector="token_spike")
    live = make_alert(Severity.CRITICAL, detector="token_spike")
    try:
        async with Router(outputs, retry=FAST_RETRY, registry=registry) as router:
            assert router.submit(shadow) == ["topic"]
            assert router.submit(live) == ["topic", "alertmanager", "webhook"]
            assert await router.flush(10)
            # belt and braces: an on-call output handed a shadow alert directly refuses it too
            await outputs[0].send([shadow])
            await outputs[1].send([shadow])
    finally:
        await topic.stop()
    assert topic.ids() == {shadow.alert_id, live.alert_id}
    assert receiver.ids() == {live.alert_id}
    assert await am_alerts(alertmanager.url, shadow.alert_id) == []
    assert len(await am_alerts(alertmanager.url, live.alert_id)) == 1
    for name in ("alertmanager", "webhook"):
        assert sample(registry, "agentwatch_alert_shadow_withheld_total", output=name) == 1


@pytest.mark.alertmanager
async def test_down_output_does_not_block_the_others(
    alertmanager: AlertmanagerServer, registry: CollectorRegistry
) -> None:
    dead = WebhookOutput(f"http://127.0.0.1:{free_port()}/hook", timeout_s=1)  # connection refused
    am = AlertmanagerOutput(alertmanager.url)
    alerts = [make_alert(Severity.MEDIUM, agent_id=f"agent-{i}") for i in range(3)]
    router = Router([am, dead], all_routes("webhook", "alertmanager"), retry=FAST_RETRY, registry=registry)
    await router.start()
    try:
        for alert in alerts:
            router.submit(alert)

        async def all_in_am() -> bool:
            return all([await am_alerts(alertmanager.url, a.alert_id) for a in alerts])

        assert await eventually(all_in_am, 5)
        assert router.queue_depth("alertmanager") == 0

        async def gave_up_once() -> bool:
            return sample(registry, "agentwatch_alert_deliveries_total", output="webhook", result="failure") >= 3

        assert await eventually(gave_up_once, 5)
        assert sample(registry, "agentwatch_alert_delivery_retries_total", output="webhook") >= 3
        # never dropped: still queued for when the webhook comes back
        assert router.queue_depth("webhook") == 3
        assert sample(registry, "agentwatch_alert_queue_depth", output="webhook") == 3
    finally:
        undelivered = await router.close(drain_timeout_s=0.2)
    assert {a.alert_id for a in undelivered["webhook"]} == {a.alert_id for a in alerts}
    assert "alertmanager" not in undelivered


# --- webhook ------------------------------------------------------------------------------------


async def test_webhook_gets_every_alert_through_failures(registry: CollectorRegistry) -> None:
    receiver = await Receiver(fail_first=3).start()
    hook = WebhookOutput(receiver.url, headers={"Authorization": "Bearer t0ken"})
    alerts = [make_alert(Severity.HIGH, agent_id=f"agent-{i}") for i in range(5)]
    try:
        async with Router([hook], all_routes("webhook"), retry=FAST_RETRY, max_batch=2, registry=registry) as router:
            for alert in alerts:
                router.submit(alert)
            assert await router.flush(10)
    finally:
        await receiver.stop()
    assert receiver.ids() == {a.alert_id for a in alerts}
    assert receiver.headers[-1]["Authorization"] == "Bearer t0ken"
    got = next(a for a in receiver.alerts if a["alert_id"] == alerts[0].alert_id)
    assert Alert.model_validate(got) == alerts[0]  # the body is the alert contract, lossless
    assert sample(registry, "agentwatch_alert_delivery_retries_total", output="webhook") == 3
    assert sample(registry, "agentwatch_alert_deliveries_total", output="webhook", result="success") == 5


async def test_repeats_of_one_alert_are_sent_once_with_the_latest_state(
    receiver: Receiver, registry: CollectorRegistry
) -> None:
    alert = make_alert(Severity.HIGH)
    router = Router([WebhookOutput(receiver.url)], all_routes("webhook"), retry=FAST_RETRY, registry=registry)
    for count in range(1, 6):  # queued before start: the worker sees all five at once
        router.submit(alert.model_copy(update={"count": count}))
    assert router.queue_depth("webhook") == 1
    await router.start()
    assert await router.flush(10)
    await router.close()
    assert [a["count"] for a in receiver.alerts] == [5]


async def test_overflow_is_counted_and_summarised(receiver: Receiver, registry: CollectorRegistry) -> None:
    receiver.failing = True
    hook = WebhookOutput(receiver.url)
    router = Router([hook], all_routes("webhook"), retry=FAST_RETRY, queue_capacity=3, registry=registry)
    await router.start()
    severities = [Severity.LOW] * 6 + [Severity.CRITICAL, Severity.HIGH, Severity.MEDIUM, Severity.LOW]
    alerts = [make_alert(s, agent_id=f"agent-{i}") for i, s in enumerate(severities)]
    for alert in alerts:  # one synchronous burst: the worker has taken nothing yet
        router.submit(alert)
    assert sample(registry, "agentwatch_alert_queue_overflow_total", output="webhook") == 7
    assert router.queue_depth("webhook") == 4  # three alerts plus the storm summary's reserved slot
    await asyncio.sleep(0.3)  # an outage: nothing is lost meanwhile
    receiver.failing = False
    assert await router.flush(10)
    await router.close()

    by_detector = {a["detector"] for a in receiver.alerts}
    assert receiver.ids() - {a["alert_id"] for a in receiver.alerts if a["detector"] == OVERFLOW_DETECTOR} == {
        a.alert_id for a in alerts[6:9]
    }  # the most severe ones were kept
    assert OVERFLOW_DETECTOR in by_detector
    [summary] = [a for a in receiver.alerts if a["detector"] == OVERFLOW_DETECTOR]
    assert summary["count"] == 7
    assert summary["severity"] == "low"
    assert "retry_loop=7" in str(summary["summary"]) and alerts[0].alert_id in str(summary["summary"])


# --- routing ------------------------------------------------------------------------------------


@pytest.mark.alertmanager
async def test_severity_routing_default(
    alertmanager: AlertmanagerServer, receiver: Receiver, registry: CollectorRegistry
) -> None:
    topic = await Receiver().start()
    outputs = [
        AlertmanagerOutput(alertmanager.url),
        WebhookOutput(receiver.url),
        WebhookOutput(topic.url, name="topic", on_call=False),
    ]
    by_severity = {s: make_alert(s, detector="disallowed_access") for s in Severity}
    try:
        async with Router(outputs, retry=FAST_RETRY, registry=registry) as router:
            for alert in by_severity.values():
                router.submit(alert)
            assert await router.flush(10)
    finally:
        await topic.stop()
    paged = {by_severity[s].alert_id for s in (Severity.MEDIUM, Severity.HIGH, Severity.CRITICAL)}
    assert topic.ids() == {a.alert_id for a in by_severity.values()}
    assert receiver.ids() == paged
    for severity, alert in by_severity.items():
        assert len(await am_alerts(alertmanager.url, alert.alert_id)) == (alert.alert_id in paged), severity


async def test_custom_routes_are_a_parameter(registry: CollectorRegistry) -> None:
    low_hook, high_hook = await Receiver().start(), await Receiver().start()
    outputs = [WebhookOutput(low_hook.url, name="chat", on_call=False), WebhookOutput(high_hook.url, name="pager")]
    routes = {"info": ["chat"], "low": ["chat"], "medium": ["chat"], "high": ["pager"], "critical": ["chat", "pager"]}
    alerts = {s: make_alert(s) for s in Severity}
    try:
        async with Router(outputs, routes, retry=FAST_RETRY, registry=registry) as router:
            for alert in alerts.values():
                router.submit(alert)
            assert await router.flush(10)
    finally:
        await low_hook.stop()
        await high_hook.stop()
    assert high_hook.ids() == {alerts[Severity.HIGH].alert_id, alerts[Severity.CRITICAL].alert_id}
    assert len(low_hook.ids()) == 4


def test_routes_must_cover_every_severity_and_name_real_outputs() -> None:
    assert parse_routes(DEFAULT_ROUTES)[Severity.INFO] == ("topic",)
    with pytest.raises(ConfigError, match="severities with no output: \\['critical'\\]"):
        parse_routes({s: ["topic"] for s in ALL_SEVERITIES if s != "critical"})
    with pytest.raises(ConfigError, match="unknown severity"):
        parse_routes({"urgent": ["topic"]})
    with pytest.raises(ConfigError, match="names output 'alertmanager'"):
        Router([WebhookOutput("http://127.0.0.1:1/", name="topic")], registry=CollectorRegistry())


def test_backoff_grows_with_jitter_and_is_capped() -> None:
    policy = RetryPolicy(initial_backoff_s=1, max_backoff_s=8, jitter=0.5)
    for attempt, ceiling in [(1, 1), (2, 2), (3, 4), (4, 8), (9, 8)]:
        delays = [policy.delay_s(attempt) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 1
    with pytest.raises(ConfigError):
        RetryPolicy(initial_backoff_s=0)


def test_credentials_in_the_alertmanager_url_become_a_header_and_leave_the_url() -> None:
    """http://user:password@host (docker-compose.yml) -> basic auth; no error names the password."""
    assert _split_credentials("http://am:9093") == ("http://am:9093", None)
    url, header = _split_credentials("http://agentwatch:p%40ss:w@[::1]:9093/prefix")
    assert url == "http://[::1]:9093/prefix"
    assert header == "Basic " + base64.b64encode(b"agentwatch:p@ss:w").decode()
    assert AlertmanagerOutput("http://u:secret@am:9093/").url == "http://am:9093"
