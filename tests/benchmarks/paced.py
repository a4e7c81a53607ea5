"""A lean real-time rtts server and client for the capacity benchmark.

    python -m tests.benchmarks.paced --port 0 [--frames 84] [--tls PEM]  # prints ``listening <port>``

Measuring whether a proxy keeps 1000 real-time streams on time needs a harness that itself
keeps 1000 on time on the one core it has. So the server writes pre-encoded 60 ms frames
from one timer callback per frame, and the client counts frames by their bytes with the
gateway's own frame scanner; websockets' sans-I/O protocols do both handshakes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import time
import uuid
from dataclasses import dataclass

import uvloop
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

from gateway.wire import FrameScanner, MessageSink, close_frame

PCM_FRAME = b"\x01\x00" * 960  # 60 ms of 16 kHz 16-bit PCM, as both stubs send it
FRAME_BYTES = len(PCM_FRAME)
FRAMES = 84  # about 5 s
PERIOD = 0.06
_ENCODED_FRAME = Frame(Opcode.BINARY, PCM_FRAME).serialize(mask=False)


class PacedSession(asyncio.Protocol):
    """Server side: START in, then a frame every 60 ms, then END and a close."""

    def __init__(self, frames: int = FRAMES) -> None:
        self.frames = frames
        self.protocol = ServerProtocol()
        self.transport: asyncio.Transport | None = None
        self.sent = 0
        self.begin = 0.0
        self.trace_id = str(uuid.uuid4())

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.protocol.receive_data(data)
        for event in self.protocol.events_received():
            if isinstance(event, Request):
                self.protocol.send_response(self.protocol.accept(event))
            elif isinstance(event, Frame) and event.opcode is Opcode.TEXT and not self.begin:
                self.protocol.send_text(
                    json.dumps({"resp_type": "START", "trace_id": self.trace_id}).encode()
                )
                self.begin = asyncio.get_running_loop().time()
                self._tick()
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def _tick(self) -> None:
        if self.transport is None:
            return
        self._flush()
        if self.sent == self.frames:
            end = {"resp_type": "END", "trace_id": self.trace_id, "reason": "NORMAL"}
            self.protocol.send_text(json.dumps(end).encode())
            self.protocol.send_close(1000)
            self._flush()
            return
        self.transport.write(_ENCODED_FRAME)
        self.sent += 1
        loop = asyncio.get_running_loop()
        loop.call_at(self.begin + self.sent * PERIOD, self._tick)

    def _flush(self) -> None:
        for chunk in self.protocol.data_to_send():
            if self.transport is None:
                return
            if chunk:
                self.transport.write(chunk)
            else:
                self.transport.close()


@dataclass
class PacedResult:
    """When START came back, when END did, and how late the latest frame was (seconds)."""

    started: float = 0.0
    ended: float = 0.0
    max_late: float = 0.0
    frames: int = 0


class PacedClient(asyncio.Protocol):
    """Client side: the upgrade, START, then every frame timed against the 60 ms grid."""

    def __init__(self, url: str, done: asyncio.Future[PacedResult]) -> None:
        self.protocol = ClientProtocol(parse_uri(url))
        self.done = done
        self.result = PacedResult()
        self.audio_bytes = 0
        self.scanner: FrameScanner | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.protocol.send_request(self.protocol.connect())
        self.transport.write(b"".join(self.protocol.data_to_send()))

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        if self.scanner is None:  # the 101; the server sends nothing before START
            self.protocol.receive_data(data)
            if any(isinstance(e, Response) for e in self.protocol.events_received()):
                sink = MessageSink(self._message, self._audio)
                self.scanner = FrameScanner(sink, masked=False, max_message_bytes=1 << 20)
                start = {"command": "START", "text": "benchmark", "config": {}}
                self.transport.write(
                    Frame(Opcode.TEXT, json.dumps(start).encode()).serialize(mask=True)
                )
            return
        self.scanner.feed(data)
        self.scanner.deliver()
        if self.scanner.close is not None:
            self.transport.write(close_frame(1000, "", mask=True))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(self.result)

    def _message(self, message: str) -> None:
        now = time.perf_counter()
        if not self.result.started:
            self.result.started = now
        elif '"END"' in str(message):
            self.result.ended = now

    def _audio(self, size: int) -> None:
        self.audio_bytes += size
        now = time.perf_counter()
        while (self.result.frames + 1) * FRAME_BYTES <= self.audio_bytes:
            due = self.result.started + self.result.frames * PERIOD
            self.result.max_late = max(self.result.max_late, now - due)
            self.result.frames += 1


async def paced_session(
    port: int, frames: int = FRAMES, tls: ssl.SSLContext | None = None
) -> PacedResult:
    """One real-time session against ``port`` (wss:// with ``tls``); its frames' worst lateness."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[PacedResult] = loop.create_future()
    url = f"{'wss' if tls else 'ws'}://127.0.0.1:{port}/v1/bench/rtts"
    await loop.create_connection(lambda: PacedClient(url, done), "127.0.0.1", port, ssl=tls)
    result = await asyncio.wait_for(done, 60)
    if result.frames != frames or not result.ended:
        raise RuntimeError(f"{result.frames} of {frames} frames arrived (END: {result.ended})")
    return result


async def serve(port: int, frames: int, tls: str | None) -> None:
    """Serve paced sessions until killed (wss:// with the ``tls`` PEM)."""
    from tests.benchmarks.stub import server_tls

    server = await asyncio.get_running_loop().create_server(
        lambda: PacedSession(frames), "127.0.0.1", port, backlog=4096, ssl=server_tls(tls)
    )
    print(f"listening {server.sockets[0].getsockname()[1]}", flush=True)
    await asyncio.Future()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--frames", type=int, default=FRAMES)
    parser.add_argument("--tls", help="serve wss:// with this PEM (certificate chain and key)")
    args = parser.parse_args()
    uvloop.run(serve(args.port, args.frames, args.tls))
