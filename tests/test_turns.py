"""A storm of callers is admitted a few per event-loop turn, in order (gateway.turns)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

import gateway.server
from gateway.server import RunningGateway
from gateway.turns import PerTurn
from tests.fakes import FakeCloud, speak, tone_pcm
from tests.support import exchange, start
from tests.test_gateway import base_of, relay_to


class Turns:
    """Counts event-loop turns: a callback that schedules itself again each turn."""

    def __init__(self) -> None:
        self.count = 0
        self._running = True
        asyncio.get_running_loop().call_soon(self._tick)

    def _tick(self) -> None:
        if self._running:
            self.count += 1
            asyncio.get_running_loop().call_soon(self._tick)

    def stop(self) -> None:
        self._running = False


async def settle(per_turn: PerTurn) -> None:
    for _ in range(100):
        if not per_turn.waiting:
            break
        await asyncio.sleep(0)
    await asyncio.sleep(0)


def submit(per_turn: PerTurn, job: Callable[[], None]) -> None:
    """What the gateway does with a caller: run it now if the turn allows, else queue it."""
    if per_turn.now():
        job()
    else:
        per_turn.later(job)


async def test_a_burst_runs_at_most_the_limit_per_turn_in_arrival_order() -> None:
    turns = Turns()
    per_turn = PerTurn(3)
    ran: list[tuple[int, int]] = []
    for job in range(10):  # all in one turn, as a storm of requests read in one poll
        submit(per_turn, lambda job=job: ran.append((job, turns.count)))  # type: ignore[misc]
    assert [job for job, _ in ran] == [0, 1, 2] and per_turn.waiting == 7
    await settle(per_turn)
    turns.stop()
    assert [job for job, _ in ran] == list(range(10))
    per_turn_counts = Counter(turn for _, turn in ran)
    assert max(per_turn_counts.values()) == 3 and len(per_turn_counts) == 4


async def test_a_caller_alone_runs_at_once_and_the_count_starts_again_each_turn() -> None:
    per_turn = PerTurn(1)
    ran: list[int] = []
    submit(per_turn, lambda: ran.append(1))
    assert ran == [1]  # nothing waiting, budget left: no delay
    submit(per_turn, lambda: ran.append(2))
    assert ran == [1]  # the turn's one job has run: the next waits
    await settle(per_turn)
    assert ran == [1, 2]
    await asyncio.sleep(0)
    submit(per_turn, lambda: ran.append(3))
    assert ran == [1, 2, 3]  # a new turn, nothing waiting: at once again


async def test_a_failing_job_does_not_strand_the_ones_behind_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    per_turn = PerTurn(1)
    ran: list[int] = []

    def broken() -> None:
        raise RuntimeError("simulated bug")

    submit(per_turn, lambda: ran.append(0))
    submit(per_turn, broken)
    submit(per_turn, lambda: ran.append(2))
    await settle(per_turn)
    assert ran == [0, 2]
    assert "a queued job failed" in caplog.text


async def test_a_storm_of_callers_is_admitted_a_few_per_turn_and_every_one_is_served(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(gateway.server, "_ADMISSIONS_PER_TURN", 2)
    audio = tone_pcm(0.1, 16000)
    cloud = FakeCloud(default=speak(audio))
    admitted_in: list[int] = []
    async with cloud.running(), relay_to(base_of(cloud.url)) as front:
        running: RunningGateway = front
        admit_now = running.gateway._admit_now
        turns = Turns()

        def counted(*args: object) -> object:
            admitted_in.append(turns.count)
            return admit_now(*args)  # type: ignore[arg-type]

        monkeypatch.setattr(running.gateway, "_admit_now", counted)
        seen = await asyncio.gather(
            *(exchange(front.url(), start(f"caller {n}")) for n in range(8))
        )
        turns.stop()
    assert all(s.kinds[0] == "START" and s.kinds[-1] == "END" and s.audio == audio for s in seen)
    assert len(admitted_in) == 8 and max(Counter(admitted_in).values()) <= 2


async def test_a_bug_in_admission_answers_500_whether_admitted_at_once_or_queued(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(gateway.server, "_ADMISSIONS_PER_TURN", 1)
    cloud = FakeCloud(default=speak(tone_pcm(0.1, 16000)))
    async with cloud.running(), relay_to(base_of(cloud.url)) as front:
        running: RunningGateway = front
        admit_now = running.gateway._admit_now
        admitted = 0

        def broken(*args: object) -> object:
            nonlocal admitted
            admitted += 1
            raise RuntimeError("simulated bug")

        monkeypatch.setattr(running.gateway, "_admit_now", broken)
        refused = await asyncio.gather(
            *(refusal_status(front.url()) for _ in range(4)), return_exceptions=True
        )
        monkeypatch.setattr(running.gateway, "_admit_now", admit_now)
        served = await exchange(front.url(), start("after the bug"))
    assert refused == [500] * 4 and admitted == 4  # the first at once, the others queued
    assert served.kinds[0] == "START" and served.kinds[-1] == "END"
    assert caplog.text.count("admitting a session failed") == 4


async def refusal_status(url: str) -> int:
    """The HTTP status a refused upgrade is answered with."""
    with pytest.raises(InvalidStatus) as refused:
        async with connect(url, proxy=None):
            pass
    return refused.value.response.status_code
