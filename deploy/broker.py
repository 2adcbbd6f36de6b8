"""Launch a real single-node Apache Kafka 4.x broker on loopback, without Docker.

The broker is the genuine ``kafka.Kafka`` server from Maven Central, run from
jars that Maven resolves once into a local cache (see ``deploy/kafka/pom.xml``).
It runs in KRaft combined mode (one process is both broker and controller),
listens on 127.0.0.1 only and keeps its data, config and log in a state
directory, so ``up``/``down`` cycles keep topics and offsets.

Public API (the ``agentwatch broker up|down|status`` commands call these)::

    up(state_dir: Path, *, port: int | None = None,
       controller_port: int | None = None, cache_dir: Path | None = None,
       timeout: float = 60.0) -> BrokerInfo
        Start the broker (or return the one already running for state_dir)
        and return once it accepts Kafka clients.
    down(state_dir: Path, *, timeout: float = 20.0) -> bool
        Stop it: SIGTERM, then SIGKILL after ``timeout`` seconds. True if a
        running broker was stopped, False if none was running.
    status(state_dir: Path) -> BrokerInfo | None
        The running broker, or None (a record left by a dead broker is removed).
    running_broker(state_dir: Path, **up_kwargs) -> ContextManager[BrokerInfo]
        ``up`` on enter, ``down`` on exit; also stopped at interpreter exit.
    ensure_jars(cache_dir: Path | None = None) -> Path
        The directory holding the broker's jars, resolving them on first use.
    default_cache_dir() -> Path
        ``$AGENTWATCH_CACHE_DIR``, else ``$XDG_CACHE_HOME/agentwatch`` or ``~/.cache/agentwatch``.

Every failure a user can cause or fix (no java, no mvn, port in use, broker
died at start) raises ``BrokerError`` with a message that says what to do.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import concurrent.futures
import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from schemas.errors import BrokerError

log = logging.getLogger(__name__)

KAFKA_VERSION = "4.1.1"  # must match <kafka.version> in deploy/kafka/pom.xml
MIN_JAVA = 17  # Kafka 4 brokers refuse older runtimes
HOST = "127.0.0.1"

_KAFKA_DIR = Path(__file__).resolve().parent / "kafka"
_POM = _KAFKA_DIR / "pom.xml"
_LOG4J = _KAFKA_DIR / "log4j2.properties"

_RECORD = "broker.json"
_PROPS = "server.properties"
_LOG = "broker.log"
_JVM_OPTS = ["-Xmx512m", "-Xms128m", "-Djava.awt.headless=true"]

# Brokers this process started: their Popen objects let us reap them, so a
# stopped broker does not linger as a zombie that still "has" its pid.
_children: dict[int, subprocess.Popen[bytes]] = {}
# State dirs whose broker must not outlive this interpreter (running_broker).
_guarded: set[Path] = set()


@dataclasses.dataclass(frozen=True)
class BrokerInfo:
    """Where a running local broker is and how to reach it."""

    bootstrap: str  # "127.0.0.1:PORT", for bootstrap_servers
    pid: int
    state_dir: Path
    log_path: Path
    secure_bootstrap: str = ""  # the SASL_SSL listener's "127.0.0.1:PORT", when one was asked for


@dataclasses.dataclass(frozen=True)
class SecureListener:
    """A SASL_SSL listener next to the PLAINTEXT one: TLS with the broker's PKCS12 keystore,
    SASL PLAIN and SCRAM-SHA-256/512 for ``users`` (SCRAM credentials are written when the
    storage is formatted, so they apply to a fresh state directory). With a truststore the
    broker requires client certificates signed by it (mutual TLS)."""

    port: int
    keystore: Path
    keystore_password: str
    users: dict[str, str]  # user -> password
    truststore: Path | None = None
    truststore_password: str = ""


# --------------------------------------------------------------------------- jars


def default_cache_dir() -> Path:
    """Once per user, not per AGENTWATCH_HOME: every checkout and test run shares one download.

    ``AGENTWATCH_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/agentwatch``, else
    ``~/.cache/agentwatch``.
    """
    explicit = os.environ.get("AGENTWATCH_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "agentwatch"


def ensure_jars(cache_dir: Path | None = None) -> Path:
    """Return ``<cache>/kafka-<version>/jars``, running Maven only the first time.

    A marker file is written after the copy completes, so an interrupted
    download is redone rather than used half-finished; later calls touch
    neither Maven nor the network.
    """
    root = (cache_dir or default_cache_dir()) / f"kafka-{KAFKA_VERSION}"
    jars, marker = root / "jars", root / ".complete"
    if marker.is_file():
        return jars
    mvn = _find_mvn()
    root.mkdir(parents=True, exist_ok=True)
    # Two test sessions (or a test and the CLI) may start cold at once.
    with _flock(root / ".lock"):
        if marker.is_file():
            return jars
        _announce("resolving Kafka jars with Maven (first run only)...")
        staging = root / "jars.partial"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(jars, ignore_errors=True)
        # Run Maven on a copy of the pom so it never writes into the source tree.
        pom = root / "pom.xml"
        shutil.copyfile(_POM, pom)
        mvn_log = root / "mvn.log"
        # transfer progress stays on (in batch mode, one line per file): it is what we count
        cmd = [
            mvn, "-B", "-f", str(pom),
            "dependency:copy-dependencies",
            f"-DoutputDirectory={staging}", "-DincludeScope=runtime",
        ]
        started = time.monotonic()
        try:
            with mvn_log.open("wb") as out:
                rc = _run_with_progress(cmd, out, mvn_log, cwd=root, timeout_s=900)
        except OSError as exc:
            raise BrokerError(f"could not run Maven ({mvn}): {exc}") from exc
        if rc != 0 or not any(staging.glob("kafka_2.13-*.jar")):
            raise BrokerError(
                f"Maven could not resolve the Kafka {KAFKA_VERSION} jars (exit {rc}); "
                f"check network access to Maven Central. Last lines of {mvn_log}:\n"
                + _tail(mvn_log, 15)
            )
        staging.rename(jars)
        marker.write_text(f"{KAFKA_VERSION}\n")
        log.info("Kafka jars ready in %s (%.0fs)", jars, time.monotonic() - started)
    return jars


def _run_with_progress(cmd: list[str], out: Any, log_path: Path, *, cwd: Path, timeout_s: float,
                       every_s: float = 10.0) -> int:
    """Run Maven, saying every ``every_s`` how far it got: a first download can take
    minutes and must not look like a hang. Returns the exit status (-1 on timeout)."""
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd)
    started = time.monotonic()
    while True:
        try:
            return proc.wait(timeout=every_s)
        except subprocess.TimeoutExpired:
            elapsed = time.monotonic() - started
            if elapsed > timeout_s:
                proc.kill()
                proc.wait()
                return -1
            try:
                downloaded = log_path.read_bytes().count(b"Downloaded from")
            except OSError:
                downloaded = 0
            _announce(f"still resolving Kafka jars: {downloaded} files downloaded, {elapsed:.0f}s "
                      f"(log: {log_path})")


# ------------------------------------------------------------------ public API


def up(
    state_dir: Path,
    *,
    port: int | None = None,
    controller_port: int | None = None,
    cache_dir: Path | None = None,
    timeout: float = 60.0,
    secure: SecureListener | None = None,
) -> BrokerInfo:
    """Start the broker for ``state_dir`` and wait until it serves clients.

    Idempotent: if a live broker is recorded there it is returned unchanged.
    Without explicit ports, the ones of the previous run are reused when free
    (clients keep their bootstrap address), else fresh free ports are picked.
    """
    state_dir = Path(state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    with _flock(state_dir / ".broker.lock"):
        record = _read_record(state_dir)
        if record is not None and _is_our_broker(record["pid"], state_dir):
            info = _info(record, state_dir)
            # Recorded and alive: probably still starting under another caller.
            _wait_ready(info, None, timeout)
            return info
        _remove_record(state_dir)

        # Check java before the (possibly long) first Maven run: fail fast.
        java = _find_java()
        jars = ensure_jars(cache_dir)
        port, controller_port = _choose_ports(state_dir, port, controller_port)
        props = state_dir / _PROPS
        data = state_dir / "data"
        props.write_text(_server_properties(port, controller_port, data)
                         + _secure_properties(secure, port, controller_port))
        classpath = f"{jars}{os.sep}*"
        log4j = f"-Dlog4j2.configurationFile={_LOG4J}"
        log_path = state_dir / _LOG
        if not (data / "meta.properties").is_file():
            _format_storage(java, classpath, log4j, props, log_path, _scram_args(secure))

        cmd = [java, *_JVM_OPTS, log4j, "-cp", classpath, "kafka.Kafka", str(props)]
        with log_path.open("ab") as out:
            # Own session: the broker survives the CLI that started it, and
            # down() can signal its whole process group.
            proc = subprocess.Popen(
                cmd, cwd=state_dir, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        _children[proc.pid] = proc
        record = {"pid": proc.pid, "bootstrap": f"{HOST}:{port}",
                  "controller_port": controller_port, "started_at": time.time(),
                  "secure_bootstrap": f"{HOST}:{secure.port}" if secure else ""}
        _write_record(state_dir, record)
        info = _info(record, state_dir)
        log.info("started Kafka %s (pid %d) on %s", KAFKA_VERSION, proc.pid, info.bootstrap)
        try:
            _wait_ready(info, proc, timeout)
        except BrokerError:
            _terminate(proc.pid, 10.0)
            _remove_record(state_dir)
            raise
        return info


def down(state_dir: Path, *, timeout: float = 20.0) -> bool:
    """Stop the broker of ``state_dir``; True if one was running."""
    state_dir = Path(state_dir).resolve()
    with _flock(state_dir / ".broker.lock") if state_dir.is_dir() else contextlib.nullcontext():
        record = _read_record(state_dir)
        if record is None:
            return False
        stopped = False
        if _is_our_broker(record["pid"], state_dir):
            _terminate(record["pid"], timeout)
            stopped = True
        _remove_record(state_dir)
        _guarded.discard(state_dir)
        return stopped


def status(state_dir: Path) -> BrokerInfo | None:
    """The running broker of ``state_dir``, or None.

    A record whose process is gone is removed. A live process whose port does
    not answer yet (starting, or hung) gives None but keeps its record, so that
    ``down`` can still stop it.
    """
    state_dir = Path(state_dir).resolve()
    record = _read_record(state_dir)
    if record is None:
        return None
    if not _is_our_broker(record["pid"], state_dir):
        _remove_record(state_dir)
        return None
    info = _info(record, state_dir)
    return info if _port_answers(info.bootstrap) else None


@contextlib.contextmanager
def running_broker(state_dir: Path, **up_kwargs: Any) -> Iterator[BrokerInfo]:
    """``up`` on enter, ``down`` on exit: for tests and one-shot demos.

    An atexit hook also stops it, so a session that dies by an exception
    outside this block does not leave a JVM behind.
    """
    state_dir = Path(state_dir).resolve()
    if not _guarded:
        atexit.register(_stop_guarded)
    _guarded.add(state_dir)
    try:
        yield up(state_dir, **up_kwargs)
    finally:
        down(state_dir)


# ------------------------------------------------------------------ internals


def _announce(message: str) -> None:
    # Quiet by default, but a minute-long first download must not look like a
    # hang: without configured logging, say it on stderr.
    if log.hasHandlers() and log.isEnabledFor(logging.INFO):
        log.info(message)
    else:
        print(f"agentwatch: {message}", file=sys.stderr, flush=True)


def _find_mvn() -> str:
    mvn = shutil.which("mvn")
    if mvn is None:
        raise BrokerError(
            "Maven ('mvn') is not on PATH; it is needed once to download the Kafka "
            "broker jars from Maven Central. Install Maven (e.g. apt-get install maven) "
            "or point AGENTWATCH_TEST_BOOTSTRAP / the bootstrap setting at an existing broker."
        )
    return mvn


def _find_java() -> str:
    java_home = os.environ.get("JAVA_HOME")
    if java_home:
        java = Path(java_home) / "bin" / "java"
        if not os.access(java, os.X_OK):
            raise BrokerError(
                f"JAVA_HOME is set to {java_home!r} but {java} is not an executable; "
                f"fix or unset JAVA_HOME (Java {MIN_JAVA}+ is needed to run Kafka)."
            )
        found = str(java)
    else:
        which = shutil.which("java")
        if which is None:
            raise BrokerError(
                f"Java is not installed: no 'java' on PATH and JAVA_HOME is unset. "
                f"Kafka {KAFKA_VERSION} needs Java {MIN_JAVA}+ (e.g. apt-get install openjdk-17-jre-headless)."
            )
        found = which
    try:
        out = subprocess.run([found, "-version"], capture_output=True, text=True, timeout=30).stderr
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BrokerError(f"could not run {found} -version: {exc}") from exc
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out)
    if match:
        major = int(match.group(1))
        if major == 1 and match.group(2):  # "1.8.0" style
            major = int(match.group(2))
        if major < MIN_JAVA:
            raise BrokerError(
                f"{found} is Java {major}; Kafka {KAFKA_VERSION} needs Java {MIN_JAVA}+. "
                "Set JAVA_HOME to a newer JDK."
            )
    return found


def _format_storage(java: str, classpath: str, log4j: str, props: Path, log_path: Path,
                    extra: list[str] | None = None) -> None:
    # A static quorum (controller.quorum.voters) is formatted with the cluster
    # id alone; --standalone is only for dynamic quorums and is refused here.
    # "--cluster-id=ID", not "-t ID": a base64url id may begin with "-" and read as an option
    cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
    cmd = [java, *_JVM_OPTS, log4j, "-cp", classpath, "kafka.tools.StorageTool",
           "format", f"--cluster-id={cluster_id}", "-c", str(props), *(extra or [])]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BrokerError(f"formatting Kafka storage failed: {exc}") from exc
    with log_path.open("a") as out:
        out.write(done.stdout + done.stderr)
    if done.returncode != 0:
        lines = (done.stdout + done.stderr).strip().splitlines()[-10:]
        raise BrokerError(
            f"formatting Kafka storage in {props.parent / 'data'} failed (exit {done.returncode}):\n"
            + "\n".join(lines)
        )


def _scram_args(secure: SecureListener | None) -> list[str]:
    """kafka-storage format arguments creating the SCRAM users (both hash sizes)."""
    if secure is None:
        return []
    return [arg for user, password in secure.users.items() for mech in ("SCRAM-SHA-256", "SCRAM-SHA-512")
            for arg in ("--add-scram", f"{mech}=[name={user},password={password}]")]


def _secure_properties(secure: SecureListener | None, port: int, controller_port: int) -> str:
    """The SASL_SSL listener's part of server.properties (later keys override the base ones)."""
    if secure is None:
        return ""
    plain_users = " ".join(f'user_{u}="{p}"' for u, p in secure.users.items())
    lines = [
        "# SASL_SSL listener (SecureListener): TLS + SASL PLAIN / SCRAM-SHA-256 / SCRAM-SHA-512",
        f"listeners=PLAINTEXT://{HOST}:{port},CONTROLLER://{HOST}:{controller_port},SASL_SSL://{HOST}:{secure.port}",
        f"advertised.listeners=PLAINTEXT://{HOST}:{port},SASL_SSL://{HOST}:{secure.port}",
        "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SASL_SSL:SASL_SSL",
        "sasl.enabled.mechanisms=PLAIN,SCRAM-SHA-256,SCRAM-SHA-512",
        "listener.name.sasl_ssl.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule "
        f"required {plain_users};",
        "listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config="
        "org.apache.kafka.common.security.scram.ScramLoginModule required;",
        "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config="
        "org.apache.kafka.common.security.scram.ScramLoginModule required;",
        "listener.name.sasl_ssl.ssl.keystore.type=PKCS12",
        f"listener.name.sasl_ssl.ssl.keystore.location={secure.keystore}",
        f"listener.name.sasl_ssl.ssl.keystore.password={secure.keystore_password}",
    ]
    if secure.truststore is not None:
        lines += [
            "listener.name.sasl_ssl.ssl.client.auth=required",
            "listener.name.sasl_ssl.ssl.truststore.type=PKCS12",
            f"listener.name.sasl_ssl.ssl.truststore.location={secure.truststore}",
            f"listener.name.sasl_ssl.ssl.truststore.password={secure.truststore_password}",
        ]
    return "\n".join(lines) + "\n"


