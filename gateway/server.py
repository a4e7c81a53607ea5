"""The gateway: the rtts front door, the upstream (Huawei Cloud or the local engine), limits.

Clients connect to ``ws://HOST:PORT/v1/{project_id}/rtts`` exactly as they would to Huawei
Cloud. During the client's handshake the gateway checks the path, the project and the
optional gateway key, enforces the session limit, and opens the upstream connection with
its own credentials; only if that succeeds is the client accepted, so the client sees the
upstream's handshake outcome (502/504 for network failures). Then every frame is relayed
unchanged (:mod:`gateway.relay`) and metered. With the local backend the upstream is the
embedded engine, served on an internal loopback port, so both backends are relayed and
metered by the same code.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import hmac
import json
import logging
import re
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Final
from urllib.parse import urlsplit

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.frames import CloseCode
from websockets.http11 import Request, Response
from websockets.protocol import State

from gateway.engine.session import EngineLimits, LocalEngine
from gateway.engine.worker import SynthesisWorker
from gateway.errors import GatewayError
from gateway.http import build_app, start_http
from gateway.metrics import GatewayMetrics
from gateway.relay import BAD_GATEWAY, SessionMeter, relay
from gateway.settings import GatewaySettings
from rtts_plugin.auth import HandshakeAuth, NoAuth
from rtts_plugin.errors import AuthenticationError, HandshakeError, RttsError, RttsTimeoutError
from rtts_plugin.logs import websockets_logger
from rtts_plugin.transport import open_authenticated

logger = logging.getLogger(__name__)

RTTS_PATH: Final = re.compile(r"^/v1/(?P<project_id>[A-Za-z0-9_-]{1,128})/rtts/?$")
# How long clients get to answer our close frame at shutdown before their socket is dropped.
_CLOSE_GRACE_SECONDS: Final = 1.0
_WATCHDOG_PERIOD: Final = 0.25
# The upstream normally ends an idle session itself (FATAL_ERROR SIS.0304); this is a backstop.
_START_GRACE_SECONDS: Final = 5.0
_READY_CACHE_SECONDS: Final = 5.0
_TRIM_INTERVAL_SECONDS: Final = 10.0


def project_id_of(path: str) -> str | None:
    """The project id in an rtts request path, or ``None`` if the path is not an rtts one."""
    # The request target is a path and maybe a query; never parse it as a URL ("//[" is not one).
    match = RTTS_PATH.match(path.partition("?")[0])
    return match["project_id"] if match else None


def json_response(status: int, code: str, message: str) -> Response:
    """An HTTP error response with Huawei's ``error_code``/``error_msg`` body."""
    body = json.dumps({"error_code": code, "error_msg": message}).encode()
    headers = Headers({"Content-Type": "application/json", "Content-Length": str(len(body))})
    return Response(status, HTTPStatus(status).phrase, headers, body)


@dataclass(eq=False)
class _Session:
    client: ServerConnection
    upstream: ClientConnection
    meter: SessionMeter
    opened: float = field(default_factory=time.monotonic)


