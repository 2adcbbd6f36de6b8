# The agentwatch worker (and CLI). Build: docker build -t agentwatch .
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY agentwatch_client agentwatch_client
COPY schemas schemas
COPY detectors detectors
COPY streams streams
COPY sinks sinks
COPY deploy deploy
RUN pip install --no-cache-dir --prefix=/install ".[server]"

FROM python:3.11-slim
# never root: the worker needs no privileges, and a compromised parser must not get them
RUN useradd --system --uid 10001 --home-dir /var/lib/agentwatch --create-home agentwatch
COPY --from=build /install /usr/local
ENV AGENTWATCH_HOME=/var/lib/agentwatch \
    AGENTWATCH_WEB_HOST=0.0.0.0 \
    AGENTWATCH_WEB_PORT=6066 \
    PYTHONUNBUFFERED=1
USER agentwatch
WORKDIR /var/lib/agentwatch
VOLUME ["/var/lib/agentwatch"]
EXPOSE 6066
# /healthz answers once the worker serves, and reports a stalled stage as unhealthy
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('AGENTWATCH_WEB_PORT', '6066'), timeout=4)"]
ENTRYPOINT ["agentwatch"]
CMD ["worker"]
