"""Spare upstream connections (--upstream-spares): used, replaced, expired, closed at shutdown."""

from __future__ import annotations

import asyncio
import json

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import InvalidStatus
from websockets.protocol import State

import gateway.server
import gateway.spares
from gateway.server import RunningGateway, run_gateway
from gateway.settings import GatewaySettings
from tests.fakes import ConnectionLog, FakeCloud, fail, speak, tone_pcm
from tests.support import exchange, limit_upstream_handshakes, start
from tests.test_gateway import base_of, relay_to, scrape, value


async def wait_for_spares(front: RunningGateway, count: int) -> None:
    for _ in range(250):
        if front.gateway.spares.ready == count:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{front.gateway.spares.ready} spares ready, expected {count}")


async def test_the_next_session_starts_on_a_spare_and_a_replacement_is_opened() -> None:
    audio = tone_pcm(0.3, 16000)
    cloud = FakeCloud(default=speak(audio))
    async with cloud.running(), relay_to(base_of(cloud.url), upstream_spares=1) as front:
        first = await exchange(front.url("p1"), start("cold"))
        await wait_for_spares(front, 1)
        second = await exchange(front.url("p1"), start("warm"))
        await wait_for_spares(front, 1)  # the used spare was replaced
        samples = await scrape(front)
    assert first.audio == second.audio == audio and second.kinds[-1] == "END"
    assert value(samples, "rtts_sessions_on_spare_total") == 1
    assert value(samples, "rtts_upstream_connect_seconds_count") == 1  # only the cold one waited
    assert len(cloud.requests) == 3  # the cold session's, the spare, its replacement
    assert value(samples, "rtts_sessions_total", outcome="normal") == 2
    assert value(samples, "rtts_upstream_spares") == 1
    # Spares are per project: the spare was opened for p1's URL.
    assert {request.path for request in cloud.requests} == {"/v1/p1/rtts"}


async def test_a_spare_that_went_away_is_not_used() -> None:
    cloud = FakeCloud()
    async with cloud.running(), relay_to(base_of(cloud.url), upstream_spares=1) as front:
        await exchange(front.url(), start("cold"))
        await wait_for_spares(front, 1)
        for project in front.gateway.spares._projects.values():
            for _, connection in project.spares:
                connection.transport.abort()  # as if the cloud had dropped it
        await asyncio.sleep(0.05)
        seen = await exchange(front.url(), start("after the drop"))
        samples = await scrape(front)
    assert seen.kinds[0] == "START" and seen.kinds[-1] == "END"
    assert value(samples, "rtts_sessions_on_spare_total") == 0


async def test_spares_rotate_before_the_idle_rule_with_no_moment_without_one() -> None:
    # The local engine ends an idle connection after idle_timeout; spares live 3/4 of it
    # (0.45 s), and each is replaced past half of that and offered until then.
    async with run_gateway(
        GatewaySettings(port=0, metrics_port=0, idle_timeout=0.6, upstream_spares=1)
    ) as running:
        await exchange(running.url(), start("cold"))
        await wait_for_spares(running, 1)
        ready = []
        for _ in range(300):  # 1.5 s: several lifetimes
            ready.append(running.gateway.spares.ready)
            await asyncio.sleep(0.005)
        seen = await exchange(running.url(), start("Still warm.", property="english_amy_common"))
        samples = await scrape(running)
        assert running.engine is not None
        outcomes = [record.outcome for record in running.engine.history]
    assert min(ready) == 1 and max(ready) == 1
    assert seen.kinds == ["START", "AUDIO", "END"]
    assert value(samples, "rtts_sessions_on_spare_total") == 1
    assert outcomes.count("normal") == 2  # the others were retired spares: rotations happened
    assert len(outcomes) >= 5


async def test_shutdown_closes_every_spare() -> None:
    cloud = FakeCloud()
    async with cloud.running():
        async with relay_to(base_of(cloud.url), upstream_spares=2) as front:
            await exchange(front.url(), start("cold"))
            await wait_for_spares(front, 2)
        for _ in range(100):
            if all(ws.state is State.CLOSED for ws in cloud.sockets):
                break
            await asyncio.sleep(0.02)
        assert all(ws.state is State.CLOSED for ws in cloud.sockets)