class Gateway:
    """Front door, relay bookkeeping, watchdog and readiness of one gateway."""

    def __init__(self, settings: GatewaySettings, upstream_base: str, auth: HandshakeAuth) -> None:
        self.settings = settings
        self.backend = settings.resolved_backend
        self.metrics = GatewayMetrics(self.backend, settings.max_sessions)
        self._upstream_base = upstream_base
        self._auth = auth
        self._allowed = settings.project_allow_list
        self._key = (
            settings.gateway_key.get_secret_value().encode() if settings.gateway_key else None
        )
        self._ssl = _tls_context(settings)
        self._pending: dict[ServerConnection, _Session] = {}
        self.sessions: dict[ServerConnection, _Session] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self.draining = False
        self._ready_cache: tuple[float, bool, str] = (0.0, False, "")

    @property
    def active_sessions(self) -> int:
        """Sessions admitted and not yet finished (including those still handshaking)."""
        return len(self.sessions) + len(self._pending)

    def upstream_url(self, project_id: str) -> str:
        """Where a client's project is relayed to."""
        return f"{self._upstream_base}/v1/{project_id}/rtts"

    async def wait_idle(self) -> None:
        """Return once no session is in progress."""
        await self._idle.wait()

    # -- handshake -------------------------------------------------------------------------

    async def process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        """Admit the client only if the upstream accepts the session too."""
        project_id = project_id_of(request.path)
        if project_id is None:
            return json_response(
                404, "APIG.0101", "API not found: connect to /v1/{project_id}/rtts"
            )
        meter = SessionMeter(self.metrics, project_id)
        refusal = self._refusal(project_id, request)
        if refusal is not None:
            meter.fail("rejected", refusal.status_code)
            meter.finish()
            return refusal
        started = time.monotonic()
        try:
            upstream = await open_authenticated(
                self.upstream_url(project_id),
                self._auth,
                extra_headers=self.settings.extra_headers(),
                connect_timeout=self.settings.upstream_connect_timeout,
                ssl=self._ssl,
            )
        except RttsError as exc:
            response, code = _handshake_failure(exc)
            meter.fail("handshake_failed", code)
            meter.finish()
            logger.warning("upstream handshake failed for project %s: %s", project_id, exc)
            return response
        meter.upstream_connect_s = time.monotonic() - started
        self._pending[connection] = _Session(connection, upstream, meter)
        self._idle.clear()
        return None

    def _refusal(self, project_id: str, request: Request) -> Response | None:
        if self.draining:
            return json_response(503, "", "gateway is shutting down; connect to another instance")
        if self._key is not None:
            scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                presented.strip().encode(), self._key
            ):
                return json_response(
                    401,
                    "APIG.0301",
                    "gateway key missing or wrong: send Authorization: Bearer <key>",
                )
        if self._allowed is not None and project_id not in self._allowed:
            return json_response(403, "", f"project {project_id!r} is not served by this gateway")
        if self.active_sessions >= self.settings.max_sessions:
            return json_response(
                429,
                "SIS.0312",
                f"concurrency limit of this gateway reached ({self.settings.max_sessions} "
                "sessions); retry later",
            )
        return None

    # -- sessions --------------------------------------------------------------------------

    async def handle(self, client: ServerConnection) -> None:
        """Relay one admitted session until both sides are closed."""
        session = self._pending.pop(client, None)
        if session is None:  # reaped by the watchdog: nothing to relay to
            await client.close(CloseCode.INTERNAL_ERROR, "upstream connection was lost")
            return
        self.sessions[client] = session
        self.metrics.active_sessions.labels(self.backend).set(self.active_sessions)
        try:
            await relay(client, session.upstream, session.meter)
        finally:
            if session.upstream.state is not State.CLOSED:
                session.upstream.transport.abort()
            del self.sessions[client]
            session.meter.finish()
            self.metrics.active_sessions.labels(self.backend).set(self.active_sessions)
            if not self.active_sessions:
                self._idle.set()
                _release_free_memory()

    async def watchdog(self) -> None:
        """Close sessions gone quiet or running too long, and upstreams of failed handshakes.

        Also keeps the ``rtts_gateway_ready`` gauge current, so dashboards and alerts see
        readiness even when nothing polls ``/readyz``.
        """
        settings = self.settings
        while True:
            await asyncio.sleep(_WATCHDOG_PERIOD)
            now = time.monotonic()
            if now - self._ready_cache[0] >= _READY_CACHE_SECONDS:
                ready, _ = await self.readiness()
                self.metrics.ready.labels(self.backend).set(1 if ready else 0)
            for client, session in list(self._pending.items()):
                if (
                    client.state is State.CLOSED
                    or now - session.opened > settings.upstream_connect_timeout + 10
                ):
                    self._pending.pop(client, None)
                    session.upstream.transport.abort()
                    if not self.active_sessions:
                        self._idle.set()
            for session in list(self.sessions.values()):
                meter = session.meter
                if meter.state.finished:
                    continue
                if now - session.opened > settings.max_session_seconds:
                    reason = f"session longer than {settings.max_session_seconds:g} s"
                elif (
                    meter.start_sent is None
                    and now - session.opened > settings.idle_timeout + _START_GRACE_SECONDS
                ):
                    reason = "no START from the client"
                elif (
                    meter.start_sent is not None
                    and now - meter.last_upstream > settings.upstream_gap_timeout
                ):
                    reason = f"upstream silent for {settings.upstream_gap_timeout:g} s"
                else:
                    continue
                meter.fail("timeout", "timeout")
                logger.warning("closing session %s: %s", meter.trace_id or "(no trace_id)", reason)
                asyncio.get_running_loop().create_task(_close_both(session, reason))

    # -- readiness -------------------------------------------------------------------------

    async def readiness(self) -> tuple[bool, str]:
        """Whether new sessions can be served, and why not (cached for a few seconds)."""
        if self.draining:
            return False, "draining"
        checked, ready, detail = self._ready_cache
        if time.monotonic() - checked < _READY_CACHE_SECONDS:
            return ready, detail
        parts = urlsplit(self._upstream_base)
        port = parts.port or (443 if parts.scheme == "wss" else 80)
        try:
            async with asyncio.timeout(2.0):
                _, writer = await asyncio.open_connection(parts.hostname, port)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            ready, detail = True, f"{self.backend} upstream reachable"
        except (OSError, TimeoutError) as exc:
            ready, detail = (
                False,
                f"upstream {parts.hostname}:{port} unreachable ({exc.__class__.__name__})",
            )
        self._ready_cache = (time.monotonic(), ready, detail)
        return ready, detail

    async def drain(self, server: Server, seconds: float) -> None:
        """Stop accepting, let sessions finish for up to ``seconds``, then close the rest."""
        self.draining = True
        server.close(close_connections=False)
        try:
            async with asyncio.timeout(seconds):
                await self.wait_idle()
        except TimeoutError:
            logger.warning(
                "%d sessions still active after the %g s drain; closing them",
                self.active_sessions,
                seconds,
            )
        for session in self.sessions.values():
            session.meter.fail("timeout", "draining")  # cut by the shutdown, not by a peer
        closing = [
            asyncio.create_task(connection.close(CloseCode.GOING_AWAY, "gateway shutting down"))
            for connection in server.connections
        ]
        if closing:
            await asyncio.wait(closing, timeout=_CLOSE_GRACE_SECONDS)
        for connection in server.all_connections:
            connection.transport.abort()  # finished or unresponsive: nothing left to send
        for session in [*self._pending.values(), *self.sessions.values()]:
            session.upstream.transport.abort()
        await server.wait_closed()


