"""No session leaves the gateway's objects in a reference cycle, however it ends.

Whatever a session allocated is freed by reference counting when it ends, so the garbage
collector, whose passes stop every stream in the process while they run, has nothing of
it to trace. Each case below runs one way a session can end against a real gateway (relaying
to a fake cloud on loopback, or to its local engine) with the collector off and every
unreachable object kept (``gc.DEBUG_SAVEALL``); then no object of the gateway's (its
classes, functions, or frames of its code) may be among them. The clients' objects, which
live in this process too, are not the gateway's and are passed over.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import socket
import struct
import types
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import pytest
import trustme
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from gateway import server as gateway_server
from gateway.server import Gateway, RunningGateway, run_gateway
from gateway.settings import GatewaySettings
from tests.fakes import FakeCloud, drip, fail, hang_up, speak, stall, tone_pcm
from tests.support import exchange, start, unanswered_port
from tests.test_gateway import base_of, relay_to, scrape, value
from tests.test_upstream_tls import server_tls

_OURS = ("gateway", "rtts_plugin")
_SOURCES = tuple(str(Path(__file__).parent.parent / package) for package in _OURS)


def _of_ours(thing: object) -> str | None:
    """What ``thing`` is, if it is the gateway's: an instance of its classes, one of its
    functions or methods, or a frame running its code (an exception's traceback holds one)."""
    kind = type(thing)  # not isinstance(): a dead weak proxy cannot answer it
    if kind is types.FrameType:
        code = thing.f_code  # type: ignore[attr-defined]
        return f"frame of {code.co_qualname}" if code.co_filename.startswith(_SOURCES) else None
    if kind is types.MethodType:
        thing = thing.__func__  # type: ignore[attr-defined]
        kind = type(thing)
    if kind is types.FunctionType or kind is types.CoroutineType:
        module = thing.__module__ or ""  # type: ignore[attr-defined]
        name = f"function {thing.__qualname__}"  # type: ignore[attr-defined]
    else:
        module, name = kind.__module__, kind.__qualname__
    return name if module.partition(".")[0] in _OURS else None


@contextmanager
def cycles_left() -> Iterator[list[str]]:
    """The gateway's objects that became garbage in a reference cycle within the block."""
    found: list[str] = []
    gc.collect()
    gc.freeze()  # what lives now is not the block's: passed over, and the collection quick
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    # No log records meanwhile: pytest keeps each, and with it the errors it names, which
    # would keep what they hold reachable and hide a cycle it is in.
    logging.disable(logging.CRITICAL)
    try:
        yield found
        gc.collect()
        found.extend(sorted({name for o in gc.garbage if (name := _of_ours(o)) is not None}))
    finally:
        logging.disable(logging.NOTSET)
        gc.set_debug(0)
        gc.garbage.clear()
        gc.unfreeze()
        gc.enable()


async def ended(running: RunningGateway) -> None:
    """Until every session of ``running`` is over and its sockets' last callbacks have run."""
    await asyncio.wait_for(running.gateway.wait_idle(), 15)
    if running.engine is not None:
        await asyncio.wait_for(running.engine.wait_idle(), 15)
    for _ in range(20):  # connection_lost comes a loop turn or two after a close
        await asyncio.sleep(0.01)


async def raw_client(running: RunningGateway, payload: bytes) -> bytes:
    """Send ``payload`` on a new TCP connection to ``running``; what it answers."""
    reader, writer = await asyncio.open_connection(running.host, running.port)
    writer.write(payload)
    answer = await asyncio.wait_for(reader.read(65536), 15)
    writer.transport.abort()
    return answer


def request(url: str) -> bytes:
    path = "/" + url.split("//", 1)[1].split("/", 1)[1]
    return (
        f"GET {path} HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


# -- the endings ---------------------------------------------------------------------------

Ending = Callable[[RunningGateway, FakeCloud], Awaitable[None]]


async def served(running: RunningGateway, cloud: FakeCloud) -> None:
    seen = await exchange(running.url(), start("all of it"))
    assert seen.kinds[-1] == "END"


@asynccontextmanager
async def streaming(
    running: RunningGateway, cloud: FakeCloud, text: str
) -> AsyncIterator[ClientConnection]:
    """A client of ``running`` whose session streams (slowly), once its START and first
    audio are in; closed with a close frame when the block ends, unless it was cut."""
    cloud.then(drip(500, 0.01))
    async with connect(running.url(), compression=None, proxy=None) as ws:
        await ws.send(start(text))
        assert isinstance(await ws.recv(), str)  # START
        assert isinstance(await ws.recv(), bytes)
        yield ws


async def client_closes_mid_stream(running: RunningGateway, cloud: FakeCloud) -> None:
    async with streaming(running, cloud, "cut short"):
        pass


async def client_drops_mid_stream(running: RunningGateway, cloud: FakeCloud) -> None:
    async with streaming(running, cloud, "dropped") as ws:
        ws.transport.abort()


async def upstream_errors(running: RunningGateway, cloud: FakeCloud) -> None:
    cloud.then(fail("ERROR", "SIS.0401", "bad text", audio_first=b"\x00\x00"))
    seen = await exchange(running.url(), start("error"))
    assert "ERROR" in seen.kinds


async def upstream_hangs_up(running: RunningGateway, cloud: FakeCloud) -> None:
    cloud.then(hang_up())
    seen = await exchange(running.url(), start("no END"))
    assert seen.close_code == 1014


async def upstream_goes_quiet(running: RunningGateway, cloud: FakeCloud) -> None:
    cloud.then(stall(after_start=True))
    seen = await exchange(running.url(), start("silence"))  # the watchdog's gap timeout
    assert seen.close_code == 1014


async def upstream_refuses(running: RunningGateway, cloud: FakeCloud) -> None:
    cloud.refuse_next(403, "SIS.0203", "not allowed")
    with pytest.raises(InvalidStatus):
        await exchange(running.url(), start("refused"))


async def upstream_too_slow(running: RunningGateway, cloud: FakeCloud) -> None:
    cloud.handshake_delay = 1.0  # past the gateway's connect budget
    with pytest.raises(InvalidStatus) as refused:
        await exchange(running.url(), start("slow cloud"))
    cloud.handshake_delay = 0.0
    assert refused.value.response.status_code == 504


async def client_leaves_during_upstream_handshake(
    running: RunningGateway, cloud: FakeCloud
) -> None:
    cloud.handshake_delay = 0.2
    _, writer = await asyncio.open_connection(running.host, running.port)
    writer.write(request(running.url()))
    await asyncio.sleep(0.1)
    writer.transport.abort()
    await asyncio.sleep(0.3)  # the cloud answers a caller already gone
    cloud.handshake_delay = 0.0


async def no_start_from_client(running: RunningGateway, cloud: FakeCloud) -> None:
    async with connect(running.url(), compression=None, proxy=None) as ws:
        await ws.wait_closed()  # the watchdog's idle timeout
    assert ws.close_code in (1000, 1014)  # the local engine's idle timeout, or the watchdog's


async def not_found(running: RunningGateway, cloud: FakeCloud) -> None:
    answer = await raw_client(running, request(running.url()).replace(b"/v1/", b"/v9/"))
    assert answer.startswith(b"HTTP/1.1 404 ")


async def malformed_request(running: RunningGateway, cloud: FakeCloud) -> None:
    answer = await raw_client(running, b"GET\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ")


async def no_request_in_time(running: RunningGateway, cloud: FakeCloud) -> None:
    answer = await raw_client(running, b"")
    assert answer.startswith(b"HTTP/1.1 408 ")


async def hang_up_before_request(running: RunningGateway, cloud: FakeCloud) -> None:
    _, writer = await asyncio.open_connection(running.host, running.port)
    writer.transport.abort()


# Endings on the upstream's side of the gateway, run over ws:// and wss://.
UPSTREAM_ENDINGS: dict[str, Ending] = {
    "served": served,
    "client-closes-mid-stream": client_closes_mid_stream,
    "client-drops-mid-stream": client_drops_mid_stream,
    "upstream-error": upstream_errors,
    "upstream-hangs-up": upstream_hangs_up,
    "upstream-goes-quiet": upstream_goes_quiet,
    "upstream-refuses": upstream_refuses,
    "upstream-too-slow": upstream_too_slow,
    "client-leaves-during-upstream-handshake": client_leaves_during_upstream_handshake,
    "no-start-from-client": no_start_from_client,
}
# Endings at the front door, before any upstream is asked (its preconnect closed unused).
DOOR_ENDINGS: dict[str, Ending] = {
    "not-found": not_found,
    "malformed-request": malformed_request,
    "no-request-in-time": no_request_in_time,
    "hang-up-before-request": hang_up_before_request,
}
ENDINGS = [
    *(pytest.param(ending, "ws", id=f"{name}-ws") for name, ending in UPSTREAM_ENDINGS.items()),
    *(pytest.param(ending, "wss", id=f"{name}-wss") for name, ending in UPSTREAM_ENDINGS.items()),
    *(pytest.param(ending, "ws", id=name) for name, ending in DOOR_ENDINGS.items()),
]

TIMEOUTS = {"idle_timeout": 0.3, "upstream_gap_timeout": 0.3, "upstream_connect_timeout": 0.5}


@pytest.fixture(scope="module")
def certificate_authority() -> trustme.CA:
    return trustme.CA()


def trusting(authority: trustme.CA, tmp_path: Path) -> Path:
    ca_file = tmp_path / "ca.pem"
    authority.cert_pem.write_to_path(str(ca_file))
    return ca_file


@asynccontextmanager
async def cloud_and_gateway(
    tls: trustme.CA | None, tmp_path: Path, **settings: object
) -> AsyncIterator[tuple[RunningGateway, FakeCloud]]:
    cloud = FakeCloud(default=speak(tone_pcm(0.2, 16000)))
    if tls is not None:
        settings["ca_file"] = trusting(tls, tmp_path)
    served_tls = server_tls(tls) if tls is not None else None
    async with cloud.running(tls=served_tls), relay_to(base_of(cloud.url), **settings) as running:
        await served(running, cloud)  # what lives as long as the gateway is made now
        await ended(running)
        yield running, cloud


@pytest.fixture(autouse=True)
def _quick_timeouts(monkeypatch: pytest.MonkeyPatch) -> None:
    """The gateway's own clocks short enough for a test (its watchdog's START grace too)."""
    monkeypatch.setattr(Gateway, "handshake_timeout", 0.2)
    monkeypatch.setattr(gateway_server, "_START_GRACE_SECONDS", 0.0)


async def cycles_after(
    running: RunningGateway, cloud: FakeCloud, ending: Ending, sessions: int = 1
) -> list[str]:
    """The gateway's objects left in cycles by ``sessions`` sessions ending as ``ending``
    does. What a gateway makes ahead for the next session (a spare, a ClientHello) is used by
    the first when a session was served before."""
    with cycles_left() as cycles:
        for _ in range(sessions):
            await ending(running, cloud)
            await ended(running)
    return cycles


@pytest.mark.parametrize(("ending", "upstream"), ENDINGS)
async def test_a_relayed_session_leaves_nothing_in_a_cycle(
    ending: Ending, upstream: str, certificate_authority: trustme.CA, tmp_path: Path
) -> None:
    tls = certificate_authority if upstream == "wss" else None
    async with cloud_and_gateway(tls, tmp_path, **TIMEOUTS) as (running, cloud):
        assert await cycles_after(running, cloud, ending) == []


@pytest.mark.parametrize("upstream", ["ws", "wss"])
@pytest.mark.parametrize(
    "ending",
    [served, client_closes_mid_stream, client_drops_mid_stream],
    ids=lambda ending: ending.__name__,
)
async def test_a_session_on_a_spare_leaves_nothing_in_a_cycle(
    ending: Ending, upstream: str, certificate_authority: trustme.CA, tmp_path: Path
) -> None:
    tls = certificate_authority if upstream == "wss" else None
    async with cloud_and_gateway(tls, tmp_path, upstream_spares=1, **TIMEOUTS) as (
        running,
        cloud,
    ):
        assert await cycles_after(running, cloud, ending, sessions=2) == []
        assert value(await scrape(running), "rtts_sessions_on_spare_total") == 2


# What a broken upstream does with the gateway's upgrade request (None: closes on reading it).
BAD_ANSWERS: dict[str, bytes | None] = {
    "closes-after-request": None,
    "garbage-status-line": b"nonsense\r\n\r\n",
    "bad-status-code": b"HTTP/1.1 abc Nope\r\n\r\n",
    "long-status-line": b"HTTP/1.1 200 " + b"x" * 20000 + b"\r\n\r\n",
    "wrong-accept": (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: AAAAAAAAAAAAAAAAAAAAAAAAAAA=\r\n\r\n"
    ),
    "truncated-head": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: webs",
}


async def refused_by_gateway(running: RunningGateway, cloud: FakeCloud) -> None:
    with pytest.raises(InvalidStatus) as answer:
        await exchange(running.url(), start("a broken upstream"))
    assert answer.value.response.status_code in (502, 504)


@pytest.mark.parametrize("upstream", ["ws", "wss"])
@pytest.mark.parametrize("answer", list(BAD_ANSWERS), ids=list(BAD_ANSWERS))
async def test_an_upstream_answering_badly_leaves_nothing_in_a_cycle(
    answer: str, upstream: str, certificate_authority: trustme.CA, tmp_path: Path
) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
            if (bad := BAD_ANSWERS[answer]) is not None:
                writer.write(bad)
                await writer.drain()
        writer.close()

    tls = upstream == "wss"
    settings: dict[str, object] = {"upstream_connect_timeout": 1.0, "breaker_failures": 0}
    if tls:
        settings["ca_file"] = trusting(certificate_authority, tmp_path)
    cloud = await asyncio.start_server(
        handle, "127.0.0.1", 0, ssl=server_tls(certificate_authority) if tls else None
    )
    port = cloud.sockets[0].getsockname()[1]
    async with cloud, relay_to(f"{upstream}://127.0.0.1:{port}", **settings) as running:
        assert await cycles_after(running, FakeCloud(), refused_by_gateway) == []


@pytest.mark.parametrize("how", ["closes-at-once", "resets"])
async def test_an_upstream_failing_at_the_tcp_level_leaves_nothing_in_a_cycle(how: str) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if how == "resets":
            await asyncio.sleep(0.05)  # the request is in
            linger = writer.get_extra_info("socket")
            linger.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    cloud = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = cloud.sockets[0].getsockname()[1]
    settings = {"upstream_connect_timeout": 1.0, "breaker_failures": 0}
    async with cloud, relay_to(f"ws://127.0.0.1:{port}", **settings) as running:
        assert await cycles_after(running, FakeCloud(), refused_by_gateway) == []


class Tamperer:
    """A TCP relay between the gateway and the cloud that can put bytes of its own into
    what the cloud sends: below TLS on wss://, so a record there fails to decrypt."""

    def __init__(self, cloud_port: int) -> None:
        self.cloud_port = cloud_port
        self.to_gateway: list[asyncio.StreamWriter] = []
        self.held = False

    async def relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        from_cloud, to_cloud = await asyncio.open_connection("127.0.0.1", self.cloud_port)
        self.to_gateway.append(writer)

        async def pipe(
            source: asyncio.StreamReader, sink: asyncio.StreamWriter, held: bool
        ) -> None:
            with contextlib.suppress(ConnectionError):
                while (data := await source.read(65536)) and not sink.is_closing():
                    if not (held and self.held):
                        sink.write(data)
            sink.close()

        await asyncio.gather(pipe(reader, to_cloud, False), pipe(from_cloud, writer, True))

    async def inject(self, data: bytes) -> None:
        self.held = True  # nothing of the cloud's after it: the bytes land between records
        await asyncio.sleep(0.05)
        for writer in self.to_gateway:
            if not writer.is_closing():
                writer.write(data)
        self.to_gateway.clear()
        self.held = False


@pytest.mark.parametrize("upstream", ["ws", "wss"])
async def test_an_upstream_broken_mid_stream_leaves_nothing_in_a_cycle(
    upstream: str, certificate_authority: trustme.CA, tmp_path: Path
) -> None:
    """Mid-stream the upstream's bytes turn to garbage: a record that fails to decrypt on
    wss:// (the TLS layer's fatal error), a reserved opcode on ws:// (a violation)."""
    tls = upstream == "wss"
    settings: dict[str, object] = dict(TIMEOUTS)
    if tls:
        settings["ca_file"] = trusting(certificate_authority, tmp_path)
    cloud = FakeCloud(default=speak(tone_pcm(0.2, 16000)))
    broken = b"\x17\x03\x03\x00\x40" + bytes(64) if tls else b"\x83\x00"

    async with cloud.running(tls=server_tls(certificate_authority) if tls else None):
        tamperer = Tamperer(int(base_of(cloud.url).rsplit(":", 1)[1]))
        relay = await asyncio.start_server(tamperer.relay, "127.0.0.1", 0)
        base = f"{upstream}://127.0.0.1:{relay.sockets[0].getsockname()[1]}"
        async with relay, relay_to(base, **settings) as running:
            await served(running, cloud)
            await ended(running)

            async def cut(running: RunningGateway, cloud: FakeCloud) -> None:
                async with streaming(running, cloud, "broken") as ws:
                    await tamperer.inject(broken)
                    with contextlib.suppress(ConnectionClosed):
                        while True:
                            await ws.recv()
                assert ws.close_code == 1014  # the upstream's fault, as the gateway reports

            assert await cycles_after(running, cloud, cut) == []


@pytest.mark.parametrize("answered", [True, False], ids=["refused", "unanswered"])
async def test_an_unreachable_upstream_leaves_nothing_in_a_cycle(answered: bool) -> None:
    async def unreachable(running: RunningGateway, cloud: FakeCloud) -> None:
        with pytest.raises(InvalidStatus) as refused:
            await exchange(running.url(), start("nobody there"))
        assert refused.value.response.status_code in (502, 504)

    with contextlib.ExitStack() as stack:
        if answered:  # a port nothing listens on: the connect is refused at once
            closed = stack.enter_context(socket.socket())
            closed.bind(("127.0.0.1", 0))
            base = f"ws://127.0.0.1:{closed.getsockname()[1]}"
        else:
            base = f"ws://127.0.0.2:{stack.enter_context(unanswered_port())}"
        async with relay_to(base, upstream_connect_timeout=0.3) as running:
            assert await cycles_after(running, FakeCloud(), unreachable) == []


@pytest.mark.parametrize("server", ["untrusted", "not-tls"])
async def test_a_failed_tls_handshake_leaves_nothing_in_a_cycle(
    server: str, certificate_authority: trustme.CA
) -> None:
    """The gateway's TLS layer fails the handshake: a certificate it does not trust (the CA
    is not given), or a server that does not speak TLS at all."""

    async def refused(running: RunningGateway, cloud: FakeCloud) -> None:
        with pytest.raises(InvalidStatus) as answer:
            await exchange(running.url(), start("no TLS"))
        assert answer.value.response.status_code == 502

    cloud = FakeCloud()
    async with cloud.running(
        tls=server_tls(certificate_authority) if server == "untrusted" else None
    ):
        base = base_of(cloud.url).replace("ws://", "wss://")
        async with relay_to(base) as running:
            assert await cycles_after(running, cloud, refused) == []


@pytest.mark.parametrize(
    "ending",
    [served, client_closes_mid_stream, client_drops_mid_stream, no_start_from_client],
    ids=lambda ending: ending.__name__,
)
async def test_a_local_engine_session_leaves_nothing_in_a_cycle(ending: Ending) -> None:
    settings = GatewaySettings(port=0, metrics_port=0, idle_timeout=0.3, drain_timeout=1.0)
    async with run_gateway(settings) as running:
        await served(running, FakeCloud())  # what lives as long as the gateway is made now
        await ended(running)
        assert await cycles_after(running, FakeCloud(), ending) == []