async def test_without_spares_nothing_is_opened_ahead(gateway: RunningGateway) -> None:
    cloud = FakeCloud()
    async with cloud.running(), relay_to(base_of(cloud.url)) as front:
        await exchange(front.url(), start("one"))
        await asyncio.sleep(0.2)
        assert len(cloud.requests) == 1 and front.gateway.spares.ready == 0


async def test_a_refused_spare_is_retried_later_and_sessions_open_their_own_meanwhile() -> None:
    cloud = FakeCloud()
    cloud.refuse_next(429, "APIG.0308", "throttled", times=2)  # the first call and its spare
    async with cloud.running(), relay_to(base_of(cloud.url), upstream_spares=1) as front:
        with pytest.raises(InvalidStatus) as refused:
            await exchange(front.url(), start("first"))
        for _ in range(100):
            if len(cloud.requests) == 2:
                break
            await asyncio.sleep(0.02)
        seen = await exchange(front.url(), start("second"))
        assert front.gateway.spares.ready == 0  # no new attempt before the retry delay
        samples = await scrape(front)
    assert refused.value.response.status_code == 429
    assert seen.kinds[0] == "START" and seen.kinds[-1] == "END"
    assert value(samples, "rtts_sessions_on_spare_total") == 0
    assert value(samples, "rtts_sessions_total", outcome="normal") == 1


