"""Alert delivery: routing by severity, per-output queues, retry with backoff.

Guarantees (what on-call can rely on, and what they cannot):

* The pipeline never waits on an output. ``Router.submit`` only puts the alert
  into each target output's in-memory queue and returns; every output drains
  its own queue in its own background task, so a slow or dead webhook cannot
  delay Alertmanager, and neither can delay detection.
* Repeats of one alert (same ``alert_id``) replace the queued copy instead of
  queueing twice: the output gets the latest state once, not a backlog.
* A failed send is retried with exponential backoff and jitter until
  ``RetryPolicy.max_attempts`` or ``max_elapsed_s`` is reached. The alerts are
  then put back in the queue (unless a newer copy arrived meanwhile), the
  failure is counted and logged, and the worker tries again after a cool-down
  of ``max_backoff_s``. An outage therefore never drops an alert: it waits in
  the queue until the output comes back.
* An output that answers "this request is invalid" (``DeliveryError`` with
  ``retryable=False``, e.g. Alertmanager's 400) is not retried forever: the
  alerts are logged with their ids at ERROR and counted as ``rejected``.
  Retrying a request the server will never accept would only hide newer alerts.
* Queues are bounded (``queue_capacity`` alerts per output) so an outage during
  an alert storm cannot exhaust memory. On overflow the alert with the lowest
  severity, oldest first, is evicted (the incoming alert itself if it is the
  least severe). Evicted alerts are not silently lost: each is counted in
  ``agentwatch_alert_queue_overflow_total``, the storm is logged once when it
  starts, and a summary alert (detector ``alert_overflow``) with the counts by
  detector and severity and the first evicted ids takes a reserved slot at the
  head of that output's queue, updated in place while the storm lasts. Every
  alert stays in the durable record (alerts topic, ClickHouse) regardless:
  these queues are notification channels, not the system of record.
* Shadow-mode alerts never reach an on-call output (``on_call`` true, the
  default for any output that does not say otherwise); they are counted in
  ``agentwatch_alert_shadow_withheld_total``.
* Queues are in memory: alerts still queued when the process dies are not
  re-sent by this module. ``Router.close`` drains for a bounded time and
  returns (and logs) whatever it could not deliver; a restarted worker
  replaying from its last committed offset re-emits the same alert ids.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import weakref
from collections import Counter, OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Protocol, runtime_checkable

import aiohttp
from prometheus_client import REGISTRY, CollectorRegistry, Counter as PromCounter, Gauge, Histogram

from schemas.alerts import Alert, Mode, Severity, alert_id_for
from schemas.errors import AgentwatchError, ConfigError

log = logging.getLogger("agentwatch.sinks.delivery")

OVERFLOW_DETECTOR = "alert_overflow"
# how many evicted alert ids a storm summary names; the counts cover all of them
_OVERFLOW_SAMPLE = 10


class DeliveryError(AgentwatchError):
    """An output could not deliver a batch; ``retryable`` says whether trying again can help."""

    def __init__(self, output: str, problem: str, *, retryable: bool = True) -> None:
        super().__init__(f"{output}: {problem}")
        self.output = output
        self.problem = problem
        self.retryable = retryable


@runtime_checkable
class Output(Protocol):
    """Where alerts go. ``send`` delivers the whole batch or raises (``DeliveryError`` preferred).

    An output may also have ``on_call: bool``; without it the router treats it as on-call
    and never hands it shadow alerts.
    """

    name: str

    async def send(self, alerts: list[Alert]) -> None: ...


@runtime_checkable
class ManagedOutput(Output, Protocol):
    """An output with resources (sessions, background loops) the router starts and closes."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...


@runtime_checkable
class ResolvingOutput(Output, Protocol):
    """An output that can tell its receiver an alert has ended (Alertmanager)."""

    async def resolve(self, alert_id: str) -> bool: ...


