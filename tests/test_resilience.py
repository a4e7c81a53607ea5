"""HuaweiRTTSService under a slow, failing or recovering cloud (issue 13, one test per item).

Real servers on loopback that stall, refuse, go quiet, answer late or misbehave on purpose,
driven through real pipecat pipelines. Where the issue speaks of seconds (first audio after
4 s against pipecat's 3 s window), the tests scale both down by the same factor. Item 9 (no
redirects) is tested in ``tests/test_transport.py`` and ``tests/test_auth.py``; failover with
a ``ServiceSwitcher`` in ``tests/test_plugin_failover.py``.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager

import pytest
from loguru import logger
from pipecat.frames.frames import (
    ErrorFrame,
    Frame,
    InterruptionFrame,
    MetricsFrame,
    TTSAudioRawFrame,
    TTSSpeakFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    TTSUpdateSettingsFrame,
)
from pipecat.metrics.metrics import TTFBMetricsData, TTSUsageMetricsData
from pipecat.pipeline.worker import PipelineParams
from pipecat.tests.utils import SleepFrame, run_test
from pipecat.utils.errors import ErrorCategory
from websockets.asyncio.server import ServerConnection, serve

from rtts_plugin import HuaweiRTTSService
from rtts_plugin.budget import Timeouts, UtteranceBudget
from rtts_plugin.config import HuaweiRTTSConnection
from rtts_plugin.errors import HandshakeError, ProtocolViolationError, RttsError, RttsTimeoutError
from rtts_plugin.health import FailureRun, ProbeBackoff, probe_until_answered
from tests.fakes import (
    Behaviour,
    ConnectionLog,
    FakeCloud,
    FakeIam,
    fail,
    speak,
    stall,
    tone_pcm,
)
from tests.test_plugin_engine import kinds

AUDIO = tone_pcm(0.4, 16000)
SCALE = 0.1  # the seconds, scaled: pipecat's 3 s window becomes 0.3 s


# -- servers that misbehave on purpose -------------------------------------------------------


def late(delay: float, behaviour: Behaviour) -> Behaviour:
    """Say nothing for ``delay`` seconds after START was received, then behave."""

    async def run(ws: ServerConnection, log: ConnectionLog) -> None:
        await asyncio.sleep(delay)
        await behaviour(ws, log)

    return run


def first_audio_after(delay: float, audio: bytes = AUDIO) -> Behaviour:
    """START at once, the first audio byte only after ``delay`` seconds, then END."""

    async def run(ws: ServerConnection, log: ConnectionLog) -> None:
        await ws.send(json.dumps({"resp_type": "START", "trace_id": log.trace_id}))
        await asyncio.sleep(delay)
        await ws.send(audio)
        await ws.send(
            json.dumps({"resp_type": "END", "trace_id": log.trace_id, "reason": "NORMAL"})
        )

    return run


def pause_inside(delay: float, audio: bytes = AUDIO) -> Behaviour:
    """START, half the audio, a ``delay`` second pause, the other half, END."""

    async def run(ws: ServerConnection, log: ConnectionLog) -> None:
        half = len(audio) // 2
        await ws.send(json.dumps({"resp_type": "START", "trace_id": log.trace_id}))
        await ws.send(audio[:half])
        await asyncio.sleep(delay)
        await ws.send(audio[half:])
        await ws.send(
            json.dumps({"resp_type": "END", "trace_id": log.trace_id, "reason": "NORMAL"})
        )

    return run


def quiet_after_end(audio: bytes = AUDIO) -> Behaviour:
    """A normal session, then the server stops reading: it never answers the client's close."""

    async def run(ws: ServerConnection, log: ConnectionLog) -> None:
        await speak(audio)(ws, log)
        ws.transport.pause_reading()  # the client's close frame is never read, never answered
        await asyncio.sleep(3.0)
        ws.transport.resume_reading()  # now see what the client did meanwhile
        async with asyncio.timeout(1.0):
            await ws.wait_closed()
        log.client_closed_early = True  # the client had dropped the socket

    return run


@asynccontextmanager
async def black_hole() -> AsyncIterator[str]:
    """Accepts TCP and never answers a byte."""

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    async with server:
        yield f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/p/rtts"


@asynccontextmanager
async def slow_handshake(delay: float) -> AsyncIterator[str]:
    """Completes the WebSocket upgrade only after ``delay`` seconds."""

    async def hold(connection: ServerConnection, request: object) -> None:
        await asyncio.sleep(delay)

    async with serve(stall_handler, "127.0.0.1", 0, process_request=hold) as server:
        yield f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/p/rtts"


async def stall_handler(ws: ServerConnection) -> None:
    await ws.wait_closed()


def refused_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"ws://127.0.0.1:{port}/v1/p/rtts"


# -- helpers ---------------------------------------------------------------------------------


def make(
    url: str,
    *,
    stop_frame_timeout_s: float = 3.0 * SCALE,
    voice: str = "english_amy_common",
    word_timestamps: bool = False,
    name: str | None = None,
    **connection: object,
) -> HuaweiRTTSService:
    return HuaweiRTTSService(
        connection=HuaweiRTTSConnection(url=url, **connection),  # type: ignore[arg-type]
        settings=HuaweiRTTSService.Settings(voice=voice),
        word_timestamps=word_timestamps,
        sample_rate=16000,
        stop_frame_timeout_s=stop_frame_timeout_s,
        name=name,
    )


