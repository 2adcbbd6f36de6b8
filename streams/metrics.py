"""Prometheus metrics of the worker (units in the names, as Prometheus expects)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_BATCH_ROWS = (1, 10, 50, 100, 500, 1000, 5000, 10000, 50000)
_SECONDS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


@dataclass
class Metrics:
    registry: CollectorRegistry
    messages_in: Counter
    events_in: Counter
    decode_failures: Counter
    records_skipped: Counter
    events_detected: Counter
    late_events: Counter
    duplicate_events: Counter
    identity_pending: Gauge
    alerts: Counter
    sink_batch_rows: Histogram
    sink_write_seconds: Histogram
    sink_failures: Counter
    stage_batch_seconds: Histogram
    consumer_lag: Gauge
    open_alerts: Gauge
    policy_reloads: Counter
    consumer_lag_events: Gauge
    stage_lag_seconds: Gauge
    dead_letters: Counter
    output_retries: Counter
    forged_acks: Counter
    snapshot_seconds: Histogram
    snapshot_held_seconds: Histogram
    snapshot_bytes: Gauge

    @classmethod
    def create(cls, registry: CollectorRegistry | None = None) -> "Metrics":
        r = registry or CollectorRegistry()
        return cls(
            registry=r,
            messages_in=Counter(
                "agentwatch_messages_in_total", "Kafka messages read from input topics", ["topic"], registry=r
            ),
            events_in=Counter(
                "agentwatch_events_in_total", "canonical events decoded, by source format and kind",
                ["source", "kind"], registry=r,
            ),
            decode_failures=Counter(
                "agentwatch_decode_failures_total", "records sent to the DLQ, by input topic", ["topic"], registry=r
            ),
            records_skipped=Counter(
                "agentwatch_records_skipped_total",
                "valid input records with nothing to monitor (PostgreSQL server lines that are not audit records)",
                ["topic"], registry=r,
            ),
            events_detected=Counter(
                "agentwatch_events_detected_total", "events that went through the detectors", registry=r
            ),
            late_events=Counter(
                "agentwatch_late_events_total", "events later than the allowed lateness (stored, counted)",
                ["stage"], registry=r,
            ),
            duplicate_events=Counter(
                "agentwatch_duplicate_events_total", "redelivered events skipped by the detectors", registry=r
            ),
            identity_pending=Gauge(
                "agentwatch_identity_pending_events", "spans waiting for their agent ancestor", registry=r
            ),
            alerts=Counter(
                "agentwatch_alerts_total", "alerts emitted (new or updated), by detector, severity and mode",
                ["detector", "severity", "mode"], registry=r,
            ),
            sink_batch_rows=Histogram(
                "agentwatch_sink_batch_rows", "rows per ClickHouse insert", ["table"], buckets=_BATCH_ROWS,
                registry=r,
            ),
            sink_write_seconds=Histogram(
                "agentwatch_sink_write_seconds", "latency of one ClickHouse insert", ["table"], buckets=_SECONDS,
                registry=r,
            ),
            sink_failures=Counter(
                "agentwatch_sink_failures_total", "failed ClickHouse inserts (retried)", ["table"], registry=r
            ),
            stage_batch_seconds=Histogram(
                "agentwatch_stage_batch_seconds", "time to process one batch, by stage", ["stage"],
                buckets=_SECONDS, registry=r,
            ),
            consumer_lag=Gauge(
                "agentwatch_consumer_lag_messages", "messages not yet consumed, by topic and partition",
                ["topic", "partition"], registry=r,
            ),
            open_alerts=Gauge("agentwatch_open_alerts", "alert episodes still open", registry=r),
            policy_reloads=Counter("agentwatch_policy_reloads_total", "policy file reloads, by result",
                                   ["result"], registry=r),
            consumer_lag_events=Gauge(
                "agentwatch_consumer_lag_events",
                "events not yet processed by a stage (messages behind x events per message), by topic",
                ["topic"], registry=r,
            ),
            stage_lag_seconds=Gauge(
                "agentwatch_stage_lag_seconds",
                "age of the oldest input a stage has not finished (0 when caught up), by stage",
                ["stage"], registry=r,
            ),
            snapshot_seconds=Histogram(
                "agentwatch_state_snapshot_seconds",
                "time to take one partition's state snapshot, by stage (in a forked child when slow)",
                ["stage"], buckets=_SECONDS, registry=r,
            ),
            snapshot_held_seconds=Histogram(
                "agentwatch_state_snapshot_held_seconds",
                "time a stage stopped for one state snapshot (a fork, or the whole snapshot), by stage",
                ["stage"], buckets=_SECONDS, registry=r,
            ),
            snapshot_bytes=Gauge("agentwatch_state_snapshot_bytes", "size of the latest state snapshot, by stage",
                                 ["stage"], registry=r),
            dead_letters=Counter(
                "agentwatch_dead_letters_total",
                "records and rows sent to the DLQ, by where they failed (decode, a stage, the store)",
                ["where"], registry=r,
            ),
            output_retries=Counter(
                "agentwatch_output_retries_total", "failed deliveries of a batch's outputs to Kafka (retried)",
                registry=r,
            ),
            forged_acks=Counter("agentwatch_forged_acks_total",
                                "kill-switch acks not signed by the agent they name (not counted), by reason",
                                ["reason"], registry=r),
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