def is_on_call(output: Output) -> bool:
    """Whether ``output`` pages people. Unknown outputs count as on-call: withholding is the safe mistake."""
    return bool(getattr(output, "on_call", True))


def withhold_shadow(alerts: list[Alert], output_name: str) -> list[Alert]:
    """Drop shadow alerts an on-call output was handed anyway (the router should never do that)."""
    kept = [a for a in alerts if a.mode != Mode.SHADOW]
    if len(kept) != len(alerts):
        log.error("%s: refused %d shadow alert(s): shadow alerts never go to on-call", output_name, len(alerts) - len(kept))
    return kept


# --- retry policy -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter for one delivery attempt cycle.

    After ``max_attempts`` sends or ``max_elapsed_s`` seconds, whichever comes first,
    the cycle gives up: the alerts go back into the queue and the next cycle starts
    after ``max_backoff_s``. Giving up is about reporting and re-ordering (newer,
    more severe alerts go first), never about dropping.
    """

    initial_backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    multiplier: float = 2.0
    # 0.5 -> the delay is uniform in [d/2, d]: spreads retries of many workers while never
    # retrying immediately (full jitter can pick ~0 and hammer a server that is coming back)
    jitter: float = 0.5
    max_attempts: int = 6
    max_elapsed_s: float = 120.0
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.initial_backoff_s <= 0 or self.max_backoff_s < self.initial_backoff_s:
            raise ConfigError("retry.backoff", "need 0 < initial_backoff_s <= max_backoff_s")
        if self.multiplier < 1:
            raise ConfigError("retry.multiplier", "must be >= 1")
        if not 0 <= self.jitter <= 1:
            raise ConfigError("retry.jitter", "must be between 0 and 1")
        if self.max_attempts < 1 or self.max_elapsed_s <= 0:
            raise ConfigError("retry.max_attempts", "max_attempts must be >= 1 and max_elapsed_s > 0")

    def delay_s(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        ceiling = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (attempt - 1))
        return ceiling * (1 - self.jitter * self.rng.random())

    def cooldown_s(self) -> float:
        """Seconds between giving up one cycle and starting the next."""
        return self.max_backoff_s * (1 - self.jitter * self.rng.random())


# --- metrics ------------------------------------------------------------------------------------


class DeliveryMetrics:
    """The delivery metrics of one registry (a registry refuses the same name twice)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.deliveries = PromCounter(
            "agentwatch_alert_deliveries_total",
            "Alerts per output by outcome: success, failure (retries exhausted, requeued), rejected",
            ["output", "result"],
            registry=registry,
        )
        self.retries = PromCounter(
            "agentwatch_alert_delivery_retries_total",
            "Send attempts that failed and were retried after a backoff",
            ["output"],
            registry=registry,
        )
        self.seconds = Histogram(
            "agentwatch_alert_delivery_seconds",
            "Seconds from submission to the router until the output accepted the alert",
            ["output"],
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
            registry=registry,
        )
        self.queue_depth = Gauge(
            "agentwatch_alert_queue_depth",
            "Alerts waiting for or in delivery per output",
            ["output"],
            registry=registry,
        )
        self.overflow = PromCounter(
            "agentwatch_alert_queue_overflow_total",
            "Alerts evicted from a full output queue and folded into a storm summary",
            ["output"],
            registry=registry,
        )
        self.shadow_withheld = PromCounter(
            "agentwatch_alert_shadow_withheld_total",
            "Shadow-mode alerts kept away from an on-call output",
            ["output"],
            registry=registry,
        )


_METRICS: weakref.WeakKeyDictionary[CollectorRegistry, DeliveryMetrics] = weakref.WeakKeyDictionary()


def delivery_metrics(registry: CollectorRegistry = REGISTRY) -> DeliveryMetrics:
    """The metrics for ``registry``, created once so several routers can share a registry."""
    metrics = _METRICS.get(registry)
    if metrics is None:
        metrics = _METRICS[registry] = DeliveryMetrics(registry)
    return metrics


