"""The gateway's front door and splice on the wire: raw bytes in, exact bytes and codes out.

These cases need control below a WebSocket library: a client that sends its START in the
same write as its upgrade, an upstream that sends frames with its 101 or masks them, frames
that break RFC 6455, a client that stops reading, a TLS upstream. Each runs on asyncio and
on uvloop (see conftest), the two loops the gateway runs on.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trustme
from websockets.asyncio.client import connect
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import Close, Frame, Opcode
from websockets.http11 import Response
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

from gateway.meter import SessionMeter
from gateway.metrics import GatewayMetrics
from gateway.server import RunningGateway
from gateway.splice import Splice
from gateway.upstream_socket import open_upstream
from gateway.upstream_tls import TLSLayer
from gateway.wire import MessageSink
from tests.fakes import FakeCloud, speak, stall, tone_pcm
from tests.support import exchange, limit_upstream_handshakes, read_upgrade, start
from tests.test_gateway import base_of, relay_to, scrape, value
from tests.test_upstream_socket import accepting, listening


def frame(opcode: Opcode, payload: bytes, *, mask: bool, fin: bool = True) -> bytes:
    return Frame(opcode, payload, fin=fin).serialize(mask=mask)


def text(message: dict[str, object], *, mask: bool) -> bytes:
    return frame(Opcode.TEXT, json.dumps(message).encode(), mask=mask)


@asynccontextmanager
async def raw_upstream(
    after_101: bytes = b"", delay: float = 0.0
) -> AsyncIterator[tuple[str, list[Frame], asyncio.Event]]:
    """An upstream that answers the upgrade (after ``delay``) and writes ``after_101`` with
    the 101 in one write; yields its base URL, the frames it then receives, and an event
    set when the gateway closed the socket."""
    frames: list[Frame] = []
    gone = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        protocol = ServerProtocol()
        try:
            if (request := await read_upgrade(reader, protocol)) is None:
                return
            await asyncio.sleep(delay)
            protocol.send_response(protocol.accept(request))
            writer.write(b"".join(protocol.data_to_send()) + after_101)
            while data := await reader.read(65536):
                protocol.receive_data(data)
                frames.extend(e for e in protocol.events_received() if isinstance(e, Frame))
                for chunk in protocol.data_to_send():  # a close answered, then the end
                    if chunk:
                        writer.write(chunk)
                    else:
                        return
        finally:
            gone.set()
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with server:
        yield f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}", frames, gone


async def raw_session(url: str, after_request: bytes = b"") -> tuple[Response | None, list[Frame]]:
    """A client written with websockets' sans-I/O protocol: the upgrade and ``after_request``
    go out in one write; returns the response and the frames received until the end."""
    protocol = ClientProtocol(parse_uri(url))
    protocol.send_request(protocol.connect())
    host, port = url.split("//")[1].split("/")[0].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"".join(protocol.data_to_send()) + after_request)
    response: Response | None = None
    frames: list[Frame] = []
    async with asyncio.timeout(10):
        while data := await reader.read(65536):
            protocol.receive_data(data)
            for event in protocol.events_received():
                if isinstance(event, Response):
                    response = event
                else:
                    frames.append(event)
            for chunk in protocol.data_to_send():  # our close frame, answering theirs
                if chunk:
                    writer.write(chunk)
    writer.close()
    return response, frames


def kinds(frames: list[Frame]) -> list[str]:
    return [
        json.loads(f.data)["resp_type"] if f.opcode is Opcode.TEXT else f.opcode.name
        for f in frames
        if f.opcode in (Opcode.TEXT, Opcode.BINARY, Opcode.CLOSE)
    ]


# -- bytes that arrive before the splice takes over ---------------------------------------------


async def test_a_start_sent_in_the_same_write_as_the_upgrade_is_served(
    gateway: RunningGateway,
) -> None:
    request = start("Pipelined.", property="english_amy_common")
    response, frames = await raw_session(
        gateway.url(), frame(Opcode.TEXT, request.encode(), mask=True)
    )
    assert response is not None and response.status_code == 101
    assert kinds(frames)[0] == "START" and kinds(frames)[-2:] == ["END", "CLOSE"]
    assert Close.parse(frames[-1].data).code == 1000
    assert gateway.engine is not None
    audio = b"".join(f.data for f in frames if f.opcode is Opcode.BINARY)
    assert hashlib.sha256(audio).hexdigest() == gateway.engine.history[-1].audio_sha256


async def test_frames_the_upstream_sends_with_its_101_reach_the_client() -> None:
    trace = {"trace_id": "t-1"}
    scripted = (
        text({"resp_type": "START", **trace}, mask=False)
        + frame(Opcode.BINARY, b"\x01\x02" * 500, mask=False)
        + text({"resp_type": "END", "reason": "NORMAL", **trace}, mask=False)
        + frame(Opcode.CLOSE, Close(1000, "done").serialize(), mask=False)
    )
    async with raw_upstream(scripted) as (base, received, _), relay_to(base) as front:
        seen = await exchange(front.url(), start("hi"))
        await asyncio.wait_for(front.gateway.wait_idle(), 5)
        samples = await scrape(front)
    assert seen.kinds == ["START", "AUDIO", "END"] and seen.audio == b"\x01\x02" * 500
    assert seen.close_code == 1000
    # It ended before the client's START came: the gateway only answered its close.
    assert [(f.opcode, Close.parse(f.data).code) for f in received] == [(Opcode.CLOSE, 1000)]
    assert value(samples, "rtts_sessions_total", outcome="normal") == 1
    assert value(samples, "rtts_audio_bytes_total") == 1000


async def test_a_client_leaving_during_the_upstream_handshake_is_counted_and_cleaned_up() -> None:
    async with raw_upstream(delay=0.3) as (base, _, upstream_gone), relay_to(base) as front:
        _, writer = await asyncio.open_connection("127.0.0.1", front.port)
        protocol = ClientProtocol(parse_uri(front.url()))
        protocol.send_request(protocol.connect())
        writer.write(b"".join(protocol.data_to_send()))
        await asyncio.sleep(0.1)
        writer.close()  # gone before the upstream answered
        await asyncio.wait_for(upstream_gone.wait(), 5)
        await asyncio.wait_for(front.gateway.wait_idle(), 5)
        samples = await scrape(front)
    assert value(samples, "rtts_sessions_total", outcome="client_cancelled") == 1
    assert value(samples, "rtts_active_sessions") == 0


async def test_a_client_hanging_up_as_its_101_arrives_leaves_nothing_behind() -> None:
    # The 101 goes out from the upstream socket's callback, a loop turn before the splice
    # takes over: a client gone in between is counted once and its upstream closed.
    async with raw_upstream() as (base, _, upstream_gone), relay_to(base) as front:
        reader, writer = await asyncio.open_connection("127.0.0.1", front.port)
        protocol = ClientProtocol(parse_uri(front.url()))
        protocol.send_request(protocol.connect())
        writer.write(b"".join(protocol.data_to_send()))
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
        writer.transport.abort()  # at once, with nothing sent
        await asyncio.wait_for(upstream_gone.wait(), 5)
        await asyncio.wait_for(front.gateway.wait_idle(), 5)
        samples = await scrape(front)
    assert head.startswith(b"HTTP/1.1 101 ")
    assert value(samples, "rtts_sessions_total", outcome="client_cancelled") == 1
    assert value(samples, "rtts_active_sessions") == 0


# -- frames that break the protocol -------------------------------------------------------------


def bad_header(first: int, second: int) -> bytes:
    return bytes([first, second]) + (b"\x00\x00\x00\x00" if second & 0x80 else b"") + b"ab"


@pytest.mark.parametrize(
    ("sent", "code", "outcome_code"),
    [
        (bad_header(0x82, 0x02), 1002, "protocol"),  # not masked
        (bad_header(0xC2, 0x82), 1002, "protocol"),  # a reserved bit
        (bad_header(0x83, 0x82), 1002, "protocol"),  # opcode 3
        (frame(Opcode.TEXT, b"\xff\xfe", mask=True), 1007, "protocol"),  # not UTF-8
        (frame(Opcode.BINARY, b"x" * 2000, mask=True), 1009, "too_big"),
    ],
)
async def test_a_client_frame_that_breaks_the_protocol_closes_it_and_cancels_upstream(
    sent: bytes, code: int, outcome_code: str
) -> None:
    cloud = FakeCloud(default=stall(after_start=True))
    async with cloud.running(), relay_to(base_of(cloud.url), max_message_bytes=1024) as front:
        async with connect(front.url(), proxy=None, compression=None) as ws:
            await ws.send(start("hi"))
            await ws.recv()  # START: the session is relaying
            ws.transport.write(sent)
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 5)
        await asyncio.wait_for(front.gateway.wait_idle(), 5)
        samples = await scrape(front)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == code
    assert cloud.connections[0].client_closed_early
    assert value(samples, "rtts_errors_total", outcome="rejected", code=outcome_code) == 1


async def test_an_upstream_that_masks_its_frames_is_cut_and_the_client_gets_1014() -> None:
    masked_start = text({"resp_type": "START", "trace_id": "t-2"}, mask=True)
    async with raw_upstream(masked_start) as (base, received, gone), relay_to(base) as front:
        seen = await exchange(front.url(), start("hi"))
        await asyncio.wait_for(gone.wait(), 15)
        samples = await scrape(front)
    assert seen.kinds == [] and seen.close_code == 1014
    assert received[-1].opcode is Opcode.CLOSE and Close.parse(received[-1].data).code == 1002
    assert value(samples, "rtts_errors_total", outcome="upstream_closed", code="protocol") == 1


async def test_a_flood_before_the_101_is_held_then_refused(gateway: RunningGateway) -> None:
    response, frames = await raw_session(gateway.url(), b"\x00" * 200_000)
    assert response is not None and response.status_code == 101
    assert kinds(frames) == ["CLOSE"] and Close.parse(frames[0].data).code == 1002


# -- control frames, fragments, flow control ----------------------------------------------------


async def test_a_client_ping_is_answered_by_the_upstream_through_the_gateway() -> None:
    cloud = FakeCloud(default=speak(tone_pcm(1.0, 16000), interval=0.02))
    async with cloud.running(), relay_to(base_of(cloud.url)) as front:
        async with connect(front.url(), proxy=None, compression=None) as ws:
            await ws.send(start("hi"))
            await ws.recv()
            pong = await ws.ping(b"still there?")
            assert await asyncio.wait_for(pong, 5) >= 0
            async for _ in ws:
                pass
        assert ws.close_code == 1000


async def test_a_fragmented_start_is_relayed_and_metered(gateway: RunningGateway) -> None:
    request = start("In pieces.", property="english_amy_common", sample_rate="16000")
    async with relay_to(base_of(gateway.url())) as front:
        async with connect(front.url(), proxy=None, compression=None) as ws:
            await ws.send([request[:10], request[10:25], request[25:]])
            received = [message async for message in ws]
        await asyncio.wait_for(front.gateway.wait_idle(), 5)
        samples = await scrape(front)
    assert json.loads(received[-1])["resp_type"] == "END" and ws.close_code == 1000
    assert (
        value(
            samples,
            "rtts_sessions_total",
            outcome="normal",
            voice="english_amy_common",
            sample_rate="16000",
        )
        == 1
    )


async def test_a_client_that_stops_reading_pauses_the_upstream_and_loses_nothing() -> None:
    audio = tone_pcm(300.0, 16000)  # 9.6 MB, more than the socket buffers on both hops hold
    cloud = FakeCloud(default=speak(audio, frame_bytes=32_000))
    async with cloud.running(), relay_to(base_of(cloud.url)) as front:
        async with connect(front.url(), proxy=None, compression=None, max_size=None) as ws:
            ws.transport.pause_reading()
            await ws.send(start("a lot"))
            (session,) = front.gateway.sessions
            for _ in range(200):
                if not session.splice.upstream.transport.is_reading():
                    break
                await asyncio.sleep(0.02)
            assert not session.splice.upstream.transport.is_reading()
            # What waits in the gateway is bounded by the socket's high-water mark, not 9.6 MB.
            assert session.splice.client.transport.get_write_buffer_size() < 1_000_000
            ws.transport.resume_reading()
            received = [message async for message in ws]
    got = b"".join(m for m in received if isinstance(m, bytes))
    assert hashlib.sha256(got).digest() == hashlib.sha256(audio).digest()


# -- the opening handshake ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_bytes", "status", "fragment"),
    [
        (b"GET /v1/p/rtts HTTP/1.1\r\nHost: x\r\n\r\n", 426, "Upgrade: websocket"),
        (b"POST /v1/p/rtts HTTP/1.1\r\nHost: x\r\n\r\n", 405, "use GET"),
        (b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n", 404, "/v1/{project_id}/rtts"),
        (b"\x16\x03\x01\x02\x00 tls to a plain port\r\n\r\n", 400, "invalid HTTP request"),
        (
            b"GET /v1/p/rtts HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: short\r\nSec-WebSocket-Version: 13\r\n\r\n",
            400,
            "Sec-WebSocket-Key",
        ),
        (
            b"GET /v1/p/rtts HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n",
            426,
            "version 13",
        ),
    ],
)
async def test_bad_upgrade_requests_get_a_precise_refusal(
    gateway: RunningGateway, request_bytes: bytes, status: int, fragment: str
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(request_bytes)
    async with asyncio.timeout(5):
        answer = await reader.read()  # the gateway closes after answering
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode())
    assert fragment in json.loads(body)["error_msg"] or fragment.encode() in head


async def test_a_request_that_never_completes_gets_408(gateway: RunningGateway) -> None:
    gateway.gateway.handshake_timeout = 0.2
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(b"GET /v1/p/rtts HTTP/1.1\r\nHost: x\r\n")  # and nothing more
    async with asyncio.timeout(5):
        answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 408 ")


# -- TLS to the upstream ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate_authority() -> trustme.CA:
    return trustme.CA()


async def test_a_tls_upstream_is_verified_against_the_ca_file_and_relayed(
    certificate_authority: trustme.CA, tmp_path: Path
) -> None:
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    certificate_authority.issue_cert("127.0.0.1").configure_cert(server_tls)
    ca_file = tmp_path / "ca.pem"
    certificate_authority.cert_pem.write_to_path(str(ca_file))
    audio = tone_pcm(0.5, 16000)
    cloud = FakeCloud(default=speak(audio))
    async with cloud.running(tls=server_tls):
        async with relay_to(base_of(cloud.url), ca_file=ca_file) as front:
            seen = await exchange(front.url(), start("over TLS"))
        assert seen.kinds[0] == "START" and seen.kinds[-1] == "END" and seen.audio == audio
        async with relay_to(base_of(cloud.url)) as front:  # system CAs: not trusted
            with pytest.raises(InvalidStatus) as refused:
                await exchange(front.url(), start("over TLS"))
        response = refused.value.response
        assert response.status_code == 502
        assert "CERTIFICATE_VERIFY_FAILED" in json.loads(response.body)["error_msg"]


async def test_each_sessions_first_audio_has_the_next_clienthello_made_ahead(
    certificate_authority: trustme.CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The key exchange of a ClientHello is made off the next caller's path; that caller's
    # connection sends it, and resumes the session kept.
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    certificate_authority.issue_cert("127.0.0.1").configure_cert(server_tls)
    ca_file = tmp_path / "ca.pem"
    certificate_authority.cert_pem.write_to_path(str(ca_file))
    layers: list[tuple[bool, TLSLayer]] = []

    def layer(*args: Any, **kwargs: Any) -> TLSLayer:
        made = TLSLayer(*args, **kwargs)
        layers.append((kwargs.get("started") is not None, made))
        return made

    monkeypatch.setattr("gateway.upstream_socket.TLSLayer", layer)
    audio = tone_pcm(0.5, 16000)
    cloud = FakeCloud(default=speak(audio))
    async with cloud.running(tls=server_tls):
        async with relay_to(base_of(cloud.url), ca_file=ca_file) as front:
            for _ in range(3):
                seen = await exchange(front.url(), start("over TLS"))
                assert seen.kinds[-1] == "END" and seen.audio == audio
    made_ahead = [ahead for ahead, _ in layers]
    resumed = [made.ssl_object.session_reused for _, made in layers]
    assert made_ahead == [False, True, True] and resumed == [False, True, True]


async def test_a_fault_inside_the_gateway_answers_500_and_the_next_session_is_served(
    gateway: RunningGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*args: object) -> None:
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(gateway.gateway.failover, "open", broken)
    with pytest.raises(InvalidStatus) as refused:
        await exchange(gateway.url(), start("hi"))
    assert refused.value.response.status_code == 500
    assert "internal error" in json.loads(refused.value.response.body)["error_msg"]
    monkeypatch.undo()
    seen = await exchange(gateway.url(), start("Fine again.", property="english_amy_common"))
    samples = await scrape(gateway)
    assert seen.kinds == ["START", "AUDIO", "END"]
    assert value(samples, "rtts_errors_total", outcome="rejected", code="http_500") == 1


async def upgrade_answer(url: str, slots: int, open_timeout: float) -> int | str:
    """101, the status the gateway refused ``url`` with, or "caller timed out".

    A busy 503 is checked to name the gateway's ``slots`` and to carry ``Retry-After: 1``.
    """
    try:
        async with connect(url, proxy=None, open_timeout=open_timeout):
            return 101
    except InvalidStatus as exc:
        if exc.response.status_code == 503:
            body = json.loads(exc.response.body)
            assert f"{slots} upstream handshakes already in flight" in body["error_msg"]
            assert exc.response.headers["Retry-After"] == "1"
        return exc.response.status_code
    except TimeoutError:
        return "caller timed out"


async def test_callers_queued_for_an_upstream_slot_are_answered_busy_within_the_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Two upstreams may open at once here; six callers meet an upstream that never answers.
    # The two handshakes started time out (the upstream's fault, 504); the four callers
    # queued behind them are answered 503 once they have waited half the connect timeout,
    # without the upstream being asked or its breaker told.
    limit_upstream_handshakes(monkeypatch, 2)

    async def never_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    server = await asyncio.start_server(never_answers, "127.0.0.1", 0)
    base = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    async with server, relay_to(base, upstream_connect_timeout=1.0) as front:
        # The callers' 2 s: generous against the gateway's 1 s, and well short of the 3 s the
        # last callers would wait if the time queued for a slot did not count.
        outcomes = await asyncio.gather(*(upgrade_answer(front.url(), 2, 2.0) for _ in range(6)))
        samples = await scrape(front)
    assert sorted(outcomes, key=str) == [503] * 4 + [504] * 2
    assert value(samples, "rtts_errors_total", outcome="handshake_failed", code="timeout") == 2
    assert value(samples, "rtts_errors_total", outcome="rejected", code="busy") == 4


async def test_a_burst_on_a_slow_healthy_upstream_never_trips_its_breaker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A far upstream (each handshake 0.2 s) and a burst of 30 callers through two handshake
    # slots: whoever waits past half the connect timeout is answered 503 busy, and every
    # handshake started has the other half, so none times out, none is charged to the
    # upstream, and its breaker stays closed for the callers after the burst.
    limit_upstream_handshakes(monkeypatch, 2)

    async def slow_accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(0.2)
        await accepting(b"")(reader, writer)

    async with listening(slow_accept) as port:
        async with relay_to(f"ws://127.0.0.1:{port}", upstream_connect_timeout=2.0) as front:
            outcomes = await asyncio.gather(
                *(upgrade_answer(front.url(), 2, 10.0) for _ in range(30))
            )
            after = await upgrade_answer(front.url(), 2, 10.0)
            samples = await scrape(front)
    assert set(outcomes) == {101, 503} and after == 101
    assert value(samples, "rtts_errors_total", outcome="rejected", code="busy") == outcomes.count(
        503
    )
    assert value(samples, "rtts_errors_total", outcome="handshake_failed", code="timeout") == 0
    breaker = [
        v
        for (name, labels), v in samples.items()
        if name == "rtts_upstream_breaker_state" and ("upstream", "primary") in labels
    ]
    assert breaker == [0]  # closed


async def test_callers_who_hang_up_while_their_upstream_opens_give_its_slot_back_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # One handshake slot and an upstream that takes each connection and never answers. The
    # first caller's handshake holds the slot; three more callers queue behind it; all four
    # hang up. The first's upstream socket is dropped then and there, the three queued never
    # reach the upstream, and the next caller's handshake starts at once: nothing waits out
    # the 60 s connect timeout for a caller who is gone.
    limit_upstream_handshakes(monkeypatch, 1)
    requested: list[bytes] = []  # each upgrade request the gateway sent (not its TCP probes)
    dropped = asyncio.Event()

    async def never_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = await reader.read(65536)
        if first.startswith(b"GET "):
            requested.append(first)
            await reader.read()  # until the gateway drops the connection
            dropped.set()
        writer.close()

    async def until(done: Callable[[], bool]) -> None:
        async with asyncio.timeout(10):
            while not done():  # noqa: ASYNC110 (the gateway's state has no event to wait on)
                await asyncio.sleep(0.01)

    request = (
        b"GET /v1/p/rtts HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    async with (
        listening(never_answers) as port,
        relay_to(f"ws://127.0.0.1:{port}", upstream_connect_timeout=60.0) as front,
    ):
        callers = [await asyncio.open_connection("127.0.0.1", front.port) for _ in range(4)]
        for _, writer in callers:
            writer.write(request)
        await until(lambda: len(requested) == 1 and front.gateway.active_sessions == 4)
        for _, writer in callers:
            writer.close()
        await until(lambda: front.gateway.active_sessions == 0)
        async with asyncio.timeout(10):
            await dropped.wait()
        _, late = await asyncio.open_connection("127.0.0.1", front.port)
        late.write(request)
        await until(lambda: len(requested) == 2)
        late.close()
        await until(lambda: front.gateway.active_sessions == 0)
        samples = await scrape(front)
    assert len(requested) == 2  # the first caller's and the late one's: no ghost handshakes
    ended = [
        v
        for (name, labels), v in samples.items()
        if name == "rtts_sessions_total" and ("outcome", "client_cancelled") in labels
    ]
    assert sum(ended) == 5
    assert not [k for k in samples if k[0] == "rtts_errors_total" and samples[k]]


# -- when the meter reads the upstream's control messages -------------------------------------


@asynccontextmanager
async def splice_over_sockets() -> AsyncIterator[tuple[Splice, socket.socket]]:
    """A splice between a raw upstream on 127.0.0.1 (101, then silence) and one end of a
    socket pair; the other end, the caller's, is yielded to read what it was sent."""
    async with listening(accepting(b"")) as port:
        upstream = await open_upstream(f"ws://127.0.0.1:{port}/v1/p/rtts", {}, connect_timeout=5)
        ours, callers = socket.socketpair()
        callers.setblocking(False)
        loop = asyncio.get_running_loop()
        client, _ = await loop.connect_accepted_socket(asyncio.Protocol, ours)
        meter = SessionMeter(GatewayMetrics("huawei", 10), "p1")
        splice = Splice(client, b"", upstream, meter, max_message_bytes=1 << 20)
        running = asyncio.create_task(splice.run())
        await asyncio.sleep(0)  # run() has taken both sockets over
        try:
            yield splice, callers
        finally:
            splice.abort()
            await running
            callers.close()


