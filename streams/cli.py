"""The ``agentwatch`` command.

A user mistake (missing file, bad setting, unreachable broker, locked store)
is printed as one line on stderr with exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import errno
import importlib.metadata
import os
import socket
import sys
from pathlib import Path
from typing import Any, Callable

from schemas.errors import AgentwatchError, ConfigError

try:
    from streams.settings import Settings, describe_settings, load_settings
except ModuleNotFoundError as _missing:  # a client-only install (pip install agentwatch)
    _SERVER_MISSING: str | None = _missing.name
else:
    _SERVER_MISSING = None


def _broker(args: argparse.Namespace, settings: Settings) -> int:
    from deploy import broker

    if args.action == "up":
        info = broker.up(settings.broker_dir)
        print(f"broker running at {info.bootstrap} (pid {info.pid}, log {info.log_path})")
    elif args.action == "down":
        print("broker stopped" if broker.down(settings.broker_dir) else "no broker was running")
    else:
        info = broker.status(settings.broker_dir)
        if info is None:
            print("no broker running")
            return 1
        print(f"broker running at {info.bootstrap} (pid {info.pid})")
    return 0


def _worker(args: argparse.Namespace, settings: Settings) -> int:
    from streams.worker import run_worker

    if args.policy:
        settings = settings.with_overrides(policy_file=args.policy)
    _check_port_free(settings.web_host, settings.web_port)
    run_worker(settings)
    return 0


def _store(args: argparse.Namespace, settings: Settings) -> int:
    from streams.app import Roles
    from streams.worker import run_worker

    _check_port_free(settings.web_host, settings.web_port)
    run_worker(settings, Roles(detect=False, store=True))
    return 0


def _check_port_free(host: str, port: int) -> None:
    """Fail in one line before anything starts, not with a web server's traceback later."""
    if port == 0:
        return
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the web server binds: TIME_WAIT is fine
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise AgentwatchError(f"port {port} on {host} is already in use (another worker?); "
                                      "set AGENTWATCH_WEB_PORT to a free port, or 0 to pick one") from None
            raise AgentwatchError(f"cannot listen on {host}:{port} (AGENTWATCH_WEB_HOST/_PORT): "
                                  f"{exc.strerror}") from None


ALERT_COLUMNS = ("first_seen", "detector", "severity", "mode", "agent_id", "count", "summary")


def _alert_row(alert: Any) -> tuple[Any, ...]:
    return (alert.first_seen, alert.detector, alert.severity.value, alert.mode.value, alert.agent_id, alert.count,
            alert.summary)


def _replay(args: argparse.Namespace, settings: Settings) -> int:
    from streams.policy_file import load_policy
    from streams.query import format_table
    from streams.replay import replay

    policy = load_policy(args.policy or settings.policy_file)
    # the options override the worker's settings, so a replay reads a log as the worker would
    overrides = {k: v for k, v in (("pg_log_timezone", args.pg_log_timezone),
                                   ("pg_log_line_prefix", args.pg_log_line_prefix)) if v is not None}
    try:
        pg = settings.with_overrides(**overrides).pg_log
    except ConfigError as exc:  # the environment was read already: the option is wrong
        raise ConfigError(exc.key.removeprefix("AGENTWATCH_").lower().replace("_", "-").join(("--", "")),
                          exc.problem) from None
    result = replay([Path(p) for p in args.paths], policy, pg)
    if args.format == "table":
        print(format_table(list(ALERT_COLUMNS), [_alert_row(a) for a in result.alerts]))
    else:
        out = sys.stdout.buffer
        for alert in result.alerts:
            out.write(alert.to_json() + b"\n")
        out.flush()
    print(
        f"replay: {result.events} events, {len(result.alerts)} alerts, {len(result.dead)} undecodable records",
        file=sys.stderr,
    )
    for d in result.dead[:20]:
        print(f"  undecodable {d.topic}:{d.offset}: {d.reason}", file=sys.stderr)
    return 0


def _query(args: argparse.Namespace, settings: Settings) -> int:
    from streams.query import format_result, run_query

    result = run_query(settings, args.sql)
    sys.stdout.write(format_result(result.columns, result.rows, args.format))
    return 0


def _query_token(args: argparse.Namespace, settings: Settings) -> int:
    from streams.query_api import query_token

    print(query_token(settings))
    return 0


def _demo(args: argparse.Namespace, settings: Settings) -> int:
    from streams.demo import run_demo

    return run_demo(settings, duration_s=args.duration, keep_running=args.keep_running)


def _bench(args: argparse.Namespace, settings: Settings) -> int:
    from streams.bench import run_bench

    peers = tuple(p for p in args.peers.split(",") if p and p != "none")
    unknown = set(peers) - {"faust", "quix"}
    if unknown:
        raise ConfigError("--peers", f"unknown peer {sorted(unknown)[0]!r}; choose from faust, quix, none")
    if args.workers < 0:
        raise ConfigError("--workers", "must be 0 (skip the row) or more")
    if args.live_rate is not None and args.live_rate <= 0:
        raise ConfigError("--live-rate", "must be a positive number of spans per second")
    return run_bench(settings, events=args.events, per_message=args.per_message, duration_s=args.duration,
                     peer_names=peers, scale_out=args.workers, live_rate=args.live_rate)


