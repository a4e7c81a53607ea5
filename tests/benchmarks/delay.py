"""A TCP forwarder that delays every byte, to stand in for a network round trip.

    python -m tests.benchmarks.delay --to PORT --rtt 0.03   # prints ``listening <port>``

Each connection to it reaches ``127.0.0.1:PORT`` one round trip later (the TCP handshake
to a far host), and every chunk is delivered half a round trip after it was read, in order,
in both directions. So TLS and WebSocket handshakes and START -> first audio pay their round
trips as they would over a real 30 ms path; bandwidth and loss are not simulated.
"""

from __future__ import annotations

import argparse
import asyncio
import collections

import uvloop


class _Delayed:
    """Writes what is read from one side to the other, ``delay`` seconds later, in order."""

    def __init__(self, writer: asyncio.StreamWriter, delay: float) -> None:
        self.writer = writer
        self.delay = delay
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.timer: asyncio.TimerHandle | None = None

    def push(self, data: bytes) -> None:
        loop = asyncio.get_running_loop()
        self.queue.append((loop.time() + self.delay, data))
        if self.timer is None:
            self.timer = loop.call_at(self.queue[0][0], self._flush)

    def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        self.timer = None
        while self.queue and self.queue[0][0] <= loop.time():
            data = self.queue.popleft()[1]
            if self.writer.is_closing():
                continue
            if data:
                self.writer.write(data)
            elif self.writer.can_write_eof():
                self.writer.write_eof()
        if self.queue:
            self.timer = loop.call_at(self.queue[0][0], self._flush)


async def _pump(reader: asyncio.StreamReader, out: _Delayed) -> None:
    while data := await reader.read(65536):
        out.push(data)
    out.push(b"")  # the end, delayed like the data


async def _forward(
    target: int, rtt: float, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        await asyncio.sleep(rtt)  # SYN, SYN-ACK to the far host
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target)
        await asyncio.gather(
            _pump(reader, _Delayed(up_writer, rtt / 2)), _pump(up_reader, _Delayed(writer, rtt / 2))
        )
        await asyncio.sleep(rtt)  # let the last delayed writes go out
        up_writer.close()
    except OSError:
        pass
    finally:
        writer.close()


async def serve(target: int, rtt: float) -> None:
    """Forward to ``target`` until killed."""
    server = await asyncio.start_server(
        lambda r, w: _forward(target, rtt, r, w), "127.0.0.1", 0, backlog=4096
    )
    print(f"listening {server.sockets[0].getsockname()[1]}", flush=True)
    await asyncio.Future()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--to", type=int, required=True)
    parser.add_argument("--rtt", type=float, default=0.03)
    args = parser.parse_args()
    uvloop.run(serve(args.to, args.rtt))
