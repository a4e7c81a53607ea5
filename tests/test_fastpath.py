"""The relay's compiled fast path (gateway/_relay.c) against the pure-Python scanner.

The claim the splice relies on: a read the compiled forwarder takes is one the scanner would
have forwarded unchanged and only counted, leaving its state as it was; every other read
reaches the scanner untouched. The property test feeds random server streams, cut into
random reads, through the scanner alone and through the forwarder in front of it, and
compares what comes out. The gateway tests then show both relay paths give a caller the same
bytes and the same metrics, and that the compiled one is really the one at work.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import socket
import time

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode

from gateway import _relay, fastpath
from gateway._relay import AudioForwarder
from gateway.settings import GatewaySettings
from gateway.wire import FrameScanner, MessageSink
from tests.fakes import Behaviour, ConnectionLog, FakeCloud, drip, speak, tone_pcm
from tests.test_gateway import base_of, relay_to, scrape, value

MAX_PAYLOAD = 65536 + 8  # room for a frame with a 64-bit length field


def test_the_compiled_relay_is_built() -> None:
    # CI builds it (gcc and the headers are there); a silent pure-Python install would leave
    # BENCHMARKS.md's figures untrue for it.
    assert fastpath.COMPILED_AVAILABLE, (
        "gateway._relay was not built: install gcc and the Python headers "
        "(apt-get install gcc python3-dev) and reinstall the project"
    )
    assert fastpath.resolve("auto") == "compiled"


def test_compiled_is_refused_with_a_clear_message_where_it_was_not_built(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fastpath, "COMPILED_AVAILABLE", False)
    with pytest.raises(ValueError, match="--relay / RTTS_GATEWAY_RELAY compiled") as caught:
        GatewaySettings(relay="compiled")
    assert "apt-get install gcc python3-dev" in str(caught.value)
    assert GatewaySettings(relay="auto").relay == "auto"


# -- the forwarder against the scanner --------------------------------------------------------


def _frame(opcode: Opcode, payload: bytes, *, fin: bool = True, mask: bool = False) -> bytes:
    return Frame(opcode, payload, fin=fin).serialize(mask=mask)


_SIZES = st.sampled_from([0, 1, 125, 126, 127, 1920, 65535, 65536, MAX_PAYLOAD + 1])
_FRAMES = st.one_of(
    _SIZES.map(lambda n: _frame(Opcode.BINARY, b"\x01" * n)),  # the audio case, and too big
    _SIZES.map(lambda n: _frame(Opcode.BINARY, b"\x01" * n)),  # (twice as likely)
    st.text(max_size=20).map(lambda t: _frame(Opcode.TEXT, t.encode())),
    st.just(_frame(Opcode.TEXT, b"\xff\xfe")),  # not UTF-8
    st.just(_frame(Opcode.BINARY, b"ab", fin=False) + _frame(Opcode.CONT, b"cd")),
    st.just(_frame(Opcode.BINARY, b"ab", fin=False)),  # a fragment left open
    st.just(_frame(Opcode.PING, b"p")),
    st.just(_frame(Opcode.PONG, b"p")),
    st.just(_frame(Opcode.BINARY, b"masked", mask=True)),  # a server must not mask
    st.just(b"\xc2\x01x"),  # a reserved bit set
    st.just(b"\x82\x7f\x80\x00\x00\x00\x00\x00\x00\x00"),  # a 64-bit length with its top bit
    st.just(_frame(Opcode.CLOSE, b"\x03\xe8")),
)


def _run(reads: list[bytes], compiled: bool) -> tuple[bytes, int, object, object]:
    """Relay ``reads`` as the splice does; return the bytes out, the audio bytes counted, the
    violation and the close the scanner saw."""
    out: list[bytes] = []
    counted = [0]

    def count(size: int) -> None:
        counted[0] += size

    scanner = FrameScanner(
        MessageSink(message=lambda _: None, binary_passed=count),
        masked=False,
        max_message_bytes=MAX_PAYLOAD,
    )

    def slow(data: bytes) -> None:
        if forwarded := scanner.feed(data):
            out.append(forwarded)
        scanner.deliver()
        if forwarder is not None:
            forwarder.enabled = scanner.at_rest

    forwarder = None
    if compiled:
        forwarder = fastpath.audio_forwarder(out.append, slow, MAX_PAYLOAD)
        forwarder.enabled = scanner.at_rest
    for data in reads:
        (forwarder or slow)(data)
    if forwarder is not None:
        counted[0] += forwarder.payload_bytes
    return b"".join(out), counted[0], scanner.violation, scanner.close


_AUDIO = _frame(Opcode.BINARY, b"\x01" * 1920)
_TOO_BIG = _frame(Opcode.BINARY, b"\x01" * (MAX_PAYLOAD + 1))
_OPEN_FRAGMENT = _frame(Opcode.BINARY, b"ab", fin=False)
_MASKED = _frame(Opcode.BINARY, b"masked", mask=True)


@settings(max_examples=500)
@given(
    reads=st.lists(st.lists(_FRAMES, min_size=1, max_size=3), max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=140_000), max_size=2),
)
@example(reads=[[_TOO_BIG]], cuts=[])
@example(reads=[[_AUDIO], [_TOO_BIG]], cuts=[])
@example(reads=[[_OPEN_FRAGMENT], [_AUDIO]], cuts=[])
@example(reads=[[_AUDIO], [_MASKED], [_AUDIO]], cuts=[])
@example(reads=[[_AUDIO, _AUDIO]], cuts=[1000])
def test_the_forwarder_relays_every_stream_exactly_as_the_scanner_does(
    reads: list[list[bytes]], cuts: list[int]
) -> None:
    # Each read is whole frames, as a server's writes usually arrive; a few more cuts land
    # anywhere, inside frames and headers included.
    stream = b"".join(b"".join(group) for group in reads)
    points = {0, len(stream)} | {min(c, len(stream)) for c in cuts}
    end = 0
    for group in reads:
        end += sum(map(len, group))
        points.add(end)
    ordered = sorted(points)
    pieces = [stream[a:b] for a, b in itertools.pairwise(ordered)] or [b""]
    assert _run(pieces, compiled=True) == _run(pieces, compiled=False)


def test_the_forwarder_takes_whole_audio_frames_and_leaves_the_rest() -> None:
    written: list[bytes] = []
    slow: list[bytes] = []

    forwarder = fastpath.audio_forwarder(written.append, slow.append, MAX_PAYLOAD)
    audio = _frame(Opcode.BINARY, b"\x01" * 1920)
    forwarder(audio)  # not enabled yet: the scanner's
    assert (written, slow, forwarder.payload_bytes, forwarder.last_read) == ([], [audio], 0, 0.0)
    forwarder.enabled = True
    before = time.monotonic()
    forwarder(audio + audio)
    assert (written, forwarder.payload_bytes) == ([audio + audio], 3840)
    read_at = forwarder.last_read
    assert before <= read_at <= time.monotonic()  # the upstream's silence timer restarts
    for other in (audio[:-1], b"", _frame(Opcode.TEXT, b"{}"), audio + b"\x82"):
        forwarder(other)
    assert slow[1:] == [audio[:-1], b"", _frame(Opcode.TEXT, b"{}"), audio + b"\x82"]
    assert (forwarder.payload_bytes, forwarder.last_read) == (3840, read_at)  # none taken


class _Transport:
    """What the forwarder asks of the client's transport: open or closing, bytes buffered."""

    def __init__(self) -> None:
        self.closing = False
        self.buffered = 0
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return self.buffered


