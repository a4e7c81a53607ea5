"""The upstream's TCP connect starts when a caller connects, before its request (gateway.dial).

A preconnect only connects: no byte goes out on it until the caller's request is admitted
and the session's dial takes it. Every other ending (the caller leaves, is refused, is too
slow, the connect failed, it is too old) closes it unused, and however many callers connect
for nothing, the upstream sees at most ``PRECONNECT_CREDIT`` such connections plus one per
session admitted.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import ssl
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import cast

import pytest
import trustme
from websockets.asyncio.server import ServerConnection, serve
from websockets.http11 import Request
from websockets.server import ServerProtocol

from gateway import dial as gateway_dial
from gateway import server as gateway_server
from gateway.addresses import ADDRESSES
from gateway.breaker import State
from gateway.dial import PRECONNECT_CREDIT, Preconnect, PreconnectBudget
from gateway.frontdoor import FrontDoor
from gateway.server import Gateway, RunningGateway
from tests.fakes import FakeCloud
from tests.support import full_accept_queue
from tests.test_dial import (
    REQUEST,
    ClientSocket,
    closed_by_gateway,
    raw_upstream,
    request_received,
    session_served,
)
from tests.test_gateway import base_of, relay_to, scrape, value

PRECONNECTS = "rtts_upstream_preconnects_total"

GATEWAY_KEY = "k" * 32


def listener() -> contextlib.AbstractContextManager[socket.socket]:
    """A listening socket the test accepts on itself (room for every connect of a test)."""
    return raw_upstream(backlog=256)


def connected(door_of: RunningGateway) -> FrontDoor:
    """A front door of ``door_of`` whose caller has connected and sent nothing yet."""
    door = door_of.gateway.door()
    door.connection_made(cast(asyncio.Transport, ClientSocket()))
    return door


def accepted(sock: socket.socket) -> list[socket.socket]:
    """Every connection waiting on ``sock`` now (none waited for)."""
    connections = []
    while True:
        try:
            connection, _ = sock.accept()
        except BlockingIOError:
            return connections
        connection.setblocking(False)
        connections.append(connection)


def far_ends(upstream: socket.socket, *doors: FrontDoor) -> list[socket.socket]:
    """The upstream's ends of the ``doors``' preconnects, accepted now (the gateway's
    reachability probe may have connected too: its connections are passed over)."""
    by_peer = {c.getpeername(): c for c in accepted(upstream)}
    found = []
    for door in doors:
        assert door.preconnect is not None
        found.append(by_peer[door.preconnect._socket.getsockname()])  # type: ignore[union-attr]
    return found


def far_end(upstream: socket.socket, door: FrontDoor) -> socket.socket:
    """The upstream's end of ``door``'s preconnect (see :func:`far_ends`)."""
    return far_ends(upstream, door)[0]


async def test_the_connect_starts_when_the_caller_connects_and_carries_its_request() -> None:
    with listener() as upstream:
        port = upstream.getsockname()[1]
        async with relay_to(f"ws://127.0.0.1:{port}") as running:
            door = connected(running)
            # Connected before the caller sent a byte (no await in between), nothing sent.
            connection = far_end(upstream, door)
            with pytest.raises(BlockingIOError):
                connection.recv(1)
            door.data_received(REQUEST)
            # The request went out on that same connection, and no other was opened.
            assert door.preconnect is None
            upstream_request = connection.recv(65536)
            assert upstream_request.startswith(b"GET /v1/p/rtts HTTP/1.1\r\n")
            assert b"X-Auth-Token: tok-Upstream-1\r\n" in upstream_request
            assert all(not c.recv(1) for c in accepted(upstream))  # no other, but a probe
            door.connection_lost(None)
            assert await closed_by_gateway(connection) == b""


def hang_up(door: FrontDoor) -> None:
    door.connection_lost(None)


def wrong_path(door: FrontDoor) -> None:
    door.data_received(REQUEST.replace(b"/v1/p/rtts", b"/v2/p/rtts"))


def no_gateway_key(door: FrontDoor) -> None:
    door.data_received(REQUEST)


def bad_request(door: FrontDoor) -> None:
    door.data_received(b"GET\r\n\r\n")


@pytest.mark.parametrize(
    ("ending", "answer"),
    [
        (hang_up, b""),
        (wrong_path, b"HTTP/1.1 404 "),
        (no_gateway_key, b"HTTP/1.1 401 "),
        (bad_request, b"HTTP/1.1 400 "),
        (None, b"HTTP/1.1 408 "),  # no request in time
    ],
    ids=["hung-up", "not-found", "no-key", "malformed", "too-slow"],
)
async def test_a_caller_not_admitted_closes_its_preconnect_with_nothing_sent(
    ending: object, answer: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Gateway, "handshake_timeout", 0.05)
    with listener() as upstream:
        port = upstream.getsockname()[1]
        async with relay_to(f"ws://127.0.0.1:{port}", gateway_key=GATEWAY_KEY) as running:
            door = running.gateway.door()
            client = ClientSocket()
            door.connection_made(cast(asyncio.Transport, client))
            connection = far_end(upstream, door)
            if callable(ending):
                ending(door)
            assert await closed_by_gateway(connection) == b""  # closed by the gateway, unused
            assert door.preconnect is None
            assert bytes(client.written).startswith(answer)
            samples = await scrape(running)
            assert value(samples, PRECONNECTS, outcome="unused") == 1
            assert value(samples, PRECONNECTS) == 1


async def test_callers_who_send_nothing_get_a_bounded_number_of_connects() -> None:
    """Connecting and leaving, again and again, spends the budget; admitted sessions earn
    it back one each, so the upstream never sees more than the budget in wasted connects."""
    cloud = FakeCloud()
    async with cloud.running(), relay_to(base_of(cloud.url)) as running:
        await session_served(running)  # the address is known from here on
        doors = [connected(running) for _ in range(PRECONNECT_CREDIT + 8)]
        started = [door for door in doors if door.preconnect is not None]
        assert len(started) == PRECONNECT_CREDIT  # the session above earned its own back
        for door in doors:
            door.connection_lost(None)
        assert not any(connected(running).preconnect for _ in range(8))  # none left
        await session_served(running)  # admitted: one more may be made
        door = connected(running)
        assert door.preconnect is not None
        door.connection_lost(None)
        assert connected(running).preconnect is None
    assert len(cloud.requests) == 2


async def test_a_burst_waiting_for_its_turn_keeps_its_preconnects() -> None:
    """More requests in one loop turn than are admitted per turn: those queued keep their
    preconnects and dial on them in a later turn; no connect is wasted."""
    with listener() as upstream:
        port = upstream.getsockname()[1]
        async with relay_to(f"ws://127.0.0.1:{port}") as running:
            doors = [connected(running) for _ in range(20)]
            ends = far_ends(upstream, *doors)
            for door in doors:
                door.data_received(REQUEST)
            assert running.gateway._admissions.waiting == 20 - gateway_server._ADMISSIONS_PER_TURN
            async with asyncio.timeout(5):
                while running.gateway._admissions.waiting:  # noqa: ASYNC110 (no event to wait on)
                    await asyncio.sleep(0.005)
            for end in ends:  # each request came on its own caller's preconnect
                assert end.recv(65536).startswith(b"GET /v1/p/rtts HTTP/1.1\r\n")
            assert all(not c.recv(1) for c in accepted(upstream))  # no other, but a probe
            for door, end in zip(doors, ends, strict=True):
                door.connection_lost(None)
                end.close()


async def test_an_admitted_session_runs_on_its_preconnect() -> None:
    cloud = FakeCloud()
    async with cloud.running(), relay_to(base_of(cloud.url)) as running:
        await session_served(running)
        taken: list[socket.socket | None] = []
        take = Preconnect.take

        def recorded(preconnect: Preconnect, address: tuple[str, int]) -> socket.socket | None:
            taken.append(take(preconnect, address))
            return taken[-1]

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(Preconnect, "take", recorded)
            await session_served(running)
        assert len(taken) == 1 and taken[0] is not None
        samples = await scrape(running)
        # Both sessions ran on their callers' preconnects (an IP literal needs no lookup).
        assert value(samples, PRECONNECTS, outcome="used") == 2
        assert value(samples, PRECONNECTS, outcome="replaced") == 0
        assert value(samples, PRECONNECTS, outcome="unused") == 0
    assert len(cloud.requests) == 2


@pytest.mark.parametrize("setting", ["spares", "breaker-open", "name-not-resolved"])
async def test_no_preconnect_where_the_session_would_not_dial(setting: str) -> None:
    cloud = FakeCloud()
    options: dict[str, object] = {"breaker_failures": 1, "breaker_probe_interval": 30}
    if setting == "spares":
        options["upstream_spares"] = 1
    async with cloud.running():
        base = base_of(cloud.url)
        if setting == "name-not-resolved":
            base = base.replace("127.0.0.1", "localhost")
            ADDRESSES.forget("localhost", int(base.rpartition(":")[2]))
        async with relay_to(base, **options) as running:
            if setting == "breaker-open":
                breaker = running.gateway.failover.primary.breaker
                ticket = breaker.admit()
                assert ticket is not None
                breaker.settle(ticket, False, "timeout")
            door = connected(running)
            assert door.preconnect is None
            door.connection_lost(None)


async def test_a_preconnect_that_failed_leaves_the_session_its_own_attempt() -> None:
    """Nothing listened when the caller connected: the session connects afresh once its
    request comes, and is served (the failed preconnect is no failure of the upstream)."""
    upstream = socket.socket()
    upstream.bind(("127.0.0.1", 0))  # bound, not listening: connects are refused
    upstream.setblocking(False)
    port = upstream.getsockname()[1]
    try:
        async with relay_to(f"ws://127.0.0.1:{port}", breaker_failures=1) as running:
            door = connected(running)
            await asyncio.sleep(0.01)  # the refusal is in, if it did not come at once
            upstream.listen(8)
            door.data_received(REQUEST)
            connection, request = request_received(upstream)
            assert request.path == "/v1/p/rtts"
            connection.close()
            door.connection_lost(None)
            breaker = running.gateway.failover.primary.breaker
            assert breaker.admit() is not None  # still closed
    finally:
        upstream.close()


async def test_a_preconnect_older_than_its_limit_is_not_used(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(gateway_dial, "PRECONNECT_MAX_AGE_SECONDS", 0.0)
    with listener() as upstream:
        port = upstream.getsockname()[1]
        async with relay_to(f"ws://127.0.0.1:{port}") as running:
            door = connected(running)
            early = far_end(upstream, door)
            door.data_received(REQUEST)
            assert await closed_by_gateway(early) == b""
            connection, request = request_received(upstream)
            assert request.path == "/v1/p/rtts"
            connection.close()
            door.connection_lost(None)


def switching(data: bytes) -> bytes:
    """The upstream's 101 for the upgrade request ``data``."""
    protocol = ServerProtocol()
    protocol.receive_data(data)
    request = cast(Request, protocol.events_received()[0])
    protocol.send_response(protocol.accept(request))
    return b"".join(protocol.data_to_send())