_last_trim = 0.0


def _release_free_memory() -> None:
    """Give freed heap back to the OS once idle, so RSS falls after a burst (glibc only).

    At most every 10 s: a gateway that is idle between single calls should not pay for it
    after every one.
    """
    global _last_trim  # noqa: PLW0603 (one process-wide heap)
    now = time.monotonic()
    if _LIBC is not None and now - _last_trim >= _TRIM_INTERVAL_SECONDS:
        _last_trim = now
        _LIBC.malloc_trim(0)


def _load_libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC: Final = _load_libc()


async def _close_both(session: _Session, reason: str) -> None:
    await asyncio.gather(
        session.client.close(BAD_GATEWAY, reason[:100]),
        session.upstream.close(CloseCode.GOING_AWAY, reason[:100]),
        return_exceptions=True,
    )


def _handshake_failure(exc: RttsError) -> tuple[Response, str | int]:
    """The client's answer when the upstream refused or could not be reached."""
    if isinstance(exc, HandshakeError) and exc.status:
        return json_response(
            exc.status, exc.error_code, f"upstream refused: {exc.message}"[:300]
        ), exc.error_code or exc.status
    if isinstance(exc, RttsTimeoutError):
        return json_response(
            504, "", f"upstream did not answer within {exc.seconds:g} s"
        ), "timeout"
    if isinstance(exc, AuthenticationError):
        return json_response(
            502, "", f"gateway could not authenticate upstream: {exc}"[:300]
        ), "network"
    return json_response(502, "", f"upstream unreachable: {exc}"[:300]), "network"


