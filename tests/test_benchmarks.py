"""A smoke run of the benchmark harness's own parts (the full run needs nginx: bench.sh)."""

from __future__ import annotations

import asyncio
import itertools
import re
import sys
from collections import Counter

import pytest

from gateway.server import run_gateway
from gateway.settings import GatewaySettings
from tests.benchmarks.paced import PERIOD, paced_session
from tests.benchmarks.run import balanced_orders

FRAMES = 10


async def listening(*module_and_args: str) -> tuple[asyncio.subprocess.Process, int]:
    """A harness process (``python -m``) and the port it says it listens on."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", *module_and_args, stdout=asyncio.subprocess.PIPE
    )
    assert process.stdout is not None
    line = (await asyncio.wait_for(process.stdout.readline(), 30)).decode()
    found = re.search(r"listening (\d+)", line)
    if not found:
        process.kill()
        await process.wait()
    assert found, line
    return process, int(found[1])


async def test_the_capacity_harness_times_every_frame_direct_and_through_the_gateway() -> None:
    server, port = await listening("tests.benchmarks.paced", "--port", "0", "--frames", str(FRAMES))
    try:
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


async def test_the_python_floor_relays_whole_sessions_both_ways() -> None:
    server, port = await listening("tests.benchmarks.paced", "--port", "0", "--frames", str(FRAMES))
    floor, floor_port = await listening("tests.benchmarks.floor", "--to", str(port))
    try:
        results = await asyncio.gather(*(paced_session(floor_port, FRAMES) for _ in range(3)))
    finally:
        for process in (floor, server):
            process.kill()
            await process.wait()
    assert [result.frames for result in results] == [FRAMES] * 3


async def test_the_outage_harness_times_timeouts_refusals_and_fallback_audio() -> None:
    from tests.benchmarks.run import DarkUpstream, answer_time

    dark = DarkUpstream()
    port = await dark.start()
    try:
        for extra, answers in (
            ({}, ["HTTP 504", "HTTP 503"]),
            ({"fallback": "local"}, ["first audio", "first audio"]),
        ):
            settings = GatewaySettings(
                port=0,
                metrics_port=0,
                backend="huawei",
                upstream_url=f"ws://127.0.0.1:{port}",
                upstream_connect_timeout=1.0,
                breaker_failures=1,
                **extra,  # type: ignore[arg-type]
            )
            async with run_gateway(settings) as gateway:
                seen = [await answer_time(gateway.port) for _ in range(2)]
            assert [answer for _, answer in seen] == answers
            assert seen[0][0] >= 1.0 and seen[1][0] < seen[0][0]  # the timeout, then none
    finally:
        await dark.stop()


@pytest.mark.parametrize("count", range(1, 8))
def test_the_latency_rounds_have_each_target_follow_each_other_one_alike(count: int) -> None:
    # A session charges the next one a little of its teardown: no target may always come
    # after the same one.
    names = [f"target{n}" for n in range(count)]
    orders = balanced_orders(names)
    assert all(sorted(order) == names for order in orders)
    follows = Counter(pair for order in orders for pair in itertools.pairwise(order))
    assert len(follows) == count * (count - 1)  # every ordered pair of two targets
    assert len(set(follows.values())) <= 1  # each as often
