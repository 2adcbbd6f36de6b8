"""The ClickHouse cluster variant of ``schema.sql``, derived from it (never a hand copy
that drifts): ``python -m deploy.clickhouse.cluster [CLUSTER] > deploy/clickhouse/cluster.sql``.

For every table ``agentwatch.X`` of the single-node schema:

* ``agentwatch.X_local``: the same columns on every replica,
  ``Replicated<Engine>('/clickhouse/tables/{shard}/agentwatch/X_local', '{replica}', ...)``;
* ``agentwatch.X``: a ``Distributed`` table over them, sharded by the table's
  deduplication key, so the rows that ReplacingMergeTree collapses (same key)
  always meet on one shard and ``FINAL`` stays exact per shard.

The worker and analysts keep using ``agentwatch.X``. Materialized views fire on
inserts into the local tables and write local rollups; views read the
Distributed tables, joins among them are ``GLOBAL``. Every statement is
``ON CLUSTER``. The ``{shard}``/``{replica}`` macros come from each server's
config; ``{cluster}`` is replaced by the cluster name given.
"""

from __future__ import annotations

import re
import sys
from importlib.resources import files

# table -> sharding expression: the deduplication key (ORDER BY of the single-node table)
SHARDING = {
    "events": "cityHash64(event_id)",
    "alerts": "cityHash64(alert_id)",
    "dlq": "cityHash64(topic, partition, offset)",
    "killswitches": "cityHash64(command_id)",
    "events_per_minute": "cityHash64(agent_id)",
    "dlq_per_minute": "cityHash64(topic)",
    "version_metrics": "cityHash64(agent_id)",
    "canary_verdicts": "cityHash64(verdict_id)",
}

_CREATE_TABLE = re.compile(r"^CREATE TABLE IF NOT EXISTS agentwatch\.(\w+)", re.M)
_ENGINE = re.compile(r"^ENGINE = (\w*MergeTree)(?:\((.*?)\))?$", re.M)
_MV = re.compile(r"^CREATE MATERIALIZED VIEW IF NOT EXISTS agentwatch\.(\w+) TO agentwatch\.(\w+) AS", re.M)


def _table(stmt: str, name: str, cluster: str) -> list[str]:
    local = f"{name}_local"
    head = f"CREATE TABLE IF NOT EXISTS agentwatch.{local} ON CLUSTER '{cluster}'"
    body = _CREATE_TABLE.sub(head, stmt, count=1)

    def replicated(m: re.Match[str]) -> str:
        args = [f"'/clickhouse/tables/{{shard}}/agentwatch/{local}'", "'{replica}'"]
        if m.group(2):
            args.append(m.group(2))
        return f"ENGINE = Replicated{m.group(1)}({', '.join(args)})"

    body = _ENGINE.sub(replicated, body, count=1)
    # the replicated engines deduplicate retried blocks themselves (replicated_deduplication_window)
    body = re.sub(r"\nSETTINGS non_replicated_deduplication_window = \d+", "", body)
    dist = (f"CREATE TABLE IF NOT EXISTS agentwatch.{name} ON CLUSTER '{cluster}' AS agentwatch.{local}\n"
            f"ENGINE = Distributed('{cluster}', agentwatch, {local}, {SHARDING[name]})")
    return [body, dist]


def cluster_schema(schema_sql: str, cluster: str = "{cluster}") -> str:
    from sinks.clickhouse import split_statements

    out = []
    for stmt in split_statements(schema_sql):
        if stmt.startswith("CREATE DATABASE"):
            out.append(f"{stmt} ON CLUSTER '{cluster}'")
        elif m := _CREATE_TABLE.match(stmt):
            out.extend(_table(stmt, m.group(1), cluster))
        elif m := _MV.match(stmt):
            mv, target = m.group(1), m.group(2)
            body = stmt.replace(m.group(0), f"CREATE MATERIALIZED VIEW IF NOT EXISTS agentwatch.{mv} "
                                f"ON CLUSTER '{cluster}' TO agentwatch.{target}_local AS", 1)
            # fire on each shard's own inserts: read the local table
            out.append(re.sub(r"FROM agentwatch\.(\w+)\b", r"FROM agentwatch.\1_local", body))
        elif m := re.match(r"^ALTER TABLE agentwatch\.(\w+) (ADD INDEX .*)$", stmt, re.S):
            # a skip index lives with the data: the local tables only
            out.append(f"ALTER TABLE agentwatch.{m.group(1)}_local ON CLUSTER '{cluster}' {m.group(2)}")
        elif m := re.match(r"^ALTER TABLE agentwatch\.(\w+) (ADD COLUMN .*)$", stmt, re.S):
            # a column added to an existing store: the local tables and the Distributed one over them
            out.append(f"ALTER TABLE agentwatch.{m.group(1)}_local ON CLUSTER '{cluster}' {m.group(2)}")
            out.append(f"ALTER TABLE agentwatch.{m.group(1)} ON CLUSTER '{cluster}' {m.group(2)}")
        elif stmt.startswith(("CREATE VIEW", "CREATE OR REPLACE VIEW")):
            body = re.sub(r"^(CREATE (?:OR REPLACE )?VIEW (?:IF NOT EXISTS )?agentwatch\.\w+)",
                          rf"\1 ON CLUSTER '{cluster}'", stmt)
            out.append(re.sub(r"\bLEFT JOIN\b", "GLOBAL LEFT JOIN", body))
        else:
            raise ValueError(f"cluster_schema: no rule for {stmt.split()[:4]}")
    header = ("-- GENERATED from schema.sql by `python -m deploy.clickhouse.cluster`; do not edit.\n"
              "-- The ClickHouse cluster variant: Replicated tables per shard, Distributed tables over\n"
              "-- them under the single-node names, every statement ON CLUSTER. Apply it once per\n"
              "-- cluster (clickhouse-client --multiquery < cluster.sql) before starting the workers.\n")
    return header + "".join(f"\n{s};\n" for s in out)


def main() -> None:
    schema = files("deploy").joinpath("clickhouse/schema.sql").read_text(encoding="utf-8")
    sys.stdout.write(cluster_schema(schema, sys.argv[1] if len(sys.argv) > 1 else "{cluster}"))


if __name__ == "__main__":
    main()