@asynccontextmanager
async def upgrades_answered(upstream: socket.socket) -> AsyncIterator[None]:
    """Answer 101 on every connection to ``upstream`` that brings an upgrade request."""
    loop = asyncio.get_running_loop()
    held: list[socket.socket] = []

    async def one(connection: socket.socket) -> None:
        held.append(connection)
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(5):
                data = await loop.sock_recv(connection, 65536)
            if data:
                await loop.sock_sendall(connection, switching(data))

    async def accept() -> None:
        async with asyncio.TaskGroup() as group:
            while True:
                connection, _ = await loop.sock_accept(upstream)
                connection.setblocking(False)
                group.create_task(one(connection))

    acceptor = asyncio.create_task(accept())
    try:
        yield
    finally:
        acceptor.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await acceptor
        for connection in held:
            connection.close()


async def caller_answer(running: RunningGateway) -> tuple[asyncio.StreamWriter, Awaitable[bytes]]:
    """A caller connected to ``running`` over TCP: its writer, and the head it gets back."""
    reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
    return writer, asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)


@asynccontextmanager
async def tls_upgrades_answered(upstream: socket.socket) -> AsyncIterator[None]:
    """As :func:`upgrades_answered`, over TLS (a websockets server on ``upstream``)."""
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert("127.0.0.1").configure_cert(server_tls)

    async def handler(ws: ServerConnection) -> None:
        await ws.wait_closed()

    async with serve(handler, sock=upstream, ssl=server_tls):
        yield


