"""The gateway's own TLS to the upstream keeps a transport's contract, byte for byte.

:mod:`gateway.upstream_tls` replaces uvloop's TLS transport for upstream connections, so it
is held here to what the relay relies on: bytes unchanged both ways in records of any size,
nothing delivered while reading is paused (and at most one socket read held), one
``eof_received`` and one ``connection_lost``, the error of a broken record, a failed or
abandoned handshake never reaching the application, close_notify after what was written,
and the socket's write flow control. The peers are real TLS servers on 127.0.0.1: asyncio's,
or one driven by hand (memory BIOs over a plain socket) where a test needs to misbehave at
the TLS level. Runs on asyncio (records read in Python) and uvloop (records read in C).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
import trustme

from gateway._relay import TLSReader
from gateway.upstream_tls import TLSLayer, TLSTransport

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class App(asyncio.Protocol):
    """An application protocol that records what its transport tells it."""

    def __init__(self, *, pause_on_data: bool = False) -> None:
        self.events: list[str] = []
        self.data = bytearray()
        self.lost: Exception | None = None
        self.transport: asyncio.Transport | None = None
        self._pause_on_data = pause_on_data
        self.changed = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.events.append("made")
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.data += data
        if self._pause_on_data and self.transport is not None:
            self.transport.pause_reading()
        self.changed.set()

    def eof_received(self) -> bool:
        self.events.append("eof")
        self.changed.set()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append("lost")
        self.lost = exc
        self.changed.set()

    def pause_writing(self) -> None:
        self.events.append("pause_writing")
        self.changed.set()

    def resume_writing(self) -> None:
        self.events.append("resume_writing")
        self.changed.set()

    async def until(self, done: Callable[[], bool]) -> None:
        async with asyncio.timeout(5):
            while not done():
                self.changed.clear()
                await self.changed.wait()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def server_tls(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    return context


def client_tls(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@asynccontextmanager
async def listening(handle: Handler, tls: ssl.SSLContext | None = None) -> AsyncIterator[int]:
    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=tls)
    async with server:
        yield server.sockets[0].getsockname()[1]


async def connect(port: int, ca: trustme.CA, app: asyncio.Protocol, compiled: bool) -> TLSLayer:
    """A TLS connection to 127.0.0.1:``port`` through the gateway's layer, handshake done."""
    layer = TLSLayer(client_tls(ca), "127.0.0.1", app, compiled=compiled)
    assert isinstance(layer.data_received, TLSReader) == compiled
    await asyncio.get_running_loop().create_connection(lambda: layer, "127.0.0.1", port)
    await layer.established
    return layer


