-- GENERATED from schema.sql by `python -m deploy.clickhouse.cluster`; do not edit.
-- The ClickHouse cluster variant: Replicated tables per shard, Distributed tables over
-- them under the single-node names, every statement ON CLUSTER. Apply it once per
-- cluster (clickhouse-client --multiquery < cluster.sql) before starting the workers.

CREATE DATABASE IF NOT EXISTS agentwatch ON CLUSTER '{cluster}';

CREATE TABLE IF NOT EXISTS agentwatch.events_local ON CLUSTER '{cluster}'
(
    event_id            String,
    kind                LowCardinality(String),
    ts                  DateTime64(6, 'UTC'),
    agent_id            String,
    tenant              LowCardinality(String),
    trace_id            String,
    span_id             String,
    parent_span_id      String,
    source              LowCardinality(String),
    origin              LowCardinality(String),
    name                String,
    duration_ms         Nullable(Float64),
    identity            LowCardinality(String),
    is_agent_span       Bool,
    fallback_agent_id   String,
    model               LowCardinality(String),
    input_tokens        UInt64,
    output_tokens       UInt64,
    cost_usd            Nullable(Float64),
    tool_name           LowCardinality(String),
    args_fingerprint    String,
    tool_call_id        String,
    outcome             LowCardinality(String),
    error_type          LowCardinality(String),
    lifecycle           LowCardinality(String),
    target_agent_id     String,
    principal           String,
    action              LowCardinality(String),
    resource            String,
    correlation         Map(String, String),
    approver            String,
    decision            LowCardinality(String),
    covers_trace_id     String,
    covers_tool_call_id String,
    covers_resource     String,
    expires_at          Nullable(DateTime64(6, 'UTC')),
    command_id          String,
    attributes          Map(String, String),
    topic               LowCardinality(String),
    partition           Int32,
    offset              Int64,
    inserted_at         DateTime64(6, 'UTC') DEFAULT now64(6),
    INDEX idx_agent agent_id TYPE bloom_filter GRANULARITY 4,
    INDEX idx_trace trace_id TYPE bloom_filter GRANULARITY 4,
    INDEX idx_tenant tenant TYPE set(256) GRANULARITY 4
)
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/agentwatch/events_local', '{replica}', inserted_at)
PARTITION BY toYYYYMM(ts)
ORDER BY (toStartOfHour(ts), event_id);

CREATE TABLE IF NOT EXISTS agentwatch.events ON CLUSTER '{cluster}' AS agentwatch.events_local
ENGINE = Distributed('{cluster}', agentwatch, events_local, cityHash64(event_id));

CREATE TABLE IF NOT EXISTS agentwatch.alerts_local ON CLUSTER '{cluster}'
(
    alert_id         String,
    detector         LowCardinality(String),
    detector_version LowCardinality(String),
    policy_version   LowCardinality(String),
    policy_hash      LowCardinality(String),
    mode             LowCardinality(String),
    severity         LowCardinality(String),
    agent_id         String,
    tenant           LowCardinality(String),
    trace_ids        Array(String),
    first_seen       DateTime64(6, 'UTC'),
    last_seen        DateTime64(6, 'UTC'),
    count            UInt64,
    summary          String,
    evidence         Array(Tuple(
                         event_id  String,
                         ts        Nullable(DateTime64(6, 'UTC')),
                         trace_id  String,
                         topic     String,
                         partition Int32,
                         offset    Int64)),
    action           LowCardinality(String),
    labels           Map(String, String),
    version          UInt64 MATERIALIZED toUInt64(toUnixTimestamp64Micro(last_seen)) * 1024 + least(count, 1023),
    inserted_at      DateTime64(6, 'UTC') DEFAULT now64(6)
)
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/agentwatch/alerts_local', '{replica}', version)
ORDER BY alert_id;

CREATE TABLE IF NOT EXISTS agentwatch.alerts ON CLUSTER '{cluster}' AS agentwatch.alerts_local
ENGINE = Distributed('{cluster}', agentwatch, alerts_local, cityHash64(alert_id));

