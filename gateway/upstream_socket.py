"""Opening an upstream WebSocket for the splice: the handshake alone, on a plain socket.

The gateway only needs the upstream's opening handshake done right (the request, the
``Sec-WebSocket-Accept`` check, the status, a refusal's body); every byte after the 101 is
relayed unchanged by :mod:`gateway.splice`. So the handshake (:mod:`gateway.upgrade`: the
request, and websockets' public HTTP parser and header checks for the answer) runs over a
plain asyncio connection (``loop.create_connection``; TLS by the gateway's own layer,
:mod:`gateway.upstream_tls`, with the given or the default context), and the parser stops
at the end of a 101's head: the bytes the upstream sends after it stay ours, unparsed, in
:attr:`UpstreamSocket.early`, until the splice takes the socket over. No websockets
internals are touched, and no protocol object or asyncio client (reader task, keepalive,
message queue) is built for a connection that is only handed over.

Redirects are never followed (credentials ride on the handshake): a 3xx is a refusal.
Loopback URLs never use a proxy; other URLs use an HTTP(S) proxy from the environment
(``HTTPS_PROXY`` / ``HTTP_PROXY``, ``NO_PROXY`` honoured) through ``CONNECT``.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import logging
import socket as socket_module
import ssl as ssl_module
import time
import urllib.request
from collections.abc import Callable, Generator, Mapping
from typing import Final, cast
from urllib.parse import unquote, urlsplit

from websockets.exceptions import InvalidHandshake, InvalidMessage, StatusLineTooLong
from websockets.frames import CloseCode
from websockets.http11 import Response
from websockets.streams import StreamReader
from websockets.uri import WebSocketURI
from websockets.utils import accept_key

from gateway.addresses import ADDRESSES, first_to_answer
from gateway.dial import Dial
from gateway.errors import detached
from gateway.fastpath import scan_switching
from gateway.http_head import HEAD_END, read_switching
from gateway.tls_session import KeptSession
from gateway.upgrade import check_switching, upgrade_request
from gateway.upstream_tls import StartedHandshake, TLSLayer, start_handshake
from gateway.wire import close_frame
from rtts_plugin.errors import HandshakeError, RttsTimeoutError
from rtts_plugin.logs import websockets_logger
from rtts_plugin.transport import handshake_error, is_loopback_host

logger = logging.getLogger(__name__)

_WS_LOGGER: Final = websockets_logger("gateway.upstream.websockets")
# Bytes an upstream may send after its 101 before the splice takes its socket over (a spare
# waits up to 15 s): past this, reading pauses until the splice resumes it.
HELD_UPSTREAM_BYTES: Final = 64 * 1024
# A proxy's answer to CONNECT is a short head; anything longer is not a proxy we can use.
_PROXY_HEAD_LIMIT: Final = 16 * 1024


wall_clock = time.time  # what TLS session times are measured against (tests move it)
hello_clock = time.monotonic  # what a ClientHello's age is measured against (tests move it)
# A ClientHello made ahead is sent within this many seconds or made again: the ticket age it
# reports to the server stays inside the 10 s skew OpenSSL servers accept as current.
HELLO_MAX_AGE: Final = 10.0


class ResumingTLS(ssl_module.SSLContext):
    """A client TLS context that resumes each host's last session, as nginx does upstream.

    A full TLS handshake costs both ends a key exchange and a certificate check on every
    upstream connection; resuming (``proxy_ssl_session_reuse``, on by default in nginx) skips
    the certificate part. The certificate was verified when the session was made; a host that
    declines to resume gets a full, verified handshake.
    """

    def __init__(self, protocol: int = ssl_module.PROTOCOL_TLS_CLIENT) -> None:
        super().__init__()  # ``protocol`` was taken by SSLContext.__new__
        self._sessions: dict[str | None, KeptSession] = {}
        self._hellos: dict[str, tuple[float, StartedHandshake]] = {}

    def prepare(self, server_hostname: str) -> None:
        """Make the next connection's ClientHello to ``server_hostname`` now.

        Its key exchange is what makes a ClientHello cost (0.1-0.3 ms of CPU): made ahead,
        off a caller's path, it is only written when the connection opens. One per host,
        offering the host's session as :meth:`wrap_bio` does; nothing is sent until then.
        """
        ready = self._hellos.get(server_hostname)
        if ready is not None and _fresh(ready[0]):
            return
        started = start_handshake(self, server_hostname)
        if started is not None:
            self._hellos[server_hostname] = (hello_clock(), started)

    def take_hello(self, server_hostname: str) -> StartedHandshake | None:
        """The ClientHello :meth:`prepare` made for ``server_hostname``, if still fresh (once)."""
        ready = self._hellos.pop(server_hostname, None)
        return ready[1] if ready is not None and _fresh(ready[0]) else None

    def wrap_bio(
        self,
        incoming: ssl_module.MemoryBIO,
        outgoing: ssl_module.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl_module.SSLSession | None = None,
    ) -> ssl_module.SSLObject:
        """Offer the host's last session (:class:`~gateway.upstream_tls.TLSLayer` calls this).

        It is handed to OpenSSL as an in-memory copy (:mod:`gateway.tls_session`), not
        through ``wrap_bio(session=...)``, which serializes and parses it on every connection.
        """
        kept = None
        if session is None and not server_side and isinstance(server_hostname, str | None):
            kept = self._sessions.get(server_hostname)
        ssl_object = super().wrap_bio(incoming, outgoing, server_side, server_hostname, session)
        if kept is not None:
            kept.offer(ssl_object, self)
        return ssl_object

    def remember(self, transport: asyncio.BaseTransport) -> None:
        """Keep the session of an established connection for the next one to the same host.

        After a resumed handshake the session kept is still offered until half its lifetime
        is gone (then the server's newer ticket replaces it); a full handshake's session
        replaces it at once.
        """
        ssl_object = transport.get_extra_info("ssl_object")
        if not isinstance(ssl_object, ssl_module.SSLObject):
            return
        host = ssl_object.server_hostname
        kept = self._sessions.get(host)
        if (
            kept is not None
            and ssl_object.session_reused
            and wall_clock() - kept.time < kept.timeout / 2
        ):
            return
        session = KeptSession.of(ssl_object, self)
        if session is not None:
            self._sessions[host] = session
            if host is not None:
                self._hellos.pop(host, None)  # it offers the session replaced, or none


def _fresh(made_at: float) -> bool:
    """Whether a ClientHello made ahead at ``made_at`` may still be sent (HELLO_MAX_AGE)."""
    return hello_clock() - made_at < HELLO_MAX_AGE


def client_tls(cafile: str | None = None, *, verify: bool = True) -> ResumingTLS:
    """What ``ssl.create_default_context(cafile=...)`` builds, resuming sessions."""
    context = ResumingTLS(ssl_module.PROTOCOL_TLS_CLIENT)
    if cafile is not None:
        context.load_verify_locations(cafile)
    else:
        context.load_default_certs()
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl_module.CERT_NONE
    return context


@functools.lru_cache(maxsize=1)
def _default_tls() -> ResumingTLS:
    """System CAs, certificates and host names verified (built once: loading CAs is slow)."""
    return client_tls()


class UpstreamSocket(asyncio.Protocol):
    """An upstream connection through its opening handshake, then holding what follows.

    The answer is read up to the end of its head (a 101 that arrives whole in one pass: on
    the compiled path read and checked in C, ``gateway/_heads.c``, else by
    :mod:`gateway.http_head`; any other by websockets' HTTP parser, which reads a refusal's
    body too) and checked by :func:`~gateway.upgrade.check_switching`. After the 101, bytes are
    only appended to :attr:`early` (reading pauses past :data:`HELD_UPSTREAM_BYTES`) until
    :mod:`gateway.splice` sets its own protocol.
    """

    def __init__(
        self,
        request: bytes,
        key: str,
        loop: asyncio.AbstractEventLoop,
        on_open: Callable[[], None] | None = None,
        *,
        compiled: bool = False,
    ) -> None:
        """``compiled``: a 101 that arrives whole is read and checked in C."""
        self._request = request
        self._key = key
        self._on_open = on_open
        # The answer a 101 must carry, for the compiled reader (not when the head is logged).
        self._accept: bytes | None = None
        if compiled and not _WS_LOGGER.isEnabledFor(logging.DEBUG):
            self._accept = accept_key(key).encode()
        self._reader = StreamReader()
        self._reading = False  # websockets' parser has started on the answer
        self.handshake: asyncio.Future[None] = loop.create_future()
        self.transport: asyncio.Transport | None = None
        self.early = bytearray()
        """What the upstream sent after its 101, unread."""
        self.eof = False
        """The upstream closed its side after the 101."""
        self.lost = False
        """The socket is closed."""
        self.sent = 0
        """Bytes of the request a :class:`~gateway.dial.Dial` wrote before the socket was ours."""

    @functools.cached_property
    def _parser(self) -> Generator[None, None, Response]:
        # Made only for an answer the one-pass readers leave to websockets' parser.
        reader = self._reader
        return Response.parse(reader.read_line, reader.read_exact, reader.read_to_eof)

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Send the handshake request."""
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        if _WS_LOGGER.isEnabledFor(logging.DEBUG):  # as websockets logs it, credentials redacted
            request_line, *lines = self._request.decode("iso-8859-1").split("\r\n")[:-2]
            _WS_LOGGER.debug("> %s", request_line)
            for line in lines:
                name, _, value = line.partition(": ")
                _WS_LOGGER.debug("> %s: %s", name, value)
        if self.sent < len(self._request):
            self.transport.write(self._request[self.sent :])

    def data_received(self, data: bytes) -> None:
        """Feed the answer to the parser; hold what follows a 101."""
        if self.handshake.done():
            self._hold(data)
            return
        first = not self._reader.buffer and not self._reading
        # The common case, a whole 101 in the first read, in one pass (read and checked in C
        # on the compiled path); else websockets' parser.
        if first and self._accept is not None:
            size = scan_switching(data, self._accept)
            if size is not None:
                self._accepted(data[size:])
                return
        self._reader.feed_data(data)
        head = read_switching(self._reader.buffer) if first else None
        if head is not None:
            status, reason, headers, size = head
            del self._reader.buffer[:size]
            self._answered(Response(status, reason, headers))
        else:
            self._step()

    def eof_received(self) -> None:
        """The upstream closed its side: keep the socket's last bytes for the splice."""
        if self.handshake.done():
            self.eof = True
        else:
            self._reader.feed_eof()  # a refusal read to EOF, or no valid answer
            self._step()

    def connection_lost(self, exc: Exception | None) -> None:
        """The socket is closed (before the splice took it over)."""
        self.lost = True
        if not self.handshake.done():
            if not self._reader.eof:
                self._reader.feed_eof()
                self._step()
            if not self.handshake.done():
                self.handshake.set_exception(InvalidMessage("connection closed during handshake"))

    # the gateway's side

    @property
    def accepted(self) -> bool:
        """The upstream accepted the upgrade (its 101 was read and checked)."""
        handshake = self.handshake
        return handshake.done() and not handshake.cancelled() and handshake.exception() is None

    def usable(self) -> bool:
        """Open, and the upstream has sent nothing (an idle-timeout error, a close) since."""
        return not self.lost and not self.early and not self.eof

    def retire(self, reason: str) -> None:
        """Close a connection that will not be used (its bytes are held, no closing handshake)."""
        if not self.lost and self.transport is not None:
            self.transport.write(close_frame(CloseCode.NORMAL_CLOSURE, reason, mask=True))
            self.transport.close()

    def abort(self) -> None:
        """Drop the socket at once."""
        if self.transport is not None:
            self.transport.abort()

    def _hold(self, data: bytes | bytearray) -> None:
        self.early += data
        if len(self.early) > HELD_UPSTREAM_BYTES and self.transport is not None:
            self.transport.pause_reading()  # the splice resumes it

    def _step(self) -> None:
        """Advance the parser; settle the handshake once the answer is complete or invalid."""
        self._reading = True
        try:
            next(self._parser)
            return  # more of the answer is needed
        except StopIteration as done:
            response: Response = done.value
        except StatusLineTooLong as exc:  # as websockets' ClientProtocol reports them
            self._fail(exc)
            return
        except Exception as exc:  # every parser error is the upstream's
            invalid = InvalidMessage("did not receive a valid HTTP response")
            invalid.__cause__ = exc
            self._fail(invalid)
            return
        self._answered(response)

    def _answered(self, response: Response) -> None:
        if _WS_LOGGER.isEnabledFor(logging.DEBUG):
            _WS_LOGGER.debug("< HTTP/1.1 %d %s", response.status_code, response.reason_phrase)
            for name, value in response.headers.raw_items():
                _WS_LOGGER.debug("< %s: %s", name, value)
        try:
            check_switching(response, self._key)
        except InvalidHandshake as exc:
            self._fail(exc)
            return
        self._accepted(self._reader.buffer)
        self._reader.buffer.clear()

    def _accepted(self, rest: bytes | bytearray) -> None:
        """The upstream accepted the upgrade; ``rest`` came with its 101: the first frames."""
        if self._on_open is not None:  # first: the caller's 101 is what everyone waits for
            try:
                self._on_open()
            except Exception:  # the awaiting task carries on; the socket must not die here
                logger.exception("upstream open callback failed")
        self.handshake.set_result(None)
        if rest:
            self._hold(rest)

    def _fail(self, exc: InvalidHandshake) -> None:
        self._reader.buffer.clear()
        self.handshake.set_exception(detached(exc))  # held by this socket, as its frames are


async def open_upstream(
    url: str,
    headers: Mapping[str, str],
    *,
    connect_timeout: float,
    ssl: ssl_module.SSLContext | None = None,
    on_open: Callable[[], None] | None = None,
    compiled: bool = False,
    dialed: Dial | None = None,
) -> UpstreamSocket:
    """Open ``url`` (handshake only) and return the socket holding what follows the 101.

    ``ssl`` replaces the default TLS context (system CAs, certificates verified) for wss;
    a :class:`ResumingTLS` (see :func:`client_tls`) also resumes the host's last session.
    ``on_open`` is called as soon as the upgrade is accepted, in the socket's callback (a
    loop turn before this returns); once it has been, no timeout is raised: a deadline seen
    after the 101 was read does not undo the acceptance. ``compiled``: the 101 is read and
    checked in C, and a TLS upstream's records are read in C
    (:class:`~gateway.upstream_tls.TLSLayer`). ``dialed``: the connection
    (:class:`~gateway.dial.Dial`) already started for ``url`` with ``headers``, to take over.

    Raises:
        HandshakeError: the server refused the upgrade (a 3xx too) or could not be reached.
        RttsTimeoutError: the handshake took longer than ``connect_timeout``.
    """
    if dialed is None:
        uri, request, key = upgrade_request(url, headers)
    else:
        uri, request, key = dialed.uri, dialed.request, dialed.key
    tls = (ssl or _default_tls()) if uri.secure else None
    loop = asyncio.get_running_loop()
    socket = UpstreamSocket(request, key, loop, on_open, compiled=compiled)
    proxy = proxy_for(uri) if dialed is None else None  # a dial is never made through one
    try:
        try:
            async with asyncio.timeout(connect_timeout):
                if dialed is not None:
                    await _adopt(loop, socket, dialed, tls, compiled)
                elif proxy is None:
                    await _connect(loop, socket, uri, tls, compiled)
                else:
                    await _through_proxy(proxy, uri, socket, tls, compiled)
                await socket.handshake
        except TimeoutError:
            # The deadline can be seen after the 101 was read (a busy loop runs it first):
            # the upstream accepted in time, and on_open may have answered the caller.
            if not socket.accepted:
                raise
        if isinstance(tls, ResumingTLS) and socket.transport is not None:
            tls.remember(socket.transport)
    except TimeoutError:
        socket.abort()
        raise RttsTimeoutError("connect", connect_timeout) from None
    # The error is held where it was set (the handshake's future, a dial's, a TLS layer's),
    # and this frame, in its traceback, holds those: detached, so no cycle is left.
    except InvalidHandshake as exc:
        socket.abort()
        raise handshake_error(detached(exc), headers) from None
    except OSError as exc:
        socket.abort()
        detached(exc)
        raise HandshakeError(
            0, "", f"cannot connect to {urlsplit(url).netloc}: {exc.strerror or exc}"
        ) from None
    except BaseException:  # cancelled: nothing may stay open
        socket.abort()
        raise
    return socket


def prepare_hello(host: str, ssl: ssl_module.SSLContext | None = None) -> None:
    """Make the next ClientHello to ``host`` (wss) ahead, if its context is a :class:`ResumingTLS`.

    ``ssl`` as for :func:`open_upstream`, whose next connection to that host sends it.
    """
    tls = ssl or _default_tls()
    if isinstance(tls, ResumingTLS):
        tls.prepare(host)


async def _connect(
    loop: asyncio.AbstractEventLoop,
    socket: UpstreamSocket,
    uri: WebSocketURI,
    tls: ssl_module.SSLContext | None,
    compiled: bool,
) -> None:
    """Connect to the first of the host's addresses that answers (TLS names the host).

    Several addresses are raced (:func:`~gateway.addresses.first_to_answer`); one is
    connected to directly. If none answers, in time or at all, the next session resolves the
    name again.
    """
    addresses = await ADDRESSES.resolve(uri.host, uri.port)
    # Over TLS the socket's protocol is the TLS layer, which hands the socket to ours.
    layer = _tls_layer(tls, uri.host, socket, compiled) if tls is not None else None
    try:
        if len(addresses) == 1:
            await loop.create_connection(lambda: layer or socket, *addresses[0])
        else:
            connected, address = await first_to_answer(addresses)
            if address != addresses[0]:
                ADDRESSES.prefer(uri.host, uri.port, address)
            await _hand_over(loop, layer or socket, connected)
    except BaseException:  # refused, unreachable, or no answer in time (cancelled)
        ADDRESSES.forget(uri.host, uri.port)
        raise
    if layer is not None:
        await _tls_handshake(layer)  # it answered: a TLS failure is not the address's


async def _adopt(
    loop: asyncio.AbstractEventLoop,
    socket: UpstreamSocket,
    dialed: Dial,
    tls: ssl_module.SSLContext | None,
    compiled: bool,
) -> None:
    """Take over the connection ``dialed`` started (TLS over it on wss://), as :func:`_connect`."""
    uri = dialed.uri
    try:
        await dialed.connected
    except BaseException:  # refused, unreachable, or no answer in time (cancelled)
        ADDRESSES.forget(uri.host, uri.port)
        dialed.discard()
        raise
    socket.sent = dialed.request_sent
    # On wss:// the TLS layer carries on from the ClientHello the dial sent, if it sent one.
    layer = _tls_layer(tls, uri.host, socket, compiled, dialed.hello) if tls is not None else None
    await _hand_over(loop, layer or socket, dialed.adopt())
    if layer is not None:
        await _tls_handshake(layer)


async def _hand_over(
    loop: asyncio.AbstractEventLoop, protocol: asyncio.Protocol, connected: socket_module.socket
) -> None:
    """Give a connected socket to a transport running ``protocol`` (closed if that fails)."""
    try:
        await loop.create_connection(lambda: protocol, sock=connected)
    except BaseException:
        connected.close()
        raise


def hello_made_ahead(host: str, ssl: ssl_module.SSLContext | None) -> StartedHandshake | None:
    """The ClientHello :func:`prepare_hello` made for ``host``, taken for a connection now."""
    tls = ssl or _default_tls()
    return tls.take_hello(host) if isinstance(tls, ResumingTLS) else None


def _tls_layer(
    tls: ssl_module.SSLContext,
    host: str,
    socket: UpstreamSocket,
    compiled: bool,
    started: StartedHandshake | None = None,
) -> TLSLayer:
    """The TLS layer to ``host``, carrying on from a ClientHello already made.

    ``started``: the one a dial sent; else the one made ahead for ``host``, if ready.
    """
    started = started or hello_made_ahead(host, tls)
    return TLSLayer(tls, host, socket, compiled=compiled, started=started)


async def _tls_handshake(layer: TLSLayer) -> None:
    """Wait for ``layer``'s handshake; if it fails or is cancelled, drop its socket."""
    try:
        await layer.established
    except BaseException:
        layer.abort()
        raise


def proxy_for(uri: WebSocketURI) -> str | None:
    """The HTTP(S) proxy the upstream at ``uri`` is reached through, if any.

    The one the environment names (as websockets chooses it), never for loopback.
    """
    if is_loopback_host(uri.host) or urllib.request.proxy_bypass(f"{uri.host}:{uri.port}"):
        return None
    proxies = urllib.request.getproxies()
    schemes = ["wss", "socks", "https"] if uri.secure else ["ws", "socks", "https", "http"]
    return next((proxies[scheme] for scheme in schemes if scheme in proxies), None)


async def _through_proxy(
    proxy: str,
    uri: WebSocketURI,
    socket: UpstreamSocket,
    tls: ssl_module.SSLContext | None,
    compiled: bool,
) -> None:
    """Tunnel to ``uri`` with ``CONNECT``, then hand the tunnel to ``socket`` (TLS inside)."""
    parts = urlsplit(proxy)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise HandshakeError(
            0,
            "",
            f"proxy {parts.scheme}://{parts.hostname}: only http:// and https:// "
            "proxies are supported (check HTTPS_PROXY / HTTP_PROXY, or list the host in NO_PROXY)",
        )
    target = f"[{uri.host}]:{uri.port}" if ":" in uri.host else f"{uri.host}:{uri.port}"
    head = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: rtts-plugin\r\n"
    if parts.username is not None:
        credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        head += f"Proxy-Authorization: Basic {base64.b64encode(credentials.encode()).decode()}\r\n"
    loop = asyncio.get_running_loop()
    tunnel = _ProxyAnswer()
    transport, _ = await loop.create_connection(
        lambda: tunnel,
        parts.hostname,
        parts.port or (443 if parts.scheme == "https" else 80),
        ssl=_default_tls() if parts.scheme == "https" else None,
    )
    try:
        transport.write(head.encode() + b"\r\n")
        answer = await tunnel.head
        status = answer.split(b" ", 2)[1:2]
        if not status or not status[0].isdigit() or not 200 <= int(status[0]) < 300:
            line = answer.split(b"\r\n", 1)[0].decode(errors="replace") or "no valid answer"
            raise HandshakeError(0, "", f"proxy {parts.hostname} refused CONNECT: {line}")
        if tls is not None:
            layer = _tls_layer(tls, uri.host, socket, compiled)
            transport.set_protocol(layer)
            layer.connection_made(transport)
            await _tls_handshake(layer)
        else:
            transport.set_protocol(socket)
            socket.connection_made(transport)
    except BaseException:
        transport.abort()
        raise


class _ProxyAnswer(asyncio.Protocol):
    """Reads a proxy's answer to ``CONNECT`` (its head; nothing else comes before ours)."""

    def __init__(self) -> None:
        self.head: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._data = bytearray()

    def data_received(self, data: bytes) -> None:
        """Collect the head."""
        self._data += data
        end = self._data.find(HEAD_END)
        if not self.head.done() and (end >= 0 or len(self._data) > _PROXY_HEAD_LIMIT):
            self.head.set_result(bytes(self._data[: end + len(HEAD_END)]) if end >= 0 else b"")

    def connection_lost(self, exc: Exception | None) -> None:
        """The proxy hung up before answering."""
        if not self.head.done():
            self.head.set_result(b"")
