"""Every shipped deployment config, checked by the real tool that reads it where that tool
runs here, plus assertions on how the pieces are wired together.

promtool and amtool come from Debian (Makefile system-deps); the compose file is checked
against the compose specification's JSON schema (check-jsonschema's vendored copy), the
Kubernetes manifests against the Kubernetes OpenAPI schemas (kubernetes-validate).
"""

from __future__ import annotations

import asyncio
import base64
import fnmatch
import json
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from streams.policy_file import load_policy

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE = ROOT / "docker-compose.yml"
BIN = Path(sys.executable).parent


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT, timeout=120)


def tool(name: str) -> str:
    found = shutil.which(name) or (str(BIN / name) if (BIN / name).exists() else None)
    if found is None:
        pytest.fail(f"{name} is not installed: `make system-deps` / `make test` install it")
    return found


# --- Prometheus and Alertmanager -----------------------------------------------------------------


def test_promtool_accepts_the_prometheus_config_and_its_rules() -> None:
    out = run(tool("promtool"), "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml"))
    assert out.returncode == 0, out.stdout + out.stderr
    # check config also checks the rule files it loads: make sure it found them
    assert "rules/agentwatch.yml" in out.stdout + out.stderr


def test_promtool_accepts_the_rules() -> None:
    out = run(tool("promtool"), "check", "rules", str(DEPLOY / "prometheus" / "rules" / "agentwatch.yml"))
    assert out.returncode == 0 and "SUCCESS: 5 rules found" in out.stdout, out.stdout + out.stderr


def test_the_rules_fire_on_the_workers_metrics(tmp_path: Path) -> None:
    """promtool's rule unit tests: each self-health alert fires on the series the worker exports."""
    tests = {
        "rule_files": [str(DEPLOY / "prometheus" / "rules" / "agentwatch.yml")],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [
                {"series": 'up{job="agentwatch", instance="worker:6066"}', "values": "0x10"},
                {"series": 'agentwatch_consumer_lag_messages{instance="w", topic="otlp_spans", partition="0"}',
                 "values": "20000x15"},
                {"series": 'agentwatch_sink_failures_total{instance="w", table="events"}', "values": "0+5x15"},
                {"series": 'agentwatch_decode_failures_total{instance="w", topic="otlp_spans"}', "values": "0+60x20"},
                {"series": 'agentwatch_messages_in_total{instance="w", topic="otlp_spans"}', "values": "0+100x20"},
                {"series": 'agentwatch_alert_deliveries_total{instance="w", output="alertmanager", result="failure"}',
                 "values": "0+1x15"},
            ],
            "alert_rule_test": [
                {"eval_time": "5m", "alertname": "AgentwatchWorkerDown",
                 "exp_alerts": [{"exp_labels": {"severity": "critical", "job": "agentwatch",
                                                "instance": "worker:6066"}}]},
                {"eval_time": "10m", "alertname": "AgentwatchConsumerLagHigh",
                 "exp_alerts": [{"exp_labels": {"severity": "high", "instance": "w", "topic": "otlp_spans"}}]},
                {"eval_time": "12m", "alertname": "AgentwatchSinkFailures",
                 "exp_alerts": [{"exp_labels": {"severity": "high", "instance": "w", "table": "events"}}]},
                {"eval_time": "20m", "alertname": "AgentwatchDeadLetterRate",
                 "exp_alerts": [{"exp_labels": {"severity": "medium", "instance": "w", "topic": "otlp_spans"}}]},
                {"eval_time": "14m", "alertname": "AgentwatchAlertDeliveryFailing",
                 "exp_alerts": [{"exp_labels": {"severity": "critical", "instance": "w", "output": "alertmanager"}}]},
            ],
        }],
    }
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules" / "agentwatch.yml").read_text())
    runbooks = {r["alert"]: r["annotations"]["runbook_url"] for g in rules["groups"] for r in g["rules"]}
    summaries = {
        "AgentwatchWorkerDown": "agentwatch worker worker:6066 is down: agents are not being watched",
        "AgentwatchConsumerLagHigh": "agentwatch is 20k messages behind on otlp_spans",
        "AgentwatchSinkFailures": "ClickHouse inserts into events are failing (83.33m/s)",
        "AgentwatchDeadLetterRate": "more than 5% of otlp_spans goes to the DLQ",
        "AgentwatchAlertDeliveryFailing": "alerts are not reaching alertmanager",
    }
    for case in tests["tests"][0]["alert_rule_test"]:  # type: ignore[index]
        name = case["alertname"]
        case["exp_alerts"][0]["exp_annotations"] = {"summary": summaries[name], "runbook_url": runbooks[name]}
    assert set(summaries) == set(runbooks)
    path = tmp_path / "rules_test.yml"
    path.write_text(yaml.safe_dump(tests))
    out = run(tool("promtool"), "test", "rules", str(path))
    assert out.returncode == 0, out.stdout + out.stderr


