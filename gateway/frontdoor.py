"""The client side of a session until the splice takes it: the opening handshake.

Each accepted socket gets a :class:`FrontDoor`. It reads the HTTP upgrade request (one
that arrives whole in one pass: on the compiled path read and checked in C,
``gateway/_heads.c``, else :mod:`gateway.http_head`; any other with websockets' own
parser), checks it (path, method, upgrade headers), asks the gateway to
admit the session and open the upstream, and only then answers 101, so the client sees
the upstream's outcome. All of that happens in socket callbacks and one task per session;
the client's socket is then handed to :class:`~gateway.splice.Splice` with any bytes that
came early.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
from collections.abc import Generator
from http import HTTPStatus
from typing import TYPE_CHECKING, Final, NamedTuple, Protocol, cast

from websockets.datastructures import Headers
from websockets.exceptions import InvalidHeader
from websockets.headers import parse_connection, parse_upgrade
from websockets.http11 import Request, Response
from websockets.streams import StreamReader
from websockets.utils import accept_key

from gateway.fastpath import scan_request
from gateway.http_head import read_request

if TYPE_CHECKING:
    from gateway.dial import Preconnect

logger = logging.getLogger(__name__)

SERVER_HEADER: Final = "rtts-gateway"
# Bytes a client may send after its request, before it has the 101 (it should send none).
_EARLY_BYTES_LIMIT: Final = 64 * 1024
REQUEST_BYTES_LIMIT: Final = 16 * 1024
"""Largest upgrade request (request line and headers); a real one is under 1 KiB."""
# After an error answer the client's remaining bytes are read and dropped, at most this long
# and this much, before the socket closes: closing with unread bytes makes the kernel reset
# the connection, and the client then loses the answer (nginx's lingering close).
_LINGER_SECONDS: Final = 1.0
_LINGER_BYTES: Final = 1024 * 1024
# A Sec-WebSocket-Key: 16 bytes in base64 (22 characters and the padding).
_KEY: Final = re.compile(r"[A-Za-z0-9+/]{22}==").fullmatch
# A header value that is one token and nothing else (no list, no blanks, no parameters).
_PLAIN_TOKEN: Final = re.compile(r"[-!#$%&'*+.^_`|~0-9a-zA-Z]+").fullmatch
# Headers a request may carry once: a second one (even equal) is refused, never guessed at.
_SINGLE_HEADERS: Final = (
    "Host",
    "Authorization",
    "Sec-WebSocket-Key",
    "Sec-WebSocket-Version",
    "Content-Length",
)


def json_response(
    status: int,
    code: str,
    message: str,
    headers: dict[str, str] | None = None,
    *,
    upstream_status: int | None = None,
) -> Response:
    """An HTTP error response with Huawei's ``error_code``/``error_msg`` body.

    ``upstream_status`` adds the status the upstream answered, when that is what failed.
    """
    fields: dict[str, object] = {"error_code": code, "error_msg": message}
    if upstream_status is not None:
        fields["upstream_status"] = upstream_status
    body = json.dumps(fields).encode()
    all_headers = Headers(
        {
            "Server": SERVER_HEADER,
            "Content-Type": "application/json",
            "Content-Length": str(len(body)),
            "Connection": "close",
            **(headers or {}),
        }
    )
    return Response(status, HTTPStatus(status).phrase, all_headers, body)


def switching_protocols(key: str) -> bytes:
    """The 101 response to a client whose upgrade request carried ``key``."""
    return (
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Accept: {accept_key(key)}\r\nServer: {SERVER_HEADER}\r\n\r\n"
    ).encode()


def check_upgrade(request: Request) -> str | Response:
    """The request's ``Sec-WebSocket-Key`` if it is a valid WebSocket upgrade, else a refusal.

    The checks of RFC 6455 §4.2.1, with the statuses websockets' own server uses.
    """
    if request.method != "GET":
        return json_response(405, "", "use GET to open an rtts WebSocket", {"Allow": "GET"})
    if request.protocol != "HTTP/1.1":
        return json_response(505, "", "the WebSocket upgrade needs HTTP/1.1")
    headers = request.headers
    for name in _SINGLE_HEADERS:
        if len(headers.get_all(name)) > 1:
            return json_response(400, "", f"more than one {name} header")
    try:
        connection, upgrade = upgrade_headers(headers)
    except InvalidHeader as exc:
        return json_response(400, "", f"invalid upgrade request: {exc}")
    if "upgrade" not in connection or upgrade != ["websocket"]:
        return json_response(
            426,
            "",
            "this is a WebSocket endpoint: send Connection: Upgrade and Upgrade: websocket",
            {"Upgrade": "websocket"},
        )
    try:
        key = headers["Sec-WebSocket-Key"]
    except KeyError:
        return json_response(400, "", "missing Sec-WebSocket-Key header")
    if not _KEY(key):  # what base64 decodes to exactly 16 bytes
        return json_response(400, "", "Sec-WebSocket-Key must be 16 bytes in base64")
    if headers.get_all("Sec-WebSocket-Version") != ["13"]:
        return json_response(
            426, "", "only WebSocket version 13 is supported", {"Sec-WebSocket-Version": "13"}
        )
    return key


class Upgrade(NamedTuple):
    """An upgrade request as the gateway admits it."""

    path: str
    key: str | Response
    """Its ``Sec-WebSocket-Key``, or the refusal :func:`check_upgrade` made."""
    authorization: str | None
    """Its ``Authorization`` header, if it has one (and a valid key)."""


def read_upgrade(request: Request) -> Upgrade:
    """What the gateway admits ``request`` by (:func:`check_upgrade` run on it)."""
    key = check_upgrade(request)
    # check_upgrade refuses a second Authorization header: one, or none, is left here.
    authorization = request.headers.get("Authorization") if isinstance(key, str) else None
    return Upgrade(request.path, key, authorization)


def upgrade_headers(headers: Headers) -> tuple[list[str], list[str]]:
    """The ``Connection`` options and ``Upgrade`` protocols, lowercase (RFC 7230 lists).

    Raises:
        InvalidHeader: a value is not a valid list.
    """
    connection, upgrade = headers.get_all("Connection"), headers.get_all("Upgrade")
    # What every client sends, read as websockets' list parsers would read it.
    if (
        len(connection) == len(upgrade) == 1
        and _PLAIN_TOKEN(connection[0])
        and _PLAIN_TOKEN(upgrade[0])
    ):
        return [connection[0].lower()], [upgrade[0].lower()]
    return (
        [option.lower() for value in connection for option in parse_connection(value)],
        [protocol.lower() for value in upgrade for protocol in parse_upgrade(value)],
    )


class Doorman(Protocol):
    """What a front door asks of the gateway."""

    handshake_timeout: float

    def admit(self, door: FrontDoor, request: Request | Upgrade) -> Response | None:
        """A refusal to send at once, or None once the session is on its way.

        ``request``: as websockets' parser read it, or as the compiled reader read and
        checked it (see :func:`read_upgrade`).
        """

    def door_closed(self, door: FrontDoor) -> None:
        """The door's socket is gone (or handed over); forget it."""