ALTER TABLE agentwatch.alerts_local ON CLUSTER '{cluster}' ADD COLUMN IF NOT EXISTS agent_version LowCardinality(String) AFTER tenant;

ALTER TABLE agentwatch.alerts ON CLUSTER '{cluster}' ADD COLUMN IF NOT EXISTS agent_version LowCardinality(String) AFTER tenant;

CREATE TABLE IF NOT EXISTS agentwatch.dlq_local ON CLUSTER '{cluster}'
(
    topic       LowCardinality(String),
    partition   Int32,
    offset      Int64,
    source      LowCardinality(String),
    reason      String,
    raw         String,
    received_at DateTime64(6, 'UTC')
)
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/agentwatch/dlq_local', '{replica}')
ORDER BY (topic, partition, offset, cityHash64(raw, reason));

CREATE TABLE IF NOT EXISTS agentwatch.dlq ON CLUSTER '{cluster}' AS agentwatch.dlq_local
ENGINE = Distributed('{cluster}', agentwatch, dlq_local, cityHash64(topic, partition, offset));

CREATE OR REPLACE VIEW agentwatch.alerts_latest ON CLUSTER '{cluster}' AS
SELECT
    alert_id, detector, detector_version, policy_version, policy_hash, mode,
    severity, agent_id, tenant, agent_version, trace_ids, first_seen, last_seen, count,
    summary, evidence, action, labels
FROM agentwatch.alerts FINAL;

ALTER TABLE agentwatch.events_local ON CLUSTER '{cluster}' ADD COLUMN IF NOT EXISTS command_action LowCardinality(String) AFTER command_id;

ALTER TABLE agentwatch.events ON CLUSTER '{cluster}' ADD COLUMN IF NOT EXISTS command_action LowCardinality(String) AFTER command_id;

ALTER TABLE agentwatch.events_local ON CLUSTER '{cluster}' ADD COLUMN IF NOT EXISTS command_scope Array(String) AFTER command_action;

ALTER TABLE agentwatch.events ON CLUSTER '{cluster}' ADD COLUMN IF NOT EXISTS command_scope Array(String) AFTER command_action;

ALTER TABLE agentwatch.events_local ON CLUSTER '{cluster}' ADD COLUMN IF NOT EXISTS agent_version LowCardinality(String) AFTER tenant;

ALTER TABLE agentwatch.events ON CLUSTER '{cluster}' ADD COLUMN IF NOT EXISTS agent_version LowCardinality(String) AFTER tenant;

CREATE TABLE IF NOT EXISTS agentwatch.killswitches_local ON CLUSTER '{cluster}'
(
    command_id   String,
    action       LowCardinality(String),
    target_kind  LowCardinality(String),
    target_value String,
    scope        Array(String),
    reason       String,
    alert_id     String,
    issued_by    String,
    issued_at    DateTime64(6, 'UTC'),
    expires_at   DateTime64(6, 'UTC'),
    nonce        String,
    key_id       String,
    signature    String,
    inserted_at  DateTime64(6, 'UTC') DEFAULT now64(6)
)
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/agentwatch/killswitches_local', '{replica}', inserted_at)
ORDER BY command_id;

CREATE TABLE IF NOT EXISTS agentwatch.killswitches ON CLUSTER '{cluster}' AS agentwatch.killswitches_local
ENGINE = Distributed('{cluster}', agentwatch, killswitches_local, cityHash64(command_id));

ALTER TABLE agentwatch.killswitches_local ON CLUSTER '{cluster}' ADD COLUMN IF NOT EXISTS target_version String AFTER target_value;

ALTER TABLE agentwatch.killswitches ON CLUSTER '{cluster}' ADD COLUMN IF NOT EXISTS target_version String AFTER target_value;

CREATE OR REPLACE VIEW agentwatch.killswitches_active ON CLUSTER '{cluster}' AS
SELECT
    command_id, target_kind, target_value, target_version, scope, reason, alert_id,
    issued_by, issued_at, expires_at
FROM
(
    SELECT *
    FROM agentwatch.killswitches FINAL
    ORDER BY issued_at DESC, command_id DESC
    LIMIT 1 BY target_kind, target_value, target_version
)
WHERE action = 'halt' AND expires_at > now64(6);

