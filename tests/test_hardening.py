"""The gateway against a hostile client and a hostile upstream, on real sockets.

Each case is an attack that once worked (see the README's reliability section for the
invariants): a redirect or an odd status from the upstream, duplicate headers, a close frame
of the gateway's landing inside a relayed frame, pings inside an unfinished message, control
messages built to stall the parser, a slow reader taken for a silent upstream, log floods.
The process-level memory bounds are measured in ``test_memory_bounds.py``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import Close, Frame, Opcode
from websockets.http11 import Request
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

from gateway.frontdoor import REQUEST_BYTES_LIMIT
from gateway.server import RunningGateway
from gateway.splice import METERED_PER_TURN
from gateway.wire import FRAMING_ALLOWANCE
from tests.fakes import ConnectionLog, FakeCloud, raw, speak, stall, tone_pcm
from tests.support import exchange, read_upgrade, start
from tests.test_gateway import base_of, relay_to, scrape, value
from tests.test_splice import kinds, raw_session

TRACE = {"trace_id": "t-hostile"}


def frame(opcode: Opcode, payload: bytes, *, mask: bool, fin: bool = True) -> bytes:
    return Frame(opcode, payload, fin=fin).serialize(mask=mask)


def server_text(message: dict[str, object]) -> bytes:
    return frame(Opcode.TEXT, json.dumps(message).encode(), mask=False)


@asynccontextmanager
async def scripted_upstream(
    answer: Callable[[Request, ServerProtocol], bytes], *, then_close: bool = True
) -> AsyncIterator[tuple[str, list[Frame]]]:
    """An upstream that writes ``answer(request)`` in one write, then closes its socket
    (``then_close``) or reads until the gateway leaves; yields its base URL and the frames
    it received after its answer. The project ``normal`` gets a normal session instead."""
    received: list[Frame] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        protocol = ServerProtocol()
        try:
            if (request := await read_upgrade(reader, protocol)) is None:
                return
            normal = "/normal/" in request.path
            writer.write((accept_then(NORMAL) if normal else answer)(request, protocol))
            await writer.drain()
            if normal or not then_close:
                while data := await reader.read(65536):
                    protocol.receive_data(data)
                    events = protocol.events_received()
                    if not normal:
                        received.extend(e for e in events if isinstance(e, Frame))
                    for chunk in protocol.data_to_send():  # a close answered, then the end
                        if not chunk:
                            return
                        writer.write(chunk)
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with server:
        yield f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}", received


def accept_then(after_101: bytes) -> Callable[[Request, ServerProtocol], bytes]:
    def answer(request: Request, protocol: ServerProtocol) -> bytes:
        protocol.send_response(protocol.accept(request))
        return b"".join(protocol.data_to_send()) + after_101

    return answer


NORMAL = (
    server_text({"resp_type": "START", "trace_id": "t-normal"})
    + frame(Opcode.BINARY, bytes(range(256)) * 16, mask=False)
    + server_text({"resp_type": "END", "trace_id": "t-normal", "reason": "NORMAL"})
    + frame(Opcode.CLOSE, Close(1000, "").serialize(), mask=False)
)


async def served(front: RunningGateway) -> None:
    """A normal session on the same gateway, while an attack is in progress."""
    seen = await exchange(front.url("normal"), start("Meanwhile.", property="english_amy_common"))
    assert seen.kinds == ["START", "AUDIO", "END"] and seen.close_code == 1000


async def raw_client(url: str, *sent: bytes, timeout: float = 10.0) -> tuple[bytes, bytes]:
    """Upgrade, send ``sent``, and read every byte until the gateway ends the connection;
    returns the response head and every byte after it, exactly as they came."""
    protocol = ClientProtocol(parse_uri(url))
    protocol.send_request(protocol.connect())
    reader, writer = await asyncio.open_connection("127.0.0.1", parse_uri(url).port)
    writer.write(b"".join(protocol.data_to_send()) + b"".join(sent))
    data = b""
    async with asyncio.timeout(timeout):
        while chunk := await reader.read(65536):
            data += chunk
    writer.close()
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


async def idle(front: RunningGateway) -> None:
    await asyncio.wait_for(front.gateway.wait_idle(), 15)


def tracebacks(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.exc_info or "Fatal error" in r.getMessage()]


# -- upstream statuses: mapped, redirects never followed ----------------------------------------


async def test_a_redirect_to_another_port_sends_it_nothing_and_the_client_gets_502(
    caplog: pytest.LogCaptureFixture,
) -> None:
    visits: list[bytes] = []

    async def elsewhere(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        visits.append(await reader.read(65536))
        writer.close()

    trap = await asyncio.start_server(elsewhere, "127.0.0.1", 0)
    trap_port = trap.sockets[0].getsockname()[1]

    def redirect(request: Request, protocol: ServerProtocol) -> bytes:
        return (
            f"HTTP/1.1 302 Found\r\nLocation: ws://127.0.0.1:{trap_port}{request.path}\r\n"
            "Content-Length: 0\r\n\r\n"
        ).encode()

    async with trap, scripted_upstream(redirect) as (base, _), relay_to(base) as front:
        attack = asyncio.create_task(exchange(front.url(), start("hi")))
        await served(front)
        with pytest.raises(InvalidStatus) as refused:
            await attack
        await asyncio.sleep(0.2)  # time for a follow-up connection, were one made
        samples = await scrape(front)
    assert visits == []  # no connection at all, so no X-Auth-Token either
    response = refused.value.response
    assert response.status_code == 502
    body = json.loads(response.body)
    assert body["upstream_status"] == 302 and "HTTP 302" in body["error_msg"]
    assert value(samples, "rtts_errors_total", outcome="handshake_failed", code="http_other") == 1
    assert not tracebacks(caplog)


@pytest.mark.parametrize(
    ("status", "label"),
    [(200, "http_other"), (204, "http_other"), (307, "http_other"), (499, "http_other")]
    + [(status, "http_5xx") for status in (520, 521, 522, 523, 524, 525, 526, 599)],
)
async def test_an_upstream_status_that_is_not_a_refusal_becomes_502(
    status: int, label: str, caplog: pytest.LogCaptureFixture
) -> None:
    def odd(request: Request, protocol: ServerProtocol) -> bytes:
        return f"HTTP/1.1 {status} Whatever\r\nContent-Length: 2\r\n\r\nno".encode()

    async with scripted_upstream(odd) as (base, _), relay_to(base) as front:
        attack = asyncio.create_task(exchange(front.url(), start("hi")))
        await served(front)
        with pytest.raises(InvalidStatus) as refused:
            await attack
        samples = await scrape(front)
    response = refused.value.response
    assert response.status_code == 502
    assert json.loads(response.body)["upstream_status"] == status
    assert value(samples, "rtts_errors_total", outcome="handshake_failed", code=label) == 1
    assert value(samples, "rtts_sessions_total", outcome="rejected") == 0
    assert not tracebacks(caplog)


async def test_a_standard_refusal_keeps_its_status_and_names_it() -> None:
    cloud = FakeCloud()
    cloud.refuse_next(503, "", "busy")
    async with cloud.running(), relay_to(base_of(cloud.url)) as front:
        with pytest.raises(InvalidStatus) as refused:
            await exchange(front.url(), start("hi"))
    assert refused.value.response.status_code == 503
    assert json.loads(refused.value.response.body)["upstream_status"] == 503


# -- every upgrade request gets an HTTP answer ---------------------------------------------------

UPGRADE = (
    "GET /v1/p/rtts HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
)


async def http_answer(port: int, request: bytes) -> tuple[int, dict[str, object]]:
    """The gateway's answer to ``request`` written at once."""
    return await split_answer(port, request, len(request))


