"""A session's upstream connection starts from the callback that admits it (gateway.dial).

The upgrade request must be on the wire before the session's own bookkeeping runs, and a
connection started that way must never outlive its session: not when the caller hangs up
before the session's task ran, not when the breaker opens before the task takes the
connection, not when the connect is still under way when the budget runs out. Each holds a
handshake slot, which must come back every time.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import cast

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
from websockets.http11 import Request
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

from gateway import dial as gateway_dial
from gateway import server as gateway_server
from gateway import upstreams
from gateway.dial import Dial, Preconnect
from gateway.frontdoor import FrontDoor
from gateway.server import Gateway, RunningGateway
from gateway.upstream_socket import client_tls
from tests.fakes import FakeCloud
from tests.support import limit_upstream_handshakes, unanswered_port
from tests.test_gateway import base_of, relay_to

REQUEST = (
    b"GET /v1/p/rtts HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


class ClientSocket:
    """The front door's side of a caller, without a socket: what the gateway writes to it."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def write_eof(self) -> None:
        self.closed = True

    def can_write_eof(self) -> bool:
        return True

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


@contextmanager
def raw_upstream(host: str = "127.0.0.1", backlog: int = 8) -> Iterator[socket.socket]:
    """A listening socket the test accepts on itself, with no event loop in between."""
    listener = socket.socket()
    listener.bind((host, 0))
    listener.listen(backlog)
    listener.setblocking(False)
    try:
        yield listener
    finally:
        listener.close()


def caller(running: RunningGateway) -> tuple[FrontDoor, ClientSocket]:
    """A front door of ``running`` whose caller has just sent :data:`REQUEST`."""
    door = running.gateway.door()
    client = ClientSocket()
    door.connection_made(cast(asyncio.Transport, client))
    door.data_received(REQUEST)
    return door, client


def request_received(listener: socket.socket) -> tuple[socket.socket, Request]:
    """The connection and upgrade request that reached ``listener`` (already, not waited for).

    Connections closed without a byte (the gateway's reachability probe) are passed over.
    """
    while True:
        connection, _ = listener.accept()  # BlockingIOError if nobody connected yet
        connection.setblocking(False)
        try:
            data = connection.recv(65536)
        except BlockingIOError:  # another connection (a probe), nothing sent on it
            data = b""
        if data:
            break
        connection.close()
    protocol = ServerProtocol()
    protocol.receive_data(data)
    events = protocol.events_received()
    assert len(events) == 1 and isinstance(events[0], Request), events
    return connection, events[0]


async def closed_by_gateway(connection: socket.socket) -> bytes:
    """What ``connection`` carries until the gateway closes it (EOF), within 5 s."""
    connection.setblocking(False)
    loop = asyncio.get_running_loop()
    data = bytearray()
    async with asyncio.timeout(5):
        while chunk := await loop.sock_recv(connection, 65536):
            data += chunk
    connection.close()
    return bytes(data)


async def session_served(running: RunningGateway) -> None:
    """A whole handshake through ``running`` (its upstream a FakeCloud-like server)."""
    async with connect(running.url("p"), open_timeout=5, proxy=None):
        pass


async def test_the_upgrade_request_is_sent_before_the_session_task_runs() -> None:
    with raw_upstream() as listener:
        port = listener.getsockname()[1]
        async with relay_to(f"ws://127.0.0.1:{port}") as running:
            door, client = caller(running)
            # No await since the request came in: the upstream has the connection and the
            # whole upgrade request, with the gateway's credentials, already.
            connection, request = request_received(listener)
            assert request.path == "/v1/p/rtts"
            assert request.headers["X-Auth-Token"] == "tok-Upstream-1"
            assert client.written == b""  # the caller's 101 waits for the upstream's
            # The session's task takes the connection over: the upstream's 101 reaches the
            # caller as with any upstream connection.
            protocol = ServerProtocol()
            protocol.receive_data(
                REQUEST.replace(b"/v1/p/rtts", request.path.encode()).replace(
                    b"dGhlIHNhbXBsZSBub25jZQ==", request.headers["Sec-WebSocket-Key"].encode()
                )
            )
            accepted = protocol.accept(cast(Request, protocol.events_received()[0]))
            protocol.send_response(accepted)
            connection.sendall(b"".join(protocol.data_to_send()))
            async with asyncio.timeout(5):
                while not door.handed_over:  # noqa: ASYNC110 (no event to wait on)
                    await asyncio.sleep(0.005)
            assert client.written.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
            connection.close()


