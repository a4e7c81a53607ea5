"""In-process stand-ins for what cannot run here: Huawei Cloud's rtts endpoint and IAM.

``FakeCloud`` is a real WebSocket server on 127.0.0.1 that speaks the documented rtts
protocol (START → binary audio / RESULT → END, or ERROR / FATAL_ERROR) and can be scripted
per connection to misbehave the ways only the cloud does: refuse the handshake with an
HTTP status, stall, close without END, send FATAL_ERROR mid-stream. It can check
``X-Auth-Token`` or verify AK/SK signatures with Huawei's own SDK signer from the request
it actually received. ``FakeIam`` is a real HTTP server answering ``POST /v3/auth/tokens``.
"""

from __future__ import annotations

import asyncio
import json
import math
import ssl
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http import HTTPStatus

from aiohttp import web
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response


def tone_pcm(seconds: float, rate: int, hz: float = 220.0) -> bytes:
    """Deterministic 16-bit PCM, so what the client got can be compared byte for byte."""
    count = int(seconds * rate)
    return b"".join(
        int(8000 * math.sin(2 * math.pi * hz * i / rate)).to_bytes(2, "little", signed=True)
        for i in range(count)
    )


@dataclass
class ConnectionLog:
    """What one connection to the fake did."""

    path: str
    headers: Headers
    start: dict[str, object] | None = None
    frames_sent: int = 0
    frames_planned: int = 0
    client_closed_early: bool = False
    trace_id: str = field(default_factory=lambda: str(uuid.uuid4()))


Behaviour = Callable[[ServerConnection, ConnectionLog], Awaitable[None]]


def json_response(status: int, code: str, message: str, retry_after: str | None = None) -> Response:
    body = json.dumps({"error_code": code, "error_msg": message}).encode()
    headers = Headers({"Content-Type": "application/json"})
    if retry_after is not None:
        headers["Retry-After"] = retry_after
    return Response(status, HTTPStatus(status).phrase, headers, body)


def speak(
    audio: bytes,
    frame_bytes: int = 1920,
    interval: float = 0.0,
    words: list[dict[str, object]] | None = None,
) -> Behaviour:
    """A normal session: START, the audio in frames (paced if ``interval``), RESULT, END."""

    async def behaviour(ws: ServerConnection, log: ConnectionLog) -> None:
        frames = [audio[i : i + frame_bytes] for i in range(0, len(audio), frame_bytes)]
        log.frames_planned = len(frames)
        await ws.send(json.dumps({"resp_type": "START", "trace_id": log.trace_id}))
        for frame in frames:
            await ws.send(frame)
            log.frames_sent += 1
            if interval:
                await asyncio.sleep(interval)
        if words:
            await ws.send(
                json.dumps({"resp_type": "RESULT", "trace_id": log.trace_id, "result": words})
            )
        await ws.send(
            json.dumps({"resp_type": "END", "trace_id": log.trace_id, "reason": "NORMAL"})
        )

    return behaviour


def fail(resp_type: str, code: str, message: str, audio_first: bytes = b"") -> Behaviour:
    """START, optional audio, then ERROR or FATAL_ERROR and a close."""

    async def behaviour(ws: ServerConnection, log: ConnectionLog) -> None:
        await ws.send(json.dumps({"resp_type": "START", "trace_id": log.trace_id}))
        if audio_first:
            await ws.send(audio_first)
            log.frames_sent += 1
        await ws.send(
            json.dumps(
                {
                    "resp_type": resp_type,
                    "trace_id": log.trace_id,
                    "error_code": code,
                    "error_msg": message,
                }
            )
        )

    return behaviour


def stall(after_start: bool = False, audio_first: bytes = b"") -> Behaviour:
    """Go quiet (before or after START, optionally after some audio) until the client leaves."""

    async def behaviour(ws: ServerConnection, log: ConnectionLog) -> None:
        if after_start:
            await ws.send(json.dumps({"resp_type": "START", "trace_id": log.trace_id}))
        if audio_first:
            await ws.send(audio_first)
            log.frames_sent += 1
        await ws.wait_closed()
        log.client_closed_early = True  # only the client can have closed it

    return behaviour


def hang_up(audio_first: bytes = b"\x00\x00") -> Behaviour:
    """START, some audio, then a normal close with no END."""

    async def behaviour(ws: ServerConnection, log: ConnectionLog) -> None:
        await ws.send(json.dumps({"resp_type": "START", "trace_id": log.trace_id}))
        await ws.send(audio_first)
        log.frames_sent += 1

    return behaviour