def scaled(**overrides: object) -> dict[str, object]:
    """Fast retries and probes; a first-audio budget generous for a busy machine.

    Tests about the budget itself scale the default down with pipecat's window
    (``first_audio_timeout=2.5 * SCALE``: 0.25 s against 0.3 s).
    """
    settings: dict[str, object] = {
        "first_audio_timeout": 1.0,
        "retry_backoff": 0.01,
        "probe_interval": 0.05,
        "probe_max_interval": 0.2,
    }
    return {**settings, **overrides}


def all_errors(up: Sequence[Frame]) -> list[ErrorFrame]:
    return [f for f in up if isinstance(f, ErrorFrame)]


def utterances(down: list[Frame]) -> list[bytes]:
    """Audio of each TTSStarted…TTSStopped pair; asserts the pairs are well formed."""
    spoken: list[bytes] = []
    current: bytearray | None = None
    for frame in down:
        if isinstance(frame, TTSStartedFrame):
            assert current is None, "TTSStartedFrame inside an utterance"
            current = bytearray()
        elif isinstance(frame, TTSStoppedFrame):
            assert current is not None, "TTSStoppedFrame without a TTSStartedFrame"
            spoken.append(bytes(current))
            current = None
        elif isinstance(frame, TTSAudioRawFrame):
            assert current is not None, "audio outside TTSStarted/TTSStopped"
            current += frame.audio
    assert current is None, "TTSStartedFrame never stopped"
    return spoken


class Watch:
    """Usability changes and recoveries a service announced, with when they happened."""

    def __init__(self, tts: HuaweiRTTSService) -> None:
        self.usable: list[bool] = []
        self.recovered: list[float] = []
        self.errors_at: list[float] = []
        self.began = time.monotonic()

        @tts.event_handler("on_usable_changed")
        async def on_usable(_: object, is_usable: bool) -> None:
            self.usable.append(is_usable)

        @tts.event_handler("on_recovered")
        async def on_recovered(_: object, outage: float) -> None:
            self.recovered.append(outage)

        @tts.event_handler("on_error")
        async def on_error(_: object, error: ErrorFrame) -> None:
            self.errors_at.append(time.monotonic() - self.began)


@pytest.fixture
def warnings_logged() -> Iterator[list[str]]:
    lines: list[str] = []
    sink = logger.add(lambda message: lines.append(str(message)), level="WARNING")
    yield lines
    logger.remove(sink)


async def settle(check: object, seconds: float = 3.0) -> bool:
    for _ in range(int(seconds / 0.02)):
        if check():  # type: ignore[operator]
            return True
        await asyncio.sleep(0.02)
    return bool(check())  # type: ignore[operator]


# -- 1. a black hole is one prompt error, within pipecat's window, with default settings -----


async def test_1_black_hole_with_default_settings_fails_inside_pipecats_window() -> None:
    async with black_hole() as url:
        tts = HuaweiRTTSService(url=url, sample_rate=16000)  # every timing setting default
        watch = Watch(tts)
        down, up = await run_test(tts, frames_to_send=[TTSSpeakFrame("Hello there.")])
    (error,) = all_errors(up)  # one failure, one error: no second "completed with no audio"
    assert error.category is ErrorCategory.CONNECTIVITY
    assert "timed out after 2.5 s waiting for connect (limit: first_audio_timeout)" in error.error
    assert utterances(list(down)) == [b""]
    # pipecat's window is 3 s; the old waits took 30 s. Generous margin for a busy machine.
    assert watch.errors_at[0] < 8
    assert tts.is_usable  # one transient failure does not write the service off


@pytest.mark.parametrize(
    "where", ["refused", "black hole", "slow handshake", "no START", "no audio"]
)
async def test_1_every_failure_before_audio_is_one_error_within_the_budget(where: str) -> None:
    cloud = FakeCloud()
    async with cloud.running(), black_hole() as hole, slow_handshake(1.0) as slow:
        url = {"refused": refused_url(), "black hole": hole}.get(where, cloud.url)
        if where == "slow handshake":
            url = slow
        elif where == "no START":
            cloud.then(stall())
        elif where == "no audio":
            cloud.then(stall(after_start=True))
        tts = make(url, **scaled(first_audio_timeout=2.5 * SCALE, max_retries=5))
        watch = Watch(tts)
        down, up = await run_test(tts, frames_to_send=[TTSSpeakFrame("Hello there.")])
    (error,) = all_errors(up)
    assert isinstance(error.exception, RttsError)
    assert utterances(list(down)) == [b""]
    if where != "refused":
        assert "limit: first_audio_timeout" in error.error
        assert "timed out after 0.25 s" in error.error
    else:
        assert "cannot connect" in error.error
    assert watch.errors_at[0] < 3  # the 0.25 s budget, retries included (generous margin)


async def test_1_retries_come_out_of_the_same_budget() -> None:
    cloud = FakeCloud()
    cloud.refuse_next(503, "", "busy", times=100)
    async with cloud.running():
        tts = make(cloud.url, **scaled(first_audio_timeout=0.5, max_retries=10, retry_backoff=0.1))
        watch = Watch(tts)
        _, up = await run_test(tts, frames_to_send=[TTSSpeakFrame("Hello there.")])
    (error,) = all_errors(up)
    assert "HTTP 503" in error.error and error.category is ErrorCategory.SERVER
    # Back-off 0.1, 0.2, 0.4… (jittered) inside 0.5 s: far fewer than the 11 attempts allowed.
    assert 1 <= len(cloud.requests) < 11
    assert watch.errors_at[0] < 3


