"""Worker and agent client through the real broker's SASL_SSL listener.

The test makes its own CA and certificates with openssl/keytool, starts the
project's broker with a SASL_SSL listener that requires client certificates
(mutual TLS) and knows a SCRAM user, and runs the worker and the agent client
through it with SCRAM-SHA-512, TLS verified against the CA (host name
included): a retry loop the client reports is detected, and a halt issued with
``agentwatch killswitch issue`` through the same listener is obeyed and
acknowledged by the client and stored by the worker. A wrong password and a
certificate the client does not trust each end ``agentwatch worker`` and the
agent client's start with a one-line error; every SASL mechanism, the mTLS
requirement and host name verification are checked on the same broker.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentwatch_client import AgentClient
from deploy.broker import SecureListener, running_broker
from streams.control_plane import AGENT_KEYS_DIR
from streams.kafka_security import kafka_options
from streams.settings import load_settings
from tests.live import REPO, LiveWorker

pytestmark = pytest.mark.kafka

USER, PASSWORD = "agentwatch-svc", "scram-Pa55-word"
STORE_PASSWORD = "store-pass-123"


def _run(*cmd: str, cwd: Path) -> None:
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, timeout=120)


def make_pki(d: Path, name: str = "ca") -> dict[str, Path]:
    """A CA, a broker certificate for 127.0.0.1/localhost and a client certificate, signed by it."""
    d.mkdir(parents=True, exist_ok=True)
    _run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
         "-keyout", "ca.key", "-out", "ca.crt", cwd=d)
    # the broker is named by its address only: "localhost" (which resolves to it) is not its name,
    # so a client that checks host names refuses it there
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for who in ("broker", "client"):
        _run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={who}", "-keyout", f"{who}.key",
             "-out", f"{who}.csr", cwd=d)
        _run("openssl", "x509", "-req", "-in", f"{who}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "2", "-extfile", "san.ext", "-out", f"{who}.crt", cwd=d)
    _run("openssl", "pkcs12", "-export", "-in", "broker.crt", "-inkey", "broker.key", "-certfile", "ca.crt",
         "-name", "broker", "-passout", f"pass:{STORE_PASSWORD}", "-out", "broker.p12", cwd=d)
    _run("keytool", "-importcert", "-noprompt", "-alias", "ca", "-file", "ca.crt", "-keystore", "trust.p12",
         "-storetype", "PKCS12", "-storepass", STORE_PASSWORD, cwd=d)
    return {n: d / f for n, f in (("ca", "ca.crt"), ("keystore", "broker.p12"), ("truststore", "trust.p12"),
                                  ("client_cert", "client.crt"), ("client_key", "client.key"))}


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, dict[str, Path]]]:
    base = tmp_path_factory.mktemp("sasl")
    pki = make_pki(base / "pki")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    listener = SecureListener(port=port, keystore=pki["keystore"], keystore_password=STORE_PASSWORD,
                              users={USER: PASSWORD}, truststore=pki["truststore"],
                              truststore_password=STORE_PASSWORD)
    with running_broker(base / "broker", secure=listener, timeout=120) as info:
        yield info.bootstrap, info.secure_bootstrap, pki


def _env(secure: str, pki: dict[str, Path], **over: str) -> dict[str, str]:
    env = {
        "AGENTWATCH_BOOTSTRAP": secure,
        "AGENTWATCH_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "AGENTWATCH_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "AGENTWATCH_KAFKA_SASL_USERNAME": USER,
        "AGENTWATCH_KAFKA_SASL_PASSWORD": PASSWORD,
        "AGENTWATCH_KAFKA_SSL_CAFILE": str(pki["ca"]),
        "AGENTWATCH_KAFKA_SSL_CERTFILE": str(pki["client_cert"]),
        "AGENTWATCH_KAFKA_SSL_KEYFILE": str(pki["client_key"]),
    }
    return {**env, **over}


def _settings(secure: str, pki: dict[str, Path], **over: object):
    return load_settings(**{**{k.removeprefix("AGENTWATCH_").lower(): v for k, v in _env(secure, pki).items()},
                            **over})


def test_every_sasl_mechanism_mutual_tls_and_host_name_verification(secure_broker):
    """PLAIN, SCRAM-SHA-256 and SCRAM-SHA-512 each carry records through the SASL_SSL listener;
    without a client certificate the broker refuses the client (mutual TLS), and a name the
    broker's certificate does not carry is refused unless host name checking is turned off."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    from schemas.control import generate_keypair
    from schemas.errors import BrokerError
    from streams.kafka import ensure_topics, missing_topics

    _, secure, pki = secure_broker

    async def round_trip(options: dict, topic: str) -> bytes:
        await ensure_topics(secure, [topic], 1, security=options)
        producer = AIOKafkaProducer(bootstrap_servers=secure, **options)
        await producer.start()
        try:
            await producer.send_and_wait(topic, topic.encode())
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(topic, bootstrap_servers=secure, auto_offset_reset="earliest", **options)
        await consumer.start()
        try:
            return (await asyncio.wait_for(consumer.getone(), 60)).value
        finally:
            await consumer.stop()

    for mechanism in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"):
        options = kafka_options(_settings(secure, pki, kafka_sasl_mechanism=mechanism))
        assert options["sasl_mechanism"] == mechanism
        topic = f"sasl-{mechanism.lower()}"
        assert asyncio.run(round_trip(options, topic)) == topic.encode()

    no_client_cert = kafka_options(_settings(secure, pki, kafka_ssl_certfile=None, kafka_ssl_keyfile=None))
    with pytest.raises(BrokerError) as refused:
        asyncio.run(missing_topics(secure, ["x"], security=no_client_cert, timeout_s=15))
    assert "\n" not in str(refused.value)

    by_name = secure.replace("127.0.0.1", "localhost")
    with pytest.raises(BrokerError, match="(?i)hostname|certificate") as mismatch:
        asyncio.run(missing_topics(by_name, ["x"], security=kafka_options(_settings(secure, pki)), timeout_s=15))
    assert "\n" not in str(mismatch.value)
    # the agent client too says why it cannot connect, on one line
    other_ca = pki["ca"].parent / "other.crt"
    _run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=other",
         "-keyout", "other.key", "-out", other_ca.name, cwd=other_ca.parent)
    for over, why in (({"kafka_sasl_password": "not-the-password"}, "authentication"),
                      ({"kafka_ssl_cafile": other_ca}, "certificate")):
        client = AgentClient("agent-refused", secure, public_keys=generate_keypair()[1],
                             kafka_options=kafka_options(_settings(secure, pki, **over)))
        with pytest.raises(BrokerError) as failed:
            asyncio.run(client.start())
        message = str(failed.value)
        assert why in message.lower() and "\n" not in message and "not-the-password" not in message, message

    unchecked = kafka_options(_settings(secure, pki, kafka_ssl_check_hostname=False))
    assert asyncio.run(missing_topics(by_name, ["sasl-plain", "x"], security=unchecked, timeout_s=30)) == ["x"]