# --- HTTP ---------------------------------------------------------------------------------------


class HttpPoster:
    """One aiohttp session posting JSON bodies, turning every failure into a ``DeliveryError``."""

    def __init__(
        self,
        output: str,
        *,
        timeout_s: float,
        headers: Mapping[str, str] | None = None,
        retry_client_errors: bool = True,
    ) -> None:
        self._output = output
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._headers = {"Content-Type": "application/json", **(headers or {})}
        # whether a 4xx other than 408/429 is worth retrying: a webhook's 401/404 is usually a
        # deployment being fixed; Alertmanager's 400 is our payload, and will stay wrong
        self._retry_client_errors = retry_client_errors
        self._session: aiohttp.ClientSession | None = None

    async def post(self, url: str, body: bytes) -> None:
        if self._session is None or self._session.closed:
            # created lazily: a ClientSession must be made inside the running event loop
            self._session = aiohttp.ClientSession(timeout=self._timeout, headers=self._headers)
        try:
            async with self._session.post(url, data=body) as resp:
                if 200 <= resp.status < 300:
                    return
                text = (await resp.text(errors="replace"))[:300]
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise DeliveryError(self._output, f"POST {url}: {type(exc).__name__}: {exc}") from exc
        retryable = resp.status >= 500 or resp.status in (408, 429) or self._retry_client_errors
        raise DeliveryError(self._output, f"POST {url}: HTTP {resp.status}: {text}", retryable=retryable)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


# --- per-output queue ---------------------------------------------------------------------------


@dataclass
class _Queued:
    alert: Alert
    submitted: float  # monotonic time of the first submission, for the latency histogram


class _Storm:
    """Counts of the alerts one overflow evicted, rendered as one summary alert."""

    def __init__(self, output: str, now: datetime) -> None:
        self.output = output
        self.started = now
        self.alert_id = alert_id_for(OVERFLOW_DETECTOR, "agentwatch", (output, now.isoformat()))
        self.count = 0
        self.by_detector: Counter[str] = Counter()
        self.by_severity: Counter[str] = Counter()
        self.sample: list[str] = []
        self.severity = Severity.INFO
        self.any_live = False  # all-shadow evictions summarise as shadow

    def add(self, alert: Alert) -> None:
        self.count += 1
        self.by_detector[alert.detector] += 1
        self.by_severity[alert.severity.value] += 1
        if len(self.sample) < _OVERFLOW_SAMPLE:
            self.sample.append(alert.alert_id)
        if alert.severity.rank > self.severity.rank:
            self.severity = alert.severity
        self.any_live = self.any_live or alert.mode != Mode.SHADOW

    def summary(self) -> Alert:
        now = datetime.now(timezone.utc)
        detectors = ", ".join(f"{d}={n}" for d, n in self.by_detector.most_common())
        severities = ", ".join(f"{s}={n}" for s, n in self.by_severity.most_common())
        return Alert(
            alert_id=self.alert_id,
            detector=OVERFLOW_DETECTOR,
            detector_version="1",
            policy_version="",
            mode=Mode.ALERT if self.any_live else Mode.SHADOW,
            severity=self.severity,
            agent_id="agentwatch",
            first_seen=self.started,
            last_seen=now,
            count=self.count,
            summary=(
                f"alert storm: {self.count} alert(s) for output {self.output} were not delivered one by one "
                f"because its queue was full; by detector: {detectors}; by severity: {severities}; "
                f"first ids: {', '.join(self.sample)} (all are in the alerts topic and ClickHouse)"
            ),
            action="notify",
            labels={"output": self.output},
        )