def _server_properties(port: int, controller_port: int, data: Path) -> str:
    return f"""\
# Written by agentwatch deploy/broker.py on each start; edits are overwritten.
# Single node, KRaft combined mode, loopback only: a development broker.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@{HOST}:{controller_port}
controller.listener.names=CONTROLLER
listeners=PLAINTEXT://{HOST}:{port},CONTROLLER://{HOST}:{controller_port}
advertised.listeners=PLAINTEXT://{HOST}:{port}
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs={data}
num.partitions=4
auto.create.topics.enable=true
# One broker: every internal topic must settle for a single replica.
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
# Fewer internal partitions: the first consumer group starts in seconds on a
# small machine instead of creating 50 partitions.
offsets.topic.num.partitions=4
transaction.state.log.num.partitions=4
# Tests and demos join groups constantly; the 3 s default delay only slows them.
group.initial.rebalance.delay.ms=0
"""


def _choose_ports(state_dir: Path, port: int | None, controller_port: int | None) -> tuple[int, int]:
    previous = _previous_ports(state_dir / _PROPS)
    chosen: list[int] = []
    for wanted, old, what in ((port, previous[0], "broker"), (controller_port, previous[1], "controller")):
        if wanted is not None:
            if not _port_free(wanted):
                raise BrokerError(
                    f"{what} port {wanted} on {HOST} is already in use; choose another port "
                    "or stop what is listening there."
                )
            chosen.append(wanted)
        elif old is not None and old not in chosen and _wait_port_free(old, _KEEP_PORT_WAIT_S):
            chosen.append(old)
        else:
            if old is not None:
                log.warning("%s port %d of the previous run is taken; clients must use the new port", what, old)
            chosen.append(_free_port(exclude=chosen))
    return chosen[0], chosen[1]


