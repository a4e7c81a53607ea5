"""A stub rtts server for benchmarks: START, 5 s of 16 kHz PCM in 60 ms frames, END.

    python -m tests.benchmarks.stub --port 0 [--handshake-delay 0.05] [--tls CERT_AND_KEY.pem]

Prints ``listening <port>``. Frames go out as fast as the socket takes them (the real-time
server for the capacity benchmark is :mod:`tests.benchmarks.paced`). ``--handshake-delay``
holds every upgrade that many seconds before answering, as a network round trip plus TLS to
the cloud would. ``--tls`` serves wss:// with that certificate chain and key (one PEM).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import uuid

from websockets.asyncio.server import ServerConnection, serve
from websockets.http11 import Request

from tests.benchmarks.paced import FRAMES, PCM_FRAME

# The rest of the audio goes out in one burst that keeps this process busy for a few ms on
# the core it shares with the clients; pausing after the first frame lets a client take its
# START and first-audio timestamps first, whatever proxy is in between.
PAUSE_AFTER_FIRST_AUDIO = 0.005


async def session(ws: ServerConnection) -> None:
    await ws.recv()
    trace_id = str(uuid.uuid4())
    await ws.send(json.dumps({"resp_type": "START", "trace_id": trace_id}))
    await ws.send(PCM_FRAME)
    await asyncio.sleep(PAUSE_AFTER_FIRST_AUDIO)
    for _ in range(FRAMES - 1):
        await ws.send(PCM_FRAME)
    await ws.send(json.dumps({"resp_type": "END", "trace_id": trace_id, "reason": "NORMAL"}))


def server_tls(pem: str | None) -> ssl.SSLContext | None:
    """A server TLS context from one PEM holding the certificate chain and its key."""
    if pem is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pem)
    return context


async def main(port: int, handshake_delay: float, tls: str | None) -> None:
    async def delay(_: ServerConnection, __: Request) -> None:
        await asyncio.sleep(handshake_delay)

    async with serve(
        session,
        "127.0.0.1",
        port,
        compression=None,
        max_size=None,
        process_request=delay if handshake_delay else None,
        ssl=server_tls(tls),
    ) as server:
        print(f"listening {server.sockets[0].getsockname()[1]}", flush=True)
        await asyncio.Future()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--handshake-delay", type=float, default=0.0)
    parser.add_argument("--tls", help="serve wss:// with this PEM (certificate chain and key)")
    args = parser.parse_args()
    asyncio.run(main(args.port, args.handshake_delay, args.tls))