def test_amtool_accepts_the_alertmanager_config() -> None:
    out = run(tool("amtool"), "check-config", str(DEPLOY / "alertmanager" / "alertmanager.yml"))
    assert out.returncode == 0 and "SUCCESS" in out.stdout, out.stdout + out.stderr


# --- OpenTelemetry Collector ---------------------------------------------------------------------

# The kafka exporter's configuration keys as its README documents them for v0.155
# (opentelemetry-collector-contrib, exporter/kafkaexporter/README.md), plus the
# exporterhelper settings every exporter takes. The Collector itself cannot run here
# (no binary on the package registries), so unknown or misplaced keys are caught here.
KAFKA_EXPORTER_KEYS = {
    "brokers", "resolve_canonical_bootstrap_servers_only", "client_id", "protocol_version", "topic_from_attribute",
    "include_metadata_keys", "partition_traces_by_id", "partition_metrics_by_resource_attributes",
    "partition_logs_by_resource_attributes", "partition_logs_by_trace_id", "logs", "metrics", "traces", "profiles",
    "timeout", "auth", "tls", "metadata", "producer", "retry_on_failure", "sending_queue", "record_headers",
    "allow_auto_topic_creation", "conn_idle_timeout", "rack_id", "use_leader_epoch",
}
KAFKA_SIGNAL_KEYS = {"topic", "encoding", "topic_from_metadata_key"}
KAFKA_PRODUCER_KEYS = {"max_message_bytes", "required_acks", "compression", "compression_params", "flush_max_messages",
                       "linger", "allow_auto_topic_creation"}
TRACE_ENCODINGS = {"otlp_proto", "otlp_json", "jaeger_proto", "jaeger_json", "zipkin_proto", "zipkin_json"}


def test_collector_config_uses_the_exporters_documented_keys() -> None:
    cfg = yaml.safe_load((DEPLOY / "otel-collector.yaml").read_text())
    kafka = cfg["exporters"]["kafka"]
    assert set(kafka) <= KAFKA_EXPORTER_KEYS, set(kafka) - KAFKA_EXPORTER_KEYS
    assert set(kafka["traces"]) <= KAFKA_SIGNAL_KEYS
    assert set(kafka["producer"]) <= KAFKA_PRODUCER_KEYS
    assert kafka["producer"]["compression"] in {"none", "gzip", "snappy", "lz4", "zstd"}
    assert kafka["traces"]["encoding"] in {"otlp_proto", "otlp_json"} <= TRACE_ENCODINGS  # the two the worker decodes
    assert kafka["partition_traces_by_id"] is True  # the correlate stage joins by trace
    # the topic the worker reads by default
    from streams.settings import Settings

    assert kafka["traces"]["topic"] == Settings.model_fields["topic_otlp"].default
    # the pipeline: otlp receiver -> batch -> kafka exporter
    traces = cfg["service"]["pipelines"]["traces"]
    assert traces["receivers"] == ["otlp"] and "batch" in traces["processors"] and traces["exporters"] == ["kafka"]
    for section, names in (("receivers", traces["receivers"]), ("processors", traces["processors"]),
                           ("exporters", traces["exporters"])):
        assert set(names) <= set(cfg[section])
    assert set(cfg["processors"]["batch"]) <= BATCH_KEYS
    assert traces["processors"][0] == "memory_limiter"  # first, as the Collector documents


BATCH_KEYS = {"send_batch_size", "timeout", "send_batch_max_size", "metadata_keys", "metadata_cardinality_limit"}


def test_request_metadata_reaches_the_worker_as_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """include_metadata_keys copies nothing unless the receiver keeps the request's metadata
    (include_metadata) and the batch processor keeps it per batch (metadata_keys); the worker
    then maps each header to identity (AGENTWATCH_HEADER_IDENTITY)."""
    cfg = yaml.safe_load((DEPLOY / "otel-collector.yaml").read_text())
    keys = cfg["exporters"]["kafka"]["include_metadata_keys"]
    assert keys
    for name, protocol in cfg["receivers"]["otlp"]["protocols"].items():
        assert protocol.get("include_metadata") is True, name
    assert set(keys) <= set(cfg["processors"]["batch"].get("metadata_keys", [])), "batching drops the metadata"
    from streams.settings import Settings

    env = yaml.safe_load(COMPOSE.read_text())["services"]["worker"]["environment"]
    monkeypatch.setenv("AGENTWATCH_HEADER_IDENTITY", env["AGENTWATCH_HEADER_IDENTITY"])  # as the worker reads it
    mapping = Settings().header_identity
    assert set(keys) <= set(mapping) and set(mapping.values()) == {"tenant", "agent_id"}


