"""SASL and TLS for every Kafka client agentwatch makes, from one place.

``kafka_options(settings)`` is the keyword arguments aiokafka's producer,
consumer and admin client take (``security_protocol``, ``sasl_*``,
``ssl_context``); ``faust_credentials(settings)`` is the same for the worker's
faust app. The TLS context verifies the broker against ``kafka_ssl_cafile``
(or the system CAs), checks the host name unless told not to, and presents a
client certificate for mutual TLS when one is configured.
"""

from __future__ import annotations

import ssl
from typing import Any

from schemas.errors import ConfigError
from streams.settings import Settings


def ssl_context(settings: Settings) -> ssl.SSLContext:
    """The TLS context of SSL/SASL_SSL connections (a bad file names its setting)."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if settings.kafka_ssl_cafile is not None:
        try:
            ctx.load_verify_locations(cafile=str(settings.kafka_ssl_cafile))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError("AGENTWATCH_KAFKA_SSL_CAFILE", f"{settings.kafka_ssl_cafile}: {exc}") from None
    ctx.check_hostname = settings.kafka_ssl_check_hostname
    if settings.kafka_ssl_certfile is not None:
        password = settings.kafka_ssl_key_password.get_secret_value() or None
        try:
            ctx.load_cert_chain(str(settings.kafka_ssl_certfile),
                                str(settings.kafka_ssl_keyfile) if settings.kafka_ssl_keyfile else None, password)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError("AGENTWATCH_KAFKA_SSL_CERTFILE", f"client certificate/key not loadable: {exc}") from None
    elif settings.kafka_ssl_keyfile is not None:
        raise ConfigError("AGENTWATCH_KAFKA_SSL_KEYFILE", "set together with AGENTWATCH_KAFKA_SSL_CERTFILE")
    return ctx


def kafka_options(settings: Settings) -> dict[str, Any]:
    """aiokafka keyword arguments for the configured security (empty for PLAINTEXT)."""
    protocol = settings.kafka_security_protocol
    if protocol == "PLAINTEXT":
        return {}
    out: dict[str, Any] = {"security_protocol": protocol}
    if protocol in ("SSL", "SASL_SSL"):
        out["ssl_context"] = ssl_context(settings)
    if protocol.startswith("SASL"):
        if not settings.kafka_sasl_username:
            raise ConfigError("AGENTWATCH_KAFKA_SASL_USERNAME", f"required with {protocol}")
        out.update(sasl_mechanism=settings.kafka_sasl_mechanism, sasl_plain_username=settings.kafka_sasl_username,
                   sasl_plain_password=settings.kafka_sasl_password.get_secret_value())
    return out


def faust_credentials(settings: Settings) -> Any:
    """``broker_credentials`` for faust.App (None for PLAINTEXT)."""
    import faust

    protocol = settings.kafka_security_protocol
    if protocol == "PLAINTEXT":
        return None
    if protocol == "SSL":
        return faust.SSLCredentials(ssl_context(settings))
    opts = kafka_options(settings)
    creds = faust.SASLCredentials(username=opts["sasl_plain_username"], password=opts["sasl_plain_password"],
                                  ssl_context=opts.get("ssl_context"), mechanism=opts["sasl_mechanism"])
    return creds
