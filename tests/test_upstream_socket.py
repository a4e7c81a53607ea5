"""Opening an upstream for the splice: the handshake on websockets' sans-I/O protocol, our socket.

Raw upstreams on 127.0.0.1 that answer byte by byte, refuse with a body read to EOF, never
answer, or sit behind an HTTP CONNECT proxy (the proxy maps the name the gateway asks for
to 127.0.0.1, so nothing leaves the machine). Runs on asyncio and uvloop.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import ssl
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trustme
from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.server import ServerProtocol
from websockets.utils import accept_key

import gateway.tls_session
from gateway.upstream_socket import (
    HELD_UPSTREAM_BYTES,
    HELLO_MAX_AGE,
    ResumingTLS,
    UpstreamSocket,
    client_tls,
    open_upstream,
)
from rtts_plugin.errors import HandshakeError, RttsTimeoutError

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
AUDIO_FRAMES = b"".join(
    Frame(Opcode.BINARY, bytes([n]) * 300).serialize(mask=False) for n in range(5)
)


@asynccontextmanager
async def listening(handle: Handler, tls: ssl.SSLContext | None = None) -> AsyncIterator[int]:
    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=tls)
    async with server:
        yield server.sockets[0].getsockname()[1]


async def read_request(reader: asyncio.StreamReader) -> tuple[ServerProtocol, Request]:
    protocol = ServerProtocol()
    while True:
        data = await reader.read(65536)
        assert data, "the gateway closed before its request"
        protocol.receive_data(data)
        for event in protocol.events_received():
            if isinstance(event, Request):
                return protocol, event


async def held(upstream: UpstreamSocket, size: int) -> None:
    """Until ``size`` bytes after the 101 are held (the socket has no event to wait on)."""
    async with asyncio.timeout(5):
        while len(upstream.early) < size:  # noqa: ASYNC110
            await asyncio.sleep(0.01)


def accepting(after_101: bytes, *, chunk: int = 0, seen: list[Request] | None = None) -> Handler:
    """Accept the upgrade, then write the 101 and ``after_101`` (``chunk`` bytes a write)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        protocol, request = await read_request(reader)
        if seen is not None:
            seen.append(request)
        protocol.send_response(protocol.accept(request))
        data = b"".join(protocol.data_to_send()) + after_101
        step = chunk or len(data)
        for at in range(0, len(data), step):
            writer.write(data[at : at + step])
            await writer.drain()
            await asyncio.sleep(0)
        await reader.read()  # until the gateway closes
        writer.close()

    return handle


async def test_bytes_after_the_101_are_held_unread_whatever_the_writes() -> None:
    # One write, then a byte a write: the head's end spans reads, frames follow in any split.
    for chunk in (0, 1, 7):
        async with listening(accepting(AUDIO_FRAMES, chunk=chunk)) as port:
            upstream = await open_upstream(
                f"ws://127.0.0.1:{port}/v1/p/rtts", {"X-Auth-Token": "t"}, connect_timeout=5
            )
            await held(upstream, len(AUDIO_FRAMES))
            assert bytes(upstream.early) == AUDIO_FRAMES
            assert not upstream.usable()  # it spoke: not a spare to hand out
            upstream.abort()


async def test_the_request_carries_the_headers_and_no_extension() -> None:
    seen: list[Request] = []
    async with listening(accepting(b"", seen=seen)) as port:
        upstream = await open_upstream(
            f"ws://127.0.0.1:{port}/v1/p/rtts", {"X-Auth-Token": "secret"}, connect_timeout=5
        )
        assert upstream.usable() and not upstream.early
        upstream.retire("done")
    request = seen[0]
    assert request.path == "/v1/p/rtts"
    assert request.headers["X-Auth-Token"] == "secret"
    assert request.headers["User-Agent"] == "rtts-plugin"
    assert "Sec-WebSocket-Extensions" not in request.headers  # audio does not compress


def refusing(head: bytes, body: bytes) -> Handler:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(head + body)
        await writer.drain()
        writer.close()  # a body without Content-Length ends with the connection

    return handle


async def test_a_refusal_read_to_eof_keeps_status_code_and_retry_after() -> None:
    body = json.dumps({"error_code": "SIS.0312", "error_msg": "quota"}).encode()
    head = b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 7\r\n\r\n"
    async with listening(refusing(head, body)) as port:
        with pytest.raises(HandshakeError) as refused:
            await open_upstream(f"ws://127.0.0.1:{port}/v1/p/rtts", {}, connect_timeout=5)
    error = refused.value
    assert (error.status, error.error_code, error.retry_after) == (429, "SIS.0312", 7.0)