# --- the worker's metrics, as the rules and dashboards use them ---------------------------------


def _exported_metrics() -> dict[str, set[str]]:
    """Every series name the worker exports -> its label names (from its own registry)."""
    from prometheus_client import CollectorRegistry

    from sinks.delivery import DeliveryMetrics
    from streams.metrics import Metrics

    registry = CollectorRegistry()
    metrics = Metrics.create(registry)
    DeliveryMetrics(registry)
    out: dict[str, set[str]] = {}
    for collector in list(registry._collector_to_names):  # noqa: SLF001 - the only list of collectors
        names = registry._collector_to_names[collector]  # noqa: SLF001
        labels = set(getattr(collector, "_labelnames", ()))
        for name in names:
            out[name] = labels
    assert metrics.consumer_lag is not None and out
    return out


def test_rules_and_panels_use_only_metrics_the_worker_exports() -> None:
    """A renamed metric or label would leave an alert that can never fire, silently."""
    from deploy.grafana.dashboards import DASHBOARDS
    from deploy.grafana.dashboards import OUT as DASHBOARD_DIR

    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules" / "agentwatch.yml").read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    exprs += [t["expr"] for name in DASHBOARDS
              for p in json.loads((DASHBOARD_DIR / f"{name}.json").read_text())["panels"]
              for t in p["targets"] if "expr" in t]
    exported = _exported_metrics()
    scrape_labels = {"instance", "job", "le"}
    checked = grouped = 0
    for expr in exprs:
        for name in re.findall(r"\b(agentwatch_\w+)", expr):
            assert name in exported, f"{name} is not exported by the worker: {expr}"
            checked += 1
            for matchers in re.findall(re.escape(name) + r"\{([^}]*)\}", expr):
                used = set(re.findall(r"(\w+)\s*[!=]~?", matchers))
                assert used <= exported[name] | scrape_labels, (name, used)
        # `sum by (labels) (... metric ...)`: the labels of the metric aggregated, the first after it
        for m in re.finditer(r"\bby\s*\(([^)]*)\)\s*\(\s*\w*\(?\s*(agentwatch_\w+)", expr):
            used = {g.strip() for g in m.group(1).split(",") if g.strip()}
            assert used <= exported[m.group(2)] | scrape_labels, (expr, m.group(2), used)
            grouped += 1
    assert checked >= 10 and grouped >= 8


# --- docker compose ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_file_matches_the_compose_specification() -> None:
    out = run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE))
    assert out.returncode == 0, out.stdout + out.stderr


def _host(address: str) -> str:
    address = re.sub(r"\$\{[^}]*\}", "interpolated", address)  # ${CLICKHOUSE_PASSWORD:?...} is filled in by compose
    return urlsplit(address if "://" in address else f"//{address}").hostname or ""