async def test_1_a_retry_comes_no_sooner_than_the_servers_retry_after() -> None:
    cloud = FakeCloud(default=speak(AUDIO))
    cloud.refuse_next(503, "", "gateway busy", retry_after="0.4")  # the back-off alone: 0.01 s
    async with cloud.running():
        tts = make(cloud.url, **scaled(first_audio_timeout=2.0))
        down, up = await run_test(tts, frames_to_send=[TTSSpeakFrame("Hello there.")])
    assert not all_errors(up)
    assert utterances(list(down)) == [AUDIO]
    first, second = cloud.requested_at
    assert second - first >= 0.4


@pytest.mark.parametrize(
    ("retry_after", "first_audio_timeout"),
    [("6", 30.0), ("0.9", 0.5)],
    ids=["over-the-5-s-cap", "past-the-budget"],
)
async def test_1_a_retry_after_that_cannot_be_waited_out_is_reported_at_once(
    retry_after: str, first_audio_timeout: float
) -> None:
    cloud = FakeCloud(default=speak(AUDIO))
    cloud.refuse_next(503, "", "circuit open", retry_after=retry_after, times=3)
    async with cloud.running():
        tts = make(cloud.url, **scaled(first_audio_timeout=first_audio_timeout, max_retries=2))
        down, up = await run_test(tts, frames_to_send=[TTSSpeakFrame("Hello there.")])
    (error,) = all_errors(up)
    assert "HTTP 503" in error.error and error.category is ErrorCategory.SERVER
    assert utterances(list(down)) == [b""]
    assert len(cloud.requests) == 1  # not retried at once against the server's word


async def test_1_the_budget_includes_the_iam_token_which_is_fetched_once_anyway() -> None:
    iam = FakeIam("bot", "pw-Secret-42", "acme", delay=0.5)
    cloud = FakeCloud(default=speak(AUDIO))
    async with iam.running(), cloud.running():
        tts = make(
            cloud.url,
            region="cn-north-4",
            iam_username="bot",
            iam_password="pw-Secret-42",
            iam_domain="acme",
            iam_endpoint=iam.endpoint,
            **scaled(first_audio_timeout=0.3, max_retries=0),
        )
        down, up = await run_test(
            tts,
            frames_to_send=[TTSSpeakFrame("Too early."), SleepFrame(0.8), TTSSpeakFrame("Now.")],
        )
    (error,) = all_errors(up)
    assert "waiting for connect (limit: first_audio_timeout)" in error.error
    # The token request outlived the first utterance's budget and served the second.
    assert iam.issued == ["token-1"] and len(iam.bodies) == 1
    assert utterances(list(down)) == [b"", AUDIO]
    assert cloud.requests[0].headers["X-Auth-Token"] == "token-1"


@pytest.mark.parametrize(
    ("variable", "value", "fragment"),
    [
        ("FIRST_AUDIO_TIMEOUT", "0", "first_audio_timeout: Input should be greater than 0"),
        ("END_TIMEOUT_PER_CHAR", "-1", "end_timeout_per_char: Input should be greater than"),
        ("MAX_CONSECUTIVE_FAILURES", "0", "max_consecutive_failures: Input should be greater"),
        ("PROBE_INTERVAL", "soon", "probe_interval: Input should be a valid number"),
        ("PROBE_MAX_INTERVAL", "0", "probe_max_interval: Input should be greater than 0"),
    ],
)
def test_bad_budget_and_health_settings_name_the_setting(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, fragment: str
) -> None:
    from rtts_plugin.errors import InvalidSettingsError

    monkeypatch.setenv(f"HUAWEI_RTTS_{variable}", value)
    with pytest.raises(InvalidSettingsError, match="invalid HuaweiRTTSService connection") as bad:
        HuaweiRTTSService(url="ws://127.0.0.1:1/v1/p/rtts")
    assert fragment in str(bad.value)


# -- 2. each failed utterance counts once; the service heals when the server does -----------


async def test_2_slow_failures_count_once_and_the_third_utterance_is_spoken() -> None:
    cloud = FakeCloud(default=speak(AUDIO))
    cloud.then(stall(), stall())  # the "4 s START timeout", scaled: 0.4 s > 0.3 s
    async with cloud.running():
        tts = make(cloud.url, **scaled(start_timeout=0.4, first_audio_timeout=1.0))
        watch = Watch(tts)
        down, up = await run_test(
            tts,
            frames_to_send=[TTSSpeakFrame("One."), TTSSpeakFrame("Two."), TTSSpeakFrame("Three.")],
        )
    errors = all_errors(up)
    assert len(errors) == 2 and all("waiting for START" in e.error for e in errors)
    assert all("limit: start_timeout" in e.error for e in errors)
    assert utterances(list(down)) == [b"", b"", AUDIO]
    assert len(cloud.connections) == 3
    assert watch.usable == [] and tts.is_usable


async def test_2_a_run_of_failures_makes_the_service_unusable_exactly_once() -> None:
    cloud = FakeCloud()
    cloud.refuse_next(503, "", "down", times=1000)
    async with cloud.running():
        tts = make(
            cloud.url, **scaled(max_retries=0, max_consecutive_failures=3, probe_interval=60)
        )
        watch = Watch(tts)
        down, up = await run_test(
            tts,
            frames_to_send=[TTSSpeakFrame(t) for t in ("One.", "Two.", "Three.", "Four.")],
        )
    errors = all_errors(up)
    # Three failures, the third with the verdict; the fourth utterance is not attempted.
    assert len(errors) == 3 and len(cloud.requests) == 3
    assert "3 failed utterances in a row" in errors[2].error
    assert "in a row" not in errors[0].error + errors[1].error
    assert all(e.category is ErrorCategory.SERVER for e in errors)
    assert watch.usable == [False] and not tts.is_usable
    assert len(utterances(list(down))) == 4


# -- 3. slow first audio and a pause mid-utterance keep one Started/Stopped pair ------------


