-- agentwatch ClickHouse schema. Idempotent: every statement is IF NOT EXISTS,
-- so applying it on every start (or twice) is harmless. Statements are
-- separated by ';' and applied one at a time (the HTTP interface and chDB both
-- take one statement per request), so no ';' may appear inside a statement or
-- a comment.
--
-- Idempotent writes (DESIGN.md "Processing guarantees") come from two layers:
--  * a retried batch carries the same insert_deduplication_token, and
--    non_replicated_deduplication_window keeps recent block hashes so the
--    retry is dropped at insert time (a plain MergeTree keeps none by default)
--  * a replayed record has the same id, and ReplacingMergeTree collapses rows
--    with equal ORDER BY keys at merge time. Reads that must be exact use FINAL
--    (or the *_latest views).

CREATE DATABASE IF NOT EXISTS agentwatch;

-- One row per canonical schemas.events.Event.
-- ORDER BY is the dedup key of a ReplacingMergeTree, so it may only hold what a
-- replay reproduces exactly: event_id (derived from the source's own ids) and
-- ts (event time from the source). agent_id and tenant are NOT in it: identity
-- can be re-resolved later (an ancestor span arriving late, a changed identity
-- map) and a replayed event with a different agent_id must still replace the
-- old row rather than sit beside it. Leading with toStartOfHour(ts) keeps time
-- range scans on the primary index; per-agent and per-tenant filters use the
-- bloom filter skip indexes below.
CREATE TABLE IF NOT EXISTS agentwatch.events
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
ENGINE = ReplacingMergeTree(inserted_at)
PARTITION BY toYYYYMM(ts)
ORDER BY (toStartOfHour(ts), event_id)
SETTINGS non_replicated_deduplication_window = 1000;

-- One row per write of a schemas.alerts.Alert. An alert is updated in place by
-- re-emitting it with the same alert_id (count grows, last_seen moves on), so
-- ORDER BY alert_id and keep the row with the highest version: last_seen in
-- microseconds, then count as the tie break (last_seen * 1024 + count stays
-- inside UInt64 for centuries). A replay of an older state can therefore never
-- replace a newer one, whatever order the writes land in.
CREATE TABLE IF NOT EXISTS agentwatch.alerts
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
    -- schemas.alerts.Evidence as named tuples: analysts can ARRAY JOIN it and
    -- read evidence.event_id etc. without parsing JSON
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
ENGINE = ReplacingMergeTree(version)
ORDER BY alert_id
SETTINGS non_replicated_deduplication_window = 1000;

-- the agent's version (canary analysis, docs/canary.md); before alerts_latest, which reads it
ALTER TABLE agentwatch.alerts ADD COLUMN IF NOT EXISTS agent_version LowCardinality(String) AFTER tenant;

-- Malformed input, never dropped: the original bytes (raw is a String, which
-- in ClickHouse is an arbitrary byte string, so non-UTF-8 input round-trips)
-- and the reason. A replayed bad record has the same position and bytes, so
-- the key (position, hash of bytes and reason) collapses it. The hash keeps
-- records whose position is unknown (-1) apart, and separates several reasons
-- found in one record. No PARTITION BY received_at: a replay receives the record
-- again later, possibly in another month, and rows only collapse within a
-- partition (the DLQ is small, one partition is fine).
CREATE TABLE IF NOT EXISTS agentwatch.dlq
(
    topic       LowCardinality(String),
    partition   Int32,
    offset      Int64,
    source      LowCardinality(String),
    reason      String,
    raw         String,
    received_at DateTime64(6, 'UTC')
)
ENGINE = ReplacingMergeTree
ORDER BY (topic, partition, offset, cityHash64(raw, reason))
SETTINGS non_replicated_deduplication_window = 1000;

-- The latest state of every alert, for analysts and dashboards. FINAL applies
-- the ReplacingMergeTree collapse at read time, so the answer is exact even
-- before background merges have run. OR REPLACE: a store created before a column
-- was added (agent_version) gets the view with it.
CREATE OR REPLACE VIEW agentwatch.alerts_latest AS
SELECT
    alert_id, detector, detector_version, policy_version, policy_hash, mode,
    severity, agent_id, tenant, agent_version, trace_ids, first_seen, last_seen, count,
    summary, evidence, action, labels
FROM agentwatch.alerts FINAL
;

-- control_command events (schemas.events: kill-switch commands as detectors see
-- them). ADD COLUMN ... AFTER keeps the columns in the model's order, both on a
-- fresh store and on one created before these fields existed.
ALTER TABLE agentwatch.events ADD COLUMN IF NOT EXISTS command_action LowCardinality(String) AFTER command_id;
ALTER TABLE agentwatch.events ADD COLUMN IF NOT EXISTS command_scope Array(String) AFTER command_action;

-- The agent's version (canary analysis, docs/canary.md).
ALTER TABLE agentwatch.events ADD COLUMN IF NOT EXISTS agent_version LowCardinality(String) AFTER tenant;

-- Every kill-switch command seen (schemas.control.KillSwitchCommand), whoever
-- issued it: the worker's enforce-mode halts and people's `agentwatch
-- killswitch issue|lift`. The same command may be recorded more than once
-- (by the issuing CLI and by the worker reading the control topic, or on a
-- replay): ReplacingMergeTree by command_id collapses the copies. The
-- signature is kept so an analyst can re-verify what agents were sent.
CREATE TABLE IF NOT EXISTS agentwatch.killswitches
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
ENGINE = ReplacingMergeTree(inserted_at)
ORDER BY command_id
SETTINGS non_replicated_deduplication_window = 1000;

-- a version-scoped halt (a failed canary's rollback) names the agent version it stops
ALTER TABLE agentwatch.killswitches ADD COLUMN IF NOT EXISTS target_version String AFTER target_value;

-- Kill switches in force now: per target, the latest command (by issue time)
-- if it is a halt that has not expired. A resume for a target lifts whatever
-- halt came before it for that same target (agent, tenant or all), whatever
-- its scope. now64() is evaluated at query time, so expiry needs no job.
-- A version-scoped halt (a canary rollback) is a target of its own. OR REPLACE: a store
-- created before target_version gets the view with it.
CREATE OR REPLACE VIEW agentwatch.killswitches_active AS
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

-- The span/audit join (detectors/join.py), for analysts. The join's verdicts
-- live on the events themselves (one row per event, no second copy to keep in
-- step): an audit row carries attributes['join'] (matched, unattributed, late,
-- not_final), the agent it was attributed to (identity 'join' or
-- 'identity_map'), the causing tool_call_id and correlation['joined_span_id',
-- 'joined_event_id', 'join.via']; a tool-call row of an auditable tool carries
-- attributes['join'] (matched or unconfirmed) and
-- correlation['join.audit_event_id']. These views put each audit record beside
-- the tool call that caused it: "which tool call of which agent caused this
-- write" and "which side effects have no span" are plain WHERE clauses on them.
--
-- audit_attribution_between(since = ..., until = ...) is the one to query: both
-- sides of its join are bounded by the primary key's time (a tool call ends
-- within an hour of the audit records it caused), so a question about a day
-- reads that day's granules, not the table.
CREATE VIEW IF NOT EXISTS agentwatch.audit_attribution_between AS
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
LEFT JOIN
(
    SELECT event_id, tool_name, ts, outcome
    FROM agentwatch.events FINAL
    WHERE kind = 'tool_call'
      AND ts >= {since:DateTime64(6, 'UTC')} - INTERVAL 1 HOUR AND ts < {until:DateTime64(6, 'UTC')} + INTERVAL 1 HOUR
) AS t ON t.event_id = a.tool_event_id;

-- Every audit record, unbounded (dashboards that add their own time filter on ts).
CREATE VIEW IF NOT EXISTS agentwatch.audit_attribution AS
SELECT *
FROM agentwatch.audit_attribution_between(since = '1970-01-01 00:00:00', until = '2299-12-31 00:00:00');

-- Audit queries filter on the resource a record touched (a table, an object, an ARN).
ALTER TABLE agentwatch.events ADD INDEX IF NOT EXISTS idx_resource resource TYPE bloom_filter GRANULARITY 4;

-- Auditable tool calls (policy detectors.unconfirmed_action.tools) and whether
-- an audit record confirmed them: the other direction of the join.
CREATE VIEW IF NOT EXISTS agentwatch.tool_call_confirmation AS
SELECT
    ts, event_id, agent_id, tenant, tool_name, tool_call_id, trace_id, span_id,
    outcome, attributes['join'] AS join_status,
    correlation['join.audit_event_id'] AS audit_event_id
FROM agentwatch.events FINAL
WHERE kind = 'tool_call' AND mapContains(attributes, 'join');

-- Per-minute activity, maintained by a materialized view as events are inserted:
-- what the dashboards read for rates and tokens instead of scanning every event.
-- SummingMergeTree adds rows with the same key at merge time, so read it with
-- sum() and GROUP BY. Counts include a redelivered event twice when its batch was
-- not deduplicated at insert (rare); exact figures come from events FINAL.
CREATE TABLE IF NOT EXISTS agentwatch.events_per_minute
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
ENGINE = SummingMergeTree
PARTITION BY toYYYYMM(minute)
ORDER BY (minute, tenant, agent_id, kind, source, tool_name, outcome, model);

CREATE MATERIALIZED VIEW IF NOT EXISTS agentwatch.events_per_minute_mv TO agentwatch.events_per_minute AS
SELECT
    toStartOfMinute(ts) AS minute, tenant, agent_id, kind, source, tool_name, outcome, model,
    count() AS events, sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens,
    sum(ifNull(cost_usd, 0)) AS cost_usd
FROM agentwatch.events
GROUP BY minute, tenant, agent_id, kind, source, tool_name, outcome, model;

-- Dead letters per minute and topic (the pipeline-health dashboard).
CREATE TABLE IF NOT EXISTS agentwatch.dlq_per_minute
(
    minute  DateTime('UTC'),
    topic   LowCardinality(String),
    source  LowCardinality(String),
    records UInt64
)
ENGINE = SummingMergeTree
ORDER BY (minute, topic, source);

CREATE MATERIALIZED VIEW IF NOT EXISTS agentwatch.dlq_per_minute_mv TO agentwatch.dlq_per_minute AS
SELECT toStartOfMinute(received_at) AS minute, topic, source, count() AS records
FROM agentwatch.dlq
GROUP BY minute, topic, source;

-- Behaviour per agent version, per window of event time (schemas.canary.VersionWindow,
-- detectors/canary.py): dashboards and the weekly review. A window is written once,
-- when it is complete; a replay rewrites the same key.
CREATE TABLE IF NOT EXISTS agentwatch.version_metrics
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
ENGINE = ReplacingMergeTree(inserted_at)
PARTITION BY toYYYYMM(window_start)
ORDER BY (tenant, agent_id, agent_version, window_start)
SETTINGS non_replicated_deduplication_window = 1000;

-- Canary verdicts with the numbers behind them (schemas.canary.CanaryVerdict), also
-- published on the canary topic.
CREATE TABLE IF NOT EXISTS agentwatch.canary_verdicts
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
ENGINE = ReplacingMergeTree(inserted_at)
ORDER BY verdict_id
SETTINGS non_replicated_deduplication_window = 1000;