def sent_so_far(caller: socket.socket) -> bytes:
    """What the caller's socket holds now (without waiting)."""
    try:
        return caller.recv(1 << 20)
    except BlockingIOError:
        return b""


async def test_the_upstreams_start_is_metered_after_the_audio_right_behind_it() -> None:
    # Parsing START (or a RESULT) for the meter must not hold up the audio the upstream sent
    # right after it: the meter reads it two loop turns later, after the next reads.
    start_frame = Frame(Opcode.TEXT, b'{"resp_type": "START", "trace_id": "t1"}').serialize(
        mask=False
    )
    audio_frame = Frame(Opcode.BINARY, b"\x01" * 1920).serialize(mask=False)
    async with splice_over_sockets() as (splice, caller):
        relayed_when_metered: list[bytes] = []
        sink = splice.upstream.scanner.sink

        def metering(message: str) -> None:
            relayed_when_metered.append(sent_so_far(caller))
            sink.message(message)

        splice.upstream.scanner.sink = MessageSink(metering, sink.binary_passed)
        loop = asyncio.get_running_loop()
        splice.received(splice.upstream, start_frame)
        loop.call_soon(splice.received, splice.upstream, audio_frame)  # the next read
        assert splice.meter.started is None
        for _ in range(3):
            await asyncio.sleep(0)
        assert relayed_when_metered == [start_frame + audio_frame]
        assert splice.meter.started is not None and splice.meter.audio_bytes == 1920
        assert splice.meter.counting_audio_only