@pytest.mark.parametrize(
    "behaviour", [first_audio_after(4 * SCALE), pause_inside(4 * SCALE)], ids=["late", "pause"]
)
async def test_3_slow_audio_stays_in_one_utterance(behaviour: Behaviour) -> None:
    cloud = FakeCloud(default=speak(AUDIO))
    cloud.then(behaviour)
    async with cloud.running():
        # The first-audio budget (1 s) is longer than pipecat's window (0.3 s): the service
        # holds the context open while it waits.
        tts = make(cloud.url, **scaled(first_audio_timeout=1.0))
        down, up = await run_test(
            tts, frames_to_send=[TTSSpeakFrame("Slow one."), TTSSpeakFrame("Next.")]
        )
    assert not all_errors(up)
    assert utterances(list(down)) == [AUDIO, AUDIO]
    assert kinds(list(down)).count("TTSStartedFrame") == 2


async def test_3_first_audio_after_the_budget_is_one_error_in_one_pair() -> None:
    cloud = FakeCloud(default=speak(AUDIO))
    cloud.then(first_audio_after(4 * SCALE))
    async with cloud.running():
        tts = make(cloud.url, **scaled(first_audio_timeout=2.5 * SCALE))  # 0.25 s < 0.4 s
        down, up = await run_test(
            tts, frames_to_send=[TTSSpeakFrame("Slow one."), TTSSpeakFrame("Next.")]
        )
    (error,) = all_errors(up)
    assert "waiting for audio (trace_id=" in error.error and "first_audio_timeout" in error.error
    assert utterances(list(down)) == [b"", AUDIO]


async def test_3_an_interruption_while_waiting_is_not_a_failure() -> None:
    cloud = FakeCloud(default=speak(AUDIO))
    cloud.then(stall(after_start=True))
    async with cloud.running():
        tts = make(cloud.url, **scaled(first_audio_timeout=5.0, max_consecutive_failures=1))
        watch = Watch(tts)
        down, up = await run_test(
            tts,
            frames_to_send=[
                TTSSpeakFrame("Waiting for audio."),
                SleepFrame(0.5),  # longer than pipecat's 0.3 s window: the context is held
                InterruptionFrame(),
                SleepFrame(0.1),
                TTSSpeakFrame("After the barge-in."),
            ],
        )
    assert not all_errors(up) and watch.usable == []
    assert tts._failures.count == 0
    assert cloud.connections[0].client_closed_early  # the waiting socket was dropped
    cut = next(i for i, f in enumerate(down) if isinstance(f, InterruptionFrame))
    assert utterances(list(down[cut + 1 :])) == [AUDIO]


# -- 4. a server quiet after END does not delay the next utterance ---------------------------


async def test_4_no_dead_air_after_end_when_the_server_never_finishes_the_close() -> None:
    cloud = FakeCloud(default=speak(AUDIO))
    cloud.then(quiet_after_end())
    async with cloud.running():
        tts = make(cloud.url, **scaled())
        began = time.monotonic()
        down, up = await run_test(
            tts, frames_to_send=[TTSSpeakFrame("First."), TTSSpeakFrame("Second.")]
        )
        elapsed = time.monotonic() - began
        # The quiet server's socket is still released (dropped after a short grace).
        assert await settle(lambda: cloud.connections[0].client_closed_early, 4.5)
    assert not all_errors(up)
    assert utterances(list(down)) == [AUDIO, AUDIO]
    # Awaiting the close would take the server's 3 s of deafness (websockets waits up to 10 s).
    assert elapsed < 2.5


# -- 5. request errors are permanent INVALID_REQUEST; transient ones are not ----------------

REQUEST_CODES = ["SIS.0411", "SIS.0402", "SIS.0410", "SIS.0415", "SIS.0012", "SIS.0031", "SIS.0032"]


@pytest.mark.parametrize("code", REQUEST_CODES)
async def test_5_request_errors_are_invalid_request_and_permanent(code: str) -> None:
    cloud = FakeCloud()
    cloud.then(fail("ERROR", code, "refused request"))
    async with cloud.running():
        tts = make(cloud.url, **scaled(first_audio_timeout=2.0))
        watch = Watch(tts)
        down, up = await run_test(
            tts, frames_to_send=[TTSSpeakFrame("One."), TTSSpeakFrame("Two.")]
        )
    (error,) = all_errors(up)
    assert error.category is ErrorCategory.INVALID_REQUEST and code in error.error
    assert len(cloud.connections) == 1  # not retried, and nothing more is sent
    assert watch.usable == [False] and watch.recovered == []
    assert tts._probe_task is None  # a refused request is not probed back to life
    assert utterances(list(down)) == [b"", b""]


@pytest.mark.parametrize(
    ("refusal", "category"),
    [
        ((400, "SIS.0032"), ErrorCategory.INVALID_REQUEST),
        ((401, "APIG.0301"), ErrorCategory.AUTHENTICATION),
        ((403, ""), ErrorCategory.AUTHORIZATION),
    ],
)
async def test_5_permanent_handshake_refusals(
    refusal: tuple[int, str], category: ErrorCategory
) -> None:
    cloud = FakeCloud()
    cloud.refuse_next(*refusal, times=10)
    async with cloud.running():
        tts = make(cloud.url, token="tok", **scaled(first_audio_timeout=2.0))
        _, up = await run_test(tts, frames_to_send=[TTSSpeakFrame("One.")])
    (error,) = all_errors(up)
    assert error.category is category and not tts.is_usable