def _direct(transport: _Transport, sock: socket.socket) -> AudioForwarder:
    forwarder = _relay.AudioForwarder(
        transport.write,
        pytest.fail,
        MAX_PAYLOAD,
        fd=sock.fileno(),
        closing=transport.is_closing,
        buffered=transport.get_write_buffer_size,
    )
    forwarder.enabled = True
    return forwarder


def _received(sock: socket.socket) -> bytes:
    data = bytearray()
    with contextlib.suppress(BlockingIOError):
        while chunk := sock.recv(1 << 20):
            data += chunk
    return bytes(data)


def test_the_forwarder_sends_on_the_socket_only_while_nothing_is_buffered_or_closing() -> None:
    """Sent directly, audio must never overtake what the transport still holds, nor go to
    a socket the transport is closing (its descriptor may be reused once closed)."""
    audio = _frame(Opcode.BINARY, b"\x01" * 1920)
    near, far = socket.socketpair()
    far.setblocking(False)
    with near, far:
        transport = _Transport()
        forwarder = _direct(transport, near)
        forwarder(audio)
        assert (_received(far), transport.written) == (audio, [])
        transport.buffered = 1  # the transport holds bytes: behind them, through write
        forwarder(audio)
        assert (_received(far), transport.written) == (b"", [audio])
        transport.buffered, transport.closing = 0, True
        forwarder(audio)
        assert (_received(far), transport.written) == (b"", [audio, audio])
        assert forwarder.payload_bytes == 3 * 1920  # counted whichever way it went


def test_what_the_socket_does_not_take_goes_to_write_in_order() -> None:
    audio = _frame(Opcode.BINARY, bytes(range(256)) * 200)
    near, far = socket.socketpair()
    near.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    far.setblocking(False)
    with near, far:
        transport = _Transport()
        forwarder = _direct(transport, near)
        forwarder(audio)  # more than the socket takes: the rest through write, once
        sent = _received(far)
        assert 0 < len(sent) < len(audio) and len(transport.written) == 1
        assert sent + transport.written[0] == audio
        transport.buffered = len(transport.written[0])  # now held: all of the next too
        forwarder(audio)
        assert transport.written[1] == audio