class FakeCloud:
    """A scriptable rtts server: each connection takes the next scripted step, else the default."""

    def __init__(self, default: Behaviour | None = None) -> None:
        self.default = default or speak(tone_pcm(0.5, 16000))
        self.handshakes: deque[Response | None] = deque()  # None: accept
        self.behaviours: deque[Behaviour] = deque()
        self.connections: list[ConnectionLog] = []
        self.requests: list[Request] = []
        self.requested_at: list[float] = []  # time.monotonic() of each upgrade request
        self.sockets: list[ServerConnection] = []
        self.check_request: Callable[[Request], Response | None] | None = None
        self.handshake_delay = 0.0  # seconds each upgrade is held, as a slow cloud would
        self.url = ""

    def refuse_next(
        self,
        status: int,
        code: str = "",
        message: str = "refused",
        times: int = 1,
        *,
        retry_after: str | None = None,
    ) -> None:
        for _ in range(times):
            self.handshakes.append(json_response(status, code, message, retry_after))

    def then(self, *behaviours: Behaviour) -> None:
        self.behaviours.extend(behaviours)

    async def _process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        self.requests.append(request)
        self.requested_at.append(time.monotonic())
        if self.handshake_delay:
            await asyncio.sleep(self.handshake_delay)
        if self.handshakes:
            scripted = self.handshakes.popleft()
            if scripted is not None:
                return scripted
        if self.check_request is not None:
            return self.check_request(request)
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        log = ConnectionLog(ws.request.path, ws.request.headers)  # type: ignore[union-attr]
        self.connections.append(log)
        self.sockets.append(ws)
        behaviour = self.behaviours.popleft() if self.behaviours else self.default
        try:
            log.start = json.loads(await ws.recv())
            await behaviour(ws, log)
        except ConnectionClosed:
            log.client_closed_early = True

    @asynccontextmanager
    async def running(self, tls: ssl.SSLContext | None = None) -> AsyncIterator[FakeCloud]:
        """Serve on a free loopback port (wss:// with ``tls``, as the real cloud)."""
        async with serve(
            self._handle,
            "127.0.0.1",
            0,
            process_request=self._process_request,
            compression=None,
            max_size=None,
            ssl=tls,
        ) as server:
            port = server.sockets[0].getsockname()[1]
            scheme = "wss" if tls else "ws"
            self.url = f"{scheme}://127.0.0.1:{port}/v1/0123456789abcdef/rtts"
            yield self


class FakeIam:
    """``POST /v3/auth/tokens`` on loopback: checks the password body, returns X-Subject-Token."""

    def __init__(
        self,
        username: str,
        password: str,
        domain: str,
        delay: float = 0.0,
        lifetime_s: float = 86400,
    ) -> None:
        self.expected = (username, password, domain)
        self.delay = delay
        self.lifetime_s = lifetime_s
        self.issued: list[str] = []
        self.bodies: list[dict[str, object]] = []
        self.endpoint = ""
        self.unavailable: list[int] = []
        """Statuses to answer the next requests with (503, 429: IAM busy), in order."""

    async def _tokens(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.bodies.append(body)
        await asyncio.sleep(self.delay)
        if self.unavailable:
            error = {"code": "IAM.0000", "message": "service busy, try again later"}
            return web.json_response({"error": error}, status=self.unavailable.pop(0))
        user = body["auth"]["identity"]["password"]["user"]
        if (user["name"], user["password"], user["domain"]["name"]) != self.expected:
            return web.json_response(
                {
                    "error": {
                        "code": "IAM.0004",
                        "message": "The username or password is incorrect.",
                    }
                },
                status=401,
            )
        token = f"token-{len(self.issued) + 1}"
        self.issued.append(token)
        expires = datetime.now(UTC) + timedelta(seconds=self.lifetime_s)
        return web.json_response(
            {"token": {"expires_at": expires.strftime("%Y-%m-%dT%H:%M:%S.%fZ")}},
            status=201,
            headers={"X-Subject-Token": token},
        )

    @asynccontextmanager
    async def running(self) -> AsyncIterator[FakeIam]:
        app = web.Application()
        app.router.add_post("/v3/auth/tokens", self._tokens)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.endpoint = f"http://127.0.0.1:{port}"
        try:
            yield self
        finally:
            await runner.cleanup()


def drip(frames: int, interval: float, *, end: bool = True) -> Behaviour:
    """START, then one byte of audio per frame, slowly, then END (or, without ``end``,
    silence until the client leaves)."""

    async def behaviour(ws: ServerConnection, log: ConnectionLog) -> None:
        log.frames_planned = frames
        await ws.send(json.dumps({"resp_type": "START", "trace_id": log.trace_id}))
        for _ in range(frames):
            await ws.send(b"\x01")
            log.frames_sent += 1
            await asyncio.sleep(interval)
        if not end:
            await ws.wait_closed()
            log.client_closed_early = True  # only the client can have closed it
            return
        await ws.send(
            json.dumps({"resp_type": "END", "trace_id": log.trace_id, "reason": "NORMAL"})
        )

    return behaviour


def raw(*frames: str | bytes) -> Behaviour:
    """Send exactly these frames, then close: for malformed and out-of-order messages."""

    async def behaviour(ws: ServerConnection, log: ConnectionLog) -> None:
        log.frames_planned = len(frames)
        for frame in frames:
            await ws.send(frame.replace("TRACE", log.trace_id) if isinstance(frame, str) else frame)
            log.frames_sent += 1

    return behaviour
