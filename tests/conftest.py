"""Shared pytest fixtures.

Kafka: ``kafka_bootstrap`` gives tests a real broker, from the first source
that is available:

1. ``AGENTWATCH_TEST_BOOTSTRAP`` (an existing broker, e.g. in CI),
2. testcontainers' Kafka, when a Docker engine answers,
3. the project's own launcher (``deploy/broker.py``): Apache Kafka from Maven
   jars cached in the default cache dir, so only the first run downloads.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest

from deploy.broker import BrokerInfo, running_broker


def _docker_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=2).ping()
    except Exception:  # noqa: BLE001 - no client, no socket, no engine: all mean "no"
        return False
    return True


def _say(config: pytest.Config, message: str) -> None:
    # Shown even under output capture: which broker a run used matters when reading results.
    capture = config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print(f"\n[kafka] {message}")


@pytest.fixture(scope="session")
def local_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerInfo]:
    """A broker started by deploy/broker.py for this session, stopped at its end."""
    with running_broker(tmp_path_factory.mktemp("kafka")) as info:
        yield info


@pytest.fixture(scope="session")
def kafka_bootstrap(request: pytest.FixtureRequest) -> Iterator[str]:
    """bootstrap_servers of a real Kafka broker (see the module docstring for the order)."""
    given = os.environ.get("AGENTWATCH_TEST_BOOTSTRAP")
    if given:
        _say(request.config, f"using AGENTWATCH_TEST_BOOTSTRAP={given}")
        yield given
    elif _docker_answers():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer() as container:
            bootstrap = container.get_bootstrap_server()
            _say(request.config, f"using a testcontainers Kafka at {bootstrap}")
            yield bootstrap
    else:
        info: BrokerInfo = request.getfixturevalue("local_broker")
        _say(request.config, f"using a local Kafka {info.bootstrap} (pid {info.pid}, log {info.log_path})")
        yield info.bootstrap