class HandDrivenPeer:
    """The server's end of TLS run by hand over a plain socket, to misbehave on purpose."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ca: trustme.CA
    ) -> None:
        self.reader, self.writer = reader, writer
        self._incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = server_tls(ca).wrap_bio(self._incoming, self._outgoing, server_side=True)

    async def handshake(self) -> None:
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._send_pending()
                await self._feed()
        await self._send_pending()

    def seal(self, plain: bytes) -> bytes:
        """``plain`` encrypted into records, not sent."""
        self.tls.write(plain)
        return self._outgoing.read()

    async def send(self, plain: bytes) -> None:
        self.writer.write(self.seal(plain))
        await self.writer.drain()

    async def receive_until_close_notify(self) -> bytes:
        """Everything the client sends, up to its close_notify (an error if TCP ends first)."""
        received = bytearray()
        while True:
            try:
                plain = self.tls.read(65536)
            except ssl.SSLWantReadError:
                await self._feed()
                continue
            if not plain:  # CPython's read returns b"" for close_notify
                return bytes(received)
            received += plain

    async def _feed(self) -> None:
        data = await self.reader.read(65536)
        if not data:
            raise ConnectionError("the client's TCP ended")
        self._incoming.write(data)

    async def _send_pending(self) -> None:
        if self._outgoing.pending:
            self.writer.write(self._outgoing.read())
            await self.writer.drain()


def by_hand(ca: trustme.CA, script: Callable[[HandDrivenPeer], Awaitable[None]]) -> Handler:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await script(HandDrivenPeer(reader, writer, ca))

    return handle


async def test_bytes_cross_both_ways_unchanged_in_records_of_any_size(
    ca: trustme.CA, compiled: bool
) -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    # Around one record (16 KiB of plaintext) and across many.
    payloads = [b"\x00", bytes(range(256)) * 64, b"a" * 16385, bytes(range(251)) * 1200]
    async with listening(echo, server_tls(ca)) as port:
        app = App()
        await connect(port, ca, app, compiled)
        assert app.events == ["made"] and isinstance(app.transport, TLSTransport)
        sent = b""
        for payload in payloads:
            app.transport.write(payload)
            sent += payload
            await app.until(lambda sent=sent: len(app.data) >= len(sent))  # type: ignore[misc]
        assert bytes(app.data) == sent
        assert app.transport.get_extra_info("ssl_object").version() is not None
        app.transport.close()  # nothing is read after close(): no eof
        await app.until(lambda: "lost" in app.events)
    assert app.events == ["made", "lost"] and app.lost is None


async def test_while_reading_is_paused_nothing_is_delivered_and_one_read_at_most_is_held(
    ca: trustme.CA, compiled: bool
) -> None:
    records = [bytes([n]) * 4096 for n in range(200)]  # 800 KiB, more than any one read

    async def burst(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for record in records:
            writer.write(record)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
            await reader.read()

    async with listening(burst, server_tls(ca)) as port:
        app = App(pause_on_data=True)
        layer = await connect(port, ca, app, compiled)
        await app.until(lambda: bool(app.data))
        first = len(app.data)
        await asyncio.sleep(0.3)  # time for reads that should not happen
        assert len(app.data) == first  # nothing while paused
        assert layer.held_bytes <= 256 * 1024 + 16 * 1024  # one socket read, one record
        for _ in range(len(records)):  # resume until everything is in, pausing each time
            if len(app.data) == sum(map(len, records)):
                break
            seen = len(app.data)
            app.transport.resume_reading()
            await app.until(lambda seen=seen: len(app.data) > seen)  # type: ignore[misc]
        assert bytes(app.data) == b"".join(records)
        app.transport.abort()


async def test_the_peers_close_notify_is_one_eof_then_one_connection_lost(
    ca: trustme.CA, compiled: bool
) -> None:
    async def say_and_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"last words")
        await writer.drain()
        writer.close()  # close_notify, then TCP's end

    async with listening(say_and_close, server_tls(ca)) as port:
        app = App()
        await connect(port, ca, app, compiled)
        await app.until(lambda: "lost" in app.events)
    assert bytes(app.data) == b"last words"
    assert app.events == ["made", "eof", "lost"] and app.lost is None


async def test_a_tcp_end_without_close_notify_is_one_eof_too(
    ca: trustme.CA, compiled: bool
) -> None:
    async def script(peer: HandDrivenPeer) -> None:
        await peer.handshake()
        await peer.send(b"cut short")
        peer.writer.close()  # TCP FIN with no close_notify before it

    async with listening(by_hand(ca, script)) as port:
        app = App()
        await connect(port, ca, app, compiled)
        await app.until(lambda: "lost" in app.events)
    assert bytes(app.data) == b"cut short"
    assert app.events == ["made", "eof", "lost"]


async def test_a_record_that_fails_to_decrypt_drops_the_connection_with_the_error(
    ca: trustme.CA, compiled: bool
) -> None:
    peer_saw_the_end = asyncio.Event()

    async def script(peer: HandDrivenPeer) -> None:
        await peer.handshake()
        await peer.send(b"fine")
        record = bytearray(peer.seal(b"tampered with"))
        record[-1] ^= 0x01  # the authentication tag no longer matches
        peer.writer.write(bytes(record))
        await peer.writer.drain()
        with contextlib.suppress(ConnectionError):  # dropped: a reset, or an alert and FIN
            while await peer.reader.read(65536):
                pass
        peer_saw_the_end.set()

    async with listening(by_hand(ca, script)) as port:
        app = App()
        await connect(port, ca, app, compiled)
        await app.until(lambda: "lost" in app.events)
        async with asyncio.timeout(5):
            await peer_saw_the_end.wait()
    assert bytes(app.data) == b"fine"  # nothing of the broken record
    assert app.events == ["made", "lost"]
    assert isinstance(app.lost, ssl.SSLError)


async def test_an_untrusted_certificate_fails_before_the_application_hears_anything(
    ca: trustme.CA, compiled: bool
) -> None:
    ended = asyncio.Event()

    async def script(peer: HandDrivenPeer) -> None:
        with contextlib.suppress(ssl.SSLError, ConnectionError):  # the client's alert
            await peer.handshake()
        with contextlib.suppress(ConnectionError):
            while await peer.reader.read(65536):
                pass
        ended.set()

    async with listening(by_hand(trustme.CA(), script)) as port:
        app = App()
        with pytest.raises(ssl.SSLCertVerificationError, match="CERTIFICATE_VERIFY_FAILED"):
            await connect(port, ca, app, compiled)
        async with asyncio.timeout(5):
            await ended.wait()  # the socket was closed, not left open
    assert app.events == []


async def test_a_peer_that_hangs_up_in_the_handshake_is_a_reset_the_application_never_sees(
    ca: trustme.CA, compiled: bool
) -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)  # the ClientHello
        writer.close()

    async with listening(hang_up) as port:
        app = App()
        with pytest.raises(ConnectionResetError):
            await connect(port, ca, app, compiled)
    assert app.events == []


async def test_close_sends_what_was_written_then_close_notify(
    ca: trustme.CA, compiled: bool
) -> None:
    payload = bytes(range(256)) * 800  # 200 KiB: many records, more than one socket write
    received: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def script(peer: HandDrivenPeer) -> None:
        await peer.handshake()
        received.set_result(await peer.receive_until_close_notify())

    async with listening(by_hand(ca, script)) as port:
        app = App()
        await connect(port, ca, app, compiled)
        app.transport.write(payload)
        app.transport.close()
        assert app.transport.is_closing()
        app.transport.write(b"after close")  # dropped, as a closing transport drops it
        async with asyncio.timeout(5):
            assert await received == payload


async def test_a_peer_that_stops_reading_pauses_the_writer_until_it_reads(
    ca: trustme.CA, compiled: bool
) -> None:
    handshaken = asyncio.Event()
    read_now = asyncio.Event()
    total = 0

    async def script(peer: HandDrivenPeer) -> None:
        nonlocal total
        await peer.handshake()
        handshaken.set()
        await read_now.wait()
        while data := await peer.reader.read(1 << 20):
            total += len(data)

    async with listening(by_hand(ca, script)) as port:
        app = App()
        await connect(port, ca, app, compiled)
        await handshaken.wait()
        for _ in range(256):  # up to 256 MiB: far past any socket buffer
            if "pause_writing" in app.events:
                break
            app.transport.write(bytes(1 << 20))
            await asyncio.sleep(0)
        assert "pause_writing" in app.events
        assert app.transport.get_write_buffer_size() > 0
        read_now.set()
        await app.until(lambda: "resume_writing" in app.events)
        app.transport.abort()


async def test_set_protocol_moves_delivery_to_the_new_protocol(
    ca: trustme.CA, compiled: bool
) -> None:
    async def two_messages(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"one")
        await reader.readexactly(2)
        writer.write(b"two")
        with contextlib.suppress(ConnectionError):
            await writer.drain()
            await reader.read()

    async with listening(two_messages, server_tls(ca)) as port:
        first, second = App(), App()
        await connect(port, ca, first, compiled)
        await first.until(lambda: bool(first.data))
        first.transport.set_protocol(second)
        assert first.transport.get_protocol() is second
        first.transport.write(b"go")
        await second.until(lambda: bool(second.data))
        first.transport.abort()
        await second.until(lambda: "lost" in second.events)
    assert (bytes(first.data), bytes(second.data)) == (b"one", b"two")
    assert first.events == ["made"] and second.events == ["lost"]
