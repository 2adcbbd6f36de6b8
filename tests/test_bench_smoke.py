"""``agentwatch bench`` on a tiny input: every row of the table, and the planted incidents detected.

The full bench (100,000 spans, faust and Quix Streams peers, a live phase) is
`make bench`, not part of the tests; this only proves that the bench runs end
to end against a real worker on the real broker and that its input is
detected as planted.
"""

from __future__ import annotations

import io
import re
from contextlib import redirect_stdout

import pytest

from streams.bench.runner import run_bench
from streams.settings import Settings

pytestmark = pytest.mark.kafka

ROWS = ("raw aiokafka consume", "raw consume + OTLP decode", "plain-loop ceiling", "agentwatch pipeline",
        "agentwatch, 2 workers + store process", "faust peer", "Quix Streams peer")


def test_bench_prints_every_row_and_the_planted_incidents_fire(kafka_bootstrap: str, tmp_path) -> None:
    settings = Settings(bootstrap=kafka_bootstrap, home=tmp_path)
    out = io.StringIO()
    with redirect_stdout(out):
        code = run_bench(settings, events=2000, per_message=100, duration_s=2.0, peer_names=(), state_agents=200,
                         restore_agents=(100, 400))
    table = out.getvalue()
    print(table)
    for row in ROWS:
        assert f"| {row} |" in table, f"row {row!r} missing"
    assert "incidents detected as planted: yes" in table
    for detector in ("retry_loop", "token_spike", "unattributed_side_effect", "killswitch_unacknowledged"):
        line = next(ln for ln in table.splitlines() if ln.strip().startswith(detector))
        assert line.rstrip().endswith("ok"), line
    assert "detection latency" in table and "kill switch" in table
    # restore against state size: read back from the broker and rebuilt, more agents more bytes
    restore = [ln.split("|") for ln in table.splitlines() if re.match(r"\| (100|400) \| ", ln)]
    assert [int(r[1]) for r in restore] == [100, 400], table
    assert int(restore[1][3].replace(",", "")) > 3 * int(restore[0][3].replace(",", "")) > 0
    assert all(r[4].strip().endswith("ms") and r[5].strip().endswith("ms") for r in restore), restore
    # the wait for an agent span exported after its tool calls is reported apart from detection
    assert "agent span exported later" in table
    # what redacting secrets at ingest costs per event (issue 8)
    assert re.search(r"secret redaction at ingest: [0-9.]+ us per event without secrets, [0-9.]+ us per event "
                     r"carrying one", table), table
    assert code == 0