def switching(accept: str, extra: str = "") -> bytes:
    return (
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Accept: {accept}\r\n{extra}\r\n"
    ).encode()


@pytest.mark.parametrize(
    ("answer", "hang_up", "named"),
    [
        (lambda key: switching(accept_key("x" * 24)), False, "Sec-WebSocket-Accept"),
        (
            lambda key: switching(accept_key(key), "Sec-WebSocket-Protocol: chat\r\n"),
            False,
            "no subprotocols supported",
        ),
        (lambda key: b"SSH-2.0-OpenSSH_9.2\r\n\r\n", False, "did not receive a valid HTTP"),
        (lambda key: switching(accept_key(key))[:40], True, "did not receive a valid HTTP"),
    ],
    ids=["wrong accept", "unoffered subprotocol", "not http", "gone in the head"],
)
async def test_an_invalid_answer_is_refused_and_the_socket_closed(
    answer: Callable[[str], bytes], hang_up: bool, named: str
) -> None:
    closed = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, request = await read_request(reader)
        writer.write(answer(request.headers["Sec-WebSocket-Key"]))
        await writer.drain()
        if not hang_up:  # else the upstream goes away in the middle of its answer
            while await reader.read(65536):
                pass
        closed.set()
        writer.close()

    async with listening(handle) as port:
        with pytest.raises(HandshakeError) as refused:
            await open_upstream(f"ws://127.0.0.1:{port}/v1/p/rtts", {}, connect_timeout=5)
        async with asyncio.timeout(5):
            await closed.wait()  # the gateway closed its side
    assert refused.value.status == 0
    assert named in str(refused.value)


async def test_a_redirect_is_a_refusal_and_is_not_followed() -> None:
    followed: list[bytes] = []

    async def elsewhere(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        followed.append(await reader.read(100))
        writer.close()

    async with listening(elsewhere) as other:
        head = (
            f"HTTP/1.1 302 Found\r\nLocation: ws://127.0.0.1:{other}/steal\r\n"
            "Content-Length: 0\r\n\r\n"
        ).encode()
        async with listening(refusing(head, b"")) as port:
            with pytest.raises(HandshakeError) as refused:
                await open_upstream(f"ws://127.0.0.1:{port}/v1/p/rtts", {}, connect_timeout=5)
    assert refused.value.status == 302
    assert followed == []


async def test_an_upstream_that_never_answers_times_out_and_is_closed() -> None:
    closed = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # the request, then the gateway's end
        while await reader.read(65536):
            pass
        closed.set()
        writer.close()

    async with listening(silent) as port:
        with pytest.raises(RttsTimeoutError):
            await open_upstream(f"ws://127.0.0.1:{port}/v1/p/rtts", {}, connect_timeout=0.3)
        async with asyncio.timeout(5):
            await closed.wait()


@pytest.mark.parametrize("tls", [False, True])
async def test_an_upstream_that_accepted_is_kept_when_its_deadline_is_seen_after(
    tls: bool, compiled: bool
) -> None:
    # The upstream accepts in time, but the loop is busy past the deadline right after (here
    # the open callback, which sends the caller its 101, blocks): the acceptance stands, as
    # the caller already has its 101; it is not thrown away for a timeout seen afterwards.
    server, client = loopback_tls() if tls else (None, None)
    opened: list[None] = []
    async with listening(accepting(AUDIO_FRAMES), server) as port:
        upstream = await open_upstream(
            f"{'wss' if tls else 'ws'}://127.0.0.1:{port}/v1/p/rtts",
            {},
            connect_timeout=0.5,
            ssl=client,
            on_open=lambda: opened.append(time.sleep(0.7)),
            compiled=compiled,
        )
        await held(upstream, len(AUDIO_FRAMES))
        assert opened == [None] and bytes(upstream.early) == AUDIO_FRAMES
        upstream.abort()


async def test_a_tls_upstream_that_never_answers_the_hello_times_out_and_is_closed(
    compiled: bool,
) -> None:
    closed = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(65536):  # the ClientHello, then nothing until the end
            pass
        closed.set()
        writer.close()

    async with listening(silent) as port:
        with pytest.raises(RttsTimeoutError):
            await open_upstream(
                f"wss://127.0.0.1:{port}/v1/p/rtts",
                {},
                connect_timeout=0.3,
                ssl=client_trusting(trustme.CA()),
                compiled=compiled,
            )
        async with asyncio.timeout(5):
            await closed.wait()


@pytest.mark.parametrize("scheme", ["ws", "wss"])
async def test_a_flood_after_the_101_pauses_reading_at_the_bound(
    scheme: str, compiled: bool
) -> None:
    # Larger than the bound plus one read (asyncio reads up to 256 KiB at a time).
    flood = Frame(Opcode.BINARY, b"x" * (16 * HELD_UPSTREAM_BYTES)).serialize(mask=False)
    server_tls, client = loopback_tls() if scheme == "wss" else (None, None)
    async with listening(accepting(flood), tls=server_tls) as port:
        upstream = await open_upstream(
            f"{scheme}://127.0.0.1:{port}/v1/p/rtts",
            {},
            connect_timeout=5,
            ssl=client,
            compiled=compiled,
        )
        await held(upstream, HELD_UPSTREAM_BYTES + 1)
        size = len(upstream.early)
        await asyncio.sleep(0.2)  # the rest of the flood waits in the socket meanwhile
        assert len(upstream.early) == size < len(flood)  # paused, not reading on
        upstream.abort()


# -- through an HTTP CONNECT proxy ------------------------------------------------------------


@asynccontextmanager
async def connect_proxy(
    target_port: int, answer: bytes = b"HTTP/1.1 200 Connection established\r\n\r\n"
) -> AsyncIterator[tuple[int, list[bytes]]]:
    """A CONNECT proxy that tunnels any requested host to 127.0.0.1:``target_port``."""
    heads: list[bytes] = []

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(answer)
        if not answer.startswith(b"HTTP/1.1 200"):
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target_port)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async with listening(handle) as port:
        yield port, heads


