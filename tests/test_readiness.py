"""Readiness is the gateway's own state: a cloud outage must not take the pod out of service."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from typing import Any

import aiohttp
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from gateway.readiness import ReadinessFacts, decide
from gateway.server import RunningGateway
from gateway.upstream_probe import UpstreamProbe
from tests.support import exchange, start
from tests.test_gateway import relay_to, scrape, value


@pytest.mark.parametrize(
    ("facts", "ready", "said"),
    [
        (ReadinessFacts(listening=True, draining=False), True, "ready"),
        (ReadinessFacts(listening=False, draining=False), False, "not listening"),
        (ReadinessFacts(listening=True, draining=True), False, "draining"),
        (ReadinessFacts(listening=True, draining=True, upstream=True), False, "draining"),
        (ReadinessFacts(listening=True, draining=False, engine=True), True, "ready"),
        (ReadinessFacts(listening=True, draining=False, engine=False), False, "local engine"),
        # The cloud down: still ready, and the body says what happens to new sessions.
        (
            ReadinessFacts(listening=True, draining=False, upstream=False, upstream_detail="x"),
            True,
            "refused (502/504) until it returns",
        ),
        (
            ReadinessFacts(listening=True, draining=False, upstream=False, fallback=True),
            True,
            "go to the fallback",
        ),
        (
            ReadinessFacts(listening=True, draining=False, upstream=False, secondary=True),
            True,
            "sessions go to the secondary upstream (",
        ),
        (
            ReadinessFacts(
                listening=True, draining=False, upstream=False, secondary=True, fallback=True
            ),
            True,
            "sessions go to the secondary upstream, then the fallback",
        ),
        # A configured fallback is the pod's own: when it cannot serve, the pod is not ready,
        # whatever the cloud's state.
        (
            ReadinessFacts(listening=True, draining=False, upstream=True, fallback=False),
            False,
            "fallback is not available",
        ),
        (
            ReadinessFacts(listening=True, draining=False, upstream=False, fallback=False),
            False,
            "fallback is not available",
        ),
    ],
)
def test_readiness_decision(facts: ReadinessFacts, ready: bool, said: str) -> None:
    decided, detail = decide(facts)
    assert decided is ready and said in detail


def test_the_upstream_alone_never_makes_the_gateway_not_ready() -> None:
    for listening in (True, False):
        for draining in (True, False):
            for engine in (None, True, False):
                for fallback in (None, True, False):
                    verdicts = {
                        decide(ReadinessFacts(listening, draining, engine, fallback, upstream))[0]
                        for upstream in (None, True, False)
                    }
                    assert len(verdicts) == 1, (listening, draining, engine, fallback)


async def readyz(gateway: RunningGateway) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{gateway.metrics_url}/readyz") as response,
    ):
        return response.status, await response.json()


async def test_readyz_stays_200_while_the_upstream_is_down_and_the_outage_is_a_metric() -> None:
    # A bound socket that does not listen: connections are refused, until listen() below.
    with socket.socket() as upstream:
        upstream.bind(("127.0.0.1", 0))
        port = upstream.getsockname()[1]
        async with relay_to(f"ws://127.0.0.1:{port}") as front:
            status, body = await readyz(front)
            assert status == 200 and body["ready"] is True and body["backend"] == "huawei"
            assert (
                f"upstream 127.0.0.1:{port} unreachable (ConnectionRefusedError)"
                in (body["detail"])
            )
            samples = await scrape(front)
            assert value(samples, "rtts_upstream_reachable", backend="huawei") == 0
            # Without a fallback, a new session is refused with the upstream's failure (502),
            # answered at once, and the pod stays ready for the next one.
            began = time.monotonic()
            with pytest.raises(InvalidStatus) as refused:
                await connect(front.url(), proxy=None, compression=None)
            assert refused.value.response.status_code == 502
            assert time.monotonic() - began < front.gateway.settings.upstream_connect_timeout
            assert value(await scrape(front), "rtts_gateway_ready", backend="huawei") == 1
            assert (await readyz(front))[0] == 200

            upstream.listen()  # the upstream is back: the probe sees it
            assert await front.gateway.upstream_probe.check() is True
            status, body = await readyz(front)
            assert status == 200 and f"upstream 127.0.0.1:{port} reachable" in body["detail"]
            assert value(await scrape(front), "rtts_upstream_reachable", backend="huawei") == 1


async def test_with_a_local_fallback_readyz_stays_200_and_says_calls_go_to_it() -> None:
    with socket.socket() as upstream:  # bound, not listening: the cloud refuses everything
        upstream.bind(("127.0.0.1", 0))
        port = upstream.getsockname()[1]
        async with relay_to(f"ws://127.0.0.1:{port}", fallback="local") as front:
            status, body = await readyz(front)
            assert status == 200 and body["ready"] is True
            assert "sessions go to the fallback" in body["detail"]
            assert (await exchange(front.url(), start("Spoken by the fallback."))).kinds[
                -1
            ] == "END"
            assert (await readyz(front))[0] == 200
            # The fallback is the pod's own: if it cannot serve, the pod is not ready.
            probe = front.gateway.fallback_probe
            assert probe is not None and probe.reachable is True
            assert front.engine is not None
            probe.reachable = False
            status, body = await readyz(front)
            assert status == 503 and "fallback is not available" in body["detail"]


async def test_local_engine_gateway_is_ready_and_its_engine_reachable(
    gateway: RunningGateway,
) -> None:
    status, body = await readyz(gateway)
    assert status == 200 and (body["ready"], body["backend"], body["detail"]) == (
        True,
        "local",
        "ready",
    )
    assert body["upstreams"]["primary"]["state"] == "closed"  # the breaker report rides along
    samples = await scrape(gateway)
    assert value(samples, "rtts_upstream_reachable", backend="local") == 1
    assert (await exchange(gateway.url(), start("Ready."))).kinds[-1] == "END"


async def test_readyz_turns_503_while_draining_and_sessions_still_finish(
    gateway: RunningGateway,
) -> None:
    ws = await connect(gateway.url(), proxy=None, compression=None)  # a session in progress
    server = gateway.server
    drain = asyncio.create_task(gateway.gateway.drain(server, 5.0))
    try:
        for _ in range(100):
            if gateway.gateway.draining:
                break
            await asyncio.sleep(0.01)
        status, body = await readyz(gateway)
        assert status == 503 and body["ready"] is False and "draining" in body["detail"]
        await ws.send(start("Still spoken while draining."))
        kinds = []
        async for message in ws:
            kinds.append(message if isinstance(message, bytes) else "text")
        assert any(isinstance(k, bytes) for k in kinds)  # the session in progress finished
    finally:
        await ws.close()
        await drain


async def test_readyz_answers_at_once_while_the_upstream_blackholes_connections() -> None:
    # A listener whose accept queue is full: the kernel drops further SYNs, so a connect to it
    # hangs as to a blackholed cloud. /readyz must not wait for the probe (a kubelet probe
    # gives up after 1 s by default).
    with socket.socket() as upstream:
        upstream.bind(("127.0.0.1", 0))
        upstream.listen(0)
        port = upstream.getsockname()[1]
        fillers = [socket.socket() for _ in range(3)]
        try:
            for filler in fillers:
                filler.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    filler.connect(("127.0.0.1", port))
            await asyncio.sleep(0.1)
            async with relay_to(f"ws://127.0.0.1:{port}") as front:
                status, body = await readyz(front)
                assert status == 200 and "unreachable (TimeoutError)" in body["detail"]
                probing = asyncio.create_task(front.gateway.upstream_probe.check())
                await asyncio.sleep(0.1)  # the probe is now waiting on the dropped SYN
                began = time.monotonic()
                status, _ = await readyz(front)
                assert status == 200 and time.monotonic() - began < 1.0
                assert not probing.done()
                assert await probing is False
        finally:
            for filler in fillers:
                filler.close()


def test_behind_a_proxy_the_probe_checks_the_proxy_it_goes_through(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An upstream reached through HTTPS_PROXY may not be reachable from here at all: what
    the gateway depends on is the proxy, so that is what the probe connects to."""
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:3128")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    via = UpstreamProbe("wss://sis-ext.cn-north-4.myhuaweicloud.com", lambda _up: None)
    assert (via.host, via.port) == ("127.0.0.1", 3128)
    assert via.detail == "proxy to the upstream 127.0.0.1:3128 not checked yet"
    monkeypatch.setenv("NO_PROXY", "myhuaweicloud.com")
    direct = UpstreamProbe("wss://sis-ext.cn-north-4.myhuaweicloud.com", lambda _up: None)
    assert (direct.host, direct.port) == ("sis-ext.cn-north-4.myhuaweicloud.com", 443)
    loopback = UpstreamProbe("ws://127.0.0.1:9000", lambda _up: None)  # never via a proxy
    assert (loopback.host, loopback.port) == ("127.0.0.1", 9000)