class FrontDoor(asyncio.Protocol):
    """One client connection, from accept until its session is spliced or refused."""

    def __init__(self, doorman: Doorman, *, busy: bool = False, compiled: bool = False) -> None:
        """``compiled``: a request that arrives whole is read and checked in C."""
        self._doorman = doorman
        self._busy = busy  # too many handshakes in progress: refuse at once
        self._compiled = compiled
        self.transport: asyncio.Transport | None = None
        self._reader = StreamReader()
        self._parsed = False
        self._request_bytes = 0
        self.early = bytearray()
        """Bytes the client sent after its request, before the 101 (for the splice)."""
        self.closed = False
        """The client's socket is gone."""
        self.handed_over = False
        """The 101 went out and the socket belongs to the splice."""
        self._deadline: asyncio.TimerHandle | None = None
        self._lingering: int | None = None  # bytes dropped since an error answer went out
        self._switching: bytes | None = None  # the 101, made while the upstream answers
        self.preconnect: Preconnect | None = None
        """The upstream's TCP connect started for this caller (gateway.dial), until admitted."""

    @functools.cached_property
    def _parser(self) -> Generator[None, None, Request]:
        # Made only for a request the one-pass readers leave to websockets' parser.
        return Request.parse(self._reader.read_line)

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Start the handshake clock."""
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        if self._busy:
            self._parsed = True  # whatever it sends before the close is ignored
            self.reply(
                json_response(503, "", "too many connections in their handshake; retry shortly")
            )
            return
        loop = asyncio.get_running_loop()
        self._deadline = loop.call_later(self._doorman.handshake_timeout, self._too_slow)

    def data_received(self, data: bytes) -> None:
        """Read the request; keep what follows it for the splice."""
        if self._lingering is not None:  # answered: drop the rest of what the client sends
            self._lingering += len(data)
            if self._lingering > _LINGER_BYTES and self.transport is not None:
                self.transport.close()
            return
        if self._parsed:
            self.early += data
            if len(self.early) > _EARLY_BYTES_LIMIT and self.transport is not None:
                self.transport.pause_reading()  # the splice resumes it
            return
        self._request_bytes += len(data)
        first = self._request_bytes == len(data)
        # The common case, a whole request in hand, in one pass (in C on the compiled path);
        # else websockets' parser.
        if first and self._compiled:
            scanned = scan_request(data)
            if scanned is not None and scanned[0] <= REQUEST_BYTES_LIMIT:
                size, path, key, authorization = scanned
                self._admit(Upgrade(path, key, authorization), data[size:])
                return
        self._reader.feed_data(data)
        read = read_request(self._reader.buffer) if first else None
        if read is not None:
            request, size = read
            del self._reader.buffer[:size]
            self._parsed_request(request, size)
        else:
            self._step()
        if not self._parsed and self._request_bytes > REQUEST_BYTES_LIMIT:
            self._too_large()

    def eof_received(self) -> bool:
        """The client half-closed: nothing more will come, so close."""
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        """The client left before its session was spliced (or while refused)."""
        self.closed = True
        self._stop_clock()
        self._close_preconnect()
        self._doorman.door_closed(self)

    # handshake

    def reply(self, response: Response) -> None:
        """Send an HTTP response and close (a refusal or a failed upstream).

        Once a request was read, the socket lingers: our side is shut for writing and what
        the client still sends is dropped until it closes, for up to :data:`_LINGER_SECONDS`,
        so the answer is not lost to a reset. A connection refused before its request (too
        many in their handshake) is closed at once: a storm must not hold sockets.
        """
        self._stop_clock()
        self._close_preconnect()
        transport = self.transport
        if transport is None or self.closed or self.handed_over or self._lingering is not None:
            return
        transport.write(response.serialize())
        if self._busy or not transport.can_write_eof():
            transport.close()
            return
        self._lingering = 0
        self.early.clear()
        transport.write_eof()
        transport.resume_reading()  # paused if the client sent too much after its request
        self._deadline = asyncio.get_running_loop().call_later(_LINGER_SECONDS, transport.close)

    def prepare_accept(self, key: str) -> None:
        """Make the 101 for ``key`` now, while the upstream answers, so :meth:`accept` sends it."""
        self._switching = switching_protocols(key)

    def accept(self, key: str) -> asyncio.Transport:
        """Send the 101 and give up the socket: from now on it is the splice's."""
        self._stop_clock()
        assert self.transport is not None
        self.transport.write(self._switching or switching_protocols(key))
        self.handed_over = True
        self._doorman.door_closed(self)
        return self.transport

    def _step(self) -> None:
        try:
            next(self._parser)
            return  # more of the request is needed
        except StopIteration as done:
            request = done.value
        except Exception as exc:  # every parser error is the client's: answer 400
            if self._request_bytes > REQUEST_BYTES_LIMIT:
                self._too_large()  # too large says more (e.g. over 128 header lines)
                return
            self._parsed = True  # whatever else arrives before the close is ignored
            # websockets' message quotes the offending line or value, which may hold a key:
            # only what is wrong is said, never the bytes.
            what = str(exc).partition(": ")[0]
            logger.debug("invalid HTTP request: %s", what)
            self.reply(json_response(400, "", f"invalid HTTP request: {what}"[:200]))
            return
        self._parsed_request(request, self._request_bytes - len(self._reader.buffer))

    def _parsed_request(self, request: Request, size: int) -> None:
        if size > REQUEST_BYTES_LIMIT:
            self._too_large()  # complete, but larger than any real upgrade request
            return
        self._admit(request, self._reader.buffer)
        self._reader.buffer.clear()

    def _admit(self, request: Request | Upgrade, rest: bytes | bytearray) -> None:
        """Hand the request to the gateway; keep ``rest``, what came after it."""
        self._parsed = True
        self.early += rest
        refusal = self._doorman.admit(self, request)  # first: it may start the upstream's connect
        if self._lingering is None:  # (a refusal's linger has a clock of its own)
            self._stop_clock()
        if refusal is not None:
            self.reply(refusal)

    def _too_large(self) -> None:
        self._parsed = True  # whatever else arrives before the close is ignored
        self._reader.buffer.clear()
        self.reply(json_response(431, "", f"upgrade request over {REQUEST_BYTES_LIMIT} bytes"))

    def _too_slow(self) -> None:
        self._deadline = None
        self.reply(json_response(408, "", "no complete upgrade request in time"))

    def _close_preconnect(self) -> None:
        preconnect, self.preconnect = self.preconnect, None
        if preconnect is not None:
            preconnect.close()

    def _stop_clock(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