def _tls_context(settings: GatewaySettings) -> ssl.SSLContext | None:
    if settings.verify_tls and settings.ca_file is None:
        return None  # websockets' default: system CAs, hostname checked
    context = ssl.create_default_context(cafile=str(settings.ca_file) if settings.ca_file else None)
    if not settings.verify_tls:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


@dataclass
class RunningGateway:
    """A gateway that is serving: where it listens, and the objects behind it."""

    gateway: Gateway
    server: Server
    host: str
    port: int
    metrics_port: int
    engine: LocalEngine | None = None

    @property
    def backend(self) -> str:
        """``local`` or ``huawei``."""
        return self.gateway.backend

    def url(self, project_id: str = "local") -> str:
        """The rtts URL for a project on this gateway."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ws://{host}:{self.port}/v1/{project_id}/rtts"

    @property
    def metrics_url(self) -> str:
        """Base URL of /metrics, /healthz and /readyz."""
        return f"http://{self.gateway.settings.metrics_host}:{self.metrics_port}"


@asynccontextmanager
async def _local_engine(settings: GatewaySettings) -> AsyncIterator[tuple[str, LocalEngine | None]]:
    """For the local backend, the engine on an internal loopback port; else nothing."""
    if settings.resolved_backend != "local":
        yield "", None
        return
    worker = SynthesisWorker(chunk_ms=settings.chunk_ms)
    await worker.start()
    engine = LocalEngine(worker, EngineLimits(idle_timeout=settings.idle_timeout))
    server = await serve(
        engine.handle,
        "127.0.0.1",
        0,
        compression=None,
        max_size=settings.max_message_bytes,
        server_header="rtts-local-engine",
        logger=websockets_logger("gateway.engine.websockets"),
    )
    try:
        yield f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}", engine
    finally:
        server.close()
        await server.wait_closed()
        worker.close()


@asynccontextmanager
async def url_or_local_engine(url: str | None, project_id: str = "local") -> AsyncIterator[str]:
    """``url`` if given; else a local-engine gateway on a free loopback port, while in use.

    For examples, demos and tests that should run with no cloud account.
    """
    if url:
        yield url
        return
    async with run_gateway(GatewaySettings(port=0, metrics_port=0)) as gateway:
        yield gateway.url(project_id)


@asynccontextmanager
async def run_gateway(settings: GatewaySettings) -> AsyncIterator[RunningGateway]:
    """Start the gateway (and its engine or upstream), yield it while it serves, then drain."""
    async with _local_engine(settings) as (engine_base, engine):
        upstream_base = engine_base or settings.upstream_base
        auth: HandshakeAuth = NoAuth() if engine is not None else settings.build_auth()
        gateway = Gateway(settings, upstream_base, auth)
        runner, metrics_port = await start_http(
            build_app(gateway.metrics, gateway.readiness),
            settings.metrics_host,
            settings.metrics_port,
        )
        try:
            server = await serve(
                gateway.handle,
                settings.host,
                settings.port,
                process_request=gateway.process_request,
                compression=None,  # audio does not compress; deflate would only cost CPU
                max_size=settings.max_message_bytes,
                open_timeout=settings.upstream_connect_timeout + 5,
                server_header="rtts-gateway",
                logger=websockets_logger("gateway.websockets"),
            )
        except OSError as exc:
            await runner.cleanup()
            raise GatewayError(
                f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}"
            ) from None
        watchdog = asyncio.create_task(gateway.watchdog())
        sockname = server.sockets[0].getsockname()
        try:
            yield RunningGateway(gateway, server, sockname[0], sockname[1], metrics_port, engine)
        finally:
            try:
                await gateway.drain(server, settings.drain_timeout)
            finally:
                watchdog.cancel()
                await runner.cleanup()
