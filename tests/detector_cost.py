"""Per-event cost of the detector stages over a synthetic stream (a measurement, not a test).

    python -m tests.detector_cost [events] [events_per_second_of_event_time] [agents]

Builds a deterministic mix of what a fleet sends (LLM calls, tool calls that
mostly succeed, client spans under them, audit records, a few approvals) for
many agents over many traces, then times the correlate stage (identity +
join) and the detection engine over it in batches of 500, as the worker
does. Prints microseconds per event for each and the entries the engine and
its windows hold at the end.
"""

from __future__ import annotations

import random
import sys
import time
from datetime import datetime, timedelta, timezone

from detectors.engine import DetectionEngine
from detectors.policy import parse_policy
from schemas.events import Event, EventKind
from streams.stages import CorrelateStage

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=timezone.utc)
POLICY = {"high_risk": {"tools": ["delete_*"]}, "allowlists": {"bot-*": ["search", "get_order"]},
          "protected_resources": ["secrets/*"]}


def stream(n: int, rate: float, agents: int, seed: int = 1) -> list[Event]:
    rnd = random.Random(seed)
    out: list[Event] = []
    tools = ["search", "get_order", "send_email", "deploy", "delete_tmp"]
    i = 0
    while len(out) < n:
        at = T0 + timedelta(seconds=len(out) / rate + rnd.random() * 5)
        agent = f"agent-{rnd.randrange(agents)}"
        trace = f"{i:032x}"
        root = f"{i:08x}root"[-16:]
        out.append(Event(event_id=f"r{i}", kind=EventKind.AGENT, ts=at, trace_id=trace, span_id=root,
                         agent_id=agent, is_agent_span=True, lifecycle="invoke", source="otlp_json"))
        for j in range(rnd.randrange(1, 6)):
            sid = f"{i:08x}{j:08x}"
            if rnd.random() < 0.5:
                out.append(Event(event_id=f"l{i}.{j}", kind=EventKind.LLM_CALL, ts=at, trace_id=trace, span_id=sid,
                                 parent_span_id=root, input_tokens=rnd.randrange(50, 800), output_tokens=100,
                                 source="otlp_json", fallback_agent_id="svc"))
            else:
                tool = rnd.choice(tools)
                out.append(Event(event_id=f"t{i}.{j}", kind=EventKind.TOOL_CALL, ts=at, trace_id=trace, span_id=sid,
                                 parent_span_id=root, tool_name=tool, args_fingerprint=f"{rnd.randrange(50):x}",
                                 outcome="error" if rnd.random() < 0.1 else "ok", tool_call_id=f"c{i}.{j}",
                                 source="otlp_json", fallback_agent_id="svc"))
                out.append(Event(event_id=f"h{i}.{j}", kind=EventKind.SPAN, ts=at, trace_id=trace,
                                 span_id=f"{sid[:-1]}h", parent_span_id=sid, source="otlp_json",
                                 attributes={"http.url": f"https://api.example.com/{tool}"}, fallback_agent_id="svc"))
                if rnd.random() < 0.3:
                    out.append(Event(event_id=f"a{i}.{j}", kind=EventKind.AUDIT, ts=at, trace_id=trace, span_id=sid,
                                     principal=f"sa:{agent}", action="update", resource=f"things/{tool}",
                                     outcome="allow", source="native"))
        i += 1
    return out[:n]


def measure(events: list[Event], batch: int = 500) -> dict[str, float]:
    policy = parse_policy(POLICY)
    correlate = CorrelateStage(policy)
    attributed: list[Event] = []
    t = time.process_time()
    for k in range(0, len(events), batch):
        attributed += correlate.process_local(events[k:k + batch])
    attributed += correlate.finish_local()
    t_corr = time.process_time() - t
    engine = DetectionEngine(policy)
    alerts = 0
    t = time.process_time()
    for k in range(0, len(attributed), batch):
        alerts += len(engine.process(attributed[k:k + batch]))
    t_det = time.process_time() - t
    return {"events": len(events), "correlate_us": 1e6 * t_corr / len(events),
            "detect_us": 1e6 * t_det / max(len(attributed), 1), "alerts": alerts,
            "dedup_ids": len(engine._dedup)}


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
    rate = float(sys.argv[2]) if len(sys.argv) > 2 else 1000.0
    agents = int(sys.argv[3]) if len(sys.argv) > 3 else 500
    evs = stream(n, rate, agents)
    r = measure(evs)
    print(" ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