def test_a_failed_send_leaves_the_error_to_the_transport_s_write() -> None:
    audio = _frame(Opcode.BINARY, b"\x01" * 1920)
    near, far = socket.socketpair()
    far.close()  # the peer is gone: send fails (EPIPE), with no SIGPIPE
    with near:
        transport = _Transport()
        _direct(transport, near)(audio)
        assert transport.written == [audio]


def test_a_forwarder_needs_both_checks_with_a_socket() -> None:
    with pytest.raises(TypeError, match="fd needs closing and buffered"):
        _relay.AudioForwarder(print, print, 1, fd=0, closing=lambda: False)


# -- through a real gateway ---------------------------------------------------------------


async def _speak_through(relay: str, cloud: FakeCloud) -> tuple[bytes, float, bool]:
    """One session through a gateway on ``relay``: the audio heard, the audio bytes metered,
    and whether the compiled forwarder was forwarding while audio streamed."""
    async with relay_to(base_of(cloud.url), relay=relay) as running:
        audio = bytearray()
        engaged = False
        async with connect(running.url("p1"), compression=None) as ws:
            await ws.send(json.dumps({"command": "START", "text": "hi", "config": {}}))
            async for message in ws:
                if isinstance(message, bytes):
                    audio += message
                    for session in running.gateway.sessions:
                        forwarder = session.splice._forwarder
                        # Forwarding, and sending on the client's socket itself.
                        engaged |= (
                            forwarder is not None
                            and forwarder.payload_bytes > 0
                            and forwarder.fd >= 0
                        )
                elif json.loads(message)["resp_type"] == "END":
                    break
        await asyncio.sleep(0.05)  # the session's metrics are written as it ends
        metered = value(await scrape(running), "rtts_audio_bytes_total")
    return bytes(audio), metered, engaged


@pytest.mark.parametrize("relay", ["compiled", "python"])
async def test_both_relay_paths_give_the_same_audio_and_metrics(relay: str) -> None:
    pcm = tone_pcm(0.5, 16000)
    async with FakeCloud(speak(pcm)).running() as cloud:
        audio, metered, _ = await _speak_through(relay, cloud)
    assert audio == pcm
    assert metered == len(pcm)


async def test_the_compiled_path_is_the_one_forwarding_streamed_audio() -> None:
    async with FakeCloud(drip(frames=30, interval=0.005)).running() as cloud:
        compiled = await _speak_through("compiled", cloud)
        cloud.then(drip(frames=30, interval=0.005))
        python = await _speak_through("python", cloud)
    assert compiled[:2] == python[:2] == (b"\x01" * 30, 30)
    assert compiled[2] and not python[2]


def test_a_forwarder_in_a_reference_cycle_is_collected() -> None:
    # The splice holds its forwarder and the forwarder the splice's method: the collector
    # must see through the C object, or every session would leak.
    import gc
    import weakref

    class Holder:
        def read(self, data: bytes) -> None:
            pass

    holder = Holder()
    holder.forwarder = fastpath.audio_forwarder(  # type: ignore[attr-defined]
        holder.read, holder.read, MAX_PAYLOAD
    )
    alive = weakref.ref(holder)
    del holder
    gc.collect()
    assert alive() is None


def _streams_then(ending: str) -> Behaviour:
    """START, 20 one-byte frames, then the upstream hangs up (no END) or goes silent."""

    async def behaviour(ws: ServerConnection, log: ConnectionLog) -> None:
        await ws.send(json.dumps({"resp_type": "START", "trace_id": log.trace_id}))
        for _ in range(20):
            await ws.send(b"\x01")
            await asyncio.sleep(0.002)
        if ending == "silent":
            await ws.wait_closed()

    return behaviour


@pytest.mark.parametrize("relay", ["compiled", "python"])
@pytest.mark.parametrize("ending", ["upstream_hangs_up", "silent"])
async def test_audio_relayed_before_a_session_is_cut_is_all_metered(
    relay: str, ending: str
) -> None:
    # However a session ends, the audio the compiled path forwarded reaches the meter.
    async with (
        FakeCloud(_streams_then(ending)).running() as cloud,
        relay_to(base_of(cloud.url), relay=relay, upstream_gap_timeout=0.3) as running,
    ):
        heard = 0
        async with connect(running.url("p1"), compression=None) as ws:
            await ws.send(json.dumps({"command": "START", "text": "hi", "config": {}}))
            with pytest.raises(ConnectionClosed):
                async for message in ws:
                    heard += len(message) if isinstance(message, bytes) else 0
        await asyncio.sleep(0.05)
        assert heard == 20
        assert value(await scrape(running), "rtts_audio_bytes_total") == 20