@pytest.mark.parametrize("scheme", ["ws", "wss"])
async def test_a_preconnect_the_upstream_closed_before_the_request_is_not_used(
    scheme: str,
) -> None:
    """The upstream closed the idle preconnect (it restarted, or drops connections that send
    nothing) before the request came: the session connects afresh and is served, and the
    breaker hears of no failure (no request, nor on wss:// the ClientHello made ahead, sent
    into a closed connection, no 502)."""
    with listener() as upstream:
        port = upstream.getsockname()[1]
        async with relay_to(
            f"{scheme}://127.0.0.1:{port}",
            breaker_failures=1,
            breaker_probe_interval=30,
            verify_tls=scheme == "ws",  # the test's own CA is not the gateway's
        ) as running:
            writer, answer = await caller_answer(running)
            await asyncio.sleep(0.05)  # the door is made, its preconnect connected
            for connection in accepted(upstream):  # closed by the upstream (FIN)
                connection.close()
            await asyncio.sleep(0.05)
            served = upgrades_answered if scheme == "ws" else tls_upgrades_answered
            async with served(upstream):
                writer.write(REQUEST)
                head = await answer
            writer.close()
            assert running.gateway.failover.primary.breaker.state is State.CLOSED
            samples = await scrape(running)
            assert value(samples, PRECONNECTS, outcome="replaced") == 1
            assert value(samples, PRECONNECTS) == 1
    assert head.startswith(b"HTTP/1.1 101 "), head


