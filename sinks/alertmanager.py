"""Alerts to Prometheus Alertmanager through its v2 API (``POST /api/v2/alerts``).

Alertmanager considers an alert firing only while it keeps hearing about it, so
this output remembers which alerts are active and re-posts them every
``resend_interval_s`` until ``resolve`` posts them with ``endsAt`` = now. Like
Prometheus, each post of an active alert carries ``endsAt`` = now +
``_ENDS_AT_INTERVALS`` resend intervals: if agentwatch dies, its alerts expire
in a few minutes instead of firing forever or depending on the receiver's
``resolve_timeout``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import re
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from urllib.parse import unquote, urlsplit, urlunsplit

import orjson

from schemas.alerts import Alert
from sinks.delivery import DeliveryError, HttpPoster, withhold_shadow

log = logging.getLogger("agentwatch.sinks.alertmanager")

# Prometheus resends every 1m and sets endsAt = now + 4 intervals: three lost resends are tolerated
_ENDS_AT_INTERVALS = 4
_EVIDENCE_IDS = 5
_TRACE_IDS = 5
# Alertmanager refuses a whole batch if one label name is invalid, so extra labels are sanitised
_LABEL_NAME_BAD = re.compile(r"[^a-zA-Z0-9_]")
# one POST carries at most this many alerts: a storm is not one huge request that times out
_POST_CHUNK = 500


def _rfc3339(ts: datetime) -> str:
    return ts.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def _label_name(key: str) -> str:
    name = _LABEL_NAME_BAD.sub("_", key)
    return name if name and not name[0].isdigit() else f"_{name}"



def _split_credentials(url: str) -> tuple[str, str | None]:
    """``url`` without its user and password, and those as a basic auth header value (None
    without a user)."""
    parts = urlsplit(url)
    if parts.username is None:
        return url, None
    netloc = parts.hostname or ""
    if ":" in netloc:  # an IPv6 address
        netloc = f"[{netloc}]"
    if parts.port is not None:
        netloc = f"{netloc}:{parts.port}"
    credential = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
    return urlunsplit(parts._replace(netloc=netloc)), "Basic " + base64.b64encode(credential).decode()


def runbook_url(base_url: str, detector: str) -> str:
    """The detector's page: ``<base>/<detector>.md`` (docs/runbooks/ in the repository)."""
    return f"{base_url.rstrip('/')}/{detector}.md"

