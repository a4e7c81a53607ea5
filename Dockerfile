# rtts-gateway: the sidecar, with the embedded local engine (works with no cloud account).
#   docker build -t rtts-gateway .
#   docker run --rm -p 127.0.0.1:8765:8765 -p 127.0.0.1:8766:8766 rtts-gateway --host 0.0.0.0
FROM python:3.11.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/rtts
COPY pyproject.toml README.md requirements-gateway.txt ./
COPY scripts/install-gateway.sh scripts/
COPY rtts_plugin rtts_plugin
COPY gateway gateway
RUN sh scripts/install-gateway.sh pip \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin rtts

USER 10001
EXPOSE 8765 8766
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8766/healthz', timeout=2)"]
ENTRYPOINT ["rtts-gateway"]
# In a pod the bot reaches the gateway on 127.0.0.1; only the metrics port faces the network.
CMD ["--metrics-host", "0.0.0.0"]
