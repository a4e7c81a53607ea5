# rtts-gateway: the sidecar, with the embedded local engine (works with no cloud account).
#   docker build -t rtts-gateway .
#   docker run --rm -p 127.0.0.1:8765:8765 -p 127.0.0.1:8766:8766 rtts-gateway --host 0.0.0.0
# Build stage: compiles the relay's fast path (gateway/_relay.c) into a wheel, since the slim
# image has no C compiler; without it the gateway would relay on its pure-Python path.
FROM python:3.11.11-bookworm AS build
WORKDIR /src
COPY pyproject.toml setup.py README.md LICENSE ./
COPY rtts_plugin rtts_plugin
COPY gateway gateway
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/rtts
COPY requirements-gateway.txt ./
COPY scripts/install-gateway.sh scripts/
COPY --from=build /wheels /wheels
# The import fails the build if the wheel came without the compiled relay.
RUN sh scripts/install-gateway.sh pip /wheels/*.whl \
    && python -c "import gateway._relay" \
    && rm -rf /wheels \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin rtts

USER 10001
EXPOSE 8765 8766
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8766/healthz', timeout=2)"]
ENTRYPOINT ["rtts-gateway"]
# In a pod the bot reaches the gateway on 127.0.0.1; only the metrics port faces the network.
CMD ["--metrics-host", "0.0.0.0"]