def topic_config(bootstrap: str, topic: str, name: str) -> tuple[str, bool]:
    """A topic's config value, and whether it was set on the topic (not a broker default)."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    async def go() -> tuple[str, bool]:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            (resp,) = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
        finally:
            await admin.close()
        # (name, value, read_only, config_source, ...): source 1 is DYNAMIC_TOPIC_CONFIG
        entry = next(e for e in resp.resources[0][4] if e[0] == name)
        return entry[1], entry[3] == 1

    return asyncio.run(go())


def test_worker_and_agent_client_detect_through_sasl_ssl(secure_broker, tmp_path: Path):
    plain, secure, pki = secure_broker
    env = {**_env(secure, pki), "AGENTWATCH_KAFKA_MIN_INSYNC_REPLICAS": "1"}
    # the LiveWorker's own produce/consume helpers use the PLAINTEXT listener; the worker
    # itself (topics, faust, state rebuild) only knows the SASL_SSL one
    with LiveWorker(plain, tmp_path, env=env) as w:
        settings = load_settings(**{k.removeprefix("AGENTWATCH_").lower(): v for k, v in env.items()})
        options = kafka_options(settings)
        assert options["security_protocol"] == "SASL_SSL" and options["ssl_context"].check_hostname

        async def agent() -> None:
            from streams.control_plane import trusted_keys_text

            s = w.settings
            client = AgentClient("agent-sasl", secure, public_keys=trusted_keys_text(s, w.home),
                                 events_topic=s.topic_events_in, control_topic=s.topic_control,
                                 acks_topic=s.topic_acks, batch_interval_s=0.1, kafka_options=options,
                                 ack_key=str(w.home / AGENT_KEYS_DIR / "agent-sasl.key"))
            await client.start()
            try:
                for _ in range(6):
                    client.record_tool_call("kubectl_apply", {"manifest": "payments.yaml"}, outcome="error",
                                            error_type="Timeout")
                    await asyncio.sleep(0.1)
                await client.flush()
                alerts = await asyncio.to_thread(
                    w.wait_alerts, lambda a: any(x.agent_id == "agent-sasl" for x in a), timeout=120)
                assert any(a.agent_id == "agent-sasl" and a.detector == "retry_loop" for a in alerts), w.log_tail()
                # the kill switch through the same listener: `agentwatch killswitch issue` publishes
                # a signed halt, the client obeys it and acknowledges, the worker stores it
                issued = await asyncio.to_thread(
                    subprocess.run, [sys.executable, "-m", "streams.cli", "killswitch", "issue", "agent:agent-sasl",
                                     "--reason", "sasl test"],
                    cwd=REPO, env=w.env, text=True, capture_output=True, timeout=120)
                assert issued.returncode == 0, issued.stderr
                deadline = time.monotonic() + 60
                while not (client.halted and client.acks) and time.monotonic() < deadline:
                    await asyncio.sleep(0.2)
                assert client.halted and client.acks[-1].status.value == "obeyed", client.acks
            finally:
                await client.stop()

        asyncio.run(agent())
        w.wait_rows("SELECT count() FROM agentwatch.killswitches WHERE target_value = 'agent-sasl'",
                    lambda r: r[0][0] >= 1, timeout=60)
        # the worker created its topics with the configured min.insync.replicas (set on the topic)
        assert topic_config(plain, w.settings.topic_alerts, "min.insync.replicas") == ("1", True)


def _worker_fails(env: dict[str, str], home: Path) -> str:
    done = subprocess.run([sys.executable, "-m", "streams.cli", "worker"], cwd=REPO, text=True,
                          capture_output=True, timeout=180,
                          env={**os.environ, **env, "AGENTWATCH_HOME": str(home), "AGENTWATCH_WEB_PORT": "0"})
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr[-2000:]
    return lines[0]


def test_wrong_password_is_a_one_line_error(secure_broker, tmp_path: Path):
    _, secure, pki = secure_broker
    line = _worker_fails(_env(secure, pki, AGENTWATCH_KAFKA_SASL_PASSWORD="not-the-password"), tmp_path)
    assert "authentication" in line.lower(), line
    assert "not-the-password" not in line


def test_untrusted_broker_certificate_is_a_one_line_error(secure_broker, tmp_path: Path):
    _, secure, pki = secure_broker
    other = make_pki(tmp_path / "other", name="someone-else")
    line = _worker_fails(_env(secure, pki, AGENTWATCH_KAFKA_SSL_CAFILE=str(other["ca"])), tmp_path)
    assert "certificate" in line.lower(), line


def test_created_topics_take_the_configured_replication_and_min_insync_replicas(secure_broker):
    from schemas.errors import BrokerError
    from streams.kafka import ensure_topics

    plain, secure, pki = secure_broker
    settings = load_settings(**{k.removeprefix("AGENTWATCH_").lower(): v for k, v in _env(secure, pki).items()},
                             kafka_min_insync_replicas=2)
    options = kafka_options(settings)

    asyncio.run(ensure_topics(secure, ["isr-topic"], 1, security=options, replication_factor=1,
                              min_insync_replicas=settings.kafka_min_insync_replicas))
    assert topic_config(plain, "isr-topic", "min.insync.replicas")[0] == "2"
    # one broker cannot hold three replicas: a one-line error naming the setting's value
    with pytest.raises(BrokerError, match="replication factor 3"):
        asyncio.run(ensure_topics(secure, ["rf-topic"], 1, security=options, replication_factor=3))


def test_faust_declares_its_own_topics_with_the_configured_replication_factor(tmp_path):
    from streams.app import Pipeline
    from streams.policy_file import load_policy

    s = load_settings(home=tmp_path, clickhouse_dsn=f"chdb://{tmp_path}/ch", web_port=6998,
                      kafka_replication_factor=3)
    pipeline = Pipeline(s, load_policy(None), "127.0.0.1:9", {}, None)  # nothing connects until it runs
    assert pipeline.app.conf.topic_replication_factor == 3