async def test_what_the_upstream_sent_before_its_close_is_metered_at_once() -> None:
    # START, audio, END and the close in one read: the outcome needs END metered first.
    frames = [
        Frame(Opcode.TEXT, b'{"resp_type": "START", "trace_id": "t1"}'),
        Frame(Opcode.BINARY, b"\x01" * 1920),
        Frame(Opcode.TEXT, b'{"resp_type": "END", "trace_id": "t1", "reason": "NORMAL"}'),
        Frame(Opcode.CLOSE, b"\x03\xe8"),
    ]
    async with splice_over_sockets() as (splice, _):
        splice.received(splice.upstream, b"".join(f.serialize(mask=False) for f in frames))
        meter = splice.meter
        assert (meter.outcome, meter.audio_bytes, meter.state.finished) == ("normal", 1920, True)


async def test_what_the_upstream_sent_before_relaying_stopped_is_metered() -> None:
    async with splice_over_sockets() as (splice, _):
        splice.received(
            splice.upstream,
            Frame(Opcode.TEXT, b'{"resp_type": "START", "trace_id": "t1"}').serialize(mask=False),
        )
        splice.close(1001, 1001, "gateway shutting down")  # in the same loop turn
        assert splice.meter.started is not None and splice.meter.trace_id == "t1"
