"""Helpers for tests that talk to a real rtts server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request
from websockets.server import ServerProtocol

import gateway.server as gateway_server

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop


@dataclass
class Exchange:
    """Everything a raw client saw on one rtts connection, in order."""

    frames: list[str | bytes] = field(default_factory=list)
    close_code: int | None = None

    @property
    def messages(self) -> list[dict[str, Any]]:
        return [json.loads(f) for f in self.frames if isinstance(f, str)]

    @property
    def kinds(self) -> list[str]:
        """resp_type of each text frame, 'AUDIO' for each run of binary frames."""
        kinds: list[str] = []
        for frame in self.frames:
            kind = "AUDIO" if isinstance(frame, bytes) else json.loads(frame)["resp_type"]
            if not (kind == "AUDIO" and kinds and kinds[-1] == "AUDIO"):
                kinds.append(kind)
        return kinds

    @property
    def audio(self) -> bytes:
        return b"".join(f for f in self.frames if isinstance(f, bytes))

    def words(self) -> list[dict[str, Any]]:
        return [w for m in self.messages if m["resp_type"] == "RESULT" for w in m["result"]]


async def exchange(
    url: str, *payloads: str | bytes, timeout: float = 20.0, headers: dict[str, str] | None = None
) -> Exchange:
    """Send ``payloads`` on one raw connection and record everything until the server closes."""
    seen = Exchange()
    async with asyncio.timeout(timeout):
        async with connect(
            url, compression=None, proxy=None, max_size=None, additional_headers=headers
        ) as ws:
            try:
                for payload in payloads:
                    await ws.send(payload)
            except ConnectionClosed:
                pass  # the server may answer and close before every payload is sent
            try:
                async for frame in ws:
                    seen.frames.append(frame)
            except ConnectionClosed:
                pass
            seen.close_code = ws.close_code
    return seen


def start(text: str, **config: Any) -> str:
    return json.dumps({"command": "START", "text": text, "config": config})


def to_samples(audio: bytes, audio_format: str, sample_rate: int) -> np.ndarray:
    """Decode engine output to float samples in -1..1, independently of the engine's code."""
    if audio_format == "pcm":
        pcm = audio
    elif audio_format == "ulaw":
        pcm = audioop.ulaw2lin(audio, 2)
    elif audio_format == "alaw":
        pcm = audioop.alaw2lin(audio, 2)
    else:
        import io

        import soundfile

        data, rate = soundfile.read(io.BytesIO(audio), dtype="float32")
        assert rate == sample_rate
        return np.asarray(data, dtype=np.float32)
    return np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0


def rms(samples: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(samples)))) if samples.size else 0.0


def examples_timeout(examples: int, seconds_each: float = 0.03) -> float:
    """A per-test timeout for a property test of ``examples`` hypothesis examples.

    The project-wide 60 s (pytest-timeout) suits ordinary tests; a property test's time grows
    with its examples (3000 hostile ones take about 18 s here), so a documented run with more
    of them gets 60 s plus ``seconds_each`` per example, five times what one needs here.
    """
    return 60 + examples * seconds_each


async def read_upgrade(reader: asyncio.StreamReader, protocol: ServerProtocol) -> Request | None:
    """Feed ``protocol`` from ``reader`` until the client's upgrade request is parsed.

    Returns ``None`` if the client leaves first. Scripted upstreams use it to answer the
    handshake themselves (a status, bytes after the 101) on a plain asyncio stream.
    """
    while True:
        if not (data := await reader.read(65536)):
            return None
        protocol.receive_data(data)
        request = next((e for e in protocol.events_received() if isinstance(e, Request)), None)
        if request is not None:
            return request


async def listening_base(process: asyncio.subprocess.Process, timeout: float = 60) -> str:
    """The ws:// base URL a gateway process prints first (``listening on ws://.../v1/...``)."""
    return (await listening_ports(process, timeout))[0]


async def listening_ports(
    process: asyncio.subprocess.Process, timeout: float = 60
) -> tuple[str, int]:
    """The ws:// base URL and the metrics port a gateway process prints first."""
    assert process.stdout is not None
    line = (await asyncio.wait_for(process.stdout.readline(), timeout)).decode()
    found = re.search(r"listening on (ws://\S+)/v1/.* on http://[^:]+:(\d+)", line)
    if found is None:
        raise RuntimeError(f"the gateway did not start: {line!r}")
    return found[1], int(found[2])


def limit_upstream_handshakes(monkeypatch: pytest.MonkeyPatch, slots: int) -> None:
    """Let the gateway run only ``slots`` upstream handshakes at once (32 otherwise)."""
    monkeypatch.setattr(gateway_server, "_MAX_UPSTREAMS_OPENING", slots)


@contextmanager
def full_accept_queue() -> Iterator[tuple[socket.socket, Callable[[], None]]]:
    """A listener on 127.0.0.2 whose full accept queue drops connection attempts (a
    firewall), and what gives it room again (then connects to it are answered)."""
    dead = socket.socket()
    dead.bind(("127.0.0.2", 0))
    dead.listen(0)
    dead.setblocking(False)
    port = dead.getsockname()[1]
    fillers = [socket.socket() for _ in range(3)]
    for filler in fillers:
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.2", port))

    def drain() -> None:
        for filler in fillers:
            filler.close()
        with contextlib.suppress(BlockingIOError):
            while True:
                dead.accept()[0].close()

    try:
        yield dead, drain
    finally:
        for sock in (*fillers, dead):
            sock.close()


@contextmanager
def unanswered_port() -> Iterator[int]:
    """A port on 127.0.0.2 whose full accept queue drops connection attempts (a firewall)."""
    with full_accept_queue() as (dead, _):
        yield dead.getsockname()[1]
