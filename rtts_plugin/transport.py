"""asyncio transport for one rtts synthesis: connect, send START, stream events, close.

This is the I/O layer over the sans-I/O :class:`~rtts_plugin.protocol.session.ClientSession`.
Every wait is bounded (:class:`~rtts_plugin.budget.UtteranceBudget`), the socket is always
closed on the way out (including cancellation), and failures surface as
:class:`~rtts_plugin.errors.RttsError` subclasses carrying Huawei's error code and trace id.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import json
import logging
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from ssl import SSLContext
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.protocol import State

from rtts_plugin.auth import HandshakeAuth
from rtts_plugin.budget import Timeouts, UtteranceBudget
from rtts_plugin.errors import (
    HandshakeError,
    RttsError,
    RttsTimeoutError,
    SynthesisError,
    retry_after_seconds,
)
from rtts_plugin.logs import websockets_logger
from rtts_plugin.protocol.messages import StartRequest
from rtts_plugin.protocol.session import (
    AudioReceived,
    ClientSession,
    Ended,
    Event,
    Failed,
    ProtocolViolation,
    Started,
)

logger = logging.getLogger(__name__)

_WS_LOGGER: Final = websockets_logger("rtts_plugin.websockets")
T = TypeVar("T")
# Generous: a 10000-character text is tens of KiB of JSON, audio frames are a few KiB.
MAX_SERVER_MESSAGE_BYTES = 4 * 1024 * 1024


@dataclass(slots=True)
class SynthesisTimings:
    """When each milestone of a synthesis happened, in seconds since the call began."""

    connected: float | None = None
    started: float | None = None
    first_audio: float | None = None
    ended: float | None = None
    audio_bytes: int = 0
    trace_id: str = ""
    _origin: float = field(default_factory=time.perf_counter, repr=False)

    def mark(self) -> float:
        """Seconds since the synthesis began."""
        return time.perf_counter() - self._origin


@functools.lru_cache(maxsize=64)  # a gateway opens the same few upstream URLs again and again
def is_loopback(url: str) -> bool:
    """True if ``url``'s host is loopback (never reached through a proxy)."""
    return is_loopback_host(urlsplit(url).hostname or "")


@functools.lru_cache(maxsize=256)  # asked on every session's path, of a few hosts
def is_loopback_host(host: str) -> bool:
    """True if ``host`` is loopback: ``localhost`` or a loopback address."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _NoRedirectConnect(connect):
    """websockets' ``connect`` that never follows an HTTP redirect.

    Credentials ride on the handshake (``X-Auth-Token``, AK/SK signature): following a 3xx
    would send them to a host or path the server chose, not the one configured. A 3xx is a
    refusal like any other (:class:`HandshakeError` with its status).
    """

    def process_redirect(self, exc: Exception) -> Exception | str:
        return exc


def handshake_error(exc: InvalidHandshake, sent: Mapping[str, str] | None = None) -> HandshakeError:
    """The :class:`HandshakeError` for websockets' refusal (status, Huawei code, Retry-After).

    The values of the ``sent`` headers (a token, a signature, a gateway key) are cut out of
    the server's message: a server or a proxy that echoes them must not put them in an
    error, a log line or the answer a gateway passes on.
    """
    if isinstance(exc, InvalidStatus):
        response = exc.response
        code, message = "", response.reason_phrase
        try:
            body = json.loads(response.body or b"")
            if isinstance(body, dict):
                code = str(body.get("error_code", ""))
                message = str(body.get("error_msg", message))
        except ValueError:
            pass
        return HandshakeError(
            response.status_code,
            _redacted(code, sent),
            _redacted(message, sent),
            retry_after=_retry_after(response.headers.get("Retry-After")),
        )
    return HandshakeError(0, "", _redacted(str(exc), sent))


# Pieces of a sent header value this long or longer are cut out of an echo ("Bearer", a
# header's name or "SDK-HMAC-SHA256" are shorter; tokens, keys and signatures are not).
_SECRET_PIECE_CHARS: Final = 12


def _redacted(text: str, sent: Mapping[str, str] | None) -> str:
    """``text`` with every value of ``sent``, and every long piece of one, replaced."""
    for value in sent.values() if sent else ():
        pieces = {value, *re.split(r"[\s,=]+", value)}
        for piece in sorted(pieces, key=len, reverse=True):
            if len(piece) >= _SECRET_PIECE_CHARS and piece in text:
                text = text.replace(piece, "[redacted]")
    return text


def _retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds (the delay form; an HTTP date is not used by rtts servers)."""
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None
    return seconds if seconds is not None and 0 <= seconds < 86400 else None


