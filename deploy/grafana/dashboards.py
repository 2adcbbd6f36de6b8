"""The Grafana dashboards, generated from one compact description (panel SQL is what
matters, and a test runs every panel's SQL on the embedded store after demo-like
traffic): ``python -m deploy.grafana.dashboards`` rewrites deploy/grafana/dashboards/*.json.

Panels read ClickHouse through the grafana-clickhouse-datasource plugin (v4; macros
``$__timeFilter(col)``, ``$__timeInterval(col)``; dashboard variables ``${agent}``);
the pipeline's lag and latency come from Prometheus (the worker's /metrics).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CH = {"type": "grafana-clickhouse-datasource", "uid": "agentwatch-clickhouse"}
PROM = {"type": "prometheus", "uid": "agentwatch-prometheus"}
OUT = Path(__file__).resolve().parent / "dashboards"


@dataclass(frozen=True)
class Panel:
    title: str
    query: str
    kind: str = "table"  # table | timeseries | stat | barchart
    source: str = "clickhouse"  # clickhouse | prometheus
    width: int = 12


FLEET = [
    Panel("Events per minute by kind", "SELECT minute AS time, kind, sum(events) AS events "
          "FROM agentwatch.events_per_minute WHERE $__timeFilter(minute) GROUP BY time, kind ORDER BY time",
          "timeseries"),
    Panel("Active agents", "SELECT uniqExact(agent_id) AS agents FROM agentwatch.events_per_minute "
          "WHERE $__timeFilter(minute) AND agent_id != ''", "stat", width=6),
    Panel("Kill switches in force", "SELECT count() AS in_force FROM agentwatch.killswitches_active", "stat",
          width=6),
    Panel("Alerts by detector and severity", "SELECT detector, severity, count() AS alerts "
          "FROM agentwatch.alerts_latest WHERE $__timeFilter(last_seen) GROUP BY detector, severity "
          "ORDER BY alerts DESC", "barchart"),
    Panel("Latest alerts", "SELECT last_seen, detector, severity, mode, agent_id, count, summary "
          "FROM agentwatch.alerts_latest WHERE $__timeFilter(last_seen) ORDER BY last_seen DESC LIMIT 50",
          width=24),
    Panel("Kill switches in force (detail)", "SELECT target_kind, target_value, scope, reason, issued_by, "
          "issued_at, expires_at FROM agentwatch.killswitches_active ORDER BY issued_at DESC", width=24),
]

AGENT = [
    Panel("Tokens per minute against the agent's baseline",
          "SELECT minute AS time, sum(input_tokens + output_tokens) AS tokens, "
          "avg(sum(input_tokens + output_tokens)) OVER (ORDER BY minute ROWS BETWEEN 30 PRECEDING AND 1 PRECEDING) "
          "AS baseline FROM agentwatch.events_per_minute WHERE $__timeFilter(minute) AND agent_id = '${agent}' "
          "AND kind = 'llm_call' GROUP BY minute ORDER BY time", "timeseries", width=24),
    Panel("Tool calls and failures", "SELECT tool_name, sum(events) AS calls, sumIf(events, outcome = 'error') "
          "AS failures FROM agentwatch.events_per_minute WHERE $__timeFilter(minute) AND agent_id = '${agent}' "
          "AND kind = 'tool_call' GROUP BY tool_name ORDER BY calls DESC"),
    Panel("Audit side effects: joined to a tool call or not", "SELECT join_status, action, resource, "
          "count() AS records FROM agentwatch.audit_attribution WHERE $__timeFilter(ts) AND agent_id = '${agent}' "
          "GROUP BY join_status, action, resource ORDER BY records DESC"),
    Panel("Alerts of this agent", "SELECT last_seen, detector, severity, mode, count, summary "
          "FROM agentwatch.alerts_latest WHERE $__timeFilter(last_seen) AND agent_id = '${agent}' "
          "ORDER BY last_seen DESC", width=24),
]

PIPELINE = [
    Panel("Consumer lag (messages)", "sum by (topic) (agentwatch_consumer_lag_messages)", "timeseries",
          "prometheus"),
    Panel("Sink write latency p95 (s)", "histogram_quantile(0.95, sum by (le, table) "
          "(rate(agentwatch_sink_write_seconds_bucket[5m])))", "timeseries", "prometheus"),
    Panel("Dead letters per minute by topic", "SELECT minute AS time, topic, sum(records) AS records "
          "FROM agentwatch.dlq_per_minute WHERE $__timeFilter(minute) GROUP BY time, topic ORDER BY time",
          "timeseries"),
    Panel("Decode failures and sink failures (/s)", "sum by (topic) (rate(agentwatch_decode_failures_total[5m])) "
          "or sum by (table) (rate(agentwatch_sink_failures_total[5m]))", "timeseries", "prometheus"),
    Panel("Latest dead letters", "SELECT received_at, topic, source, reason FROM agentwatch.dlq "
          "WHERE $__timeFilter(received_at) ORDER BY received_at DESC LIMIT 50", width=24),
]

TASK_TYPE = "if(attributes['task_type'] != '', attributes['task_type'], tool_name)"
WEEKLY = [
    Panel("Escalation rate by task type (approval requests per tool call)",
          f"SELECT {TASK_TYPE} AS task_type, countIf(kind = 'tool_call') AS calls, "
          "countIf(kind = 'approval' AND decision = 'pending') AS escalations, "
          "round(escalations / greatest(calls, 1), 3) AS rate FROM agentwatch.events FINAL "
          "WHERE $__timeFilter(ts) AND kind IN ('tool_call', 'approval') GROUP BY task_type ORDER BY rate DESC"),
    Panel("Blocked actions by policy category", "SELECT detector AS category, severity, count() AS alerts, "
          "sum(count) AS occurrences FROM agentwatch.alerts_latest WHERE $__timeFilter(last_seen) "
          "AND detector IN ('disallowed_access', 'escalation_bypass', 'peer_preservation') "
          "GROUP BY category, severity ORDER BY alerts DESC"),
    Panel("Time to human approval (s)", "SELECT agent_id, count() AS approvals, "
          "round(avg(dateDiff('millisecond', asked, granted)) / 1000, 1) AS avg_s, "
          "round(max(dateDiff('millisecond', asked, granted)) / 1000, 1) AS max_s FROM ("
          "SELECT agent_id, covers_tool_call_id, minIf(ts, decision = 'pending') AS asked, "
          "minIf(ts, decision = 'granted') AS granted FROM agentwatch.events FINAL "
          "WHERE $__timeFilter(ts) AND kind = 'approval' AND covers_tool_call_id != '' "
          "GROUP BY agent_id, covers_tool_call_id HAVING countIf(decision = 'pending') > 0 "
          "AND countIf(decision = 'granted') > 0) GROUP BY agent_id ORDER BY avg_s DESC"),
    Panel("Side-effect error rate (audited writes)", "SELECT agent_id, count() AS side_effects, "
          "countIf(outcome = 'error') AS errors, round(errors / count(), 3) AS error_rate "
          "FROM agentwatch.audit_attribution WHERE $__timeFilter(ts) AND agent_id != '' "
          "AND action NOT IN ('get', 'list', 'watch', 'SELECT') GROUP BY agent_id ORDER BY error_rate DESC"),
    Panel("Retried tool-call frequency (identical calls)", "SELECT agent_id, tool_name, count() AS calls, "
          "countIf(repeats > 1) AS retried_argument_sets, round(sumIf(repeats - 1, repeats > 1) / sum(repeats), 3) "
          "AS retried_share FROM (SELECT agent_id, tool_name, args_fingerprint, count() AS repeats "
          "FROM agentwatch.events FINAL WHERE $__timeFilter(ts) AND kind = 'tool_call' AND args_fingerprint != '' "
          "GROUP BY agent_id, tool_name, args_fingerprint) GROUP BY agent_id, tool_name "
          "ORDER BY retried_share DESC"),
    Panel("Cost per successful task (USD)", "SELECT agent_id, round(sum(cost), 6) AS cost_usd, "
          "countIf(ok) AS successful_tasks, round(sum(cost) / greatest(countIf(ok), 1), 6) AS cost_per_success "
          "FROM (SELECT agent_id, if(trace_id != '', trace_id, toString(toStartOfMinute(ts))) AS task, "
          "sum(ifNull(cost_usd, 0)) AS cost, countIf(kind = 'tool_call' AND outcome = 'error') = 0 AS ok "
          "FROM agentwatch.events FINAL WHERE $__timeFilter(ts) AND agent_id != '' "
          "AND kind IN ('llm_call', 'tool_call') GROUP BY agent_id, task) GROUP BY agent_id "
          "ORDER BY cost_per_success DESC", width=24),
]

AGENT_VARIABLE = ("SELECT DISTINCT agent_id FROM agentwatch.events_per_minute "
                  "WHERE $__timeFilter(minute) AND agent_id != '' ORDER BY agent_id")

DASHBOARDS: dict[str, tuple[str, str, list[Panel], str]] = {
    # file: (title, time range, panels, uid)
    "fleet-overview": ("agentwatch: fleet overview", "now-6h", FLEET, "agentwatch-fleet"),
    "agent-drilldown": ("agentwatch: per-agent drill-down", "now-6h", AGENT, "agentwatch-agent"),
    "pipeline-health": ("agentwatch: pipeline health", "now-6h", PIPELINE, "agentwatch-pipeline"),
    "weekly-review": ("agentwatch: weekly behaviour review", "now-7d", WEEKLY, "agentwatch-weekly"),
}


def _panel(i: int, p: Panel, x: int, y: int) -> dict[str, Any]:
    ds = CH if p.source == "clickhouse" else PROM
    if p.source == "clickhouse":
        target: dict[str, Any] = {"refId": "A", "datasource": ds, "editorType": "sql", "rawSql": p.query,
                                  "queryType": "timeseries" if p.kind == "timeseries" else "table",
                                  "format": 0 if p.kind == "timeseries" else 1}
    else:
        target = {"refId": "A", "datasource": ds, "expr": p.query, "legendFormat": "__auto"}
    return {"id": i, "type": p.kind, "title": p.title, "datasource": ds, "targets": [target],
            "gridPos": {"x": x, "y": y, "w": p.width, "h": 8 if p.kind != "stat" else 4}}


def dashboard(name: str) -> dict[str, Any]:
    title, since, panels, uid = DASHBOARDS[name]
    out, x, y = [], 0, 0
    for i, p in enumerate(panels, 1):
        if x + p.width > 24:
            x, y = 0, y + 8
        out.append(_panel(i, p, x, y))
        x += p.width
    templating: list[dict[str, Any]] = []
    if panels is AGENT:
        templating.append({"name": "agent", "label": "agent", "type": "query", "datasource": CH,
                           "query": AGENT_VARIABLE, "refresh": 2, "sort": 1})
    return {"title": title, "uid": uid, "tags": ["agentwatch"], "schemaVersion": 39, "version": 1,
            "editable": True, "refresh": "30s", "time": {"from": since, "to": "now"},
            "templating": {"list": templating}, "panels": out}


def render(name: str) -> str:
    return json.dumps(dashboard(name), indent=2) + "\n"


def main() -> None:
    for name in DASHBOARDS:
        (OUT / f"{name}.json").write_text(render(name))
    print(f"wrote {len(DASHBOARDS)} dashboards to {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
