"""On-call outputs of the worker: Alertmanager and a webhook, routed by severity.

Alerts always go to the alerts topic and ClickHouse (the worker does that
itself, before committing). The outputs here are extra deliveries with their
own queues and retries (sinks.delivery.Router), so an outage of one never
stalls the pipeline or the others.
"""

from __future__ import annotations

from schemas.alerts import Alert, Severity
from sinks.alertmanager import AlertmanagerOutput
from sinks.delivery import Router
from sinks.webhook import WebhookOutput
from streams.settings import Settings

TOPIC_ONLY = "topic"


class TopicOnly:
    """Route target of severities below the paging threshold: nothing more to deliver,
    the alert is already on the alerts topic and in ClickHouse."""

    name = TOPIC_ONLY
    on_call = False

    async def send(self, alerts: list[Alert]) -> None:
        return None


def build_router(settings: Settings, registry: object) -> Router | None:
    outputs: list[object] = []
    if settings.alertmanager_url:
        outputs.append(AlertmanagerOutput(settings.alertmanager_url, runbook_base_url=settings.runbook_base_url))
    if settings.webhook_url:
        outputs.append(WebhookOutput(settings.webhook_url))
    if not outputs:
        return None
    paged = tuple(o.name for o in outputs)  # type: ignore[attr-defined]
    routes = {s: (paged if s.rank >= settings.page_min_severity.rank else (TOPIC_ONLY,)) for s in Severity}
    return Router([*outputs, TopicOnly()], routes, registry=registry)  # type: ignore[arg-type]