def test_every_service_the_worker_needs_is_reachable_by_the_name_it_is_given(compose: dict[str, Any]) -> None:
    services = compose["services"]
    env = services["worker"]["environment"]
    bootstrap = env["AGENTWATCH_BOOTSTRAP"]
    assert _host(bootstrap) in services
    # Kafka advertises exactly that address to containers (else clients are redirected elsewhere)
    kafka_env = services["kafka"]["environment"]
    assert f"://{bootstrap}" in kafka_env["KAFKA_ADVERTISED_LISTENERS"]
    # and a listener the host reaches: advertised as 127.0.0.1:P, published as 127.0.0.1:P -> its port
    listeners = dict(re.findall(r"(\w+)://[^:,]*:(\d+)", kafka_env["KAFKA_LISTENERS"]))
    host_side = [(name, port) for name, host, port in
                 re.findall(r"(\w+)://([^:,]+):(\d+)", kafka_env["KAFKA_ADVERTISED_LISTENERS"]) if host == "127.0.0.1"]
    assert host_side, "no listener advertised for the host"
    for name, port in host_side:
        assert f"127.0.0.1:{port}:{listeners[name]}" in services["kafka"]["ports"], name
    assert _host(env["AGENTWATCH_CLICKHOUSE_DSN"]) in services
    assert urlsplit(re.sub(r"\$\{[^}]*\}", "x", env["AGENTWATCH_CLICKHOUSE_DSN"])).username == services["clickhouse"]["environment"]["CLICKHOUSE_USER"]
    assert _host(env["AGENTWATCH_ALERTMANAGER_URL"]) in services
    assert _host(services["otel-collector"]["environment"]["KAFKA_BROKERS"]) in services
    assert services["otel-collector"]["environment"]["KAFKA_BROKERS"] == bootstrap
    # Prometheus scrapes the worker by its service name, on the port it listens on, and alerts Alertmanager
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = [t for sc in prom["scrape_configs"] for s in sc["static_configs"] for t in s["targets"]]
    assert f"worker:{env['AGENTWATCH_WEB_PORT']}" in targets and not any(t.startswith("127.") for t in targets)
    am_targets = prom["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    assert all(_host(t) in services for t in am_targets)
    # Grafana's data source names the ClickHouse service
    ds = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "clickhouse.yaml").read_text())
    assert ds["datasources"][0]["jsonData"]["host"] in services
    # whose plugin Grafana installs before it starts (provisioning fails on a missing plugin)
    grafana_env = services["grafana"]["environment"]
    assert ds["datasources"][0]["type"] in grafana_env["GF_PLUGINS_PREINSTALL_SYNC"].split(",")
    assert "GF_INSTALL_PLUGINS" not in grafana_env  # deprecated since Grafana 12.1
    assert ds["datasources"][0]["secureJsonData"]["password"] == "$CLICKHOUSE_PASSWORD" and "CLICKHOUSE_PASSWORD" in grafana_env
    # the dashboards Grafana's provider reads are the ones mounted
    provider = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "agentwatch.yaml").read_text())
    mounts = dict(v.split(":")[:2][::-1] for v in services["grafana"]["volumes"])
    assert mounts[provider["providers"][0]["options"]["path"]] == "./deploy/grafana/dashboards"
    # the worker starts once its dependencies are healthy, and its input topics exist
    deps = services["worker"]["depends_on"]
    assert deps["kafka"]["condition"] == deps["clickhouse"]["condition"] == "service_healthy"
    assert deps["kafka-init"]["condition"] == "service_completed_successfully"
    created = re.findall(r"for t in ([^;]+);", services["kafka-init"]["command"][0])[0].split()
    from streams.kafka import input_topics
    from streams.settings import Settings

    assert set(created) == set(input_topics(Settings()))


def test_keys_and_data_live_on_volumes(compose: dict[str, Any]) -> None:
    services, volumes = compose["services"], compose["volumes"]

    def named_mounts(svc: str) -> dict[str, str]:
        out = {}
        for v in services[svc].get("volumes", []):
            src, _, rest = v.partition(":")
            out[rest.split(":")[0]] = src
        return out

    worker = services["worker"]
    env = worker["environment"]
    assert named_mounts("worker")[env["AGENTWATCH_HOME"]] in volumes  # query token, dev state survive recreation
    secret = env["AGENTWATCH_CONTROL_PRIVATE_KEY"]
    assert secret.startswith("/run/secrets/") and secret.removeprefix("/run/secrets/") in worker["secrets"]
    assert compose["secrets"][secret.removeprefix("/run/secrets/")]["file"].startswith("./deploy/secrets/")
    assert named_mounts("clickhouse")["/var/lib/clickhouse"] in volumes
    assert named_mounts("kafka")[services["kafka"]["environment"]["KAFKA_LOG_DIRS"]] in volumes
    for svc, path in (("prometheus", "/prometheus"), ("alertmanager", "/alertmanager"), ("grafana", "/var/lib/grafana")):
        assert named_mounts(svc)[path] in volumes, svc
    # every file mounted from the repository exists
    for svc in services.values():
        for v in svc.get("volumes", []):
            src = v.split(":")[0]
            if src.startswith("./"):
                assert (ROOT / src).exists(), src


