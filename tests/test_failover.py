"""The gateway under a degraded cloud: circuit breaking, fast refusal, failover, recovery.

Real gateways and upstreams on loopback: an upstream that goes dark (accepts TCP, never
answers), one that refuses, one that answers slowly, one that flaps; a second upstream with
its own credentials; the local engine as the last resort. Each test checks what callers get
(status, timing by order of magnitude, whose audio), what /metrics and /readyz say, and
that a recovered upstream is used again after its probe.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import aiohttp
import pytest
from websockets.exceptions import InvalidStatus

from gateway.breaker import State
from gateway.cli import main
from gateway.server import RunningGateway
from rtts_plugin.errors import HandshakeError
from rtts_plugin.transport import open_connection
from tests.fakes import FakeCloud, fail, json_response, speak, tone_pcm
from tests.support import Exchange, exchange, limit_upstream_handshakes, start
from tests.test_faults import upstream
from tests.test_gateway import base_of, relay_to, scrape, value

PRIMARY_AUDIO = tone_pcm(0.3, 16000, hz=220)
SECONDARY_AUDIO = tone_pcm(0.3, 16000, hz=440)
ENGLISH = {"property": "english_amy_common", "sample_rate": "16000"}


async def attempt(url: str, text: str = "Hello there.") -> tuple[float, Exchange | InvalidStatus]:
    """One session: seconds to the answer, and the exchange or the refusal."""
    began = time.monotonic()
    try:
        seen = await exchange(url, start(text, **ENGLISH), timeout=15)
    except InvalidStatus as refusal:
        return time.monotonic() - began, refusal
    return time.monotonic() - began, seen


def status(result: Exchange | InvalidStatus) -> int:
    return result.response.status_code if isinstance(result, InvalidStatus) else 101


def state(front: RunningGateway, name: str = "primary") -> State:
    return next(u for u in front.gateway.failover.upstreams if u.name == name).breaker.state


async def wait_for(front: RunningGateway, wanted: State, name: str = "primary") -> None:
    for _ in range(300):
        if state(front, name) is wanted:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{name} breaker is {state(front, name).label}, not {wanted.label}")


async def readyz(front: RunningGateway) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(f"{front.metrics_url}/readyz") as answer:
        return await answer.json()  # type: ignore[no-any-return]


def transitions(samples: dict[Any, float], upstream: str = "primary") -> dict[str, float]:
    return {
        to: value(samples, "rtts_upstream_breaker_transitions_total", upstream=upstream, state=to)
        for to in ("open", "half_open", "closed")
    }


async def test_a_dark_upstream_opens_the_breaker_and_callers_get_503_at_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.upstreams")
    async with (
        upstream("silent") as (url, _),
        relay_to(
            base_of(url),
            upstream_connect_timeout=1.5,
            breaker_failures=2,
            breaker_probe_interval=30,
        ) as front,
    ):
        timed_out = [await attempt(front.url("p1")) for _ in range(2)]
        fast = [await attempt(front.url("p1")) for _ in range(3)]
        samples = await scrape(front)
        ready = await readyz(front)
    assert [status(r) for _, r in timed_out] == [504, 504]
    assert all(seconds >= 1.4 for seconds, _ in timed_out)  # each waited the connect timeout
    assert [status(r) for _, r in fast] == [503, 503, 503]
    assert all(seconds < 0.75 for seconds, _ in fast)  # answered, not waited (ms, in fact)
    refusal = fast[0][1]
    assert isinstance(refusal, InvalidStatus)
    assert 1 <= int(refusal.response.headers["Retry-After"]) <= 60
    body = json.loads(refusal.response.body)
    assert body["cause"] == "circuit_open" and body["upstreams"] == {"primary": "timeout"}
    assert "circuit open for primary (timeout)" in body["error_msg"]
    assert value(samples, "rtts_upstream_breaker_state", upstream="primary") == State.OPEN == 2
    assert transitions(samples) == {"open": 1, "half_open": 0, "closed": 0}
    assert value(samples, "rtts_sessions_refused_fast_total") == 3
    assert value(samples, "rtts_sessions_total", outcome="rejected") == 3
    assert value(samples, "rtts_errors_total", code="circuit_open") == 3
    assert value(samples, "rtts_errors_total", code="timeout") == 2
    assert value(samples, "rtts_upstream_sessions_total") == 0
    primary = ready["upstreams"]["primary"]
    assert primary["state"] == "open" and primary["last_failure"] == "timeout"
    assert 0 < primary["next_probe_in_s"] <= 60
    opened = [r.getMessage() for r in caplog.records if "circuit closed -> open" in r.getMessage()]
    assert opened == [
        "upstream primary circuit closed -> open (2 failures in a row, last: timeout; "
        "probe in 30 s)"
    ]


async def test_a_recovered_upstream_is_used_again_after_its_probe() -> None:
    cloud = FakeCloud(default=speak(PRIMARY_AUDIO))
    # Two sessions and the first probe are refused; the cloud is back from then on.
    cloud.refuse_next(503, "", "service unavailable", times=3)
    async with (
        cloud.running(),
        relay_to(
            base_of(cloud.url),
            breaker_failures=2,
            breaker_probe_interval=0.2,
            breaker_half_open_sessions=2,
        ) as front,
    ):
        refused = [await attempt(front.url("p1")) for _ in range(2)]
        _, fast = await attempt(front.url("p1"))
        await wait_for(front, State.HALF_OPEN)  # the second probe, 0.4 s after the first
        probes_before_trials = len(cloud.requests)
        served = [await attempt(front.url("p1")) for _ in range(3)]
        samples = await scrape(front)
        ready = await readyz(front)
    assert [status(r) for _, r in refused] == [503, 503]  # the cloud's own 503s, relayed
    assert status(fast) == 503 and "circuit_open" in fast.response.body.decode()  # type: ignore[union-attr]
    assert all(isinstance(r, Exchange) and r.audio == PRIMARY_AUDIO for _, r in served)
    assert probes_before_trials == 4  # two sessions, a failed probe, a good one
    # The probes were handshakes alone: no START reached the cloud, so nothing was billed.
    assert [c.start is None for c in cloud.connections] == [True] + [False] * 3
    assert transitions(samples) == {"open": 1, "half_open": 1, "closed": 1}
    assert value(samples, "rtts_upstream_breaker_probes_total", result="failed") == 1
    assert value(samples, "rtts_upstream_breaker_probes_total", result="ok") == 1
    assert value(samples, "rtts_upstream_breaker_state", upstream="primary") == 0
    assert value(samples, "rtts_upstream_sessions_total", upstream="primary") == 3
    assert ready["upstreams"]["primary"]["state"] == "closed"


async def test_an_upstream_that_answers_too_slowly_counts_one_slow_within_the_timeout_does_not() -> (
    None
):
    cloud = FakeCloud(default=speak(PRIMARY_AUDIO))
    async with (
        cloud.running(),
        relay_to(
            base_of(cloud.url),
            upstream_connect_timeout=0.3,
            breaker_failures=2,
            breaker_probe_interval=30,
        ) as front,
    ):
        cloud.handshake_delay = 0.1  # slow, but inside the timeout
        slow_ok = [await attempt(front.url()) for _ in range(3)]
        assert state(front) is State.CLOSED
        cloud.handshake_delay = 1.0  # slower than the timeout
        too_slow = [await attempt(front.url()) for _ in range(2)]
        _, refused = await attempt(front.url())
        samples = await scrape(front)
    assert all(isinstance(r, Exchange) and r.audio == PRIMARY_AUDIO for _, r in slow_ok)
    assert [status(r) for _, r in too_slow] == [504, 504] and status(refused) == 503
    assert transitions(samples) == {"open": 1, "half_open": 0, "closed": 0}


async def test_a_flapping_upstream_reopens_the_breaker_with_a_longer_wait() -> None:
    cloud = FakeCloud(default=speak(PRIMARY_AUDIO))
    down = json_response(503, "", "down")
    # Sessions 1-2 refused (opens); probe 1 accepted (half-opens); the trial refused (opens
    # again, probe wait doubled); probe 2 accepted; trials fine (closes).
    cloud.handshakes.extend([down, down, None, down, None])
    async with (
        cloud.running(),
        relay_to(
            base_of(cloud.url),
            breaker_failures=2,
            breaker_probe_interval=0.2,
            breaker_half_open_sessions=1,
        ) as front,
    ):
        for _ in range(2):
            await attempt(front.url())
        await wait_for(front, State.HALF_OPEN)
        _, trial = await attempt(front.url())
        assert status(trial) == 503 and state(front) is State.OPEN
        waiting = (await readyz(front))["upstreams"]["primary"]
        await wait_for(front, State.HALF_OPEN)
        _, recovered = await attempt(front.url())
        samples = await scrape(front)
    assert waiting["probe_interval_s"] == 0.4  # twice the first wait
    assert waiting["last_failure"] == "http_5xx"
    assert isinstance(recovered, Exchange) and recovered.audio == PRIMARY_AUDIO
    assert state(front) is State.CLOSED
    assert transitions(samples) == {"open": 2, "half_open": 2, "closed": 1}


async def test_a_second_upstream_takes_over_with_its_own_project_and_credentials() -> None:
    secondary = FakeCloud(default=speak(SECONDARY_AUDIO))
    async with (
        upstream("refused") as (url, _),
        secondary.running(),
        relay_to(
            base_of(url),
            breaker_failures=1,
            breaker_probe_interval=30,
            secondary_url=base_of(secondary.url),
            secondary_project_id="otherregion01",
            secondary_token="tok-Secondary-2",
        ) as front,
    ):
        first_s, first = await attempt(front.url("clientproject"))
        assert state(front) is State.OPEN
        then_s, then = await attempt(front.url("clientproject"))
        samples = await scrape(front)
        ready = await readyz(front)
    for result in (first, then):
        assert isinstance(result, Exchange) and result.audio == SECONDARY_AUDIO
        assert result.kinds == ["START", "AUDIO", "END"]
    # A refused connection fails over at once: well under the 8 s connect timeout.
    assert then_s < 4.0 and first_s < 4.0
    assert {r.path for r in secondary.requests} == {"/v1/otherregion01/rtts"}
    assert {r.headers["X-Auth-Token"] for r in secondary.requests} == {"tok-Secondary-2"}
    assert value(samples, "rtts_upstream_sessions_total", upstream="secondary") == 2
    assert value(samples, "rtts_upstream_sessions_total", upstream="primary") == 0
    assert value(samples, "rtts_upstream_breaker_state", upstream="secondary") == 0
    assert value(samples, "rtts_sessions_total", outcome="normal") == 2
    assert ready["upstreams"]["primary"]["state"] == "open"
    assert ready["upstreams"]["secondary"]["state"] == "closed"


async def test_the_local_engine_is_the_last_resort_before_the_first_audio_byte() -> None:
    secondary = FakeCloud(default=speak(SECONDARY_AUDIO))
    secondary.refuse_next(503, "", "also down", times=100)
    async with (
        upstream("silent") as (url, _),
        secondary.running(),
        relay_to(
            base_of(url),
            upstream_connect_timeout=3.0,
            breaker_failures=1,
            breaker_probe_interval=30,
            secondary_url=base_of(secondary.url),
            fallback="local",
        ) as front,
    ):
        assert front.engine is not None
        _, first = await attempt(front.url())  # waits out the dark primary, then falls back
        later = [await attempt(front.url()) for _ in range(3)]
        samples = await scrape(front)
    for result in [first, *(r for _, r in later)]:
        assert isinstance(result, Exchange) and result.kinds[0] == "START"
        assert result.kinds[-1] == "END" and len(result.audio) > 16000  # the engine's voice
        assert result.audio not in (PRIMARY_AUDIO, SECONDARY_AUDIO)
    assert all(seconds < 1.5 for seconds, _ in later)  # not the 3 s connect timeout: skipped
    assert value(samples, "rtts_upstream_sessions_total", upstream="local") == 4
    assert value(samples, "rtts_upstream_breaker_state", upstream="primary") == 2
    assert value(samples, "rtts_upstream_breaker_state", upstream="secondary") == 2
    assert value(samples, "rtts_sessions_total", outcome="normal") == 4
    assert value(samples, "rtts_sessions_refused_fast_total") == 0


async def test_callers_turned_away_busy_fall_back_to_the_local_engine_without_a_slot(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Two handshakes at once, six callers at a dark primary with the local engine behind it:
    # the two started wait out their timeout (the primary's fault, counted), the four queued
    # are turned away after half of it without asking the primary (not counted) and go to
    # the engine, which runs in the gateway and takes no slot. Every caller gets audio.
    limit_upstream_handshakes(monkeypatch, 2)
    async with (
        upstream("silent") as (url, _),
        relay_to(
            base_of(url),
            upstream_connect_timeout=1.0,
            breaker_failures=5,
            breaker_probe_interval=30,
            fallback="local",
        ) as front,
    ):
        results = await asyncio.gather(*(attempt(front.url()) for _ in range(6)))
        samples = await scrape(front)
    for _, result in results:
        assert isinstance(result, Exchange) and result.kinds[-1] == "END"
        assert len(result.audio) > 16000  # the engine's voice
    assert value(samples, "rtts_upstream_sessions_total", upstream="local") == 6
    assert transitions(samples)["open"] == 0  # two failures counted, of five
    primary = next(u for u in front.gateway.failover.upstreams if u.name == "primary")
    assert primary.breaker.consecutive == 2


async def test_sessions_in_progress_are_never_cut_when_the_breaker_opens() -> None:
    long_audio = tone_pcm(1.5, 16000)
    cloud = FakeCloud(default=speak(long_audio, interval=0.02))
    async with (
        cloud.running(),
        relay_to(base_of(cloud.url), breaker_failures=2, breaker_probe_interval=30) as front,
    ):
        speaking = asyncio.create_task(attempt(front.url()))
        for _ in range(500):  # until the first frames are on their way
            if cloud.connections and cloud.connections[0].frames_sent:
                break
            await asyncio.sleep(0.01)
        cloud.refuse_next(503, "", "overloaded", times=2)
        refused = [await attempt(front.url()) for _ in range(2)]
        assert state(front) is State.OPEN
        _, spoken = await speaking
    assert [status(r) for _, r in refused] == [503, 503]
    assert isinstance(spoken, Exchange) and spoken.audio == long_audio
    assert spoken.kinds == ["START", "AUDIO", "END"]


async def test_the_plugin_sees_the_503_and_its_retry_after() -> None:
    async with (
        upstream("refused") as (url, _),
        relay_to(base_of(url), breaker_failures=1, breaker_probe_interval=7) as front,
    ):
        await attempt(front.url())
        with pytest.raises(HandshakeError) as refused:
            await open_connection(front.url())
    assert refused.value.status == 503 and refused.value.retry_after == 7
    assert "circuit open for primary (refused)" in str(refused.value)


async def test_a_disabled_breaker_lets_every_session_wait_for_the_upstream() -> None:
    async with (
        upstream("refused") as (url, _),
        relay_to(base_of(url), breaker_failures=0) as front,
    ):
        results = [await attempt(front.url()) for _ in range(4)]
        samples = await scrape(front)
    assert [status(r) for _, r in results] == [502] * 4
    assert value(samples, "rtts_upstream_breaker_transitions_total") == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--fallback", "local"],
            "--fallback local backs up the huawei backend",
        ),
        (
            ["--backend", "huawei", "--upstream-url", "ws://127.0.0.1:9", "--secondary-token", "x"],
            "--secondary-token (RTTS_GATEWAY_SECONDARY_TOKEN) is set but --secondary-url",
        ),
        (
            ["--upstream-url", "ws://127.0.0.1:9", "--secondary-url", "http://example.com"],
            "--secondary-url / RTTS_GATEWAY_SECONDARY_URL must be ws://host[:port]",
        ),
        (
            ["--secondary-url", "ws://127.0.0.1:9"],
            "--secondary-url backs up the huawei backend's upstream",
        ),
        (
            [
                "--upstream-url",
                "ws://127.0.0.1:9",
                "--secondary-url",
                "ws://127.0.0.1:10",
                "--secondary-token",
                "t",
                "--secondary-gateway-key",
                "k",
            ],
            "one way to authenticate, not --secondary-token and --secondary-gateway-key",
        ),
        (
            [
                "--upstream-url",
                "ws://127.0.0.1:9",
                "--secondary-url",
                "ws://127.0.0.1:10",
                "--secondary-access-key",
                "AK",
            ],
            "needs both --secondary-access-key and --secondary-secret-key",
        ),
        (
            ["--breaker-probe-interval", "10", "--breaker-max-probe-interval", "5"],
            "--breaker-max-probe-interval (5) must not be below --breaker-probe-interval (10)",
        ),
        (
            [
                "--upstream-url",
                "ws://127.0.0.1:9",
                "--secondary-url",
                "ws://127.0.0.1:10",
                "--secondary-project-id",
                "bad id!",
            ],
            "--secondary-project-id must be 1 to 128 letters, digits, - or _, got 'bad id!'",
        ),
        (["--breaker-failures", "-1"], "--breaker-failures / RTTS_GATEWAY_BREAKER_FAILURES"),
        (["--fallback", "cloud"], "--fallback / RTTS_GATEWAY_FALLBACK"),
    ],
)
def test_bad_failover_settings_are_refused_with_the_flag_named(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err, err


def test_secondary_secrets_never_appear_in_errors(capsys: pytest.CaptureFixture[str]) -> None:
    secret = "SECRET-sk-3b7e"
    args = ["--secondary-secret-key", secret, "--breaker-failures", "x"]
    assert main(args) == 2
    assert secret not in capsys.readouterr().err


async def test_a_local_backend_reports_its_engine_as_the_primary(gateway: RunningGateway) -> None:
    _, seen = await attempt(gateway.url())
    samples = await scrape(gateway)
    ready = await readyz(gateway)
    assert isinstance(seen, Exchange) and seen.kinds == ["START", "AUDIO", "END"]
    assert list(ready["upstreams"]) == ["primary"] and ready["upstreams"]["primary"]["state"] == (
        "closed"
    )
    # "local" is only ever the fallback, so RttsServingFromFallback stays quiet here.
    assert value(samples, "rtts_upstream_sessions_total", upstream="primary") == 1
    assert value(samples, "rtts_upstream_sessions_total", upstream="local") == 0


async def test_the_quota_error_counts_whether_at_the_handshake_or_after_start() -> None:
    cloud = FakeCloud(default=speak(PRIMARY_AUDIO))
    cloud.refuse_next(429, "APIG.0308", "throttled")
    cloud.then(fail("FATAL_ERROR", "SIS.0312", "resource concurrency limit exceeded"))
    async with (
        cloud.running(),
        relay_to(base_of(cloud.url), breaker_failures=2, breaker_probe_interval=30) as front,
    ):
        _, throttled = await attempt(front.url())
        _, over_quota = await attempt(front.url())
        await wait_for(front, State.OPEN)  # the session's verdict comes as it ends
        _, refused = await attempt(front.url())
        ready = await readyz(front)
    assert status(throttled) == 429
    assert isinstance(over_quota, Exchange) and over_quota.kinds == ["START", "FATAL_ERROR"]
    assert status(refused) == 503 and ready["upstreams"]["primary"]["last_failure"] == "SIS.0312"


async def test_callers_go_back_from_the_fallback_to_the_recovered_primary() -> None:
    cloud = FakeCloud(default=speak(PRIMARY_AUDIO))
    cloud.refuse_next(503, "", "down", times=2)  # the first session and the first probe
    async with (
        cloud.running(),
        relay_to(
            base_of(cloud.url),
            breaker_failures=1,
            breaker_probe_interval=0.2,
            breaker_half_open_sessions=1,
            fallback="local",
        ) as front,
    ):
        _, during = await attempt(front.url())
        await wait_for(front, State.HALF_OPEN)
        after = [await attempt(front.url()) for _ in range(2)]
        samples = await scrape(front)
    assert isinstance(during, Exchange) and during.kinds[-1] == "END"
    assert during.audio != PRIMARY_AUDIO  # the engine's voice while the cloud was down
    assert all(isinstance(r, Exchange) and r.audio == PRIMARY_AUDIO for _, r in after)
    assert value(samples, "rtts_upstream_sessions_total", upstream="local") == 1
    assert value(samples, "rtts_upstream_sessions_total", upstream="primary") == 2
    assert transitions(samples) == {"open": 1, "half_open": 1, "closed": 1}
