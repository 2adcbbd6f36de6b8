"""What the pipeline is measured against, each consuming the bench's topic from the start.

In this process: raw aiokafka consume, the same plus our OTLP decoder, and the
plain-loop ceiling (protobuf decode + retry_loop in a dict of deques, nothing
durable). In their own processes: the faust-streaming peer (our virtualenv:
faust is a dependency) and the Quix Streams peer (a virtualenv of its own
under ~/.cache/agentwatch/bench-venvs, created on first use, because its
dependencies are not ours).
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from schemas.decoders.otlp import decode_otlp
from schemas.errors import AgentwatchError
from streams.bench.retry import LoopCounter
from streams.bench.workload import tool_calls

REPO = Path(__file__).resolve().parents[2]
VENVS = Path(os.environ.get("AGENTWATCH_BENCH_VENVS", Path.home() / ".cache" / "agentwatch" / "bench-venvs"))
QUIX_REQUIREMENT = "quixstreams>=3,<4"


@dataclass
class PeerResult:
    seconds: float
    loops: int | None = None  # retry_loop keys found (None: the row does not detect)
    note: str = ""


def progress(text: str) -> None:
    print(f"\r  {text:<72}", end="", file=sys.stderr, flush=True)


def progress_done(text: str) -> None:
    print(f"\r  {text:<72}", file=sys.stderr, flush=True)


async def consume(bootstrap: str, topic: str, messages: int, handle: Callable[[bytes], None] | None,
                  label: str, security: Mapping[str, Any]) -> float:
    """Seconds from the first record to the last, reading ``messages`` records with aiokafka."""
    # assigned, not subscribed: no group join inside the timing, and the clock starts at the first fetch
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None,
                                max_partition_fetch_bytes=16 << 20, fetch_max_bytes=64 << 20, **security)
    await consumer.start()
    got = 0
    try:
        consumer.assign([TopicPartition(topic, 0)])
        await consumer.seek_to_beginning()
        first = time.perf_counter()
        while got < messages:
            batches = await consumer.getmany(timeout_ms=1000, max_records=10_000)
            for records in batches.values():
                got += len(records)
                if handle is not None:
                    for r in records:
                        handle(r.value)
            progress(f"{label}: {got:,}/{messages:,} messages")
        progress_done(f"{label}: {messages:,} messages")
        return time.perf_counter() - first
    finally:
        await consumer.stop()


async def raw(bootstrap: str, topic: str, messages: int, security: Mapping[str, Any]) -> PeerResult:
    return PeerResult(await consume(bootstrap, topic, messages, None, "raw consume", security))


async def raw_decode(bootstrap: str, topic: str, messages: int, spans: int,
                     security: Mapping[str, Any]) -> PeerResult:
    decoded = 0

    def handle(value: bytes) -> None:
        nonlocal decoded
        decoded += len(decode_otlp(value).events)

    seconds = await consume(bootstrap, topic, messages, handle, "raw + decode", security)
    if decoded != spans:
        raise AgentwatchError(f"the OTLP decoder returned {decoded} events for {spans} spans")
    return PeerResult(seconds)


async def ceiling(bootstrap: str, topic: str, messages: int, security: Mapping[str, Any]) -> PeerResult:
    counter = LoopCounter()
    add = counter.add

    def handle(value: bytes) -> None:
        for agent, tool, args, ts_ms in tool_calls(value):
            add((agent, tool, args), ts_ms)

    seconds = await consume(bootstrap, topic, messages, handle, "plain loop", security)
    return PeerResult(seconds, len(counter.loops))


def quix_python() -> Path:
    """The Quix Streams virtualenv's interpreter, created (with progress shown) on first use."""
    venv = VENVS / "quix"
    python = venv / "bin" / "python"
    ok = python.exists() and subprocess.run([str(python), "-c", "import quixstreams, opentelemetry.proto"],
                                            capture_output=True).returncode == 0
    if not ok:
        print(f"  creating the Quix Streams virtualenv in {venv} (first use; about a minute)...",
              file=sys.stderr, flush=True)
        venv.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--progress-bar", "on", QUIX_REQUIREMENT,
                        "opentelemetry-proto"], check=True, stdout=sys.stderr)
    return python


def run_peer(name: str, python: Path, module: str, bootstrap: str, topic: str, tool_calls_total: int,
             timeout_s: float) -> PeerResult:
    """Run a peer process until it reports having judged every tool call; its own timing."""
    home = Path(tempfile.mkdtemp(prefix=f"agentwatch-bench-{name}-"))
    env = {**os.environ, "PYTHONPATH": str(REPO), "BENCH_BOOTSTRAP": bootstrap, "BENCH_TOPIC": topic,
           "BENCH_APP_ID": f"bench-{name}-{uuid.uuid4().hex[:8]}", "BENCH_DATADIR": str(home),
           "BENCH_TOOL_CALLS": str(tool_calls_total)}
    log = (home / "peer.log").open("wb")
    proc = subprocess.Popen([str(python), "-m", module], env=env, cwd=home, stdout=subprocess.PIPE, stderr=log,
                            text=True)
    deadline = time.monotonic() + timeout_s
    result: dict[str, object] | None = None
    lines: queue.Queue[str] = queue.Queue()
    # a reader thread, so a silent or hung peer cannot block the deadline
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout or ()], daemon=True).start()
    try:
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=1.0)
            except queue.Empty:
                if proc.poll() is not None and lines.empty():
                    break
                continue
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if msg.get("done"):
                result = msg
                break
            progress(f"{name} peer: {msg.get('tool_calls', 0):,}/{tool_calls_total:,} tool calls")
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()
    if result is None:
        raise AgentwatchError(f"the {name} peer did not finish (exit {proc.returncode}); see {home / 'peer.log'}")
    progress_done(f"{name} peer: {tool_calls_total:,} tool calls")
    return PeerResult(float(result["seconds"]), int(result["loops"]))  # type: ignore[arg-type]