class AlertmanagerOutput:
    """Posts alerts to one Alertmanager and keeps active ones alive until resolved."""

    on_call = True

    def __init__(
        self,
        url: str,
        *,
        runbook_base_url: str = "https://github.com/agentwatch/agentwatch/blob/main/docs/runbooks",
        resend_interval_s: float = 60.0,
        timeout_s: float = 5.0,
        generator_url: Callable[[Alert], str] | None = None,
        name: str = "alertmanager",
    ) -> None:
        self.name = name
        # credentials in the URL (http://user:password@host:9093, as docker-compose.yml sets
        # it) become a basic auth header, so no error message or log line carries them
        url, auth = _split_credentials(url)
        self.url = url.rstrip("/")
        self._endpoint = f"{self.url}/api/v2/alerts"
        self._runbook_base_url = runbook_base_url
        self._resend_interval_s = resend_interval_s
        self._generator_url = generator_url
        headers = {"Authorization": auth} if auth is not None else None
        self._http = HttpPoster(name, timeout_s=timeout_s, headers=headers, retry_client_errors=False)
        self._active: dict[str, Alert] = {}
        # resolved while Alertmanager was unreachable: alert -> endsAt, re-posted by the resend loop
        self._resolving: dict[str, tuple[Alert, datetime]] = {}
        self._resend_task: asyncio.Task[None] | None = None
        # one post at a time: a re-send of an alert's firing state that lands after its
        # resolution would make Alertmanager fire it again until the re-sent endsAt
        self._lock = asyncio.Lock()

    # --- Output protocol ---------------------------------------------------------------------

    async def start(self) -> None:
        if self._resend_task is None:
            self._resend_task = asyncio.create_task(self._resend_loop(), name=f"{self.name}-resend")

    async def send(self, alerts: list[Alert]) -> None:
        """Post ``alerts`` as firing and remember them as active (raises ``DeliveryError``)."""
        alerts = withhold_shadow(alerts, self.name)
        if not alerts:
            return
        async with self._lock:
            await self._post([self.payload(a) for a in alerts])
            for alert in alerts:
                self.mark_active(alert)

    async def close(self) -> None:
        if self._resend_task is not None:
            self._resend_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._resend_task
            self._resend_task = None
        await self._http.close()

    # --- active / resolved bookkeeping -------------------------------------------------------

    def mark_active(self, alert: Alert) -> None:
        """Keep re-sending ``alert`` (its latest version) until ``resolve``."""
        self._active[alert.alert_id] = alert
        self._resolving.pop(alert.alert_id, None)

    def active_ids(self) -> list[str]:
        return list(self._active)

    async def resolve(self, alert_id: str) -> bool:
        """Post ``alert_id`` as ended now and stop re-sending it.

        True once Alertmanager has the resolution; False if the alert is unknown here
        or Alertmanager is unreachable, in which case the resend loop keeps trying.
        """
        async with self._lock:
            alert = self._active.pop(alert_id, None)
            if alert is None:
                pending = self._resolving.get(alert_id)
                if pending is None:
                    return False
                alert = pending[0]
            ends_at = datetime.now(timezone.utc)
            self._resolving[alert_id] = (alert, ends_at)
            try:
                await self._post([self.payload(alert, ends_at=ends_at)])
            except DeliveryError as exc:
                log.warning("%s: resolving %s failed (%s); retried every %ss", self.name, alert_id, exc, self._resend_interval_s)
                return False
            self._resolving.pop(alert_id, None)
            return True

    # --- wire format -------------------------------------------------------------------------

    def payload(self, alert: Alert, *, ends_at: datetime | None = None) -> dict[str, object]:
        """The v2 API object for ``alert``: firing unless ``ends_at`` is given."""
        now = datetime.now(timezone.utc)
        # event time can run ahead of this clock; Alertmanager rejects startsAt after endsAt
        starts_at = min(alert.first_seen, now)
        if ends_at is None:
            ends_at = now + timedelta(seconds=_ENDS_AT_INTERVALS * self._resend_interval_s)
        labels = {_label_name(k): v for k, v in alert.labels.items()}
        labels.update(
            alertname=alert.detector,
            agent_id=alert.agent_id,
            tenant=alert.tenant,
            severity=alert.severity.value,
            detector_version=alert.detector_version,
            mode=alert.mode.value,
            alert_id=alert.alert_id,
        )
        body: dict[str, object] = {
            # an empty label value means "no such label" to Alertmanager: leave it out
            "labels": {k: v for k, v in labels.items() if v},
            "annotations": {
                "summary": alert.summary,
                "evidence": self._evidence(alert),
                "runbook_url": runbook_url(self._runbook_base_url, alert.detector),
                "description": self._description(alert),
            },
            "startsAt": _rfc3339(starts_at),
            "endsAt": _rfc3339(max(ends_at, starts_at)),
        }
        if self._generator_url is not None:
            body["generatorURL"] = self._generator_url(alert)
        return body

    @staticmethod
    def _evidence(alert: Alert) -> str:
        ids = [e.event_id for e in alert.evidence[:_EVIDENCE_IDS]]
        more = len(alert.evidence) - len(ids)
        return f"{len(alert.evidence)} event(s): {', '.join(ids)}" + (f" (+{more} more)" if more else "")

    @staticmethod
    def _description(alert: Alert) -> str:
        traces = ", ".join(alert.trace_ids[:_TRACE_IDS]) or "none"
        return (
            f"{alert.detector} v{alert.detector_version} (policy {alert.policy_version or '?'}, mode {alert.mode.value}) "
            f"saw this {alert.count} time(s) for agent {alert.agent_id} of tenant {alert.tenant} "
            f"between {_rfc3339(alert.first_seen)} and {_rfc3339(alert.last_seen)}; action: {alert.action}; "
            f"traces: {traces}"
        )

    # --- internals ---------------------------------------------------------------------------

    async def _post(self, items: list[dict[str, object]]) -> None:
        for i in range(0, len(items), _POST_CHUNK):
            await self._http.post(self._endpoint, orjson.dumps(items[i : i + _POST_CHUNK]))

    async def _resend_loop(self) -> None:
        while True:
            await asyncio.sleep(self._resend_interval_s)
            async with self._lock:
                await self._resend()

    async def _resend(self) -> None:
        items = [self.payload(a) for a in self._active.values()]
        items += [self.payload(a, ends_at=ends) for a, ends in self._resolving.values()]
        if not items:
            return
        try:
            await self._post(items)
        except DeliveryError as exc:
            # the next tick tries again; Alertmanager keeps firing alerts until their endsAt
            log.warning("%s: re-sending %d alert(s) failed: %s", self.name, len(items), exc)
            return
        self._resolving.clear()
