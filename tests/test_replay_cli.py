"""`agentwatch replay` over OTLP traces recorded from the real OpenTelemetry SDK."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

OTEL = Path(__file__).parent / "fixtures" / "otel"
REPO = Path(__file__).resolve().parent.parent


def replay(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "streams.cli", "replay", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("fixture, agent", [
    ("retry_loop_genai.jsonl", "agent-billing-7"),  # gen_ai.agent.id on the invoke_agent span
    ("retry_loop_openinference.jsonl", "billing-agent"),  # agent.name on the AGENT span
    ("retry_loop_openllmetry.jsonl", "billing-agent"),  # traceloop.entity.name on the agent span
])
def test_replay_finds_retry_loop_and_names_agent_from_ancestor_span(fixture, agent):
    out = replay(str(OTEL / fixture))
    assert out.returncode == 0, out.stderr
    alerts = [orjson.loads(line) for line in out.stdout.splitlines()]
    assert len(alerts) == 1
    a = alerts[0]
    # the tool spans carry no agent attribute: the name comes from the agent span exported after them
    assert a["detector"] == "retry_loop" and a["agent_id"] == agent
    assert a["labels"]["tool"] == "refund_payment"
    assert len(a["evidence"]) >= 5 and a["evidence"][0]["topic"].endswith(fixture)


def test_replay_is_deterministic_and_quiet_on_healthy_traffic():
    first = replay(str(OTEL / "retry_loop_genai.jsonl"), str(OTEL / "healthy_genai.jsonl"))
    second = replay(str(OTEL / "retry_loop_genai.jsonl"), str(OTEL / "healthy_genai.jsonl"))
    assert first.stdout == second.stdout and len(first.stdout.splitlines()) == 1
    assert replay(str(OTEL / "healthy_genai.jsonl")).stdout == ""


def test_replay_user_mistakes_are_one_line_errors(tmp_path):
    missing = replay(str(tmp_path / "nope.jsonl"))
    assert missing.returncode == 2 and "no such file" in missing.stderr and "Traceback" not in missing.stderr
    bad = tmp_path / "policy.yaml"
    bad.write_text("detectors:\n  retry_loop:\n    window_s: -1\n")
    out = replay("--policy", str(bad), str(OTEL / "healthy_genai.jsonl"))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "detectors.retry_loop.window_s" in out.stderr and str(bad) in out.stderr


def test_undecodable_lines_are_reported_not_fatal(tmp_path):
    f = tmp_path / "mixed.jsonl"
    f.write_bytes((OTEL / "retry_loop_genai.jsonl").read_bytes() + b"{not json\n")
    out = replay(str(f))
    assert out.returncode == 0 and len(out.stdout.splitlines()) == 1
    assert "1 undecodable" in out.stderr


def test_replay_reads_postgres_log_times_in_the_servers_log_timezone():
    """The option (or AGENTWATCH_PG_LOG_TIMEZONE, as in the worker) resolves EST as New York time,
    the same UTC instants the live worker stores; without it the records are refused, never shifted."""
    from datetime import datetime, timezone

    from schemas.decoders.pgaudit import PgLogConfig
    from streams.replay import decode_any, records_in_event_time

    log = REPO / "tests" / "fixtures" / "audit" / "pg" / "rds_new_york.log"
    pg = PgLogConfig("rds", "America/New_York")
    times = {e.ts for r in records_in_event_time([log], pg) for e in decode_any(r.value, pg=pg).events}
    assert times == {datetime(2026, 11, 25, 9, 22, 47, tzinfo=timezone.utc)}
    refused = replay(str(log))
    assert refused.returncode == 0 and "4 undecodable" in refused.stderr and "TIMEZONE" in refused.stderr
    read = replay("--pg-log-timezone", "America/New_York", str(log))
    assert read.returncode == 0 and "4 events" in read.stderr and "0 undecodable" in read.stderr
    bad = replay("--pg-log-timezone", "Mars/Base", str(log))
    assert bad.returncode == 2 and "--pg-log-timezone" in bad.stderr and "Traceback" not in bad.stderr