@pytest.mark.parametrize(
    "extra",
    [
        "Authorization: Bearer k-1\r\nAuthorization: Bearer k-1\r\n",
        "Authorization: Bearer k-1\r\nAuthorization: Bearer wrong\r\n",
        "Authorization: Bearer k-1\r\nHost: y\r\n",
        "Authorization: Bearer k-1\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
        "Authorization: Bearer k-1\r\nSec-WebSocket-Version: 13\r\n",
    ],
)
async def test_a_duplicate_header_gets_400_and_no_traceback(
    extra: str, caplog: pytest.LogCaptureFixture
) -> None:
    cloud = FakeCloud()
    async with cloud.running(), relay_to(base_of(cloud.url), gateway_key="k-1") as front:
        status, body = await http_answer(front.port, (UPGRADE + extra + "\r\n").encode())
        # The same request with each header once is served.
        seen = await exchange(front.url(), start("hi"), headers={"Authorization": "Bearer k-1"})
    assert status == 400 and "more than one" in str(body["error_msg"])
    assert seen.kinds[-1] == "END"
    assert cloud.requests and len(cloud.requests) == 1  # no upstream for the refused one
    assert not tracebacks(caplog)


@pytest.mark.parametrize(
    "line",
    ["Authorization: Bearer k-Secret-4\x7f\r\n", "Authorization k-Secret-4\r\n"],
    ids=["bad value", "bad line"],
)
async def test_a_malformed_header_gets_400_naming_the_fault_never_its_bytes(
    line: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    cloud = FakeCloud()
    async with cloud.running(), relay_to(base_of(cloud.url), gateway_key="k-Secret-4") as front:
        status, body = await http_answer(front.port, (UPGRADE + line + "\r\n").encode())
    assert status == 400 and str(body["error_msg"]).startswith("invalid HTTP request: invalid")
    assert "k-Secret-4" not in str(body) and "k-Secret-4" not in caplog.text
    assert not cloud.requests


@pytest.mark.parametrize("kib", [20, 200, 900])
async def test_an_oversized_upgrade_request_gets_431(gateway: RunningGateway, kib: int) -> None:
    # The gateway answers after 16 KiB; what the client still sends is read and dropped, so
    # the answer is not lost to a reset (once: 200 KiB got ECONNRESET instead of the 431).
    padding = "".join(f"X-Pad-{i}: {'p' * 1000}\r\n" for i in range(kib))
    status, body = await http_answer(gateway.port, (UPGRADE + padding + "\r\n").encode())
    assert status == 431 and str(REQUEST_BYTES_LIMIT) in str(body["error_msg"])


async def sent_in_pieces(
    port: int, request: bytes, chunk: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to ``port`` with ``request`` written ``chunk`` bytes at a time."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for at in range(0, len(request), chunk):
        writer.write(request[at : at + chunk])
        await writer.drain()
        await asyncio.sleep(0.001)  # each piece its own read
    return reader, writer


async def split_answer(port: int, request: bytes, chunk: int) -> tuple[int, dict[str, object]]:
    """The gateway's answer to ``request`` written ``chunk`` bytes at a time."""
    reader, writer = await sent_in_pieces(port, request, chunk)
    async with asyncio.timeout(5):
        answer = await reader.read()
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


@pytest.mark.parametrize(
    "request_bytes",
    [
        UPGRADE.replace("/v1/p/rtts", "/nowhere") + "\r\n",
        UPGRADE.replace("GET", "POST") + "\r\n",
        UPGRADE.replace("HTTP/1.1", "HTTP/1.0") + "\r\n",
        UPGRADE + "X-Bad: a\x7fb\r\n\r\n",
        UPGRADE + "Content-Length: 5\r\n\r\nhello",
        UPGRADE + "Bad Name: x\r\n\r\n",
        UPGRADE + "Host: y\r\n\r\n",
        UPGRADE.replace("websocket", "h2c") + "\r\n",
        UPGRADE + "".join(f"X-Pad-{i}: {'p' * 1000}\r\n" for i in range(20)) + "\r\n",
        UPGRADE.replace("Version: 13", "Version: 8") + "\r\n",
        UPGRADE.replace("dGhlIHNhbXBsZSBub25jZQ==", "dGhlIHNhbXBsZSBub25jZQ") + "\r\n",
        UPGRADE.replace("Connection: Upgrade", "Connection: close") + "\r\n",
    ],
    ids=[
        *("path", "method", "http/1.0", "value", "body", "name", "twice", "upgrade", "size"),
        *("version", "key", "connection"),
    ],
)
async def test_a_request_gets_the_same_answer_whole_or_in_pieces(
    gateway: RunningGateway, request_bytes: str
) -> None:
    # Whole, it is read in one pass (in C on the compiled path, on uvloop here; else
    # gateway.http_head); in pieces, by websockets' parser.
    data = request_bytes.encode("iso-8859-1")
    whole = await http_answer(gateway.port, data)
    pieces = await split_answer(gateway.port, data, 7 if len(data) < 1000 else len(data) // 2 + 1)
    assert whole == pieces
    assert whole[0] >= 400


async def switching_head(port: int, request: bytes, chunk: int) -> bytes:
    """The head the gateway answers ``request`` with, written ``chunk`` bytes at a time."""
    reader, writer = await sent_in_pieces(port, request, chunk)
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
    writer.close()
    return head


@pytest.mark.parametrize(
    "request_bytes",
    [
        UPGRADE + "\r\n",
        "GET /v1/p/rtts HTTP/1.1\r\nhost: x\r\nupgrade: WebSocket\r\nconnection: upgrade\r\n"
        "sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n",
        UPGRADE.replace("Connection: Upgrade", "Connection: keep-alive, Upgrade") + "\r\n",
        UPGRADE.replace(": ", ":\t ") + "Authorization: Bearer \xe9 \r\n\r\n",
    ],
    ids=["usual", "lowercase", "connection list", "blanks"],
)
async def test_a_valid_request_is_accepted_alike_whole_or_in_pieces(
    gateway: RunningGateway, request_bytes: str
) -> None:
    data = request_bytes.encode("iso-8859-1")
    for chunk in (len(data), 7):
        head = await switching_head(gateway.port, data, chunk)
        assert head.startswith(b"HTTP/1.1 101 ")
        assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in head


# -- the gateway never writes a frame of its own inside a relayed frame --------------------------


async def test_an_upstream_ending_inside_a_frame_ends_the_client_at_tcp_level() -> None:
    started = server_text({"resp_type": "START", **TRACE})
    audio = frame(Opcode.BINARY, b"\x07" * 1000, mask=False)
    cut = started + audio[:300]  # the header promises 1000 bytes; 296 come, then EOF
    async with scripted_upstream(accept_then(cut)) as (base, _), relay_to(base) as front:
        attack = asyncio.create_task(raw_client(front.url()))
        await served(front)
        head, rest = await attack
        await idle(front)
        samples = await scrape(front)
    assert head.startswith(b"HTTP/1.1 101")
    assert rest == cut  # exactly what was relayed: no close header, no garbage after it
    assert value(samples, "rtts_errors_total", outcome="upstream_closed", code="network") == 1


async def test_an_upstream_ending_between_frames_still_gets_the_client_1014() -> None:
    whole = server_text({"resp_type": "START", **TRACE}) + frame(
        Opcode.BINARY, b"\x07" * 1000, mask=False
    )
    async with scripted_upstream(accept_then(whole)) as (base, _), relay_to(base) as front:
        _, frames = await raw_session(front.url())
    assert [f.opcode for f in frames] == [Opcode.TEXT, Opcode.BINARY, Opcode.CLOSE]
    assert frames[1].data == b"\x07" * 1000 and Close.parse(frames[2].data).code == 1014


async def test_the_watchdog_cutting_inside_a_frame_ends_the_client_at_tcp_level() -> None:
    started = server_text({"resp_type": "START", **TRACE})
    cut = started + frame(Opcode.BINARY, b"\x07" * 1000, mask=False)[:500]
    async with (
        scripted_upstream(accept_then(cut), then_close=False) as (base, upstream_got),
        relay_to(base, upstream_gap_timeout=0.5) as front,
    ):
        attack = asyncio.create_task(
            raw_client(front.url(), frame(Opcode.TEXT, start("hi").encode(), mask=True))
        )
        await served(front)
        _, rest = await attack
        await idle(front)
        samples = await scrape(front)
    assert rest == cut
    assert value(samples, "rtts_errors_total", outcome="timeout", code="timeout") == 1
    # The upstream hop was frame-aligned: it got the START, then the gateway's 1001.
    assert [f.opcode for f in upstream_got] == [Opcode.TEXT, Opcode.CLOSE]
    assert Close.parse(upstream_got[-1].data).code == 1001


# -- bounded holding: control frames, unfinished messages, upstream messages ----------------------


async def test_pings_inside_an_unfinished_start_pass_through_and_the_session_is_served(
    gateway: RunningGateway,
) -> None:
    request = start("Held.", property="english_amy_common").encode()
    async with connect(gateway.url(), proxy=None, compression=None) as ws:
        ws.transport.write(frame(Opcode.TEXT, request[:10], fin=False, mask=True))
        for _ in range(30):  # under the unanswered limit, each answered by the engine
            ws.transport.write(frame(Opcode.PING, b"p" * 125, mask=True))
        await asyncio.sleep(0.2)
        (session,) = gateway.gateway.sessions
        assert session.splice.client.scanner.held_bytes < 100  # the fragment, no pings
        await served(gateway)
        ws.transport.write(frame(Opcode.CONT, request[10:], mask=True))
        kinds = [json.loads(m)["resp_type"] async for m in ws if isinstance(m, str)]
    assert kinds == ["START", "END"] and ws.close_code == 1000


async def test_endless_empty_fragments_close_the_client_with_1009(
    gateway: RunningGateway,
) -> None:
    async with connect(gateway.url(), proxy=None, compression=None) as ws:
        ws.transport.write(frame(Opcode.TEXT, b"{", fin=False, mask=True))
        empty = frame(Opcode.CONT, b"", fin=False, mask=True)
        limit = gateway.gateway.settings.max_message_bytes + FRAMING_ALLOWANCE
        ws.transport.write(empty * (limit // len(empty) + 1000))
        await served(gateway)
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 5)
    await idle(gateway)
    samples = await scrape(gateway)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    assert value(samples, "rtts_errors_total", outcome="rejected", code="too_big") == 1


async def test_an_upstream_text_over_1_mib_is_refused_with_1009_and_the_client_gets_1014() -> None:
    huge = json.dumps({"resp_type": "RESULT", "trace_id": "t", "pad": "x" * (1 << 20)})
    cloud = FakeCloud(default=raw(json.dumps({"resp_type": "START", "trace_id": "t"}), huge))
    async with cloud.running(), relay_to(base_of(cloud.url)) as front:
        seen = await exchange(front.url(), start("hi"))
        await idle(front)
        samples = await scrape(front)
    assert seen.kinds == ["START"] and seen.close_code == 1014
    assert cloud.sockets[0].close_code == 1009
    assert value(samples, "rtts_errors_total", outcome="upstream_closed", code="too_big") == 1


# A small control message of a kind no session expects: each one a violation to meter, and
# the session goes on (a newer protocol's message is skipped).
NOISE = server_text({"resp_type": "NOISE"})


async def test_a_flood_of_control_messages_is_metered_a_slice_per_loop_turn() -> None:
    """Thousands of small texts in one read: the meter takes them METERED_PER_TURN at a time,
    a loop turn apart (the upstream not read meanwhile), so other sessions are served in
    between; every one is relayed and metered."""
    flood = server_text({"resp_type": "START", **TRACE}) + NOISE * 3000  # then the upstream goes
    async with scripted_upstream(accept_then(flood)) as (base, _), relay_to(base) as front:
        hello = frame(Opcode.TEXT, start("hi").encode(), mask=True)
        client = asyncio.create_task(raw_session(front.url(), hello))
        metered: list[int] = []  # violations metered, seen once a loop turn
        while not client.done():
            await asyncio.sleep(0)
            meters = [session.meter for session in front.gateway.sessions]
            if meters:
                metered.append(meters[0].protocol_violations)
        _, frames = await client
    steps = [after - before for before, after in itertools.pairwise(metered)]
    assert metered[-1] == 3000 and max(steps) == METERED_PER_TURN
    assert kinds(frames) == ["START", *["NOISE"] * 3000, "CLOSE"]


async def test_an_upstream_flooding_control_messages_past_the_bound_is_closed_with_1008(
    caplog: pytest.LogCaptureFixture,
) -> None:
    flood = server_text({"resp_type": "START", **TRACE}) + NOISE * 20000  # one write
    async with (
        scripted_upstream(accept_then(flood), then_close=False) as (base, received),
        relay_to(base) as front,
    ):
        hello = frame(Opcode.TEXT, start("hi").encode(), mask=True)
        _, frames = await raw_session(front.url(), hello)
        await served(front)
        await idle(front)
        samples = await scrape(front)
    assert Close.parse(frames[-1].data) == Close(1014, "upstream closed before END")
    closes = [Close.parse(f.data) for f in received if f.opcode is Opcode.CLOSE]
    assert closes == [Close(1008, "over 4096 control messages unread")]
    assert value(samples, "rtts_errors_total", outcome="upstream_closed", code="policy") == 1
    assert not tracebacks(caplog)


@pytest.mark.parametrize(
    "hostile",
    [
        pytest.param("[" * 200_000, id="200k nested brackets"),
        pytest.param("{'resp_type': " + "x" * ((1 << 20) - 20), id="1 MiB malformed"),
    ],
)
async def test_an_unparsable_upstream_message_is_error_protocol_while_others_stream(
    hostile: str, caplog: pytest.LogCaptureFixture
) -> None:
    audio = tone_pcm(1.0, 16000)
    cloud = FakeCloud(default=speak(audio, frame_bytes=640, interval=0.02))
    cloud.then(
        speak(audio, frame_bytes=640, interval=0.02),  # the normal caller, first
        raw(json.dumps({"resp_type": "START", "trace_id": "t"}), hostile),
    )
    async with cloud.running(), relay_to(base_of(cloud.url)) as front:
        async with connect(front.url(), proxy=None, compression=None) as normal:
            await normal.send(start("normal"))
            assert json.loads(await normal.recv())["resp_type"] == "START"  # it streams now
            seen = await exchange(front.url(), start("hostile"))
            rest = [message async for message in normal]
        await idle(front)
        samples = await scrape(front)
    assert seen.frames[1:] == [hostile]  # relayed unchanged: the client judges it too
    assert b"".join(m for m in rest if isinstance(m, bytes)) == audio
    assert json.loads(rest[-1])["resp_type"] == "END" and normal.close_code == 1000
    assert value(samples, "rtts_errors_total", outcome="error", code="protocol") == 1
    assert value(samples, "rtts_sessions_total", outcome="upstream_closed") == 0
    assert not tracebacks(caplog)


# -- precise accounting, one log line per event ---------------------------------------------------


async def test_a_peer_that_never_completes_the_close_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    cloud = FakeCloud(default=stall(after_start=True))
    async with cloud.running(), relay_to(base_of(cloud.url), upstream_gap_timeout=0.3) as front:
        _, writer = await asyncio.open_connection("127.0.0.1", front.port)
        protocol = ClientProtocol(parse_uri(front.url()))
        protocol.send_request(protocol.connect())
        writer.write(
            b"".join(protocol.data_to_send()) + frame(Opcode.TEXT, start("hi").encode(), mask=True)
        )
        await asyncio.sleep(2.0)  # eight watchdog rounds after the cut; we never answer it
        writer.close()
        await idle(front)
    lines = [r for r in caplog.records if "closing session" in r.getMessage()]
    assert len(lines) == 1 and "upstream silent" in lines[0].getMessage()


async def test_a_client_that_stops_reading_is_told_apart_from_a_silent_upstream() -> None:
    audio = b"\x00\x01" * 4_800_000  # 9.6 MB, more than the socket buffers on both hops hold
    cloud = FakeCloud(default=speak(audio, frame_bytes=32_000))
    async with cloud.running(), relay_to(base_of(cloud.url), upstream_gap_timeout=0.5) as front:
        async with connect(front.url(), proxy=None, compression=None, max_size=None) as ws:
            ws.transport.pause_reading()
            await ws.send(start("a lot"))
            await idle(front)
            ws.transport.abort()
        samples = await scrape(front)
    assert value(samples, "rtts_errors_total", outcome="client_slow", code="timeout") == 1
    assert value(samples, "rtts_errors_total", outcome="timeout") == 0


async def test_a_second_start_meters_the_audio_relayed_and_warns_once(
    gateway: RunningGateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    text = "This sentence is spoken to the end although a second request came. " * 3
    request = start(text, property="english_amy_common")
    seen = await exchange(gateway.url(), request, request)
    await idle(gateway)
    samples = await scrape(gateway)
    assert "ERROR" in seen.kinds and len(seen.audio) > 50_000
    assert value(samples, "rtts_audio_bytes_total") == len(seen.audio)
    warnings = [r for r in caplog.records if "broke the protocol" in r.getMessage()]
    assert len(warnings) == 1
    (line,) = [r.getMessage() for r in caplog.records if r.name == "gateway.sessions"]
    record = json.loads(line)
    assert record["audio_bytes"] == len(seen.audio) and record["protocol_violations"] > 1


async def test_a_ping_flood_that_never_reads_its_pongs_is_closed_with_1008(
    gateway: RunningGateway,
) -> None:
    async with connect(gateway.url(), proxy=None, compression=None) as ws:
        ws.transport.pause_reading()  # the pongs are never read
        ws.transport.write(frame(Opcode.PING, b"p" * 125, mask=True) * 200_000)  # 26 MB
        await served(gateway)
        await idle(gateway)
    samples = await scrape(gateway)
    assert value(samples, "rtts_errors_total", outcome="rejected", code="policy") == 1


async def test_a_flood_the_upstream_sends_with_its_101_is_held_back_then_relayed_whole() -> None:
    audio = bytes(range(256)) * 40  # 10 KiB frames, 2 MB in all: far over the early bound
    flood = (
        server_text({"resp_type": "START", **TRACE}) + frame(Opcode.BINARY, audio, mask=False) * 200
    )
    async with (
        scripted_upstream(accept_then(flood), then_close=False) as (base, _),
        relay_to(base) as front,
    ):
        async with connect(front.url(), proxy=None, compression=None) as ws:
            assert json.loads(await ws.recv())["resp_type"] == "START"
            got = 0
            while got < len(audio) * 200:
                message = await asyncio.wait_for(ws.recv(), 5)
                assert message == audio
                got += len(message)


async def test_an_upstream_streaming_on_after_its_error_is_still_held_to_the_session_limit() -> (
    None
):
    async def error_then_stream(ws: ServerConnection, log: ConnectionLog) -> None:
        await ws.send(json.dumps({"resp_type": "START", "trace_id": log.trace_id}))
        await ws.send(
            json.dumps({"resp_type": "ERROR", "trace_id": log.trace_id, "error_code": "SIS.0415"})
        )
        while True:  # and audio for ever
            await ws.send(b"\x01\x02")
            await asyncio.sleep(0.02)

    cloud = FakeCloud(default=error_then_stream)
    async with cloud.running(), relay_to(base_of(cloud.url), max_session_seconds=0.5) as front:
        seen = await exchange(front.url(), start("hi"), timeout=10)
        await idle(front)
        samples = await scrape(front)
    assert seen.kinds[:2] == ["START", "ERROR"] and seen.close_code == 1014
    assert value(samples, "rtts_errors_total", outcome="error", code="SIS.0415") == 1


def no_handshakes_open(front: RunningGateway) -> bool:
    return not front.gateway._doors  # what the limit counts


async def test_connections_past_the_handshake_limit_get_503_at_once(
    gateway: RunningGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gateway.server as gateway_server

    monkeypatch.setattr(gateway_server, "_MAX_HANDSHAKES", 2)
    idle_writers = [(await asyncio.open_connection("127.0.0.1", gateway.port))[1] for _ in "ab"]
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    async with asyncio.timeout(5):
        answer = await reader.read()
    writer.close()
    for idle_writer in idle_writers:
        idle_writer.close()
    assert answer.startswith(b"HTTP/1.1 503 ") and b"handshake" in answer
    for _ in range(100):  # the gateway sees them leave, and makes room again
        if no_handshakes_open(gateway):
            break
        await asyncio.sleep(0.02)
    seen = await exchange(gateway.url(), start("Next.", property="english_amy_common"))
    assert seen.kinds == ["START", "AUDIO", "END"]