@pytest.fixture
def no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("http_proxy", "https_proxy", "ws_proxy", "wss_proxy", "no_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    return monkeypatch


@pytest.mark.parametrize("hello", ["made on connecting", "made ahead"])
async def test_a_wss_upstream_is_reached_through_the_environments_https_proxy(
    no_proxy_env: pytest.MonkeyPatch, hello: str
) -> None:
    ca = trustme.CA()
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("rtts.example.test").configure_cert(server_tls)
    client_tls = client_trusting(ca)
    if hello == "made ahead":
        client_tls.prepare("rtts.example.test")
    async with listening(accepting(AUDIO_FRAMES), tls=server_tls) as upstream_port:
        async with connect_proxy(upstream_port) as (proxy_port, heads):
            no_proxy_env.setenv("HTTPS_PROXY", f"http://user:p%40ss@127.0.0.1:{proxy_port}")
            upstream = await open_upstream(
                f"wss://rtts.example.test:{upstream_port}/v1/p/rtts",
                {},
                connect_timeout=5,
                ssl=client_tls,
            )
            await held(upstream, len(AUDIO_FRAMES))
            assert bytes(upstream.early) == AUDIO_FRAMES  # TLS inside the tunnel, verified
            upstream.abort()
    assert client_tls.take_hello("rtts.example.test") is None  # sent, if there was one
    head = heads[0].decode()
    assert head.startswith(f"CONNECT rtts.example.test:{upstream_port} HTTP/1.1\r\n")
    assert f"Proxy-Authorization: Basic {base64.b64encode(b'user:p@ss').decode()}" in head


async def test_loopback_and_no_proxy_hosts_bypass_the_proxy(
    no_proxy_env: pytest.MonkeyPatch,
) -> None:
    async with listening(accepting(b"")) as port, connect_proxy(port) as (proxy_port, heads):
        no_proxy_env.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy_port}")
        no_proxy_env.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy_port}")
        upstream = await open_upstream(f"ws://127.0.0.1:{port}/v1/p/rtts", {}, connect_timeout=5)
        upstream.abort()
        assert heads == []


async def test_a_proxy_that_refuses_connect_is_a_handshake_error_naming_it(
    no_proxy_env: pytest.MonkeyPatch,
) -> None:
    answer = b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n"
    async with connect_proxy(1, answer) as (proxy_port, _):
        no_proxy_env.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy_port}")
        with pytest.raises(HandshakeError) as refused:
            await open_upstream("ws://rtts.example.test/v1/p/rtts", {}, connect_timeout=5)
    assert refused.value.status == 0
    assert "refused CONNECT: HTTP/1.1 407" in str(refused.value)


