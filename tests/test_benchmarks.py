"""A smoke run of the benchmark harness's own parts (the full run needs nginx: bench.sh)."""

from __future__ import annotations

import asyncio
import re
import sys

from gateway.server import run_gateway
from gateway.settings import GatewaySettings
from tests.benchmarks.paced import PERIOD, paced_session

FRAMES = 10


async def test_the_capacity_harness_times_every_frame_direct_and_through_the_gateway() -> None:
    server = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.benchmarks.paced",
        "--port",
        "0",
        "--frames",
        str(FRAMES),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert server.stdout is not None
        line = (await asyncio.wait_for(server.stdout.readline(), 30)).decode()
        found = re.search(r"listening (\d+)", line)
        assert found, line
        port = int(found[1])
        settings = GatewaySettings(
            port=0, metrics_port=0, backend="huawei", upstream_url=f"ws://127.0.0.1:{port}"
        )
        async with run_gateway(settings) as gateway:
            direct, relayed = await asyncio.gather(
                paced_session(port, FRAMES), paced_session(gateway.port, FRAMES)
            )
    finally:
        server.kill()
        await server.wait()
    for result in (direct, relayed):
        assert result.frames == FRAMES and result.started < result.ended
        # Paced, not dumped: END comes after the last frame's slot on the 60 ms grid.
        assert result.ended - result.started >= (FRAMES - 1) * PERIOD
        assert 0 <= result.max_late < 1.0