def test_no_port_is_published_beyond_this_machine(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        for port in svc.get("ports", []):
            assert isinstance(port, str) and port.startswith("127.0.0.1:"), f"{name} publishes {port} to every interface"
    # the UIs that are published ask for credentials
    grafana = compose["services"]["grafana"]["environment"]
    assert grafana["GF_AUTH_ANONYMOUS_ENABLED"] == "false" and "?" in grafana["GF_SECURITY_ADMIN_PASSWORD"]


# --- nothing the compose stack publishes answers without a credential -----------------------------

def _required(value: str, variable: str) -> bool:
    """``${VAR:?...}``: compose refuses to start without the variable, never an empty credential."""
    return f"${{{variable}:?" in value


def _secret_file(compose: dict[str, Any], service: str, path: str) -> str:
    """The file under deploy/secrets/ (not committed) that ``path`` mounts into ``service``."""
    name = path.removeprefix("/run/secrets/")
    assert path.startswith("/run/secrets/") and name in compose["services"][service]["secrets"], (service, path)
    source = compose["secrets"][name]
    return str(source.get("file", ""))


def _web_config_file(compose: dict[str, Any], service: str) -> str:
    flags = dict(a.removeprefix("--").split("=", 1) for a in compose["services"][service]["command"] if "=" in a)
    return _secret_file(compose, service, flags["web.config.file"])


def _kafka_is_sasl_only(compose: dict[str, Any]) -> str:
    env = compose["services"]["kafka"]["environment"]
    protocols = dict(p.split(":") for p in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    listeners = dict(re.findall(r"(\w+)://([^:,]*):\d+", env["KAFKA_LISTENERS"]))
    for name in re.findall(r"(\w+)://", env["KAFKA_ADVERTISED_LISTENERS"]):  # every listener clients use
        assert protocols[name].startswith("SASL_"), name
        assert env["KAFKA_SASL_ENABLED_MECHANISMS"] == "PLAIN"
        jaas = env[f"KAFKA_LISTENER_NAME_{name}_PLAIN_SASL_JAAS_CONFIG"]
        assert "PlainLoginModule required" in jaas and _required(jaas, "KAFKA_PASSWORD"), name
        assert re.findall(r'user_(\w+)="', jaas) == ["agentwatch"], name  # the one account
    for name, protocol in protocols.items():  # a listener without SASL is on the container's loopback
        assert protocol.startswith("SASL_") or listeners[name] == "localhost", name
    return "SASL PLAIN on every listener clients use"


def _collector_asks_a_bearer_token(compose: dict[str, Any]) -> str:
    cfg = yaml.safe_load((DEPLOY / "otel-collector.yaml").read_text())
    assert "bearertokenauth" in cfg["service"]["extensions"]
    assert cfg["extensions"]["bearertokenauth"] == {"token": "${env:OTLP_TOKEN}"}
    assert _required(compose["services"]["otel-collector"]["environment"]["OTLP_TOKEN"], "OTLP_TOKEN")
    for name, protocol in cfg["receivers"]["otlp"]["protocols"].items():
        assert protocol["auth"] == {"authenticator": "bearertokenauth"}, name
    return "bearertokenauth on both OTLP receivers"


def _clickhouse_asks_a_password(compose: dict[str, Any]) -> str:
    env = compose["services"]["clickhouse"]["environment"]
    assert _required(env["CLICKHOUSE_PASSWORD"], "CLICKHOUSE_PASSWORD") and env["CLICKHOUSE_USER"] != "default"
    return "password of the agentwatch user"


def _web_basic_auth(service: str) -> Any:
    def check(compose: dict[str, Any]) -> str:
        assert _web_config_file(compose, service) == "./deploy/secrets/web-config.yml", service
        return "basic auth (--web.config.file)"

    return check


def _grafana_asks_a_password(compose: dict[str, Any]) -> str:
    env = compose["services"]["grafana"]["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert _required(env["GF_SECURITY_ADMIN_PASSWORD"], "GRAFANA_ADMIN_PASSWORD")
    return "admin password, no anonymous access"


# service -> the check that its published ports ask for a credential (and which)
AUTHENTICATED = {
    "kafka": _kafka_is_sasl_only,
    "otel-collector": _collector_asks_a_bearer_token,
    "clickhouse": _clickhouse_asks_a_password,
    "prometheus": _web_basic_auth("prometheus"),
    "alertmanager": _web_basic_auth("alertmanager"),
    "grafana": _grafana_asks_a_password,
}


def test_every_published_port_asks_for_a_credential(compose: dict[str, Any]) -> None:
    published = {name for name, svc in compose["services"].items() if svc.get("ports")}
    unauthenticated = published - set(AUTHENTICATED)
    assert not unauthenticated, f"published without a credential: {unauthenticated}"
    mechanisms = {name: AUTHENTICATED[name](compose) for name in published}
    assert set(mechanisms) == set(AUTHENTICATED)  # a service dropped from ports: drop it here too
    # the worker's /metrics and /healthz take no credential: reachable on the compose network only
    assert "ports" not in compose["services"]["worker"] and compose["services"]["worker"]["expose"] == ["6066"]
    # the Collector's health_check extension is not published either
    assert all(":13133" not in p for p in compose["services"]["otel-collector"]["ports"])


def test_every_kafka_client_of_the_stack_uses_the_sasl_identity(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    services = compose["services"]
    identity = {k: v for k, v in services["worker"]["environment"].items() if k.startswith("AGENTWATCH_KAFKA_")}
    assert identity["AGENTWATCH_KAFKA_SECURITY_PROTOCOL"] == "SASL_PLAINTEXT"
    assert _required(identity["AGENTWATCH_KAFKA_SASL_PASSWORD"], "KAFKA_PASSWORD")
    # the worker reads them as its settings (the variables are its own)
    from streams.kafka_security import kafka_options
    from streams.settings import Settings

    for key, value in identity.items():
        monkeypatch.setenv(key, value)
    options = kafka_options(Settings())
    assert options["security_protocol"] == "SASL_PLAINTEXT" and options["sasl_mechanism"] == "PLAIN"
    assert options["sasl_plain_username"] == "agentwatch"
    # the broker's account is that user
    jaas = services["kafka"]["environment"]["KAFKA_LISTENER_NAME_INTERNAL_PLAIN_SASL_JAAS_CONFIG"]
    assert f'user_{identity["AGENTWATCH_KAFKA_SASL_USERNAME"]}=' in jaas
    # kafka-init, the broker's healthcheck and the Collector get the same variables
    for name in ("kafka", "kafka-init", "otel-collector"):
        env = services[name]["environment"]
        assert {k: env.get(k) for k in identity} == identity, name
    wrapper = "/etc/agentwatch/with-sasl-client.sh"
    assert services["kafka-init"]["entrypoint"][:2] == ["/bin/sh", wrapper]
    assert "--command-config /tmp/client.properties" in services["kafka-init"]["command"][0]
    assert services["kafka"]["healthcheck"]["test"][1:3] == ["sh", wrapper]
    assert "/tmp/client.properties" in services["kafka"]["healthcheck"]["test"]
    script = (DEPLOY / "kafka" / "with-sasl-client.sh").read_text()
    assert set(re.findall(r"\$(AGENTWATCH_KAFKA_\w+)", script)) == set(identity)
    assert run("sh", "-n", str(DEPLOY / "kafka" / "with-sasl-client.sh")).returncode == 0
    # the Collector's kafka exporter: auth.sasl with the documented keys, from those variables
    sasl = yaml.safe_load((DEPLOY / "otel-collector.yaml").read_text())["exporters"]["kafka"]["auth"]["sasl"]
    assert set(sasl) <= {"username", "password", "mechanism", "version", "aws_msk"}
    assert sasl == {"mechanism": "${env:AGENTWATCH_KAFKA_SASL_MECHANISM}",
                    "username": "${env:AGENTWATCH_KAFKA_SASL_USERNAME}",
                    "password": "${env:AGENTWATCH_KAFKA_SASL_PASSWORD}"}


def _image_properties(env: dict[str, Any], *, password: str, ports: dict[str, int], data: Path) -> str:
    """server.properties as the apache/kafka image writes it from its environment (KAFKA_A_B ->
    a.b, ``__`` -> ``_``, ``___`` -> ``-``), with compose's password filled in, the container's
    ports moved to free loopback ports and the service name ``kafka`` to 127.0.0.1."""
    lines = []
    for key, value in env.items():
        if not key.startswith("KAFKA_"):
            continue
        value = re.sub(r"\$\{KAFKA_PASSWORD:\?[^}]*\}", password, str(value))
        for container_port, port in ports.items():
            value = re.sub(rf":{container_port}\b", f":{port}", value)
        value = value.replace("kafka:", "127.0.0.1:").replace("://:", "://127.0.0.1:")
        if key == "KAFKA_LOG_DIRS":
            value = str(data)
        name = key.removeprefix("KAFKA_").lower().replace("___", "-").replace("__", "\0").replace("_", ".")
        lines.append(f"{name.replace(chr(0), '_')}={value}")
    return "\n".join(lines) + "\ngroup.initial.rebalance.delay.ms=0\noffsets.topic.num.partitions=1\n"


def test_the_compose_broker_accepts_only_the_stacks_sasl_identity(
    compose: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real broker run with docker-compose.yml's kafka settings: the worker's Kafka options
    (from the worker's compose environment) work on both listeners; a wrong password and a
    PLAINTEXT client are refused."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    from deploy import broker
    from streams.kafka_security import kafka_options
    from streams.settings import Settings
    from tests.alertmanager_server import free_port

    password = "Compose0Test9Pw"
    ports = {"29092": free_port(), "9092": free_port(), "9093": free_port()}
    props = tmp_path / "server.properties"
    props.write_text(_image_properties(compose["services"]["kafka"]["environment"], password=password, ports=ports,
                                       data=tmp_path / "data"))
    java, classpath = broker._find_java(), f"{broker.ensure_jars()}/*"  # noqa: SLF001 - the project's launcher
    log4j, log = f"-Dlog4j2.configurationFile={broker._LOG4J}", tmp_path / "broker.log"  # noqa: SLF001
    broker._format_storage(java, classpath, log4j, props, log)  # noqa: SLF001
    for key, value in compose["services"]["worker"]["environment"].items():
        if key.startswith("AGENTWATCH_KAFKA_"):
            monkeypatch.setenv(key, password if key == "AGENTWATCH_KAFKA_SASL_PASSWORD" else value)
    worker = kafka_options(Settings())

    async def create_topic(bootstrap: str, options: dict[str, Any]) -> str:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000, **options)
        try:
            await admin.start()
            await admin.create_topics([NewTopic(f"t{time.monotonic_ns()}", 1, 1)])
            return "ok"
        except Exception as exc:  # noqa: BLE001 - the refusal is the result
            return f"{type(exc).__name__}: {exc}"
        finally:
            await admin.close()

    internal, external = f"127.0.0.1:{ports['29092']}", f"127.0.0.1:{ports['9092']}"
    with log.open("ab") as out:
        proc = subprocess.Popen([java, *broker._JVM_OPTS, log4j, "-cp", classpath, "kafka.Kafka", str(props)],  # noqa: SLF001
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while (result := asyncio.run(create_topic(internal, worker))) != "ok":
            assert proc.poll() is None and time.monotonic() < deadline, (result, log.read_text()[-3000:])
            time.sleep(1)
        assert asyncio.run(create_topic(external, worker)) == "ok"
        assert asyncio.run(create_topic(external, {**worker, "sasl_plain_password": "wrong"})) != "ok"
        assert asyncio.run(create_topic(external, {})) != "ok"  # PLAINTEXT
        assert asyncio.run(create_topic(internal, {})) != "ok"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_every_client_of_prometheus_and_alertmanager_sends_the_credential(compose: dict[str, Any]) -> None:
    services = compose["services"]
    from deploy.web_config import USER

    # worker -> Alertmanager: the URL's user and password (aiohttp sends them as basic auth)
    am = urlsplit(services["worker"]["environment"]["AGENTWATCH_ALERTMANAGER_URL"].replace(
        "${MONITORING_PASSWORD:?set MONITORING_PASSWORD}", "x"))
    assert am.username == USER and am.password == "x"
    # Prometheus -> Alertmanager: basic_auth with the compose secret made from MONITORING_PASSWORD
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    for am_config in prom["alerting"]["alertmanagers"]:
        auth = am_config["basic_auth"]
        assert auth["username"] == USER
        _secret_file(compose, "prometheus", auth["password_file"])
        assert compose["secrets"][auth["password_file"].removeprefix("/run/secrets/")] == {
            "environment": "MONITORING_PASSWORD"}
    # Grafana -> Prometheus
    ds = {d["type"]: d for d in yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "clickhouse.yaml").read_text())["datasources"]}
    assert ds["prometheus"]["basicAuth"] is True and ds["prometheus"]["basicAuthUser"] == USER
    assert ds["prometheus"]["secureJsonData"]["basicAuthPassword"] == "$MONITORING_PASSWORD"
    assert _required(services["grafana"]["environment"]["MONITORING_PASSWORD"], "MONITORING_PASSWORD")
    # the example env file names every credential compose requires, with no real value
    required = set(re.findall(r"\$\{(\w+):\?", COMPOSE.read_text()))
    example = dict(line.split("=", 1) for line in (DEPLOY / "compose.env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    assert set(example) == required and set(example.values()) == {"change-me"}


def test_the_web_config_is_accepted_by_promtool_and_enforced_by_alertmanager(tmp_path: Path) -> None:
    """The file deploy/web_config.py writes: promtool accepts it, and the real Alertmanager run
    with it refuses requests without the password and with a wrong one (silences included)."""
    from deploy.web_config import USER, write
    from tests.alertmanager_server import free_port, require_alertmanager

    path = write(tmp_path, "s3cret-Pw")
    out = run(tool("promtool"), "check", "web-config", str(path))
    assert out.returncode == 0 and "SUCCESS" in out.stdout + out.stderr, out.stdout + out.stderr
    binary = require_alertmanager()
    port = free_port()
    log = (tmp_path / "am.log").open("wb")
    proc = subprocess.Popen(
        [binary, f"--config.file={DEPLOY / 'alertmanager' / 'alertmanager.yml'}", f"--storage.path={tmp_path / 'am'}",
         f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address=", f"--web.config.file={path}",
         "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def status(password: str | None) -> int | None:
        request = urllib.request.Request(f"http://127.0.0.1:{port}/api/v2/silences")
        if password is not None:
            request.add_header("Authorization", "Basic " + base64.b64encode(f"{USER}:{password}".encode()).decode())
        try:
            with urllib.request.urlopen(request, timeout=2) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return exc.code
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return None

    try:
        deadline = time.monotonic() + 30
        while status("s3cret-Pw") != 200:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "am.log").read_text()
            time.sleep(0.1)
        assert status(None) == 401 and status("wrong") == 401
        # the worker's Alertmanager output, with the credential in its URL as docker-compose.yml sets it
        from sinks.alertmanager import AlertmanagerOutput
        from sinks.delivery import DeliveryError
        from tests.test_alert_outputs import make_alert

        async def deliver(password: str) -> None:
            am = AlertmanagerOutput(f"http://{USER}:{password}@127.0.0.1:{port}")
            try:
                await am.send([make_alert()])
            finally:
                await am.close()

        asyncio.run(deliver("s3cret-Pw"))
        with pytest.raises(DeliveryError, match="401") as refused:
            asyncio.run(deliver("wrong-Pw"))
        assert "wrong-Pw" not in str(refused.value)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


def test_long_running_services_restart_and_the_worker_has_a_healthcheck(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        if name != "kafka-init":
            assert svc.get("restart") == "unless-stopped", name
    for name in ("kafka", "clickhouse", "worker"):
        assert compose["services"][name]["healthcheck"]["test"], name


# --- Dockerfile ----------------------------------------------------------------------------------


def test_dockerfile_runs_as_a_user_with_a_healthcheck_and_a_small_context() -> None:
    text = (ROOT / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK\s", text, re.M)
    for src in re.findall(r"^COPY\s+(?!--)(\S+)", text, re.M):
        for part in src.split():
            assert (ROOT / part).exists(), part
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for heavy in (".venv", ".git", ".agentwatch", "deploy/secrets"):
        assert heavy in ignored, heavy

    def excluded(path: str) -> bool:  # a pattern matching the path or one of its parents
        parts = path.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        return any(fnmatch.fnmatch(p, pat.removeprefix("**/")) or fnmatch.fnmatch(p.split("/")[-1], pat.removeprefix("**/"))
                   for pat in ignored for p in prefixes)

    # what the image installs and the worker reads at run time stays in the build context
    for src in re.findall(r"^COPY\s+(?!--)(.+)\s+\S+$", text, re.M):
        for part in src.split():
            assert not excluded(part), f"{part} is COPYed but .dockerignore leaves it out"
    for needed in ("deploy/clickhouse/schema.sql", "deploy/broker.py", "detectors/policy.py", "streams/cli.py"):
        assert not excluded(needed), needed
    assert excluded("deploy/secrets/control.key") and excluded(".venv/bin/python")


# --- Kubernetes ----------------------------------------------------------------------------------

K8S_VERSION = "1.33.0"


def _k8s_docs() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    docs = []
    for res in kustomization["resources"]:
        docs += [d for d in yaml.safe_load_all((DEPLOY / "k8s" / res).read_text()) if d]
    return docs


def test_manifests_match_the_kubernetes_schemas() -> None:
    import kubernetes_validate

    checked = 0
    for doc in _k8s_docs():
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: no schema in the Kubernetes API; checked structurally below
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)  # raises on any unknown or wrong field
        checked += 1
    assert checked == 6


def test_manifests_are_wired_together() -> None:
    docs = {(d["kind"], d["metadata"]["name"]): d for d in _k8s_docs()}
    deploy = docs[("Deployment", "agentwatch-worker")]
    labels = deploy["spec"]["template"]["metadata"]["labels"]
    container = deploy["spec"]["template"]["spec"]["containers"][0]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["path"] == "/healthz"
    for kind in ("Service", "PodDisruptionBudget", "ServiceMonitor"):
        selector = docs[(kind, "agentwatch-worker")]["spec"]["selector"]
        selector = selector.get("matchLabels", selector)
        assert selector.items() <= labels.items(), kind
    # a ServiceMonitor endpoint names a port of the Service, whose targetPort names the container's
    service_ports = {p["name"]: p for p in docs[("Service", "agentwatch-worker")]["spec"]["ports"]}
    container_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    endpoint = docs[("ServiceMonitor", "agentwatch-worker")]["spec"]["endpoints"][0]
    assert endpoint["port"] in service_ports and endpoint["path"] == "/metrics"
    target = service_ports[endpoint["port"]]["targetPort"]
    assert target in container_ports or target in container_ports.values()
    web_port = {e["name"]: e.get("value") for e in container["env"]}["AGENTWATCH_WEB_PORT"]
    assert int(web_port) == container_ports[endpoint["port"]] if target in container_ports else int(web_port) == target
    assert docs[("Service", "agentwatch-worker")]["spec"]["type"] == "ClusterIP"
    # the policy ConfigMap is the example policy, and valid
    policy = docs[("ConfigMap", "agentwatch-policy")]["data"]["policy.yaml"]
    assert policy == (DEPLOY / "policy.example.yaml").read_text()
    env = {e["name"]: e for e in container["env"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert str(Path(env["AGENTWATCH_POLICY_FILE"]["value"]).parent) in mounts
    assert str(Path(env["AGENTWATCH_CONTROL_PRIVATE_KEY"]["value"]).parent) in mounts
    secret = docs[("Secret", "agentwatch-keys")]["stringData"]
    for e in env.values():
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            assert ref["name"] == "agentwatch-keys" and ref["key"] in secret
    assert load_policy(DEPLOY / "policy.example.yaml").version
