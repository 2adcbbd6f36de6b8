#!/bin/sh
# Run a Kafka command-line tool as the compose stack's SASL client: writes the client
# properties (--command-config /tmp/client.properties) from the variables the worker
# reads (AGENTWATCH_KAFKA_*, docker-compose.yml's x-kafka-client), then runs "$@".
# Used by the kafka service's healthcheck and by kafka-init.
set -eu
umask 077  # the file holds the password
printf 'security.protocol=%s\nsasl.mechanism=%s\nsasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required username="%s" password="%s";\n' \
  "$AGENTWATCH_KAFKA_SECURITY_PROTOCOL" "$AGENTWATCH_KAFKA_SASL_MECHANISM" \
  "$AGENTWATCH_KAFKA_SASL_USERNAME" "$AGENTWATCH_KAFKA_SASL_PASSWORD" > /tmp/client.properties
exec "$@"
