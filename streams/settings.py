"""Every setting of agentwatch, in one place.

Each field is read from the environment as ``AGENTWATCH_<NAME>`` (upper case),
or from a ``.env`` file in the working directory. ``agentwatch settings``
prints them all with their current values and descriptions.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlparse

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import SettingsConfigDict, SettingsError

from schemas.alerts import Severity
from schemas.decoders.pgaudit import AUTO_PREFIX, PG_PREFIX_PRESETS, PgLogConfig, check_timezone
from schemas.errors import ConfigError
from schemas.redact import mask_secrets
from streams.control_plane import ControlSettings

ENV_PREFIX = "AGENTWATCH_"


class Settings(ControlSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_file=".env", extra="ignore")

    home: Path = Field(
        Path(".agentwatch"),
        description="state directory: local broker, embedded ClickHouse data, worker state and pid files",
    )
    bootstrap: str = Field(
        "",
        description="Kafka bootstrap servers host:port[,host:port]; empty = the local broker "
        "started by `agentwatch broker up` (or by the demo)",
    )
    clickhouse_dsn: str = Field(
        "",
        description="ClickHouse DSN: chdb:///abs/path (embedded engine, one process only) or "
        "http(s)://user:pass@host:port/db (server); empty = chdb:///<home>/clickhouse",
    )
    policy_file: Path | None = Field(None, description="detector policy (YAML); empty = built-in defaults")
    app_id: str = Field("agentwatch", description="consumer group / faust application id")

    topic_otlp: str = Field("otlp_spans", description="OTLP traces from the OpenTelemetry Collector")
    topic_events_in: str = Field("agentwatch.events.in", description="native JSON events from the client")
    topic_audit_in: str = Field("agentwatch.audit.in", description="audit events (k8s, CloudTrail, OCSF, pgaudit, native)")
    topic_dlq: str = Field("agentwatch.dlq", description="records that could not be decoded, with the reason")
    topic_alerts: str = Field("agentwatch.alerts", description="alerts for on-call (alert and enforce modes)")
    topic_shadow_alerts: str = Field("agentwatch.alerts.shadow", description="alerts of detectors in shadow mode")
    topic_control: str = Field("agentwatch.control", description="signed kill-switch commands")
    topic_canary: str = Field("agentwatch.canary.verdicts", description="canary verdicts with their numbers "
                              "(docs/canary.md), keyed by agent id")
    topic_acks: str = Field("agentwatch.control.acks", description="agents' acknowledgements of commands")
    topic_by_trace: str = Field("agentwatch.internal.by_trace", description="canonical events keyed by trace id")
    topic_by_agent: str = Field("agentwatch.internal.by_agent", description="attributed events keyed by agent id")
    topic_by_tenant: str = Field(
        "agentwatch.internal.by_tenant",
        description="signals for cross-agent detections (coordinated incidents, tenant budgets) keyed by tenant",
    )
    topic_state: str = Field(
        "agentwatch.internal.state",
        description="compacted topic of per-partition state snapshots (correlate and detect stages)",
    )
    partitions: int = Field(4, ge=1, description="partitions of the topics agentwatch creates")
    detect_partitions: int | None = Field(
        None, ge=1,
        description="partitions of the agent-keyed detect topic; unset: AGENTWATCH_PARTITIONS (per-agent "
        "detection spreads over that many workers; cross-agent detections run in the tenant-keyed stage)",
    )
    worker_store: bool = Field(
        True,
        description="the worker also writes ClickHouse and serves /query (one process does everything); "
        "false = a detection-only worker that opens no store, so N of them run on one machine, with one "
        "`agentwatch store` process writing the store from the topics",
    )

    batch_max_messages: int = Field(500, ge=1, description="Kafka messages taken per processing batch")
    batch_within_s: float = Field(
        0.05, gt=0,
        description="longest wait to fill a batch: each stage adds up to this much to detection latency",
    )
    checkpoint_s: float = Field(
        1.0, gt=0,
        description="how often a stage that writes the store makes its work durable: rows flushed in one "
        "insert, state snapshotted, offsets committed (a crash re-reads at most this much of its input)",
    )
    max_events_per_message: int = Field(
        500, ge=1, description="events packed into one message between stages (keeps messages well under 1 MB)"
    )
    internal_format_version: int = Field(
        2, ge=1, le=2,
        description="layout version of the events this worker writes to the internal topics: 1 while workers "
        "of an older release, which read only version 1, still run (a rolling upgrade); this release reads both",
    )
    state_snapshot_s: float = Field(
        2.0, ge=0,
        description="at most this often a stage snapshots the state of a partition it changed (at a "
        "checkpoint, to the state topic); a restore replays only the input since the snapshot",
    )
    gc_full_s: float = Field(
        3600.0, ge=0,
        description="how often the worker looks for reference cycles among all its objects (a pause of about "
        "a second per million objects held); 0 = never. Younger objects are collected all the time",
    )
    tick_s: float = Field(1.0, gt=0, description="how often idle event time advances (window close, timers)")
    stall_s: float = Field(
        120.0, gt=0,
        description="/healthz answers 503 when a stage holds one batch this long, or makes no progress "
        "this long while its input waits",
    )
    shutdown_timeout_s: float = Field(
        30.0, gt=0, description="SIGTERM stops the worker within this many seconds, even with a stuck output",
    )

    alertmanager_url: str = Field("", description="Prometheus Alertmanager base URL (http://host:9093); empty = off")
    webhook_url: str = Field("", description="generic webhook receiving {\"alerts\": [...]} POSTs; empty = off")
    page_min_severity: Severity = Field(
        Severity.MEDIUM, description="alerts at or above this severity go to Alertmanager and the webhook; "
        "below it they stay on the alerts topic and in ClickHouse"
    )
    runbook_base_url: str = Field(
        "https://github.com/agentwatch/agentwatch/blob/main/docs/runbooks",
        description="where docs/runbooks is served; alerts link to <this>/<detector>.md",
    )
    retention_events_days: int = Field(90, ge=0, description="days events (and their per-minute rollups) are "
                                       "kept in ClickHouse; 0 = forever")
    retention_alerts_days: int = Field(365, ge=0, description="days alerts are kept; 0 = forever")
    retention_dlq_days: int = Field(30, ge=0, description="days dead letters (their raw bytes) are kept; 0 = forever")
    web_host: str = Field("127.0.0.1", description="bind address of /metrics and the read-only /query endpoint")
    web_port: int = Field(6066, ge=0, le=65535, description="port of /metrics and /query; 0 = pick a free port")
    # -- audit sources: how PostgreSQL writes its log, identity in Kafka headers (docs/join.md) --
    pg_log_line_prefix: str = Field(
        "auto",
        description="the PostgreSQL server's log_line_prefix (SHOW log_line_prefix), or a preset: postgres "
        "('%m [%p] '), debian ('%m [%p] %q%u@%d '), rds ('%t:%r:%u@%d:[%p]:'), cloudsql, pgbadger; auto = "
        "try every preset. Not needed for jsonlog (recommended)",
    )
    pg_log_timezone: str = Field(
        "", description="the PostgreSQL server's log_timezone (IANA name, e.g. Europe/Berlin) to resolve zone "
        "abbreviations in log times; empty = only UTC/GMT/numeric offsets are accepted, others are rejected"
    )
    pg_stitch_s: float = Field(
        2.0, gt=0, description="longest wait for the rest of a PostgreSQL log record shipped in pieces "
        "(one line per message, an ERROR and its STATEMENT as two messages)"
    )
    header_identity: dict[str, str] = Field(
        default_factory=dict,
        description="Kafka header -> identity for events that carry none, as JSON: "
        '{"x-tenant-id": "tenant", "x-agent-id": "agent_id", "x-team": "team"} (any other target is an '
        "attribute); pair with the Collector kafka exporter's include_metadata_keys",
    )

    # -- Kafka security: every client agentwatch makes (worker, admin, agent client, bench, demo) --
    kafka_security_protocol: str = Field(
        "PLAINTEXT", description="PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL (managed Kafka: SASL_SSL)"
    )
    kafka_sasl_mechanism: str = Field("PLAIN", description="PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512")
    kafka_sasl_username: str = Field("", description="SASL user name")
    kafka_sasl_password: SecretStr = Field(SecretStr(""), description="SASL password")
    kafka_ssl_cafile: Path | None = Field(None, description="CA certificate(s) (PEM) to verify the brokers; "
                                          "empty = the system's trusted CAs")
    kafka_ssl_certfile: Path | None = Field(None, description="client certificate (PEM) for mutual TLS")
    kafka_ssl_keyfile: Path | None = Field(None, description="client private key (PEM) for mutual TLS")
    kafka_ssl_key_password: SecretStr = Field(SecretStr(""), description="password of the client key, if any")
    kafka_ssl_check_hostname: bool = Field(True, description="verify that the broker's certificate names "
                                           "the host connected to")
    kafka_replication_factor: int = Field(1, ge=1, description="replication factor of the topics agentwatch "
                                          "creates (3 on a production cluster)")
    kafka_min_insync_replicas: int = Field(0, ge=0, description="min.insync.replicas of the topics agentwatch "
                                           "creates; 0 = the broker's default")

    query_token: SecretStr = Field(
        SecretStr(""),
        description="bearer token /query requires; empty = one generated once into <home>/keys/query_token "
        "(mode 0600; `agentwatch query-token` prints it)",
    )
    query_allowed_hosts: str = Field(
        "",
        description="extra host[:port] names /query answers to (comma-separated) besides localhost, "
        "127.0.0.1, [::1] and the bind address: the Host header is checked against DNS rebinding",
    )
    query_max_seconds: float = Field(30.0, gt=0, description="an analyst query is stopped after this long")
    # at least 1000 rows and 64 KiB: the statement's parse tree (EXPLAIN AST, one row per node) is read
    # under the same limits
    query_max_rows: int = Field(100_000, ge=1000, description="most rows an analyst query may return")
    query_max_bytes: int = Field(64 * 1024 * 1024, ge=65536, description="most bytes an analyst query may return")
    query_max_threads: int = Field(0, ge=0, description="threads an analyst query may use; 0 = half of this "
                                   "machine's cores (at least 1) with the embedded store, so the pipeline keeps "
                                   "the rest; the server's own default with a ClickHouse server")
    log_level: str = Field("warning", description="debug, info, warning or error")
    log_format: str = Field("json", description="json (one object per line) or text")

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        v = v.lower()
        if v not in {"debug", "info", "warning", "error"}:
            raise ValueError("must be one of debug, info, warning, error")
        return v

    @field_validator("log_format")
    @classmethod
    def _fmt(cls, v: str) -> str:
        if v not in {"json", "text"}:
            raise ValueError("must be json or text")
        return v

    @field_validator("pg_log_timezone")
    @classmethod
    def _pg_tz(cls, v: str) -> str:
        return check_timezone(v)

    @field_validator("pg_log_line_prefix")
    @classmethod
    def _pg_prefix(cls, v: str) -> str:
        if v != AUTO_PREFIX and v not in PG_PREFIX_PRESETS and "%" not in v:
            raise ValueError(f"{v!r} is neither a log_line_prefix (with % escapes) nor one of "
                             f"{', '.join([AUTO_PREFIX, *PG_PREFIX_PRESETS])}")
        return v

    @field_validator("clickhouse_dsn")
    @classmethod
    def _dsn(cls, v: str) -> str:
        if v and urlparse(v).scheme not in {"chdb", "http", "https"}:
            raise ValueError(f"unsupported scheme in {v!r} (use chdb:///path or http(s)://host:port)")
        return v

    @field_validator("kafka_security_protocol")
    @classmethod
    def _protocol(cls, v: str) -> str:
        v = v.upper()
        if v not in {"PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"}:
            raise ValueError("must be one of PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL")
        return v

    @field_validator("kafka_sasl_mechanism")
    @classmethod
    def _mechanism(cls, v: str) -> str:
        v = v.upper()
        if v not in {"PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"}:
            raise ValueError("must be one of PLAIN, SCRAM-SHA-256, SCRAM-SHA-512")
        return v

    @field_validator("bootstrap")
    @classmethod
    def _bootstrap(cls, v: str) -> str:
        for part in filter(None, v.split(",")):
            host, _, port = part.strip().rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"{part!r} is not host:port")
        return v

    # -- derived --------------------------------------------------------------------------

    @property
    def home_dir(self) -> Path:
        return self.home.expanduser().resolve()

    @property
    def agent_partitions(self) -> int:
        """Partitions of the agent-keyed topic: detection spreads over this many workers."""
        return self.detect_partitions or self.partitions

    @property
    def broker_dir(self) -> Path:
        return self.home_dir / "broker"

    @property
    def dsn(self) -> str:
        return self.clickhouse_dsn or f"chdb://{self.home_dir / 'clickhouse'}"

    @property
    def pg_log(self) -> PgLogConfig:
        return PgLogConfig(self.pg_log_line_prefix, self.pg_log_timezone, self.pg_stitch_s)

    @property
    def worker_file(self) -> Path:
        return self.home_dir / "worker.json"

    def with_overrides(self, **values: object) -> "Settings":
        return load_settings(**{**self.model_dump(), **values})


def load_settings(**overrides: object) -> Settings:
    """Read settings; a bad value names its environment variable and the problem."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ENV_PREFIX + str(err["loc"][0]).upper() if err["loc"] else "(settings)"
        raise ConfigError(key, err["msg"].removeprefix("Value error, ")) from None
    except SettingsError as exc:  # a structured (JSON) setting that does not parse
        field = re.search(r'field "(\w+)"', str(exc))
        key = ENV_PREFIX + field.group(1).upper() if field else "(settings)"
        raise ConfigError(key, "is not valid JSON for this setting") from None


def describe_settings(settings: Settings) -> list[tuple[str, str, str]]:
    """(variable, current value, description) of every setting; passwords and tokens
    inside values (DSNs, URLs) show as ``****`` and secret settings as ``**********``."""
    rows = []
    for name, field in Settings.model_fields.items():
        rows.append((ENV_PREFIX + name.upper(), mask_secrets(str(getattr(settings, name))), field.description or ""))
    return rows