async def test_a_preconnect_still_connecting_after_a_while_is_replaced() -> None:
    """Its SYN was dropped (the upstream's accept queue was full) and is resent only a
    second after it left; the queue has room by the time the request comes, 0.3 s later:
    a fresh connect is answered at once, within the session's 0.5 s budget."""
    with full_accept_queue() as (upstream, drain):
        port = upstream.getsockname()[1]
        async with relay_to(
            f"ws://127.0.0.2:{port}", upstream_connect_timeout=0.5, breaker_failures=100
        ) as running:
            writer, answer = await caller_answer(running)
            await asyncio.sleep(0.05)  # the door is made, its preconnect's SYN dropped
            drain()
            await asyncio.sleep(0.25)
            async with upgrades_answered(upstream):
                writer.write(REQUEST)
                head = await answer
            writer.close()
    assert head.startswith(b"HTTP/1.1 101 "), head


def _writes(far: socket.socket) -> None:
    far.send(b"HTTP/1.1 400 Bad Request\r\n\r\n")  # no upstream speaks first


def _resets(far: socket.socket) -> None:
    far.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    far.close()


@pytest.mark.parametrize(
    "peer", [_writes, socket.socket.close, _resets], ids=["wrote", "fin", "rst"]
)
def test_a_preconnect_its_peer_wrote_on_closed_or_reset_is_not_used(
    peer: Callable[[socket.socket], None],
) -> None:
    with listener() as upstream:
        address = upstream.getsockname()
        preconnect = Preconnect(address)
        (far,) = accepted(upstream)
        with far:
            peer(far)
            time.sleep(0.01)
            assert preconnect.take(address) is None


def test_preconnect_take_and_close_are_once() -> None:
    with listener() as upstream:
        address = upstream.getsockname()
        preconnect = Preconnect(address)
        assert preconnect.take(("127.0.0.2", address[1])) is None  # another address: closed
        assert preconnect.take(address) is None  # once
        preconnect.close()
        second = Preconnect(address)
        sock = second.take(address)
        assert sock is not None
        second.close()  # taken: not closed by the preconnect
        assert sock.fileno() != -1
        sock.close()


def test_a_refused_preconnect_is_not_taken() -> None:
    # A port nothing listens on: on Linux the connect is refused after it started.
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    address = sock.getsockname()
    sock.close()
    preconnect = Preconnect(address)
    time.sleep(0.01)
    assert preconnect.take(address) is None


def test_a_connect_that_fails_at_once_is_no_preconnect(monkeypatch: pytest.MonkeyPatch) -> None:
    """What connect() can answer at once (no route, no address to bind): an error, and the
    socket closed (the session's own connect meets it again and reports it)."""
    made: list[socket.socket] = []
    fresh = gateway_dial._fresh_socket

    def recorded(family: int) -> socket.socket:
        made.append(fresh(family))
        return made[-1]

    monkeypatch.setattr(gateway_dial, "_fresh_socket", recorded)
    monkeypatch.setattr(gateway_dial, "_connect_started", lambda *_: errno.ENETUNREACH)
    with pytest.raises(OSError) as failed:
        Preconnect(("127.0.0.1", 9))
    assert failed.value.errno == errno.ENETUNREACH
    assert made[0].fileno() == -1


def test_the_budget_is_spent_and_earned_back_up_to_its_limit() -> None:
    budget = PreconnectBudget(2)
    assert budget.spend() and budget.spend() and not budget.spend()
    budget.earn()
    assert budget.spend() and not budget.spend()
    for _ in range(5):
        budget.earn()
    assert budget.credit == 2