@pytest.mark.parametrize(
    ("script", "category"),
    [
        (lambda c: c.then(fail("ERROR", "SIS.0312", "concurrency")), ErrorCategory.RATE_LIMIT),
        (lambda c: c.refuse_next(429, "APIG.0308", "throttled"), ErrorCategory.RATE_LIMIT),
        (lambda c: c.refuse_next(503), ErrorCategory.SERVER),
        (lambda c: c.then(fail("ERROR", "SIS.0413", "internal")), ErrorCategory.SERVER),
        (lambda c: c.then(stall()), ErrorCategory.CONNECTIVITY),
    ],
    ids=["SIS.0312", "429", "503", "SIS.0413", "stall"],
)
async def test_5_transient_failures_keep_the_service_usable(
    script: object, category: ErrorCategory
) -> None:
    cloud = FakeCloud(default=speak(AUDIO))
    script(cloud)  # type: ignore[operator]
    async with cloud.running():
        tts = make(cloud.url, **scaled(max_retries=0))
        down, up = await run_test(
            tts, frames_to_send=[TTSSpeakFrame("One."), TTSSpeakFrame("Two.")]
        )
    (error,) = all_errors(up)
    assert error.category is category and tts.is_usable
    assert utterances(list(down)) == [b"", AUDIO]


# -- 6. metrics: no TTFB and no characters for an utterance without audio -------------------


async def test_6_failed_utterance_reports_neither_ttfb_nor_characters() -> None:
    cloud = FakeCloud(default=speak(AUDIO))
    cloud.then(late(0.3, fail("ERROR", "SIS.0413", "TTS internal error")))
    async with cloud.running():
        tts = make(cloud.url, **scaled(first_audio_timeout=2.0, max_retries=0))
        down, up = await run_test(
            tts,
            frames_to_send=[TTSSpeakFrame("This one fails."), TTSSpeakFrame("This one speaks.")],
            pipeline_params=PipelineParams(enable_metrics=True, enable_usage_metrics=True),
        )
    assert len(all_errors(up)) == 1
    data = [d for f in down if isinstance(f, MetricsFrame) for d in f.data]
    ttfb = [d.value for d in data if isinstance(d, TTFBMetricsData) and d.value > 0]
    usage = [d.value for d in data if isinstance(d, TTSUsageMetricsData)]
    assert usage == [len("This one speaks.")]
    assert len(ttfb) == 1 and ttfb[0] < 0.3  # the spoken one only (the ERROR came at 0.3 s)


# -- 7. the catalogue is open: unknown voices go to the cloud, conservatively ----------------


async def test_7_unknown_voice_is_passed_with_conservative_capabilities(
    warnings_logged: list[str],
) -> None:
    cloud = FakeCloud(default=speak(AUDIO))
    text = "Word " * 150  # 750 characters: over the 500 assumed for an unknown voice
    async with cloud.running():
        tts = make(cloud.url, voice="english_cameal_common", word_timestamps=True, **scaled())
        down, up = await run_test(
            tts, frames_to_send=[TTSSpeakFrame(text.strip()), TTSSpeakFrame("Again.")]
        )
    assert not all_errors(up)
    starts = [c.start for c in cloud.connections]
    assert len(starts) == 3  # the long text in two pieces of at most 500 characters
    for start in starts:
        assert start is not None
        config = start["config"]
        assert config["property"] == "english_cameal_common"  # type: ignore[index]
        assert config["audio_format"] == "pcm" and config["sample_rate"] == "16000"  # type: ignore[index]
        assert "subtitle" not in config  # type: ignore[operator]
        assert len(str(start["text"])) <= 500
    warned = [line for line in warnings_logged if "'english_cameal_common' is not in" in line]
    assert len(warned) == 1 and "conservative capabilities" in warned[0]
    assert tts._settings.language == "en-US"
    assert len(utterances(list(down))) == 2


async def test_7_the_clouds_answer_on_an_unknown_voice_is_final() -> None:
    cloud = FakeCloud()
    cloud.then(fail("ERROR", "SIS.0411", "invalid property"))
    async with cloud.running():
        tts = make(cloud.url, voice="chinese_nobody_common", **scaled(first_audio_timeout=2.0))
        _, up = await run_test(tts, frames_to_send=[TTSSpeakFrame("Hello.")])
    (error,) = all_errors(up)
    assert error.category is ErrorCategory.INVALID_REQUEST and "SIS.0411" in error.error
    assert not tts.is_usable


def test_7_assumed_capabilities_and_names_no_voice_can_have() -> None:
    from rtts_plugin.errors import InvalidRequestError, InvalidSettingsError
    from rtts_plugin.protocol.validation import check_voice_name
    from rtts_plugin.protocol.voices import VOICES, assumed_voice, voice_capabilities

    for name, language in [
        ("english_cameal_common", "en-US"),
        ("chinese_xiaowen_common", "zh-CN"),
        ("arabic_new_voice", "ar"),
        ("brand_new", "zh-CN"),
    ]:
        voice, known = voice_capabilities(name)
        assert not known and voice == assumed_voice(name)
        assert (voice.language, voice.text_limit, voice.formats, voice.sample_rates) == (
            language,
            500,
            ("pcm",),
            ("8000", "16000"),
        )
        assert not voice.subtitles
    assert voice_capabilities("chinese_huaxiaomei_common") == (
        VOICES["chinese_huaxiaomei_common"],
        True,
    )
    check_voice_name("a.b-c_1")
    for bad in ("", " ", "x" * 65, "chinese huaxiaomei", "voice/../etc"):
        with pytest.raises(InvalidRequestError, match=r"SIS\.0411: 'property' is invalid"):
            check_voice_name(bad)
    with pytest.raises(InvalidSettingsError, match="is not a voice name"):
        HuaweiRTTSService(
            url="ws://127.0.0.1:1/v1/p/rtts", settings=HuaweiRTTSService.Settings(voice="")
        )


