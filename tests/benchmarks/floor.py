"""The floor of a relay written in Python: the least any Python proxy can add, for scale.

    python -m tests.benchmarks.floor --to PORT   # prints ``listening <port>``

uvloop, one protocol object per socket, callbacks only: like nginx and the gateway it reads
the client's first bytes, then connects to ``127.0.0.1:PORT``, then copies bytes both ways
as they come. Nothing is parsed, checked, counted, limited or timed out, so it is no proxy
to deploy; the benchmark runs it beside the gateway and nginx to show what Python itself
costs on the caller's path.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import cast

import uvloop


class _Side(asyncio.Protocol):
    """One socket; what it reads is written to its peer's socket."""

    def __init__(self, target: int, peer: _Side | None = None) -> None:
        self.target = target
        self.peer = peer
        self.transport: asyncio.Transport | None = None
        self.early: list[bytes] = []  # read before the peer's socket was connected

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        if self.peer is not None:  # the upstream side: send what the client already sent
            self.transport.writelines(self.peer.early)
            self.peer.early.clear()

    def data_received(self, data: bytes) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write(data)
            return
        self.early.append(data)
        if self.peer is None:  # the client's first bytes: now connect
            assert self.transport is not None
            self.transport.pause_reading()
            asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        assert self.transport is not None
        try:
            _, self.peer = await asyncio.get_running_loop().create_connection(
                lambda: _Side(self.target, self), "127.0.0.1", self.target
            )
        except OSError:
            self.transport.close()
            return
        self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()


async def serve(target: int) -> None:
    """Relay to ``target`` until killed."""
    server = await asyncio.get_running_loop().create_server(
        lambda: _Side(target), "127.0.0.1", 0, backlog=4096
    )
    print(f"listening {server.sockets[0].getsockname()[1]}", flush=True)
    await asyncio.Future()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--to", type=int, required=True)
    uvloop.run(serve(parser.parse_args().to))