async def test_a_socks_proxy_is_refused_with_what_to_change(
    no_proxy_env: pytest.MonkeyPatch,
) -> None:
    no_proxy_env.setenv("HTTPS_PROXY", "socks5://127.0.0.1:1")
    with pytest.raises(HandshakeError) as refused:
        await open_upstream("wss://rtts.example.test/v1/p/rtts", {}, connect_timeout=5)
    assert "HTTPS_PROXY" in str(refused.value) and "NO_PROXY" in str(refused.value)


# -- TLS sessions -----------------------------------------------------------------------------


@pytest.fixture(params=["in-memory copies", "CPython's getter and setter"])
def session_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each TLS session test runs on both ways of keeping and offering a session."""
    if request.param != "in-memory copies":
        monkeypatch.setattr(gateway.tls_session, "DIRECT", False)
    return str(request.param)


def test_sessions_are_kept_as_in_memory_copies_on_this_python() -> None:
    # The CPython this runs on is one whose layouts the ctypes path checks out against: if
    # that ever stops being so, sessions still work (the other path), but slower.
    assert gateway.tls_session.DIRECT


def server_for_loopback(
    ca: trustme.CA, version: ssl.TLSVersion = ssl.TLSVersion.MAXIMUM_SUPPORTED
) -> ssl.SSLContext:
    """A server TLS context for 127.0.0.1 with a certificate ``ca`` issued, up to ``version``."""
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_tls)
    server_tls.maximum_version = version
    return server_tls


def client_trusting(ca: trustme.CA) -> ResumingTLS:
    """The gateway's client TLS context, trusting ``ca`` through a CA file as --ca-file does."""
    with tempfile.TemporaryDirectory() as workdir:
        ca_file = Path(workdir) / "ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        return client_tls(str(ca_file))


def loopback_tls(
    version: ssl.TLSVersion = ssl.TLSVersion.MAXIMUM_SUPPORTED,
) -> tuple[ssl.SSLContext, ResumingTLS]:
    """A server context for 127.0.0.1 (up to ``version``) and a gateway client trusting it."""
    ca = trustme.CA()
    return server_for_loopback(ca, version), client_trusting(ca)


async def opened_with(url: str, client: ResumingTLS) -> ssl.SSLObject:
    """Open ``url`` with ``client``; the connection's TLS object (the socket is dropped)."""
    upstream = await open_upstream(url, {}, connect_timeout=5, ssl=client)
    assert upstream.transport is not None
    ssl_object: ssl.SSLObject = upstream.transport.get_extra_info("ssl_object")
    upstream.abort()
    return ssl_object


async def session_reused(url: str, client: ResumingTLS) -> bool:
    """Open ``url`` with ``client``: whether the TLS session was resumed."""
    return bool((await opened_with(url, client)).session_reused)


async def test_the_next_tls_connection_resumes_the_session_and_a_stranger_is_refused(
    session_path: str,
) -> None:
    ca = trustme.CA()
    client = client_trusting(ca)
    async with listening(accepting(b""), tls=server_for_loopback(ca)) as port:
        url = f"wss://127.0.0.1:{port}/v1/p/rtts"
        reused = [await session_reused(url, client) for _ in range(3)]
        assert reused == [False, True, True]
        # A host that no longer knows the session (another server behind the same name, a
        # ticket key rotated) makes a full handshake; its new session is kept and resumed.
        async with listening(accepting(b""), tls=server_for_loopback(ca)) as other_port:
            other = f"wss://127.0.0.1:{other_port}/v1/p/rtts"
            reused += [await session_reused(other, client) for _ in range(2)]
        assert reused == [False, True, True, False, True]
        # Another CA's context has no session to offer: a full handshake, which fails.
        with pytest.raises(HandshakeError) as refused:
            await open_upstream(url, {}, connect_timeout=5, ssl=client_tls())
    assert "CERTIFICATE_VERIFY_FAILED" in str(refused.value)


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
async def test_a_connection_aborted_and_freed_leaves_the_kept_session_resumable(
    session_path: str, version: ssl.TLSVersion
) -> None:
    # OpenSSL marks the session a connection holds when it is freed without a TLS shutdown
    # not resumable (after a TLS 1.2 resumption that is the session offered): the session
    # kept must never be one a connection holds.
    server_tls, client = loopback_tls(version)
    async with listening(accepting(b""), tls=server_tls) as port:
        url = f"wss://127.0.0.1:{port}/v1/p/rtts"
        reused = []
        for _ in range(4):
            upstream = await open_upstream(url, {}, connect_timeout=5, ssl=client)
            assert upstream.transport is not None
            reused.append(upstream.transport.get_extra_info("ssl_object").session_reused)
            upstream.abort()
            async with asyncio.timeout(5):
                while not upstream.lost:  # noqa: ASYNC110 (a flag, no event to wait on)
                    await asyncio.sleep(0.001)
            del upstream
            gc.collect()  # the TLS object is freed now, before the next connection
    assert reused == [False, True, True, True]