async def open_connection(
    url: str,
    headers: Mapping[str, str] | None = None,
    *,
    connect_timeout: float = 10.0,
    ssl: SSLContext | None = None,
) -> ClientConnection:
    """Open an rtts WebSocket (no compression; loopback never goes through a proxy).

    ``ssl`` replaces the default TLS context (system CAs, certificates verified) for wss.

    Raises:
        HandshakeError: the server refused the upgrade or could not be reached.
        RttsTimeoutError: the handshake took longer than ``connect_timeout``.
    """
    # Only ever replace the default context, never pass None: websockets would then use none.
    tls: dict[str, Any] = {"ssl": ssl} if ssl is not None and url.startswith("wss:") else {}
    try:
        return await _NoRedirectConnect(
            url,
            additional_headers=dict(headers or {}),
            compression=None,  # audio does not compress; deflate would only cost CPU
            open_timeout=connect_timeout,
            max_size=MAX_SERVER_MESSAGE_BYTES,
            proxy=None if is_loopback(url) else True,
            user_agent_header="rtts-plugin",
            logger=_WS_LOGGER,
            **tls,
        )
    except TimeoutError:
        raise RttsTimeoutError("connect", connect_timeout) from None
    except InvalidHandshake as exc:
        raise handshake_error(exc, headers) from None
    except OSError as exc:
        raise HandshakeError(
            0, "", f"cannot connect to {urlsplit(url).netloc}: {exc.strerror or exc}"
        ) from None


async def open_authenticated(
    url: str,
    auth: HandshakeAuth,
    *,
    extra_headers: Mapping[str, str] | None = None,
    connect_timeout: float = 10.0,
    ssl: SSLContext | None = None,
) -> ClientConnection:
    """Open an rtts WebSocket with ``auth``'s headers; on a 401, renew them once if possible."""
    return await with_renewal(
        url,
        auth,
        lambda headers: open_connection(
            url, {**(extra_headers or {}), **headers}, connect_timeout=connect_timeout, ssl=ssl
        ),
    )


async def with_renewal(
    url: str,
    auth: HandshakeAuth,
    attempt: Callable[[Mapping[str, str]], Awaitable[T]],
    *,
    within: float | None = None,
) -> T:
    """``attempt(auth's headers)``; on a 401, renew the credentials once if possible.

    A fetched IAM token can be revoked before it expires (password or permission changes);
    a 401 then drops it and the handshake is tried once more with a fresh one. ``within``
    bounds each wait for credentials to what is left of that many seconds from the call
    (:class:`RttsTimeoutError` after; a token fetch goes on for the next caller).
    """
    loop = asyncio.get_running_loop()
    deadline = None if within is None else loop.time() + within
    renewed = False
    while True:
        try:
            if deadline is None:
                headers = await auth.headers(url)
            else:
                try:
                    async with asyncio.timeout_at(deadline):
                        headers = await auth.headers(url)
                except TimeoutError:
                    raise RttsTimeoutError("credentials (IAM token)", within or 0.0) from None
            return await attempt(headers)
        except HandshakeError as exc:
            if exc.status != 401 or not auth.renewable or renewed:
                raise
            logger.info("rtts credentials rejected (HTTP 401); fetching new ones")
            auth.invalidate()
            renewed = True


DEFAULT_TIMEOUTS: Final = Timeouts()


async def _next_events(
    websocket: ClientConnection, session: ClientSession, budget: UtteranceBudget
) -> list[Event]:
    """Wait (within the budget) for the next frame or the close, and feed it to ``session``."""
    wait = budget.next_wait()
    try:
        async with asyncio.timeout(wait.seconds):
            message = await websocket.recv()
    except TimeoutError:
        raise RttsTimeoutError(wait.phase, wait.limit, session.trace_id, wait.setting) from None
    except ConnectionClosed as closed:
        # The server's close frame; else ours (e.g. 1009 for an oversized message).
        frame = closed.rcvd or closed.sent
        return session.connection_closed(
            frame.code if frame else None, frame.reason if frame else ""
        )
    budget.activity()
    if isinstance(message, bytes):
        return session.receive_binary(message)
    return session.receive_text(message)


