"""The watchdog looks at a session only once one of its deadlines may have come.

Each rule (no START, upstream silent, client not reading, session too long) fires at or
after a time known in advance (gateway.deadlines); these tests hold the rules to their
deadlines when the clock a rule runs on moves on after the session was filed, and hold the
watchdog to looking at no session before its time.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

import gateway.server
from gateway.deadlines import Deadlines
from tests.fakes import FakeCloud, drip, speak, tone_pcm
from tests.support import exchange, start
from tests.test_gateway import base_of, relay_to, scrape, value


class Item:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


def test_deadlines_hand_items_back_once_due_earliest_first() -> None:
    deadlines: Deadlines[Item] = Deadlines()
    items = {name: Item(name) for name in ("a", "a2", "b", "c", "late")}
    for when, name in ((3.0, "c"), (1.0, "a"), (2.0, "b"), (1.0, "a2"), (9.0, "late")):
        deadlines.file(when, items[name])
    assert deadlines.due(0.5) == []
    assert [i.name for i in deadlines.due(2.0)] == ["a", "a2", "b"]  # ties in filing order
    assert deadlines.due(2.0) == []  # handed back once
    assert [i.name for i in deadlines.due(5.0)] == ["c"]
    assert len(deadlines) == 1


def test_deadlines_keep_no_item_alive_and_stay_within_a_multiple_of_the_live_ones() -> None:
    deadlines: Deadlines[Item] = Deadlines()
    live = {Item("live0"), Item("live1"), Item("live2")}
    for item in live:
        deadlines.file(5000.0, item)
    ended = Item("ended")
    gone = weakref.ref(ended)
    deadlines.file(1.0, ended)
    del ended
    assert gone() is None  # a session that ended is freed at once, whatever its entry
    assert deadlines.due(2.0) == []
    held = []  # sessions that ended but are still referenced elsewhere
    for number in range(10_000):
        held.append(Item(f"ended{number}"))
        deadlines.file(1000.0 + number, held[-1])
        deadlines.prune(live)
        assert len(deadlines) <= 2 * len(live) + 65
    assert set(deadlines.due(1e9)) >= live  # the live ones are never dropped


async def test_an_upstream_streaming_past_its_first_deadline_is_cut_only_once_silent() -> None:
    # Filed at open with "last upstream message + 0.3 s": by then audio has moved that
    # clock on, so the watchdog must look again later, and cut only after the silence.
    cloud = FakeCloud(default=drip(frames=25, interval=0.04, end=False))
    async with cloud.running(), relay_to(base_of(cloud.url), upstream_gap_timeout=0.3) as front:
        seen = await exchange(front.url(), start("hi"), timeout=10)
        samples = await scrape(front)
    audio = [f for f in seen.frames if isinstance(f, bytes)]
    assert len(audio) == 25  # all of it relayed: not cut while streaming
    assert seen.close_code == 1014
    assert value(samples, "rtts_errors_total", outcome="timeout", code="timeout") == 1
    assert cloud.connections[0].client_closed_early


async def test_a_client_that_never_sends_start_is_cut_after_the_idle_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(gateway.server, "_START_GRACE_SECONDS", 0.1)
    cloud = FakeCloud(default=speak(tone_pcm(0.1, 16000)))
    async with cloud.running(), relay_to(base_of(cloud.url), idle_timeout=0.3) as front:
        async with asyncio.timeout(10):
            async with connect(front.url(), proxy=None) as ws:
                with pytest.raises(ConnectionClosed):
                    await ws.recv()
            assert ws.close_code == 1014
        samples = await scrape(front)
    assert value(samples, "rtts_errors_total", outcome="timeout", code="timeout") == 1


async def test_the_watchdog_looks_at_no_session_before_its_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    looked: list[object] = []
    overdue = gateway.server.Gateway._overdue

    def spy(self: gateway.server.Gateway, session: Any, now: float) -> Any:
        looked.append(session)
        return overdue(self, session, now)

    monkeypatch.setattr(gateway.server.Gateway, "_overdue", spy)
    # Eight sessions streaming for about a second: four watchdog rounds each, and every
    # deadline (the 5 s gap after the last message, the 600 s limit) still ahead.
    cloud = FakeCloud(default=speak(tone_pcm(1.0, 16000), frame_bytes=3200, interval=0.1))
    async with cloud.running(), relay_to(base_of(cloud.url), upstream_gap_timeout=5.0) as front:
        seen = await asyncio.gather(*(exchange(front.url(), start("hi")) for _ in range(8)))
    assert all(s.kinds == ["START", "AUDIO", "END"] for s in seen)
    assert looked == []