# -- 8. the END deadline grows with the text ------------------------------------------------


def test_8_end_deadline_grows_with_the_text() -> None:
    timeouts = HuaweiRTTSConnection(url="ws://127.0.0.1:1/v1/p/rtts").timeouts
    # The longest text a voice takes, at 2 characters a second (slow speech in real time).
    assert timeouts.end_deadline(10_000) >= 10_000 / 2
    assert timeouts.end_deadline(10) == pytest.approx(60 + 5)
    now = [0.0]
    budget = UtteranceBudget(Timeouts(gap=5, end=1, end_per_char=0.5), 100, clock=lambda: now[0])
    budget.request_sent()
    budget.started()
    budget.heard()
    for _ in range(11):  # 44 s of audio, a frame every 4 s: the gap rule applies
        now[0] += 4
        budget.activity()
        wait = budget.next_wait()
        assert wait.phase == "audio" and wait.seconds == 5
    now[0] += 4  # 48 s: the END deadline (1 + 0.5 × 100 = 51 s) is nearer than the gap
    budget.activity()
    wait = budget.next_wait()
    assert (wait.phase, wait.seconds, wait.limit, wait.setting) == ("END", 3, 51, "end_timeout")


async def test_8_a_long_text_finishes_where_a_short_one_is_cut() -> None:
    # Audio paced over 0.6 s; END is due end_timeout (0.2 s) + 0.05 s per character.
    paced = speak(AUDIO, frame_bytes=len(AUDIO) // 6, interval=0.1)
    cloud = FakeCloud(default=paced)
    long_text = "A sentence that takes its time."  # 31 characters: 1.75 s
    async with cloud.running():
        tts = make(
            cloud.url, **scaled(first_audio_timeout=2.0, end_timeout=0.2, end_timeout_per_char=0.05)
        )
        down, up = await run_test(
            tts, frames_to_send=[TTSSpeakFrame(long_text), TTSSpeakFrame("Hi.")]
        )
    (error,) = all_errors(up)  # "Hi." (3 characters: 0.35 s) is cut
    assert "waiting for END (trace_id=" in error.error and "limit: end_timeout" in error.error
    spoken = utterances(list(down))
    assert spoken[0] == AUDIO and 0 < len(spoken[1]) < len(AUDIO)


# -- 10. hostile server messages: bounded, and an ErrorFrame through the service -------------

HOSTILE = {
    "deep nesting": "[" * 200_000 + "]" * 200_000,
    "deep object": '{"a":' * 100_000 + "1" + "}" * 100_000,
    "1 MiB malformed": "{'resp_type': 'START', " + "x" * (1024 * 1024),
    "1 MiB single-quoted": "{'resp_type': 'END', 'pad': '" + "y" * (1024 * 1024) + "'}",
}


@pytest.mark.parametrize("message", list(HOSTILE.values()), ids=list(HOSTILE))
async def test_10_hostile_messages_reach_the_pipeline_as_one_error(message: str) -> None:
    async def hostile(ws: ServerConnection, log: ConnectionLog) -> None:
        await ws.send(json.dumps({"resp_type": "START", "trace_id": log.trace_id}))
        await ws.send(message)
        await ws.wait_closed()

    cloud = FakeCloud(default=speak(AUDIO))
    cloud.then(hostile)
    async with cloud.running():
        tts = make(cloud.url, **scaled(first_audio_timeout=5.0, max_retries=0))
        began = time.monotonic()
        down, up = await run_test(
            tts, frames_to_send=[TTSSpeakFrame("One."), TTSSpeakFrame("Two.")]
        )
        elapsed = time.monotonic() - began
    (error,) = all_errors(up)
    assert isinstance(error.exception, RttsError) and error.category is ErrorCategory.SERVER
    assert "protocol" in error.error or "malformed" in error.error or "too" in error.error
    assert utterances(list(down)) == [b"", AUDIO]  # and the service carries on
    assert elapsed < 5


async def test_10_parse_failures_are_protocol_violations() -> None:
    from rtts_plugin.protocol.messages import parse_server_message

    for message in HOSTILE.values():
        with pytest.raises(ProtocolViolationError):
            parse_server_message(message)


async def test_10_a_server_that_closes_before_start_is_an_rtts_error() -> None:
    async def slam(ws: ServerConnection) -> None:
        await ws.close(1011, "going away at once")

    async with serve(slam, "127.0.0.1", 0) as server:
        url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/p/rtts"
        tts = make(url, **scaled(first_audio_timeout=2.0, max_retries=0))
        _, up = await run_test(tts, frames_to_send=[TTSSpeakFrame("One.")])
    (error,) = all_errors(up)
    assert isinstance(error.exception, RttsError) and "closed before END" in error.error


# -- self-healing ---------------------------------------------------------------------------


async def through_an_outage(
    *later: Frame,
) -> tuple[FakeCloud, HuaweiRTTSService, Watch, list[Frame], list[Frame]]:
    """Speak "Lost." to a cloud that refuses its handshake and three probes' (one failure
    makes the service unusable), then ``later``."""
    cloud = FakeCloud(default=speak(AUDIO))
    cloud.refuse_next(503, "", "down", times=4)
    async with cloud.running():
        tts = make(cloud.url, **scaled(max_retries=0, max_consecutive_failures=1))
        watch = Watch(tts)
        down, up = await run_test(
            tts, frames_to_send=[TTSSpeakFrame("Lost."), SleepFrame(0.1), *later]
        )
    return cloud, tts, watch, list(down), list(up)


async def test_unusable_service_probes_with_a_handshake_only_and_comes_back() -> None:
    cloud, tts, watch, down, up = await through_an_outage(
        TTSSpeakFrame("Not even tried."), SleepFrame(2.5), TTSSpeakFrame("Back.")
    )
    (error,) = all_errors(up)
    assert "1 failed utterance in a row" in error.error
    assert watch.usable == [False, True] and len(watch.recovered) == 1
    assert watch.recovered[0] > 0
    spoken = [c for c in cloud.connections if c.start is not None]
    probes = [c for c in cloud.connections if c.start is None]
    assert [c.start["text"] for c in spoken] == ["Back."]  # type: ignore[index]
    assert len(probes) == 1  # the probe that got through sent no START; nothing was billed
    assert len(cloud.requests) == 6  # 1 attempt + 3 refused probes + 1 probe + "Back."
    assert utterances(list(down)) == [b"", b"", AUDIO]
    assert tts.is_usable and tts._probe_task is None


async def test_text_with_nothing_to_say_is_not_sent_and_never_writes_the_service_off() -> None:
    """An LLM reply of only an emoji, three times: no letter to speak, so no request (the
    cloud would END without audio) and no silent context that pipecat would count against
    the service (max_consecutive_zero_audio_contexts, 3)."""
    cloud = FakeCloud(default=speak(b""))  # what a cloud answers for text it cannot speak
    cloud.then(speak(AUDIO))
    async with cloud.running():
        tts = make(cloud.url, **scaled())
        _, up = await run_test(
            tts,
            frames_to_send=[
                *(frame for _ in range(3) for frame in (TTSSpeakFrame("😊"), SleepFrame(0.1))),
                TTSSpeakFrame("Still here."),
            ],
        )
    assert not all_errors(up) and tts.is_usable
    assert [c.start["text"] for c in cloud.connections] == ["Still here."]  # type: ignore[index]


async def test_a_settings_update_during_an_outage_keeps_the_probe_and_its_recovery() -> None:
    """pipecat calls set_usable(True) on every settings update (a ServiceSwitcher's members
    too, with reach_inactive_services): that gives the service another chance, but the
    cloud is still down, so the probe goes on and on_recovered, what switches back, comes."""
    # The probe's first pause is 0.025–0.05 s: its three refusals take at least 0.275 s.
    cloud, tts, watch, _, up = await through_an_outage(
        TTSUpdateSettingsFrame(delta=HuaweiRTTSService.Settings(speed=20)), SleepFrame(2.0)
    )
    assert len(all_errors(up)) == 1
    assert watch.usable == [False, True]  # the update; the probe's answer changes nothing
    assert len(watch.recovered) == 1 and watch.recovered[0] >= 0.2  # the outage's whole length
    assert len(cloud.requests) == 5  # 1 attempt + 3 refused probes + 1 answered probe
    assert tts._probe_task is None and tts._failures.probation  # back, on probation


async def test_a_probe_refused_for_good_ends_with_one_error_of_that_kind() -> None:
    """Credentials revoked during an outage: no probe can bring the service back, so the
    probing ends with one AUTHENTICATION error instead of going on unheard."""
    cloud = FakeCloud(default=speak(AUDIO))
    cloud.refuse_next(503, "", "down", times=2)  # the utterance's attempt and one probe
    cloud.refuse_next(401, "APIG.0301", "incorrect IAM authentication information", times=9)
    async with cloud.running():
        tts = make(cloud.url, **scaled(max_retries=0, max_consecutive_failures=1))
        watch = Watch(tts)
        _, up = await run_test(tts, frames_to_send=[TTSSpeakFrame("Lost."), SleepFrame(1.5)])
    first, last = all_errors(up)
    assert "HTTP 503" in first.error
    assert "recovery probe" in last.error and "APIG.0301" in last.error
    assert last.category is ErrorCategory.AUTHENTICATION
    assert len(cloud.requests) == 3  # the attempt, then probes until the 401, then none
    assert watch.usable == [False] and not watch.recovered and tts._probe_task is None


async def test_a_spoken_utterance_ends_the_probe_and_its_probation() -> None:
    """Made usable by a settings update mid-outage, the service speaks: the outage is over,
    so the probe still running stops; its late answer must not put the service on
    probation (one failure would then write it off) nor announce a recovery."""
    cloud = FakeCloud(default=speak(AUDIO))
    cloud.refuse_next(503, "", "down", times=2)  # "Lost one.", "Lost two.": unusable
    cloud.handshakes.append(None)  # "Back." is spoken
    cloud.refuse_next(503, "", "blip")  # "Again.": one transient failure (or a late probe)
    async with cloud.running():
        tts = make(
            cloud.url,
            **scaled(
                max_retries=0,
                max_consecutive_failures=2,
                probe_interval=0.6,  # the first probe comes 0.3-0.6 s after "Lost two."
                probe_max_interval=1.2,
            ),
        )
        watch = Watch(tts)
        _, up = await run_test(
            tts,
            frames_to_send=[
                TTSSpeakFrame("Lost one."),
                TTSSpeakFrame("Lost two."),
                SleepFrame(0.05),
                TTSUpdateSettingsFrame(delta=HuaweiRTTSService.Settings(speed=20)),
                TTSSpeakFrame("Back."),
                SleepFrame(1.0),
                TTSSpeakFrame("Again."),
                SleepFrame(0.2),
            ],
        )
    assert len(all_errors(up)) == 3 and tts.is_usable  # one of two allowed failures
    assert watch.recovered == [] and tts._probe_task is None


def test_failure_run_and_probe_backoff_are_pure() -> None:
    now = [100.0]
    backoff = ProbeBackoff(initial=1, cap=8, uniform=lambda low, high: high)
    run = FailureRun(limit=3, backoff=backoff, clock=lambda: now[0])
    assert [run.failure(), run.failure()] == [False, False]
    run.success()
    assert [run.failure(), run.failure()] == [False, False]
    now[0] += 7
    assert run.failure() is True and run.failure() is False  # the verdict comes once
    assert run.outage_seconds() == 7
    assert [backoff.next_delay() for _ in range(6)] == [1, 2, 4, 8, 8, 8]
    # Back after a probe: on probation. One failure trips it again, the back-off goes on.
    run.recovered()
    assert not run.unusable and run.probation
    assert run.failure() is True and backoff.next_delay() == 8
    run.recovered()
    run.success()  # a spoken utterance ends the probation and the back-off
    assert not run.probation and backoff.attempts == 0 and run.outage_seconds() == 0
    assert [run.failure(), run.failure(), run.failure()] == [False, False, True]
    # Given another chance mid-outage: the count starts over, the outage and its pace go on.
    assert [backoff.next_delay(), backoff.next_delay()] == [1, 2]  # the probe is at work
    now[0] += 2
    run.forgive()
    assert not run.unusable and run.count == 0 and run.outage_seconds() == 2
    assert backoff.next_delay() == 4
    assert [run.failure(), run.failure(), run.failure()] == [False, False, True]
    backoff = ProbeBackoff(initial=1, cap=8, uniform=lambda low, high: low)
    assert [backoff.next_delay() for _ in range(3)] == [0.5, 1, 2]


async def test_a_flapping_endpoint_is_tripped_at_once_and_probed_less_often() -> None:
    # Handshakes always succeed, synthesis never starts: the probe alone cannot tell.
    cloud = FakeCloud(default=stall())
    async with cloud.running():
        tts = make(
            cloud.url,
            **scaled(
                first_audio_timeout=0.2,
                max_retries=0,
                max_consecutive_failures=2,
                probe_interval=0.1,
                probe_max_interval=10,
            ),
        )
        watch = Watch(tts)
        _, up = await run_test(
            tts,
            frames_to_send=[
                # Frames are sent on a timeline; each failure takes the 0.2 s budget.
                TTSSpeakFrame("One."),
                TTSSpeakFrame("Two."),  # ~0.4 s: unusable, probe after 0.05–0.1 s
                SleepFrame(1.2),
                TTSSpeakFrame("Three."),  # on probation: fails, unusable at once
                SleepFrame(1.0),  # the next probe waits 0.1–0.2 s
                TTSSpeakFrame("Four."),  # on probation again: fails, unusable
            ],
        )
    errors = all_errors(up)
    assert len(errors) == 4
    assert "2 failed utterances in a row" in errors[1].error
    assert all("failed again after the probe brought it back" in e.error for e in errors[2:])
    assert watch.usable == [False, True, False, True, False]
    assert len(watch.recovered) == 2 and watch.recovered[1] > watch.recovered[0]
    # Each trip's probe continues the back-off (restarted, it would have drawn one delay).
    assert tts._failures.backoff.attempts >= 2
    assert sum(1 for c in cloud.connections if c.start is None) in (2, 3)


async def probed(answers: list[RttsError | None], backoff: ProbeBackoff) -> tuple[int, list[float]]:
    """The recovery probe against ``answers`` (one per handshake, None: it succeeds): the
    number of probes it took and the pauses it made."""
    slept: list[float] = []

    async def handshake() -> None:
        answer = answers.pop(0)
        if answer is not None:
            raise answer

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    probes = await probe_until_answered(handshake, backoff, sleep=sleep)
    assert not answers
    return probes, slept


async def test_probe_retries_until_the_handshake_succeeds() -> None:
    answers: list[RttsError | None] = [
        HandshakeError(503, "", "down"),
        RttsTimeoutError("connect", 1.0),
        None,
    ]
    backoff = ProbeBackoff(initial=1, cap=3, uniform=lambda low, high: high)
    assert await probed(answers, backoff) == (3, [1, 2, 3])


async def test_probe_pauses_as_long_as_a_refusal_asks_up_to_the_cap() -> None:
    answers: list[RttsError | None] = [
        HandshakeError(503, "", "busy", retry_after=2.5),  # more than the back-off's 1 s
        HandshakeError(503, "", "circuit open", retry_after=60),  # more than the 3 s cap
        HandshakeError(503, "", "busy", retry_after=0.1),  # less than the back-off's 3 s
        None,
    ]
    backoff = ProbeBackoff(initial=0.5, cap=3, uniform=lambda low, high: high)
    assert await probed(answers, backoff) == (4, [0.5, 2.5, 3, 3])


def test_first_audio_budget_caps_every_wait_before_audio() -> None:
    now = [0.0]
    budget = UtteranceBudget(
        Timeouts(connect=10, start=10, gap=10, first_audio=2.5), 5, clock=lambda: now[0]
    )
    assert budget.connect_wait().seconds == 2.5
    assert budget.connect_wait().setting == "first_audio_timeout"
    now[0] = 1.0
    budget.request_sent()
    assert budget.next_wait().seconds == 1.5 and budget.next_wait().phase == "START"
    assert budget.allows_retry(1.0) and not budget.allows_retry(1.49)
    now[0] = 2.0
    budget.started()
    assert budget.next_wait().seconds == 0.5 and budget.next_wait().phase == "audio"
    budget.heard()
    wait = budget.next_wait()
    assert (wait.seconds, wait.setting) == (10, "gap_timeout")