async def test_a_resumed_session_is_kept_until_half_its_lifetime_then_renewed(
    monkeypatch: pytest.MonkeyPatch, session_path: str
) -> None:
    # Resumed connections keep offering the session already kept, until half its lifetime.
    server_tls, client = loopback_tls()

    async def connect(url: str) -> tuple[bool, ssl.SSLSession]:
        reused = await session_reused(url, client)
        return reused, client._sessions["127.0.0.1"]

    async with listening(accepting(b""), tls=server_tls) as port:
        url = f"wss://127.0.0.1:{port}/v1/p/rtts"
        full, first = await connect(url)
        resumed = [await connect(url) for _ in range(3)]
        assert not full and resumed == [(True, first)] * 3  # the same session, not re-read
        later = first.time + first.timeout / 2 + 1
        monkeypatch.setattr("gateway.upstream_socket.wall_clock", lambda: later)
        renewed, newer = await connect(url)
        assert renewed and newer is not first  # the server's newer ticket from now on
        monkeypatch.setattr("gateway.upstream_socket.wall_clock", lambda: newer.time + 1)
        assert await connect(url) == (True, newer)


# -- ClientHellos made ahead ------------------------------------------------------------------


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
async def test_a_hello_made_ahead_is_what_the_next_connection_sends_and_it_resumes(
    session_path: str, version: ssl.TLSVersion
) -> None:
    server_tls, client = loopback_tls(version)
    async with listening(accepting(AUDIO_FRAMES), tls=server_tls) as port:
        url = f"wss://127.0.0.1:{port}/v1/p/rtts"
        # With no session kept yet: a full handshake, certificate verified, from that hello.
        client.prepare("127.0.0.1")
        made = client._hellos["127.0.0.1"][1].ssl_object
        first = await opened_with(url, client)
        assert first is made and not first.session_reused
        assert client.take_hello("127.0.0.1") is None  # each hello is sent once
        # Made once a session is kept, the next hello offers it.
        for _ in range(2):
            client.prepare("127.0.0.1")
            made = client._hellos["127.0.0.1"][1].ssl_object
            resumed = await opened_with(url, client)
            assert resumed is made and resumed.session_reused
        # Nothing made ahead: the connection makes its own, as before.
        assert await opened_with(url, client) is not made


async def test_a_hello_is_made_once_and_not_sent_past_its_max_age(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server_tls, client = loopback_tls()
    now = [1000.0]
    monkeypatch.setattr("gateway.upstream_socket.hello_clock", lambda: now[0])
    async with listening(accepting(b""), tls=server_tls) as port:
        url = f"wss://127.0.0.1:{port}/v1/p/rtts"
        client.prepare("127.0.0.1")
        made = client._hellos["127.0.0.1"]
        client.prepare("127.0.0.1")  # one is ready: kept, not made again
        assert client._hellos["127.0.0.1"] is made
        now[0] += HELLO_MAX_AGE
        # Too old to send (its ticket age would be stale): the connection makes its own.
        opened = await opened_with(url, client)
        assert opened is not made[1].ssl_object and client.take_hello("127.0.0.1") is None
        client.prepare("127.0.0.1")
        now[0] += HELLO_MAX_AGE  # and one going stale is made again
        client.prepare("127.0.0.1")
        assert client._hellos["127.0.0.1"][0] == now[0]


async def test_a_hello_offering_a_session_since_replaced_is_dropped() -> None:
    server_tls, client = loopback_tls()
    async with listening(accepting(b""), tls=server_tls) as port:
        url = f"wss://127.0.0.1:{port}/v1/p/rtts"
        upstream = await open_upstream(url, {}, connect_timeout=5, ssl=client)
        assert upstream.transport is not None
        client.prepare("127.0.0.1")
        # A full handshake's session replaces the one kept: the hello made for it goes too.
        client.remember(upstream.transport)
        upstream.abort()
        assert client.take_hello("127.0.0.1") is None


def test_a_hello_that_openssl_cannot_make_is_left_to_the_connection() -> None:
    client = client_tls()
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    client.minimum_version = ssl.TLSVersion.TLSv1_3  # no version left: OpenSSL refuses
    client.prepare("127.0.0.1")
    assert client.take_hello("127.0.0.1") is None