async def test_a_caller_gone_before_its_task_ran_leaves_no_connection_and_no_slot(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Hung up in the same loop turn as its request: the dial is closed, its slot freed."""
    limit_upstream_handshakes(monkeypatch, 1)
    with raw_upstream() as listener:
        port = listener.getsockname()[1]
        async with relay_to(f"ws://127.0.0.1:{port}") as running:
            door, _ = caller(running)
            connection, _ = request_received(listener)
            door.connection_lost(None)  # before the session's task ever ran
            await closed_by_gateway(connection)
            assert running.gateway.active_sessions == 0
            # The one slot is free again: a whole session gets it at once.
            cloud = FakeCloud()
            async with cloud.running():
                running.gateway.failover.primary.base = base_of(cloud.url)
                await session_served(running)
            assert len(cloud.requests) == 1


async def test_a_dial_the_breaker_overtook_is_closed_and_the_caller_refused() -> None:
    """The primary's breaker opened between the admission and the session's task: the
    connection started for it is closed at once (not held for the session), the caller gets
    the breaker's 503, and the slot is back."""
    with raw_upstream() as listener:
        port = listener.getsockname()[1]
        async with relay_to(f"ws://127.0.0.1:{port}", breaker_failures=1) as running:
            _, client = caller(running)
            connection, _ = request_received(listener)
            breaker = running.gateway.failover.primary.breaker
            ticket = breaker.admit()
            assert ticket is not None
            breaker.settle(ticket, False, "timeout")  # another session's failure opens it
            await closed_by_gateway(connection)
            async with asyncio.timeout(5):
                while not client.closed:  # noqa: ASYNC110 (no event to wait on)
                    await asyncio.sleep(0.005)
            assert client.written.startswith(b"HTTP/1.1 503 ")
            assert b"circuit open" in client.written
            assert not running.gateway._opening_slots.locked()


async def test_a_dial_still_connecting_when_the_budget_ends_is_a_timeout_and_closed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The connect never completes (SYNs dropped): the caller gets the gateway's 504 within
    its connect budget, as without a dial, and nothing stays open or held."""
    limit_upstream_handshakes(monkeypatch, 1)
    dials: list[Dial] = []

    class Recorded(Dial):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            dials.append(self)

    monkeypatch.setattr(upstreams, "Dial", Recorded)
    with unanswered_port() as port:
        async with relay_to(
            f"ws://127.0.0.2:{port}", upstream_connect_timeout=0.3, breaker_failures=100
        ) as running:
            for _ in range(2):  # the second gets the one slot: the first gave it back
                with pytest.raises(InvalidStatus) as refused:
                    await session_served(running)
                assert refused.value.response.status_code == 504
                assert b"did not answer within 0." in refused.value.response.body
    assert len(dials) == 2
    assert all(dial._socket is None and dial.connected.done() for dial in dials)


async def test_on_wss_the_dial_sends_the_client_hello_made_ahead() -> None:
    """wss://: the connect and the ClientHello made ahead go out at once, and the TLS layer
    that takes the connection over carries on from that hello (sends no second one)."""
    context = client_tls(verify=False)
    context.prepare("rtts.test")
    hello = context.take_hello("rtts.test")
    assert hello is not None
    with raw_upstream() as listener:
        port = listener.getsockname()[1]
        released: list[bool] = []
        dial = Dial(
            parse_uri(f"wss://rtts.test:{port}/v1/p/rtts"),
            ("127.0.0.1", port),
            request=b"GET /v1/p/rtts HTTP/1.1\r\n\r\n",
            key="k",
            headers={},
            release=lambda: released.append(True),
            hello=hello,
        )
        connection, _ = listener.accept()  # connected already, no await
        record = connection.recv(65536)
        assert record[:2] == b"\x16\x03" and record[5] == 1  # a handshake record: ClientHello
        assert dial.first == record and dial.request_sent == 0
        await dial.connected
        dial.discard()
        dial.discard()  # once is enough: the slot came back once
        assert released == [True]
        connection.setblocking(False)
        await closed_by_gateway(connection)


@pytest.mark.parametrize("preconnected", [False, True], ids=["fresh", "preconnected"])
async def test_a_dial_that_cannot_start_closes_its_socket(
    preconnected: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its connect under way (SYNs dropped), the loop refuses to watch the socket: the error
    goes to the caller (the usual path then says why) and the socket, whichever, is closed."""
    made: list[socket.socket] = []
    fresh = gateway_dial._fresh_socket

    def recorded(family: int) -> socket.socket:
        made.append(fresh(family))
        return made[-1]

    def refused(_dial: Dial, _sock: socket.socket) -> None:
        raise OSError(errno.ENOMEM, "no room to watch it")

    monkeypatch.setattr(gateway_dial, "_fresh_socket", recorded)
    monkeypatch.setattr(Dial, "_watch", refused)
    with unanswered_port() as port:
        address = ("127.0.0.2", port)
        sock = Preconnect(address).take(address) if preconnected else None
        with pytest.raises(OSError, match="no room to watch it"):
            Dial(
                parse_uri(f"ws://127.0.0.2:{port}/v1/p/rtts"),
                address,
                request=REQUEST,
                key="k",
                headers={},
                release=pytest.fail,
                preconnected=sock,
            )
    assert len(made) == 1 and made[0].fileno() == -1


def breaker_opened_after_the_dial(monkeypatch: pytest.MonkeyPatch) -> None:
    """Another session's failure opens the primary's breaker right after each dial starts."""
    dial_now = Gateway._dial

    def dial_then_open(
        self: Gateway, project_id: str, preconnect: Preconnect | None = None
    ) -> Dial | None:
        dial = dial_now(self, project_id, preconnect)
        breaker = self.failover.primary.breaker
        ticket = breaker.admit()
        assert ticket is not None
        breaker.settle(ticket, False, "timeout")
        return dial

    monkeypatch.setattr(Gateway, "_dial", dial_then_open)


async def test_a_dial_passed_over_frees_its_slot_before_the_secondary_needs_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One handshake slot and a secondary: the session fails over to the secondary, which
    gets the slot the overtaken dial held (not 503 busy behind it), and the primary's
    connection is closed before the secondary's handshake, not after."""
    limit_upstream_handshakes(monkeypatch, 1)
    breaker_opened_after_the_dial(monkeypatch)
    secondary = FakeCloud()
    secondary.handshake_delay = 0.3
    with raw_upstream() as listener:
        port = listener.getsockname()[1]
        async with (
            secondary.running(),
            relay_to(
                f"ws://127.0.0.1:{port}",
                breaker_failures=1,
                breaker_probe_interval=30,
                upstream_connect_timeout=2.0,
                secondary_url=base_of(secondary.url),
                secondary_token="tok-Secondary-2",
            ) as running,
        ):
            served = asyncio.create_task(session_served(running))
            async with asyncio.timeout(5):
                while not secondary.requests:  # noqa: ASYNC110 (no event to wait on)
                    await asyncio.sleep(0.005)
            connection, request = request_received(listener)  # the dial's
            assert request.headers["X-Auth-Token"] == "tok-Upstream-1"
            await closed_by_gateway(connection)  # already, during the secondary's handshake
            assert not served.done()
            await served
    assert secondary.requests[0].headers["X-Auth-Token"] == "tok-Secondary-2"


async def test_a_fault_after_the_dial_is_answered_500_and_leaves_nothing_held(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bug between the dial and the session's task (here the meter) is answered 500 and
    closes the dial: its socket and its slot are not lost."""
    limit_upstream_handshakes(monkeypatch, 1)
    meter = gateway_server.SessionMeter
    faults = [RuntimeError("a bug in the gateway")]

    def faulty(*args: object, **kwargs: object) -> object:
        if faults:
            raise faults.pop()
        return meter(*args, **kwargs)  # type: ignore[arg-type]

    with raw_upstream() as listener:
        port = listener.getsockname()[1]
        async with relay_to(f"ws://127.0.0.1:{port}") as running:
            monkeypatch.setattr(gateway_server, "SessionMeter", faulty)
            with pytest.raises(InvalidStatus) as refused:
                await session_served(running)
            assert refused.value.response.status_code == 500
            connection, _ = request_received(listener)
            await closed_by_gateway(connection)
            assert not running.gateway._opening_slots.locked()  # the one slot is back


@pytest.mark.parametrize("spare_socket", [False, True], ids=["fresh", "made-ahead"])
async def test_a_dialed_connection_has_nagle_off(
    spare_socket: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The relay writes small frames: a dialed socket has TCP_NODELAY, as one the usual
    path opens (asyncio's transport only sets it on sockets made with IPPROTO_TCP)."""
    dials: list[Dial] = []
    adopt = Dial.adopt

    def adopted(dial: Dial) -> socket.socket:
        dials.append(dial)
        return adopt(dial)

    monkeypatch.setattr(Dial, "adopt", adopted)
    cloud = FakeCloud()
    nodelay: list[int] = []
    async with cloud.running(), relay_to(base_of(cloud.url)) as running:
        for _ in range(2 if spare_socket else 1):  # the second dial's socket was made ahead
            async with connect(running.url("p"), open_timeout=5, proxy=None):
                (session,) = running.gateway.sessions
                upstream = session.splice.upstream.transport.get_extra_info("socket")
                nodelay.append(upstream.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
    assert len(dials) == len(nodelay) and all(nodelay), nodelay