def _killswitch(args: argparse.Namespace, settings: Settings) -> int:
    from schemas.control import Target, TargetKind
    from streams import killswitch
    from streams.control_plane import control_settings, trusted_keys_text

    if args.action == "list":
        print(killswitch.format_active(killswitch.list_active(settings)))
        return 0
    if args.action == "keygen":
        return _keygen(Path(args.target or "."))
    if args.action == "pubkey":
        print(trusted_keys_text(control_settings(settings), settings.home_dir))
        return 0
    if not args.target:
        raise AgentwatchError(f"killswitch {args.action}: a TARGET is needed (agent:NAME, tenant:NAME or all)")
    common = dict(scope=args.scope or (), issued_by=args.issued_by)
    target = Target.parse(args.target)
    if args.agent_version:
        if target.kind is not TargetKind.AGENT:
            raise ConfigError("--agent-version", "only an agent target (agent:NAME) can name a version")
        target = Target(kind=target.kind, value=target.value, version=args.agent_version)
    if args.action == "issue":
        if not args.reason:
            raise AgentwatchError("killswitch issue: --reason is required (it is recorded with the command)")
        cmd = killswitch.issue(settings, target, reason=args.reason, ttl_s=args.ttl, **common)
    else:
        cmd = killswitch.lift(settings, target, reason=args.reason or "lifted", **common)
    print(f"{cmd.action.value} {cmd.target.key}: command {cmd.command_id} issued by {cmd.issued_by}, "
          f"expires {cmd.expires_at.isoformat()}")
    return 0


def _keygen(directory: Path) -> int:
    """A new signing key pair: ``control.key`` (private, 0600) for the worker and the people who
    issue kill switches, ``control.pub`` for agents (AGENTWATCH_CONTROL_PUBLIC_KEYS)."""
    from schemas.control import generate_keypair

    private, public = generate_keypair()
    key, pub = directory / "control.key", directory / "control.pub"
    if key.exists():
        raise AgentwatchError(f"{key} already exists: agents trust its public half; remove it yourself to rotate")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(private + "\n")
        pub.write_text(public + "\n")
    except OSError as exc:
        raise AgentwatchError(f"cannot write the key pair into {directory}: {exc.strerror}") from None
    print(f"private key: {key} (AGENTWATCH_CONTROL_PRIVATE_KEY={key})\npublic key:  {pub} ({public})")
    return 0


def _scorecard(args: argparse.Namespace, settings: Settings) -> int:
    from streams.scorecard import run_scorecard

    corpus = Path(args.corpus)
    if not corpus.is_dir():
        raise AgentwatchError(f"{corpus}: no such directory")
    return run_scorecard(corpus, Path(args.policy) if args.policy else None)


def _compare_detectors(args: argparse.Namespace, settings: Settings) -> int:
    from streams.compare import compare_corpus, compare_paths, format_report, read_overlay
    from streams.policy_file import load_policy

    overlay = read_overlay(Path(args.candidate))
    if args.corpus:
        corpus = Path(args.corpus)
        if not corpus.is_dir():
            raise AgentwatchError(f"{corpus}: no such directory")
        cmp = compare_corpus(corpus, overlay, policy_path=Path(args.policy) if args.policy else None)
    elif args.paths:
        cmp = compare_paths([Path(p) for p in args.paths], load_policy(args.policy or settings.policy_file),
                            overlay)
    else:
        raise AgentwatchError("compare-detectors: give recorded PATHs or --corpus DIR")
    if args.format == "json":
        sys.stdout.write(cmp.to_json().decode() + "\n")
    else:
        print(format_report(cmp))
    return 0


def _settings(args: argparse.Namespace, settings: Settings) -> int:
    for name, value, desc in describe_settings(settings):
        print(f"{name}={value}\n    {desc}")
    return 0


