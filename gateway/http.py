"""The gateway's HTTP side port: ``/metrics`` (Prometheus), ``/healthz`` and ``/readyz``.

The port serves a scraper and the kubelet's probes, which send small requests in one go,
but in Kubernetes it listens on every address: so what it holds is bounded. At most
:data:`SIDE_PORT_CONNECTIONS` connections are open; at that limit a new one takes the place
of the one quiet longest (a slow or idle client, never a probe in the middle of its
request), so no number of stalled connections shuts the probes out. A request head is at
most :data:`HEADER_LINE_BYTES` a line and :data:`HEADER_LINES` lines (else 400).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, Final, cast

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


SIDE_PORT_CONNECTIONS: Final = 32
"""Connections open at once on the side port."""
HEADER_LINE_BYTES: Final = 4096
"""Longest request line or header line on the side port."""
HEADER_LINES: Final = 32
"""Most header lines in a side-port request."""
_IDLE_SECONDS: Final = 75.0  # between keep-alive requests (aiohttp's default is an hour)


async def start_http(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Serve ``app`` on ``host:port`` (0: the OS chooses); returns the runner and the port."""
    runner = web.AppRunner(
        app,
        access_log=None,
        keepalive_timeout=_IDLE_SECONDS,
        max_line_size=HEADER_LINE_BYTES,
        max_field_size=HEADER_LINE_BYTES,
        max_headers=HEADER_LINES,
    )
    await runner.setup()
    site = _BoundedSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise GatewayError(
            f"cannot listen on {host}:{port} for /metrics: {exc.strerror or exc} (choose another "
            "with --metrics-host/--metrics-port, or RTTS_GATEWAY_METRICS_HOST/_PORT; port 0: any)"
        ) from None
    return runner, site.port


class _BoundedSite(web.BaseSite):
    """aiohttp's TCP site, its connections made by :class:`_Connections`."""

    __slots__ = ("_host", "_port")

    def __init__(self, runner: web.AppRunner, host: str, port: int) -> None:
        super().__init__(runner)
        self._host, self._port = host, port  # the port the OS chose, once listening

    @property
    def name(self) -> str:
        """The site's URL (aiohttp logs it)."""
        return f"http://{self._host}:{self._port}"

    @property
    def port(self) -> int:
        """The port listened on (the OS's choice for 0, once started)."""
        return self._port

    async def start(self) -> None:
        """Listen (registered with the runner, which stops it on cleanup)."""
        await super().start()
        handlers = self._runner.server
        assert handlers is not None
        server = await asyncio.get_running_loop().create_server(
            _Connections(handlers, SIDE_PORT_CONNECTIONS), self._host, self._port
        )
        self._server = server
        self._port = int(server.sockets[0].getsockname()[1])


class _Connections:
    """The side port's connections, at most ``limit``; the quietest makes way for a new one."""

    def __init__(self, handlers: web.Server, limit: int) -> None:
        self._handlers = handlers
        self._limit = limit
        self._open: OrderedDict[_Connection, None] = OrderedDict()  # quietest first

    def __call__(self) -> _Connection:
        if len(self._open) >= self._limit:
            quietest, _ = self._open.popitem(last=False)
            quietest.drop()
        connection = _Connection(cast(asyncio.Protocol, self._handlers()), self._open)
        self._open[connection] = None
        return connection


class _Connection(asyncio.Protocol):
    """aiohttp's protocol for one connection, noting when the client last sent something."""

    def __init__(self, handler: asyncio.Protocol, open_: OrderedDict[_Connection, None]) -> None:
        self._handler = handler
        self._open = open_
        self._transport: asyncio.BaseTransport | None = None

    def drop(self) -> None:
        """Close the connection at once, to make way for a new one."""
        if self._transport is not None:
            cast(asyncio.Transport, self._transport).abort()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Hand the socket to aiohttp."""
        self._transport = transport
        self._handler.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        """The client is active: it is the last to make way."""
        if self in self._open:
            self._open.move_to_end(self)
        self._handler.data_received(data)

    def eof_received(self) -> bool | None:
        """As aiohttp answers it."""
        return self._handler.eof_received()

    def pause_writing(self) -> None:
        """As aiohttp does."""
        self._handler.pause_writing()

    def resume_writing(self) -> None:
        """As aiohttp does."""
        self._handler.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the connection, and tell aiohttp."""
        self._open.pop(self, None)
        self._handler.connection_lost(exc)