def replace_within(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """Bound the wait for a replacement; the maintenance round (which would also open one)
    is put out of reach, so that what opens it is what the test says."""
    monkeypatch.setattr(gateway.spares, "REPLACE_WITHIN", seconds)
    monkeypatch.setattr(gateway.spares, "_MAINTENANCE_PERIOD", 600.0)
    monkeypatch.setattr(gateway.server, "_SPARE_MAX_AGE_SECONDS", 2400.0)


async def test_a_used_spare_is_replaced_once_its_session_has_first_audio(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The replacement's handshake (and TLS) must not take the gateway's CPU while the caller
    # waits for START and the first audio (the time bound is set out of reach here).
    replace_within(monkeypatch, 60.0)
    audio = tone_pcm(0.1, 16000)
    released, finished = asyncio.Event(), asyncio.Event()

    async def gated(ws: ServerConnection, log: ConnectionLog) -> None:
        await ws.send(json.dumps({"resp_type": "START", "trace_id": log.trace_id}))
        await released.wait()
        await ws.send(audio)
        await finished.wait()  # the session is still on when its replacement opens
        await ws.send(json.dumps({"resp_type": "END", "trace_id": log.trace_id}))

    cloud = FakeCloud(default=speak(audio))
    cloud.then(speak(audio), gated)  # the cold session's connection, then the spare's
    async with cloud.running(), relay_to(base_of(cloud.url), upstream_spares=1) as front:
        await exchange(front.url("p1"), start("cold"))
        await wait_for_spares(front, 1)
        async with connect(front.url("p1"), proxy=None) as ws:
            await ws.send(start("warm"))
            assert json.loads(await ws.recv())["resp_type"] == "START"
            await asyncio.sleep(0.2)  # time enough for a replacement, were one opened now
            assert len(cloud.requests) == 2 and front.gateway.spares.ready == 0
            released.set()
            assert await ws.recv() == audio
            await wait_for_spares(front, 1)
            assert len(cloud.requests) == 3
            finished.set()
            assert json.loads(await ws.recv())["resp_type"] == "END"
        samples = await scrape(front)
    assert value(samples, "rtts_sessions_on_spare_total") == 1


async def test_a_spare_used_by_a_session_still_waiting_is_replaced_within_the_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    replace_within(monkeypatch, 0.05)
    released = asyncio.Event()

    async def silent(ws: ServerConnection, log: ConnectionLog) -> None:
        await released.wait()

    cloud = FakeCloud()
    cloud.then(speak(tone_pcm(0.1, 16000)), silent)
    async with cloud.running(), relay_to(base_of(cloud.url), upstream_spares=1) as front:
        await exchange(front.url(), start("cold"))
        await wait_for_spares(front, 1)
        async with connect(front.url(), proxy=None) as ws:
            await ws.send(start("waiting"))
            await wait_for_spares(front, 1)  # while the session has had no answer at all
            assert len(cloud.requests) == 3
            released.set()


async def test_a_spare_used_by_a_session_with_no_audio_is_replaced_when_it_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    replace_within(monkeypatch, 60.0)
    cloud = FakeCloud()
    cloud.then(speak(tone_pcm(0.1, 16000)), fail("ERROR", "SIS.0402", "bad text"))
    async with cloud.running(), relay_to(base_of(cloud.url), upstream_spares=1) as front:
        await exchange(front.url(), start("cold"))
        await wait_for_spares(front, 1)
        seen = await exchange(front.url(), start("refused"))
        await wait_for_spares(front, 1)
    assert seen.kinds == ["START", "ERROR"] and seen.audio == b""
    assert len(cloud.requests) == 3


class CountingCloud(FakeCloud):
    """A fake cloud that notes how many handshakes it has in progress at most."""

    def __init__(self) -> None:
        super().__init__()
        self.in_flight = self.peak = 0

    async def _process_request(self, connection, request):  # type: ignore[no-untyped-def,override]
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            return await super()._process_request(connection, request)
        finally:
            self.in_flight -= 1


async def test_spare_handshakes_take_a_handshake_slot_and_never_wait_for_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The limit on upstream handshakes at once holds with spares being opened too (once:
    68 at once against a limit of 32), and no caller is turned away for a spare's sake."""
    limit_upstream_handshakes(monkeypatch, 4)
    cloud = CountingCloud()
    cloud.handshake_delay = 0.3  # a slow cloud: every handshake overlaps the others
    async with cloud.running(), relay_to(base_of(cloud.url), upstream_spares=4) as front:
        seen = await asyncio.gather(*(exchange(front.url(f"p{i}"), start("hi")) for i in range(4)))
        await asyncio.sleep(0.5)  # the spares' handshakes, as many as the slots allow
        samples = await scrape(front)
    assert cloud.peak <= 4
    assert all(s.kinds[-1] == "END" for s in seen)
    assert value(samples, "rtts_sessions_total", outcome="normal") == 4


async def test_the_newest_spare_is_taken_so_the_clouds_idle_clock_has_run_least() -> None:
    # A client may hold its connection idle before START (a bot's prewarm does): the spare
    # it gets should leave it as much of the cloud's idle allowance as there is.
    cloud = FakeCloud()
    async with cloud.running(), relay_to(base_of(cloud.url), upstream_spares=2) as front:
        await exchange(front.url(), start("cold"))  # connection 0; spares 1 and 2 open
        await wait_for_spares(front, 2)
        await exchange(front.url(), start("warm"))  # takes one; its replacement is 3
        await wait_for_spares(front, 2)
        await exchange(front.url(), start("on the newest"))
    texts = {index: (log.start or {}).get("text") for index, log in enumerate(cloud.connections)}
    assert texts[0] == "cold" and texts[3] == "on the newest"


async def test_a_project_whose_spares_are_refused_is_tried_less_and_less_often(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(gateway.spares, "_RETRY_AFTER_SECONDS", 0.05)
    monkeypatch.setattr(gateway.spares, "_RETRY_AFTER_CAP_SECONDS", 0.4)
    monkeypatch.setattr(gateway.spares, "_MAINTENANCE_PERIOD", 0.01)
    cloud = FakeCloud()
    async with cloud.running(), relay_to(base_of(cloud.url), upstream_spares=1) as front:
        await exchange(front.url(), start("served"))
        cloud.refuse_next(403, "APIG.0302", "forbidden", times=1000)  # every spare from now on
        await asyncio.sleep(1.5)
        attempts = len(cloud.requests) - 2  # the session's and its first spare
    # Every 50 ms that would be about 30; doubling to 400 ms, about 7 (fewer on a slow day).
    assert 1 <= attempts <= 9