# How long a restart waits for the previous run's port to be released (a broker
# that is still exiting). Workers and agents keep their bootstrap address only
# if the port stays the same, so it is worth a few seconds.
_KEEP_PORT_WAIT_S = 15.0


def _wait_port_free(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not _port_free(port):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.25)
    return True


def _previous_ports(props: Path) -> tuple[int | None, int | None]:
    try:
        text = props.read_text()
    except OSError:
        return None, None
    broker = re.search(r"PLAINTEXT://[\d.]+:(\d+)", text)
    controller = re.search(r"CONTROLLER://[\d.]+:(\d+)", text)
    return (int(broker.group(1)) if broker else None,
            int(controller.group(1)) if controller else None)


def _port_free(port: int) -> bool:
    """Whether the broker could listen on ``port`` now.

    The probe sets SO_REUSEADDR as the broker's own listener does (Java sets it
    on server sockets): connections of the previous run left in TIME_WAIT do not
    keep the port from being reused, while a live listener still does.
    """
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _free_port(exclude: list[int]) -> int:
    while True:
        with socket.socket() as sock:
            sock.bind((HOST, 0))
            port = sock.getsockname()[1]
        if port not in exclude:
            return port


def _port_answers(bootstrap: str) -> bool:
    host, _, port = bootstrap.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1.0):
            return True
    except OSError:
        return False


