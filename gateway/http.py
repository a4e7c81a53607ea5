"""The gateway's HTTP side port: ``/metrics`` (Prometheus), ``/healthz`` and ``/readyz``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.errors import GatewayError
from gateway.metrics import GatewayMetrics

Readiness = Callable[[], Awaitable[tuple[bool, str]]]
Breakers = Callable[[], dict[str, Any]]


def build_app(
    metrics: GatewayMetrics, readiness: Readiness, breakers: Breakers = dict
) -> web.Application:
    """The aiohttp application serving the three endpoints.

    ``/readyz`` also reports each upstream's circuit breaker (``breakers``), as information:
    an open breaker does not make the gateway unready, since it still answers at once.
    """

    async def metrics_page(request: web.Request) -> web.Response:
        body = generate_latest(metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "backend": metrics.backend})

    async def readyz(request: web.Request) -> web.Response:
        ready, detail = await readiness()
        metrics.ready.labels(metrics.backend).set(1 if ready else 0)
        return web.json_response(
            {"ready": ready, "backend": metrics.backend, "detail": detail, "upstreams": breakers()},
            status=200 if ready else 503,
        )

    app = web.Application()
    app.router.add_get("/metrics", metrics_page)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


async def start_http(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Serve ``app`` on ``host:port`` (0: the OS chooses); returns the runner and the port."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise GatewayError(
            f"cannot listen on {host}:{port} for /metrics: {exc.strerror or exc} (choose another "
            "with --metrics-host/--metrics-port, or RTTS_GATEWAY_METRICS_HOST/_PORT; port 0: any)"
        ) from None
    server = site._server  # aiohttp keeps the listening sockets here
    sockets = getattr(server, "sockets", None) or []
    return runner, sockets[0].getsockname()[1] if sockets else port