async def stream_synthesis(
    url: str,
    request: StartRequest,
    *,
    headers: Mapping[str, str] | None = None,
    timeouts: Timeouts = DEFAULT_TIMEOUTS,
    timings: SynthesisTimings | None = None,
    connection: ClientConnection | None = None,
    budget: UtteranceBudget | None = None,
) -> AsyncIterator[Event]:
    """Run one synthesis and yield its events until END.

    Yields :class:`Started`, :class:`AudioReceived` (in order) and
    :class:`~rtts_plugin.protocol.session.WordsReceived`, then :class:`Ended` last.
    Protocol violations are logged and skipped. ``connection`` may be an already-open
    (prewarmed) socket; it is closed at the end either way. Every wait is bounded by
    ``budget`` (:class:`~rtts_plugin.budget.UtteranceBudget`; by default one made from
    ``timeouts`` for this request alone).

    After END the socket is released without waiting for the server's side of the close:
    a server that goes quiet after END costs the caller nothing.

    Raises:
        HandshakeError, RttsTimeoutError: connecting failed or a wait ran out.
        SynthesisError: ERROR, FATAL_ERROR, or a close before END.
    """
    timings = timings if timings is not None else SynthesisTimings()
    budget = budget if budget is not None else UtteranceBudget(timeouts, len(request.text))
    if connection is None:
        wait = budget.connect_wait()
        try:
            connection = await open_connection(url, headers, connect_timeout=wait.seconds)
        except RttsTimeoutError:
            raise RttsTimeoutError("connect", wait.limit, setting=wait.setting) from None
    websocket = connection
    timings.connected = timings.mark()
    session = ClientSession()
    try:
        with contextlib.suppress(ConnectionClosed):  # then recv() below reports the close
            await websocket.send(request.to_json())
        budget.request_sent()
        while not session.finished:
            for event in await _next_events(websocket, session, budget):
                match event:
                    case Started():
                        timings.started = timings.mark()
                        timings.trace_id = event.trace_id
                        budget.started()
                    case AudioReceived():
                        if timings.first_audio is None:
                            timings.first_audio = timings.mark()
                        timings.audio_bytes += len(event.data)
                        budget.heard()
                    case Ended():
                        timings.ended = timings.mark()
                    case Failed():
                        raise event.to_error()
                    case ProtocolViolation():
                        logger.warning(
                            "rtts protocol violation (trace_id=%s): %s",
                            session.trace_id,
                            event.description,
                        )
                        continue
                yield event
    finally:
        if session.finished and session.failure is None:
            release(websocket)  # after END: never wait for the server's side of the close
        else:
            # Failed, timed out or cancelled (interrupted): drop the socket at once, so the
            # server stops sending and no caller waits on a closing handshake.
            websocket.transport.abort()
            await websocket.wait_closed()


# Closes in progress after END, held so they are not garbage-collected mid-way.
_CLOSING: Final[set[asyncio.Task[None]]] = set()
CLOSE_GRACE_SECONDS: Final = 1.0


def release(websocket: ClientConnection, grace: float = CLOSE_GRACE_SECONDS) -> None:
    """Close ``websocket`` politely in the background; drop it if the peer takes over ``grace``.

    Returns at once: the caller never waits for a peer that does not finish the close.
    """
    if websocket.state is State.CLOSED:
        return
    task = asyncio.get_running_loop().create_task(_close_within(websocket, grace))
    _CLOSING.add(task)
    task.add_done_callback(_CLOSING.discard)


async def _close_within(websocket: ClientConnection, grace: float) -> None:
    try:
        async with asyncio.timeout(grace):
            await websocket.close()
    except TimeoutError:
        websocket.transport.abort()


# Huawei codes worth retrying: the concurrency quota (SIS.0312) and engine-side timeouts.
_TRANSIENT_CODES: Final = frozenset(
    {"SIS.0312", "SIS.0001", "SIS.0033", "SIS.0412", "SIS.0414", "APIG.0308"}
)


def is_transient(error: RttsError) -> bool:
    """True if retrying may succeed: no connection, 429, 5xx, a connect timeout, SIS.0312.

    Only safe before the first audio byte (nothing was spoken; failed calls are not billed).
    """
    if isinstance(error, HandshakeError):
        return (
            error.status in {0, 429} or error.status >= 500 or error.error_code in _TRANSIENT_CODES
        )
    if isinstance(error, RttsTimeoutError):
        return error.phase == "connect"
    if isinstance(error, SynthesisError):
        return error.error_code in _TRANSIENT_CODES
    return False


# The longest Retry-After an utterance waits out, and the cap of its own back-off.
RETRY_CAP_SECONDS: Final = 5.0


def backoff_delay(attempt: int, base: float, cap: float = RETRY_CAP_SECONDS) -> float:
    """Seconds to wait before retry number ``attempt`` (0-based): exponential, full jitter."""
    return random.uniform(0, min(cap, base * 2**attempt))  # noqa: S311 (jitter, not crypto)


def retry_delay(error: RttsError, attempt: int, base: float) -> float | None:
    """The pause before retry number ``attempt`` after ``error``, or None: do not retry now.

    The jittered back-off, added to the server's ``Retry-After`` when it sent one, so callers
    turned away together never come back sooner than asked nor all at the same instant. A
    server that asks for more than :data:`RETRY_CAP_SECONDS` is not waited out inside an
    utterance: the failure is reported at once (the service's usability rules take over).
    """
    asked = retry_after_seconds(error)
    if asked is not None and asked > RETRY_CAP_SECONDS:
        return None
    return (asked or 0.0) + backoff_delay(attempt, base)