class _Pending:
    """Bounded, deduplicating queue: highest severity first, FIFO within a severity."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._buckets: dict[Severity, OrderedDict[str, _Queued]] = {s: OrderedDict() for s in Severity}
        self._where: dict[str, Severity] = {}
        self.summary: _Queued | None = None  # reserved slot, never evicted

    def __len__(self) -> int:
        return len(self._where) + (self.summary is not None)

    def __contains__(self, alert_id: str) -> bool:
        return alert_id in self._where

    def put(self, item: _Queued, *, front: bool = False) -> list[Alert]:
        """Queue ``item`` (replacing a queued copy of the same alert); return what overflow evicted."""
        alert_id = item.alert.alert_id
        old_severity = self._where.pop(alert_id, None)
        if old_severity is not None:
            old = self._buckets[old_severity].pop(alert_id)
            item.submitted = min(item.submitted, old.submitted)
        bucket = self._buckets[item.alert.severity]
        bucket[alert_id] = item
        if front:
            bucket.move_to_end(alert_id, last=False)
        self._where[alert_id] = item.alert.severity
        evicted: list[Alert] = []
        while len(self._where) > self.capacity:
            lowest = next(b for b in self._buckets.values() if b)  # Severity iterates lowest first
            victim_id, victim = lowest.popitem(last=False)
            del self._where[victim_id]
            evicted.append(victim.alert)
        return evicted

    def take(self, n: int) -> list[_Queued]:
        taken: list[_Queued] = []
        if self.summary is not None:
            taken.append(self.summary)
            self.summary = None
        for severity in reversed(Severity):
            bucket = self._buckets[severity]
            while bucket and len(taken) < n:
                alert_id, item = bucket.popitem(last=False)
                del self._where[alert_id]
                taken.append(item)
        return taken

    def drain(self) -> list[Alert]:
        return [q.alert for q in self.take(len(self) + 1)]


class OutputWorker:
    """Drains one output's queue in a background task. Created by ``Router``."""

    def __init__(
        self,
        output: Output,
        *,
        retry: RetryPolicy,
        capacity: int,
        max_batch: int,
        metrics: DeliveryMetrics,
    ) -> None:
        self.output = output
        self.name = output.name
        self._retry = retry
        self._max_batch = max_batch
        self._pending = _Pending(capacity)
        self._inflight: list[_Queued] = []
        self._storm: _Storm | None = None
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._m = metrics

    @property
    def depth(self) -> int:
        return len(self._pending) + len(self._inflight)

    def enqueue(self, alert: Alert, submitted: float) -> None:
        self._put(_Queued(alert, submitted))
        self._wake.set()

    def _put(self, item: _Queued, *, front: bool = False) -> None:
        evicted = self._pending.put(item, front=front)
        if evicted:
            self._summarise(evicted)
        self._changed()

    def _summarise(self, evicted: list[Alert]) -> None:
        self._m.overflow.labels(self.name).inc(len(evicted))
        if self._storm is None:
            self._storm = _Storm(self.name, datetime.now(timezone.utc))
            log.warning(
                "%s: queue full (%d alerts): evicting the least severe, oldest first, into storm summary %s",
                self.name,
                self._pending.capacity,
                self._storm.alert_id,
            )
        for alert in evicted:
            self._storm.add(alert)
        self._pending.summary = _Queued(self._storm.summary(), time.monotonic())

    def _changed(self) -> None:
        self._m.queue_depth.labels(self.name).set(self.depth)
        if self.depth == 0:
            self._idle.set()
        else:
            self._idle.clear()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"alert-output-{self.name}")
            if len(self._pending):
                self._wake.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()

    async def stop(self) -> list[Alert]:
        """Stop the worker; return every alert it still held (queued or in flight)."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        left = [q.alert for q in self._inflight] + self._pending.drain()
        self._inflight = []
        self._changed()
        return left

    async def _run(self) -> None:
        while True:
            if not len(self._pending):
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = self._inflight = self._pending.take(self._max_batch)
            self._changed()
            settled = await self._deliver(batch)
            self._inflight = []
            if not settled:
                self._requeue(batch)
            self._changed()
            if not settled:
                # a pause before the next cycle, during which newer alerts join the queue
                await asyncio.sleep(self._retry.cooldown_s())

    async def _deliver(self, batch: list[_Queued]) -> bool:
        """One retry cycle: True once the batch is settled (delivered or rejected), False on giving up."""
        alerts = [q.alert for q in batch]
        started = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            try:
                await self.output.send(alerts)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any output bug is a failed attempt, never a dead worker
                if isinstance(exc, DeliveryError) and not exc.retryable:
                    self._m.deliveries.labels(self.name, "rejected").inc(len(alerts))
                    log.error(
                        "%s rejected %d alert(s), not retrying (%s): %s",
                        self.name,
                        len(alerts),
                        exc,
                        ", ".join(a.alert_id for a in alerts),
                    )
                    return True
                delay = self._retry.delay_s(attempt)
                if attempt >= self._retry.max_attempts or time.monotonic() - started + delay > self._retry.max_elapsed_s:
                    self._m.deliveries.labels(self.name, "failure").inc(len(alerts))
                    log.warning(
                        "%s: %d alert(s) not delivered after %d attempt(s) (%s); kept queued, next try in <= %.1fs",
                        self.name,
                        len(alerts),
                        attempt,
                        exc,
                        self._retry.max_backoff_s,
                    )
                    return False
                self._m.retries.labels(self.name).inc()
                log.info("%s: attempt %d failed (%s); retrying in %.2fs", self.name, attempt, exc, delay)
                await asyncio.sleep(delay)
                continue
            self._succeeded(batch)
            return True

    def _succeeded(self, batch: list[_Queued]) -> None:
        now = time.monotonic()
        self._m.deliveries.labels(self.name, "success").inc(len(batch))
        hist = self._m.seconds.labels(self.name)
        for q in batch:
            hist.observe(now - q.submitted)
            storm = self._storm
            if storm is not None and q.alert.alert_id == storm.alert_id and q.alert.count == storm.count:
                # on-call has the final counts: the next overflow is a new storm with a new id
                log.warning("%s: storm summary delivered: %d alert(s) were summarised", self.name, storm.count)
                self._storm = None

    def _requeue(self, batch: list[_Queued]) -> None:
        storm = self._storm
        for q in reversed(batch):  # reversed + front keeps their original order at the head
            if storm is not None and q.alert.alert_id == storm.alert_id:
                if self._pending.summary is None:  # else a fresher summary is already queued
                    self._pending.summary = q
                continue
            if q.alert.alert_id not in self._pending:  # a newer copy queued meanwhile wins
                self._put(q, front=True)


# --- router -------------------------------------------------------------------------------------

_LIVE = ("topic", "alertmanager", "webhook")
DEFAULT_ROUTES: dict[Severity, tuple[str, ...]] = {
    # low-value alerts are recorded, not paged: on-call reads them in dashboards
    Severity.INFO: ("topic",),
    Severity.LOW: ("topic",),
    Severity.MEDIUM: _LIVE,
    Severity.HIGH: _LIVE,
    Severity.CRITICAL: _LIVE,
}


def parse_routes(routes: Mapping[Severity | str, Sequence[str]]) -> dict[Severity, tuple[str, ...]]:
    """Validate a severity -> output names mapping; every severity must go somewhere."""
    parsed: dict[Severity, tuple[str, ...]] = {}
    for key, names in routes.items():
        try:
            severity = Severity(key)
        except ValueError:
            raise ConfigError(f"routes.{key}", f"unknown severity; expected one of {[s.value for s in Severity]}") from None
        if isinstance(names, str):
            raise ConfigError(f"routes.{key}", "must be a list of output names, not one string")
        parsed[severity] = tuple(dict.fromkeys(names))
    missing = [s.value for s in Severity if not parsed.get(s)]
    if missing:
        # an unrouted severity would be a silent drop
        raise ConfigError("routes", f"severities with no output: {missing}")
    return parsed


class Router:
    """Sends each alert to the outputs its severity maps to, each through its own queue and worker."""

    def __init__(
        self,
        outputs: Sequence[Output],
        routes: Mapping[Severity | str, Sequence[str]] | None = None,
        *,
        retry: RetryPolicy | None = None,
        queue_capacity: int = 10_000,
        max_batch: int = 100,
        registry: CollectorRegistry = REGISTRY,
    ) -> None:
        if queue_capacity < 1 or max_batch < 1:
            raise ConfigError("queue_capacity", "queue_capacity and max_batch must be >= 1")
        self._routes = parse_routes(DEFAULT_ROUTES if routes is None else routes)
        self._outputs: dict[str, Output] = {}
        for output in outputs:
            if output.name in self._outputs:
                raise ConfigError("outputs", f"two outputs are named {output.name!r}")
            self._outputs[output.name] = output
        for severity, names in self._routes.items():
            for name in names:
                if name not in self._outputs:
                    raise ConfigError(
                        f"routes.{severity.value}",
                        f"names output {name!r}, but the outputs are {sorted(self._outputs)}",
                    )
        self._metrics = delivery_metrics(registry)
        retry = retry or RetryPolicy()
        self._workers = {
            name: OutputWorker(o, retry=retry, capacity=queue_capacity, max_batch=max_batch, metrics=self._metrics)
            for name, o in self._outputs.items()
        }
        self._started = False

    @property
    def routes(self) -> dict[Severity, tuple[str, ...]]:
        return dict(self._routes)

    async def start(self) -> None:
        """Start the outputs' resources and one delivery task per output."""
        for output in self._outputs.values():
            if isinstance(output, ManagedOutput):
                await output.start()
        for worker in self._workers.values():
            worker.start()
        self._started = True

    def submit(self, alert: Alert) -> list[str]:
        """Queue ``alert`` for its outputs without waiting; return their names.

        Safe to call before ``start``: alerts wait in the queues until the workers run.
        """
        now = time.monotonic()
        targets: list[str] = []
        for name in self._routes[alert.severity]:
            output = self._outputs[name]
            if alert.mode == Mode.SHADOW and is_on_call(output):
                self._metrics.shadow_withheld.labels(name).inc()
                continue
            self._workers[name].enqueue(alert, now)
            targets.append(name)
        return targets

    async def resolve(self, alert_id: str) -> dict[str, bool]:
        """Tell every output that understands resolution that ``alert_id`` has ended.

        Returns, per such output, whether the resolution was delivered now (outputs keep
        retrying the ones that were not).
        """
        resolvers = [o for o in self._outputs.values() if isinstance(o, ResolvingOutput)]
        done = await asyncio.gather(*(o.resolve(alert_id) for o in resolvers))
        return {o.name: ok for o, ok in zip(resolvers, done)}

    def queue_depth(self, output: str) -> int:
        return self._workers[output].depth

    async def flush(self, timeout_s: float) -> bool:
        """Wait until every queue is empty; False if some output still holds alerts after ``timeout_s``."""
        try:
            async with asyncio.timeout(timeout_s):
                for worker in self._workers.values():
                    await worker.wait_idle()
        except TimeoutError:
            return False
        return True

    async def close(self, drain_timeout_s: float = 5.0) -> dict[str, list[Alert]]:
        """Drain for up to ``drain_timeout_s``, stop; return (and log) what each output did not get."""
        if self._started:
            await self.flush(drain_timeout_s)
        undelivered: dict[str, list[Alert]] = {}
        for name, worker in self._workers.items():
            left = await worker.stop()
            if left:
                undelivered[name] = left
                log.error(
                    "%s: %d alert(s) undelivered at shutdown: %s",
                    name,
                    len(left),
                    ", ".join(a.alert_id for a in left[:50]),
                )
        for output in self._outputs.values():
            if isinstance(output, ManagedOutput):
                await output.close()
        self._started = False
        return undelivered

    async def __aenter__(self) -> Router:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