CREATE VIEW IF NOT EXISTS agentwatch.audit_attribution_between ON CLUSTER '{cluster}' AS
SELECT
    a.ts AS ts, a.event_id AS audit_event_id, a.source AS audit_source, a.principal AS principal, a.action AS action,
    a.resource AS resource, a.outcome AS outcome, a.join_status AS join_status, a.joined_via AS joined_via,
    a.agent_principal AS agent_principal, a.agent_id AS agent_id, a.identity AS identity, a.tenant AS tenant,
    a.trace_id AS trace_id, a.tool_span_id AS tool_span_id, a.tool_call_id AS tool_call_id,
    t.tool_name AS tool_name, t.ts AS tool_ended_at, t.outcome AS tool_outcome,
    a.topic AS topic, a.partition AS partition, a.offset AS offset
FROM
(
    SELECT
        ts, event_id, source, principal, action, resource, outcome, agent_id,
        identity, tenant, trace_id, tool_call_id, topic, partition, offset,
        attributes['join'] AS join_status,
        attributes['agent_principal'] = 'true' AS agent_principal,
        correlation['join.via'] AS joined_via,
        correlation['joined_span_id'] AS tool_span_id,
        correlation['joined_event_id'] AS tool_event_id
    FROM agentwatch.events FINAL
    WHERE kind = 'audit' AND ts >= {since:DateTime64(6, 'UTC')} AND ts < {until:DateTime64(6, 'UTC')}
) AS a
GLOBAL LEFT JOIN
(
    SELECT event_id, tool_name, ts, outcome
    FROM agentwatch.events FINAL
    WHERE kind = 'tool_call'
      AND ts >= {since:DateTime64(6, 'UTC')} - INTERVAL 1 HOUR AND ts < {until:DateTime64(6, 'UTC')} + INTERVAL 1 HOUR
) AS t ON t.event_id = a.tool_event_id;

CREATE VIEW IF NOT EXISTS agentwatch.audit_attribution ON CLUSTER '{cluster}' AS
SELECT *
FROM agentwatch.audit_attribution_between(since = '1970-01-01 00:00:00', until = '2299-12-31 00:00:00');

ALTER TABLE agentwatch.events_local ON CLUSTER '{cluster}' ADD INDEX IF NOT EXISTS idx_resource resource TYPE bloom_filter GRANULARITY 4;

CREATE VIEW IF NOT EXISTS agentwatch.tool_call_confirmation ON CLUSTER '{cluster}' AS
SELECT
    ts, event_id, agent_id, tenant, tool_name, tool_call_id, trace_id, span_id,
    outcome, attributes['join'] AS join_status,
    correlation['join.audit_event_id'] AS audit_event_id
FROM agentwatch.events FINAL
WHERE kind = 'tool_call' AND mapContains(attributes, 'join');

CREATE TABLE IF NOT EXISTS agentwatch.events_per_minute_local ON CLUSTER '{cluster}'
(
    minute        DateTime('UTC'),
    tenant        LowCardinality(String),
    agent_id      String,
    kind          LowCardinality(String),
    source        LowCardinality(String),
    tool_name     LowCardinality(String),
    outcome       LowCardinality(String),
    model         LowCardinality(String),
    events        UInt64,
    input_tokens  UInt64,
    output_tokens UInt64,
    cost_usd      Float64
)
ENGINE = ReplicatedSummingMergeTree('/clickhouse/tables/{shard}/agentwatch/events_per_minute_local', '{replica}')
PARTITION BY toYYYYMM(minute)
ORDER BY (minute, tenant, agent_id, kind, source, tool_name, outcome, model);

CREATE TABLE IF NOT EXISTS agentwatch.events_per_minute ON CLUSTER '{cluster}' AS agentwatch.events_per_minute_local
ENGINE = Distributed('{cluster}', agentwatch, events_per_minute_local, cityHash64(agent_id));

CREATE MATERIALIZED VIEW IF NOT EXISTS agentwatch.events_per_minute_mv ON CLUSTER '{cluster}' TO agentwatch.events_per_minute_local AS
SELECT
    toStartOfMinute(ts) AS minute, tenant, agent_id, kind, source, tool_name, outcome, model,
    count() AS events, sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens,
    sum(ifNull(cost_usd, 0)) AS cost_usd
