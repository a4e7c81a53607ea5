"""The gateway's WebSocket server: routing, handshake checks and graceful shutdown.

Clients connect to ``ws://HOST:PORT/v1/{project_id}/rtts`` exactly as they would to Huawei
Cloud. Other paths are refused at the handshake with 404 and APIG.0101, as the cloud's API
gateway does. The backend that serves a session is chosen by configuration.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from http import HTTPStatus
from typing import Final
from urllib.parse import urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.frames import CloseCode
from websockets.http11 import Request, Response

from gateway.engine.session import EngineLimits, LocalEngine
from gateway.engine.worker import SynthesisWorker
from gateway.settings import GatewaySettings

logger = logging.getLogger(__name__)

# How long clients get to answer our close frame at shutdown before their socket is dropped.
_CLOSE_GRACE_SECONDS: Final = 1.0
RTTS_PATH: Final = re.compile(r"^/v1/(?P<project_id>[A-Za-z0-9_-]{1,128})/rtts/?$")


def project_id_of(path: str) -> str | None:
    """The project id in an rtts request path, or ``None`` if the path is not an rtts one."""
    match = RTTS_PATH.match(urlsplit(path).path)
    return match["project_id"] if match else None


def _json_response(status: HTTPStatus, code: str, message: str) -> Response:
    body = json.dumps({"error_code": code, "error_msg": message}).encode()
    headers = Headers({"Content-Type": "application/json", "Content-Length": str(len(body))})
    return Response(status.value, status.phrase, headers, body)


@dataclass
class RunningGateway:
    """A gateway that is serving: where it listens, and the objects behind it."""

    server: Server
    engine: LocalEngine
    host: str
    port: int

    def url(self, project_id: str = "local") -> str:
        """The rtts URL for a project on this gateway."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ws://{host}:{self.port}/v1/{project_id}/rtts"


@asynccontextmanager
async def run_gateway(settings: GatewaySettings) -> AsyncIterator[RunningGateway]:
    """Start the gateway, yield it while it serves, then drain and stop it."""
    worker = SynthesisWorker(chunk_ms=settings.chunk_ms)
    await worker.start()
    engine = LocalEngine(
        worker, EngineLimits(idle_timeout=settings.idle_timeout, max_sessions=settings.max_sessions)
    )

    def check_request(connection: ServerConnection, request: Request) -> Response | None:
        if project_id_of(request.path) is None:
            return _json_response(
                HTTPStatus.NOT_FOUND,
                "APIG.0101",
                "API not found: connect to /v1/{project_id}/rtts",
            )
        return None

    server = await serve(
        engine.handle,
        settings.host,
        settings.port,
        process_request=check_request,
        compression=None,  # audio does not compress; deflate would only cost CPU
        max_size=settings.max_message_bytes,
        server_header="rtts-gateway",
    )
    sockname = server.sockets[0].getsockname() if server.sockets else (settings.host, settings.port)
    running = RunningGateway(server, engine, sockname[0], sockname[1])
    try:
        yield running
    finally:
        await _drain(server, engine, settings.drain_timeout)
        worker.close()


async def _drain(server: Server, engine: LocalEngine, drain_seconds: float) -> None:
    """Stop accepting, let sessions in progress finish for up to ``drain_seconds``, then close.

    Waits on sessions, not sockets: a client that never closes its side of a finished
    connection must not hold up shutdown.
    """
    server.close(close_connections=False)
    try:
        async with asyncio.timeout(drain_seconds):
            await engine.wait_idle()
    except TimeoutError:
        logger.warning(
            "%d sessions still active after the %g s drain; closing them",
            engine.active_sessions,
            drain_seconds,
        )
    closing = [
        asyncio.create_task(connection.close(CloseCode.GOING_AWAY, "gateway shutting down"))
        for connection in server.connections
    ]
    if closing:
        await asyncio.wait(closing, timeout=_CLOSE_GRACE_SECONDS)
    for connection in server.all_connections:
        connection.transport.abort()  # finished or unresponsive: nothing left to send
    await server.wait_closed()
