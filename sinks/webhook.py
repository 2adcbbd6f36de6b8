"""Alerts to any HTTP endpoint as ``POST {"alerts": [<alert json>, ...]}``.

Delivery is at least once: a batch that failed (non-2xx, timeout, connection
error) is sent again by the router's retry policy, so a receiver can see an
alert twice and should deduplicate on ``alert_id`` (stable across repeats and
replays; ``last_seen`` and ``count`` tell which copy is newest).
"""

from __future__ import annotations

from collections.abc import Mapping

from schemas.alerts import Alert
from sinks.delivery import HttpPoster, withhold_shadow


class WebhookOutput:
    """Posts each batch of alerts as one JSON document; every non-2xx answer is retried."""

    on_call = True

    def __init__(
        self,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        timeout_s: float = 5.0,
        name: str = "webhook",
        on_call: bool = True,
    ) -> None:
        self.name = name
        self.url = url
        # an internal collector (not paging anyone) may take shadow alerts: say so explicitly
        self.on_call = on_call
        self._http = HttpPoster(name, timeout_s=timeout_s, headers=headers, retry_client_errors=True)

    async def start(self) -> None:
        """Nothing to start: the HTTP session is opened by the first send."""

    async def send(self, alerts: list[Alert]) -> None:
        if self.on_call:
            alerts = withhold_shadow(alerts, self.name)
        if not alerts:
            return
        # alerts are serialised once by their own to_json, not dumped to dicts and encoded again
        body = b'{"alerts":[' + b",".join(a.to_json() for a in alerts) + b"]}"
        await self._http.post(self.url, body)

    async def close(self) -> None:
        await self._http.close()