FROM agentwatch.events_local
GROUP BY minute, tenant, agent_id, kind, source, tool_name, outcome, model;

CREATE TABLE IF NOT EXISTS agentwatch.dlq_per_minute_local ON CLUSTER '{cluster}'
(
    minute  DateTime('UTC'),
    topic   LowCardinality(String),
    source  LowCardinality(String),
    records UInt64
)
ENGINE = ReplicatedSummingMergeTree('/clickhouse/tables/{shard}/agentwatch/dlq_per_minute_local', '{replica}')
ORDER BY (minute, topic, source);

CREATE TABLE IF NOT EXISTS agentwatch.dlq_per_minute ON CLUSTER '{cluster}' AS agentwatch.dlq_per_minute_local
ENGINE = Distributed('{cluster}', agentwatch, dlq_per_minute_local, cityHash64(topic));

CREATE MATERIALIZED VIEW IF NOT EXISTS agentwatch.dlq_per_minute_mv ON CLUSTER '{cluster}' TO agentwatch.dlq_per_minute_local AS
SELECT toStartOfMinute(received_at) AS minute, topic, source, count() AS records
FROM agentwatch.dlq_local
GROUP BY minute, topic, source;

CREATE TABLE IF NOT EXISTS agentwatch.version_metrics_local ON CLUSTER '{cluster}'
(
    tenant                 LowCardinality(String),
    agent_id               String,
    agent_version          LowCardinality(String),
    window_start           DateTime64(6, 'UTC'),
    window_s               Float64,
    actions                UInt64,
    tool_calls             UInt64,
    llm_calls              UInt64,
    retried_calls          UInt64,
    tool_errors            UInt64,
    tokens                 UInt64,
    cost_usd               Float64,
    approvals              UInt64,
    tasks                  UInt64,
    successful_tasks       UInt64,
    violations             UInt64,
    side_effect_errors     UInt64,
    violations_by_detector Map(String, UInt64),
    tool_calls_by_tool     Map(String, UInt64),
    inserted_at            DateTime64(6, 'UTC') DEFAULT now64(6)
)
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/agentwatch/version_metrics_local', '{replica}', inserted_at)
PARTITION BY toYYYYMM(window_start)
ORDER BY (tenant, agent_id, agent_version, window_start);

CREATE TABLE IF NOT EXISTS agentwatch.version_metrics ON CLUSTER '{cluster}' AS agentwatch.version_metrics_local
ENGINE = Distributed('{cluster}', agentwatch, version_metrics_local, cityHash64(agent_id));

CREATE TABLE IF NOT EXISTS agentwatch.canary_verdicts_local ON CLUSTER '{cluster}'
(
    verdict_id        String,
    tenant            LowCardinality(String),
    agent_id          String,
    baseline_version  LowCardinality(String),
    candidate_version LowCardinality(String),
    verdict           LowCardinality(String),
    test              LowCardinality(String),
    confidence        Float64,
    judged_at         DateTime64(6, 'UTC'),
    baseline_tasks    UInt64,
    candidate_tasks   UInt64,
    min_tasks         UInt64,
    metrics           Array(Tuple(
                          metric    String,
                          outcome   String,
                          baseline  Float64,
                          candidate Float64,
                          threshold Float64,
                          p_value   Nullable(Float64),
                          ci_low    Nullable(Float64),
                          ci_high   Nullable(Float64))),
    reason            String,
    policy_version    LowCardinality(String),
    alert_id          String,
    inserted_at       DateTime64(6, 'UTC') DEFAULT now64(6)
)
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/agentwatch/canary_verdicts_local', '{replica}', inserted_at)
ORDER BY verdict_id;

CREATE TABLE IF NOT EXISTS agentwatch.canary_verdicts ON CLUSTER '{cluster}' AS agentwatch.canary_verdicts_local
ENGINE = Distributed('{cluster}', agentwatch, canary_verdicts_local, cityHash64(verdict_id));
