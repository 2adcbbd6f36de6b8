"""``agentwatch bench``: pipeline throughput next to raw aiokafka consume.

Both are measured in one run on the same topic of the same broker, so the
ratio is meaningful on a shared, noisy machine even when the absolute numbers
are not. The input is OTLP (protobuf) batches of ``per_message`` spans, the
way a Collector exports them.

    raw consume        aiokafka getmany over the topic, no decoding
    raw + decode       the same plus our OTLP decoder (no Kafka hops after it)
    pipeline           a real worker: ingest -> correlate -> detect -> ClickHouse
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from schemas.decoders.otlp import decode_otlp
from schemas.errors import AgentwatchError
from streams.settings import Settings
from streams.worker import WorkerInfo, running_worker

TOOLS = ["search_docs", "create_ticket", "send_email", "query_db", "kubectl_apply"]


def _kv(key: str, value: str | int) -> KeyValue:
    v = AnyValue(int_value=value) if isinstance(value, int) else AnyValue(string_value=value)
    return KeyValue(key=key, value=v)


def make_batch(rng: random.Random, spans: int, t0_ns: int) -> bytes:
    """One ExportTraceServiceRequest: traces of an agent span with tool/LLM children."""
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.append(_kv("service.name", f"svc-{rng.randint(1, 50)}"))
    ss = rs.scope_spans.add()
    made = 0
    while made < spans:
        trace_id = rng.randbytes(16)
        agent = f"agent-{rng.randint(1, 200)}"
        root = rng.randbytes(8)
        children = min(9, spans - made - 1)
        for i in range(children):
            tool = rng.choice(TOOLS)
            s = ss.spans.add(trace_id=trace_id, span_id=rng.randbytes(8), parent_span_id=root,
                             name=f"execute_tool {tool}", kind=Span.SPAN_KIND_INTERNAL,
                             start_time_unix_nano=t0_ns + i * 1000, end_time_unix_nano=t0_ns + i * 1000 + 500)
            s.attributes.extend([_kv("gen_ai.operation.name", "execute_tool"), _kv("gen_ai.tool.name", tool),
                                 _kv("gen_ai.tool.call.arguments", f'{{"q": {rng.randint(1, 10**9)}}}')])
        s = ss.spans.add(trace_id=trace_id, span_id=root, name=f"invoke_agent {agent}",
                         start_time_unix_nano=t0_ns, end_time_unix_nano=t0_ns + 10_000)
        s.attributes.extend([_kv("gen_ai.operation.name", "invoke_agent"), _kv("gen_ai.agent.id", agent)])
        made += children + 1
    return req.SerializeToString()


async def _produce(bootstrap: str, topic: str, events: int, per_message: int,
                   security: Mapping[str, Any]) -> int:
    rng = random.Random(42)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, max_batch_size=1 << 20,
                                max_request_size=8 << 20, **security)
    await producer.start()
    sent = 0
    try:
        t0 = time.time_ns()
        futs = []
        for i in range(0, events, per_message):
            n = min(per_message, events - i)
            futs.append(await producer.send(topic, make_batch(rng, n, t0 + i * 1_000_000)))
            sent += 1
        await asyncio.gather(*futs)
    finally:
        await producer.stop()
    return sent


async def _raw_consume(bootstrap: str, topic: str, messages: int, decode: bool,
                       security: Mapping[str, Any]) -> tuple[float, int]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False, group_id=f"bench-raw-{uuid.uuid4().hex[:6]}",
                                max_partition_fetch_bytes=16 << 20, fetch_max_bytes=64 << 20, **security)
    await consumer.start()
    got = events = 0
    try:
        started = time.perf_counter()
        while got < messages:
            batches = await consumer.getmany(timeout_ms=1000, max_records=10_000)
            for records in batches.values():
                got += len(records)
                if decode:
                    for r in records:
                        events += len(decode_otlp(r.value).events)
        return time.perf_counter() - started, events
    finally:
        await consumer.stop()


def _detected(url: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    m = re.search(r"^agentwatch_events_detected_total (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def _pipeline(settings: Settings, bootstrap: str, topic: str, events: int) -> tuple[float, float]:
    home = Path(tempfile.mkdtemp(prefix="agentwatch-bench-"))
    run = uuid.uuid4().hex[:6]
    env = {**os.environ, "AGENTWATCH_BOOTSTRAP": bootstrap, "AGENTWATCH_HOME": str(home),
           "AGENTWATCH_APP_ID": f"bench-{run}", "AGENTWATCH_TOPIC_OTLP": topic, "AGENTWATCH_WEB_PORT": "0",
           "AGENTWATCH_CLICKHOUSE_DSN": f"chdb://{home / 'clickhouse'}", "AGENTWATCH_PARTITIONS": "1"}
    for name in ("events_in", "audit_in", "dlq", "alerts", "shadow_alerts", "by_trace", "by_agent"):
        env[f"AGENTWATCH_TOPIC_{name.upper()}"] = f"bench.{run}.{name}"
    log = (home / "worker.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "streams.cli", "worker"], env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    bench_settings = settings.with_overrides(home=home, clickhouse_dsn=env["AGENTWATCH_CLICKHOUSE_DSN"])
    try:
        info: WorkerInfo | None = None
        deadline = time.monotonic() + 120
        while info is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AgentwatchError(f"bench worker failed to start; see {home / 'worker.log'}")
            time.sleep(0.3)
            info = running_worker(bench_settings)
        first_t = first_n = None
        last_progress = time.monotonic()
        n = 0.0
        while n < events:
            time.sleep(0.2)
            if proc.poll() is not None:
                raise AgentwatchError(f"the bench worker exited ({proc.returncode}); see {home / 'worker.log'}")
            m = _detected(info.url)
            now = time.perf_counter()
            if m > n:
                last_progress = time.monotonic()
            n = m
            if first_t is None and n > 0:
                first_t, first_n = now, n
            if time.monotonic() - last_progress > 60:
                raise AgentwatchError(f"pipeline stalled at {n:.0f}/{events} events; see {home / 'worker.log'}")
            print(f"\r  pipeline: {n:,.0f}/{events:,} events", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
        assert first_t is not None and first_n is not None
        elapsed = max(time.perf_counter() - first_t, 1e-6)
        return elapsed, (events - first_n) / elapsed
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def run_bench(settings: Settings, *, events: int, per_message: int) -> int:
    from deploy import broker
    from streams.kafka import ensure_topics
    from streams.kafka_security import kafka_options

    bootstrap = settings.bootstrap
    started = False
    if not bootstrap:
        info = broker.status(settings.broker_dir)
        if info is None:
            print("starting the local Kafka broker...", file=sys.stderr)
            info = broker.up(settings.broker_dir)
            started = True
        bootstrap = info.bootstrap
    topic = f"bench.{uuid.uuid4().hex[:8]}.otlp"
    try:
        security = kafka_options(settings)
        asyncio.run(ensure_topics(bootstrap, [topic], 1, security=security))
        t = time.perf_counter()
        messages = asyncio.run(_produce(bootstrap, topic, events, per_message, security))
        print(f"produced {events:,} spans in {messages:,} messages ({per_message}/message) "
              f"in {time.perf_counter() - t:.1f}s", file=sys.stderr)
        raw_s, _ = asyncio.run(_raw_consume(bootstrap, topic, messages, False, security))
        dec_s, decoded = asyncio.run(_raw_consume(bootstrap, topic, messages, True, security))
        if decoded != events:
            raise AgentwatchError(f"decoder returned {decoded} events for {events} spans")
        pipe_s, pipe_rate = _pipeline(settings, bootstrap, topic, events)
    finally:
        if started:
            broker.down(settings.broker_dir)
    raw_rate, dec_rate = events / raw_s, events / dec_s
    print(f"{'measure':<28}{'events/s':>14}{'messages/s':>14}{'vs raw':>10}")
    for name, rate in (("raw aiokafka consume", raw_rate), ("raw consume + OTLP decode", dec_rate),
                       ("pipeline (3 hops + chDB)", pipe_rate)):
        print(f"{name:<28}{rate:>14,.0f}{rate / per_message:>14,.0f}{rate / raw_rate:>10.3f}")
    clean_us, secret_us = redaction_cost()
    print(f"secret redaction at ingest: {clean_us:.1f} us per event without secrets, "
          f"{secret_us:.1f} us per event carrying one")
    return 0


def redaction_cost(n: int = 5000) -> tuple[float, float]:
    """Microseconds the ingest redaction adds per decoded event: events as the bench makes
    them, and the same with an API key in a URL attribute."""
    from schemas.redact import DEFAULT

    events = decode_otlp(make_batch(random.Random(7), n, time.time_ns())).events
    out = []
    for secret in (False, True):
        batch = [e.model_copy(deep=True) for e in events]
        if secret:
            for e in batch:
                e.attributes["http.url"] = "https://api.example/v1/q?api_key=sk-proj-Ab3dEf6hIj9kLm2nOp5qRs"
        t = time.perf_counter()
        for e in batch:
            DEFAULT.event(e)
        out.append((time.perf_counter() - t) / len(batch) * 1e6)
    return out[0], out[1]