def _version() -> str:
    try:
        return importlib.metadata.version("agentwatch")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="agentwatch", description="Real-time safety monitor for AI agents")
    p.add_argument("--version", action="version", version=f"agentwatch {_version()}")
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("broker", help="the local Kafka broker (started from Maven Central jars)")
    b.add_argument("action", choices=["up", "down", "status"])
    b.set_defaults(fn=_broker)

    w = sub.add_parser("worker", help="run the stream processors")
    w.add_argument("--policy", help="detector policy file (YAML)")
    w.set_defaults(fn=_worker)

    st = sub.add_parser("store", help="write ClickHouse from the topics and serve /query, for detection-only "
                        "workers (AGENTWATCH_WORKER_STORE=false)")
    st.set_defaults(fn=_store)

    r = sub.add_parser("replay", help="run the detectors offline over recorded events; alerts as JSON lines")
    r.add_argument("--policy", help="detector policy file (YAML)")
    r.add_argument("--format", choices=["json", "table"], default="json",
                   help="json: one alert per line (default); table: one row per alert")
    r.add_argument("--pg-log-timezone", metavar="ZONE",
                   help="the PostgreSQL server's log_timezone (IANA name) for zone abbreviations in its log's "
                   "times (default: AGENTWATCH_PG_LOG_TIMEZONE)")
    r.add_argument("--pg-log-line-prefix", metavar="PREFIX",
                   help="the PostgreSQL server's log_line_prefix or a preset (default: AGENTWATCH_PG_LOG_LINE_PREFIX)")
    r.add_argument("paths", nargs="+", metavar="PATH", help="OTLP JSON lines, native JSON / JSON lines, audit logs")
    r.set_defaults(fn=_replay)

    q = sub.add_parser("query", help="run read-only SQL against the configured ClickHouse")
    q.add_argument("sql")
    q.add_argument("--format", choices=["table", "json", "csv"], default="table",
                   help="table (default); json: one object per row, one per line; csv: with a header row")
    q.set_defaults(fn=_query)

    qt = sub.add_parser("query-token", help="print the bearer token the worker's /query endpoint requires")
    qt.set_defaults(fn=_query_token)

    d = sub.add_parser("demo", help="broker, worker and a simulated fleet of agents, end to end")
    d.add_argument("--duration", type=float, default=60.0, help="seconds of simulated traffic (default 60)")
    d.add_argument("--keep-running", action="store_true", help="leave the broker and worker running afterwards")
    d.set_defaults(fn=_demo)

    be = sub.add_parser("bench", help="pipeline throughput, latency and memory next to a plain loop, faust and "
                        "Quix Streams, on the local broker (see docs/benchmarks.md)")
    be.add_argument("--events", type=int, default=100_000, help="OTLP spans in the throughput input")
    be.add_argument("--per-message", type=int, default=100, help="spans carried by one Kafka message")
    be.add_argument("--duration", type=float, default=20.0,
                    help="seconds of the live phase at half the pipeline's rate (latency, kill switch, memory); "
                    "1200 for the 20-minute run, 0 to skip")
    be.add_argument("--live-rate", type=float, default=None,
                    help="spans/s of the live phase instead of half the pipeline's measured rate (to compare "
                    "runs, or to find the rate the worker sustains)")
    be.add_argument("--peers", default="faust,quix", help="peers to run: faust,quix (default), or none")
    be.add_argument("--workers", type=int, default=2,
                    help="detection workers (plus a store process) of the scale-out row, on topics of as many "
                    "partitions; 0 to skip it")
    be.set_defaults(fn=_bench)

    k = sub.add_parser("killswitch", help="issue, lift or list signed kill-switch commands")
    k.add_argument("action", choices=["issue", "lift", "list", "pubkey", "keygen"])
    k.add_argument("target", nargs="?", help="agent:NAME, tenant:NAME or all; for keygen, the directory")
    k.add_argument("--reason", help="why (recorded with the command)")
    k.add_argument("--scope", action="append", metavar="TOOL", help="only these tools (repeatable); default all")
    k.add_argument("--ttl", type=float, default=3600.0, help="seconds until the halt expires (default 3600)")
    k.add_argument("--issued-by", help="who issues it (default: your user@host)")
    k.add_argument("--agent-version", metavar="VERSION",
                   help="an agent target's version only (a canary rollback; docs/canary.md)")
    k.set_defaults(fn=_killswitch)

    sc = sub.add_parser("scorecard", help="replay the behaviour corpus; per detector: expected, found, unexpected")
    sc.add_argument("corpus", nargs="?", default="tests/scenarios")
    sc.add_argument("--policy", help="policy file overriding the corpus policy")
    sc.set_defaults(fn=_scorecard)

    cd = sub.add_parser("compare-detectors", help="replay the same input under the live policy and a candidate; "
                        "per detector: alerts under each, both, only one (docs/canary.md)")
    cd.add_argument("--candidate", required=True, metavar="FILE",
                    help="YAML: the policy keys the candidate changes, merged over the live policy")
    cd.add_argument("--policy", help="live policy file (default AGENTWATCH_POLICY_FILE; with --corpus, the "
                    "corpus policy, each scenario's own policy still applying)")
    cd.add_argument("--corpus", metavar="DIR", help="a behaviour corpus (e.g. tests/scenarios) instead of PATHs")
    cd.add_argument("--format", choices=["table", "json"], default="table")
    cd.add_argument("paths", nargs="*", metavar="PATH", help="recorded input, as for replay")
    cd.set_defaults(fn=_compare_detectors)

    s = sub.add_parser("settings", help="print every setting (AGENTWATCH_* variables) and its value")
    s.set_defaults(fn=_settings)
    return p


def main(argv: list[str] | None = None) -> int:
    if _SERVER_MISSING:
        print(f"agentwatch: the server is not installed (no module {_SERVER_MISSING!r}); "
              "install it with: pip install 'agentwatch[server]'", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    fn: Callable[[argparse.Namespace, Settings], int] = args.fn
    try:
        return fn(args, load_settings())
    except AgentwatchError as exc:
        print(f"agentwatch {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