def _wait_ready(info: BrokerInfo, proc: subprocess.Popen[bytes] | None, timeout: float) -> None:
    """Block until a Kafka client sees the broker registered, or raise BrokerError."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BrokerError(
                f"the Kafka broker exited during startup (code {proc.returncode}). "
                f"Last lines of {info.log_path}:\n{_tail(info.log_path, 20)}"
            )
        if proc is None and not _is_our_broker(info.pid, info.state_dir):
            raise BrokerError(f"the Kafka broker (pid {info.pid}) died; see {info.log_path}")
        # A plain TCP check first keeps aiokafka from logging connection errors
        # while the JVM is still booting.
        if _port_answers(info.bootstrap) and _client_sees_broker(info.bootstrap):
            return
        time.sleep(0.5)
    raise BrokerError(
        f"the Kafka broker did not accept clients on {info.bootstrap} within {timeout:.0f}s. "
        f"Last lines of {info.log_path}:\n{_tail(info.log_path, 20)}"
    )


def _client_sees_broker(bootstrap: str) -> bool:
    async def probe() -> bool:
        from aiokafka.admin import AIOKafkaAdminClient

        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
        try:
            await asyncio.wait_for(admin.start(), 10)
            cluster = await asyncio.wait_for(admin.describe_cluster(), 10)
            # Brokers appear in metadata only once registered and unfenced,
            # i.e. once topic creation and group joins will work.
            return bool(cluster.get("brokers"))
        except Exception:  # noqa: BLE001 - any failure just means "not ready yet"
            return False
        finally:
            await admin.close()

    # A worker thread with its own loop: up() may be called from async code
    # (an asyncio test, the faust app), where asyncio.run() is not allowed.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, probe()).result()


def _is_our_broker(pid: int, state_dir: Path) -> bool:
    """Whether ``pid`` is alive and is the Kafka JVM of ``state_dir``.

    Checking the command line guards against pid reuse: a stale record must
    never make ``down`` signal an unrelated process.
    """
    child = _children.get(pid)
    if child is not None and child.poll() is not None:
        _children.pop(pid, None)
        return False
    proc = Path("/proc") / str(pid)
    if proc.is_dir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return False
        return state != "Z" and b"kafka.Kafka" in cmdline and str(state_dir / _PROPS).encode() in cmdline
    if Path("/proc/self").is_dir():  # procfs present, pid absent: gone
        return False
    try:  # no procfs (macOS): fall back to existence
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _terminate(pid: int, timeout: float) -> None:
    # The broker leads its own process group (start_new_session); signalling the
    # group also reaches anything the JVM might have spawned.
    try:
        target_group = os.getpgid(pid) == pid
    except ProcessLookupError:
        return
    kill = os.killpg if target_group else os.kill

    def signal_it(sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            kill(pid, sig)

    signal_it(signal.SIGTERM)  # Kafka's controlled shutdown flushes its logs
    if not _wait_gone(pid, timeout):
        log.warning("Kafka broker pid %d ignored SIGTERM for %.0fs; killing it", pid, timeout)
        signal_it(signal.SIGKILL)
        _wait_gone(pid, 10.0)
    _children.pop(pid, None)


def _wait_gone(pid: int, timeout: float) -> bool:
    child = _children.get(pid)
    if child is not None:
        try:
            child.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        if Path(f"/proc/{pid}/stat").is_file() and " Z " in Path(f"/proc/{pid}/stat").read_text():
            return True  # a zombie of another parent: it no longer runs
        time.sleep(0.2)
    return False


def _info(record: dict[str, Any], state_dir: Path) -> BrokerInfo:
    return BrokerInfo(bootstrap=str(record["bootstrap"]), pid=int(record["pid"]),
                      state_dir=state_dir, log_path=state_dir / _LOG,
                      secure_bootstrap=str(record.get("secure_bootstrap", "")))


def _read_record(state_dir: Path) -> dict[str, Any] | None:
    try:
        record = json.loads((state_dir / _RECORD).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("pid"), int) or "bootstrap" not in record:
        return None
    return record


def _write_record(state_dir: Path, record: dict[str, Any]) -> None:
    tmp = state_dir / f"{_RECORD}.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(state_dir / _RECORD)  # atomic: status() never reads half a file


def _remove_record(state_dir: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        (state_dir / _RECORD).unlink()


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.rstrip().splitlines()[-lines:]) or "(empty log)"


def _stop_guarded() -> None:
    for state_dir in list(_guarded):
        with contextlib.suppress(Exception):
            down(state_dir, timeout=10.0)
