"""HuaweiRTTSService against a scripted fake of Huawei Cloud: what only the cloud does."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from loguru import logger
from pipecat.frames.frames import (
    ErrorFrame,
    Frame,
    InterruptionFrame,
    TTSAudioRawFrame,
    TTSSpeakFrame,
    TTSTextFrame,
)
from pipecat.tests.utils import SleepFrame, run_test
from pipecat.utils.errors import ErrorCategory

from rtts_plugin import HuaweiRTTSService
from rtts_plugin.config import HuaweiRTTSConnection
from rtts_plugin.errors import RttsError
from tests.fakes import FakeCloud, FakeIam, fail, hang_up, json_response, speak, stall, tone_pcm
from tests.test_plugin_engine import audio_of, kinds

AUDIO = tone_pcm(0.5, 16000)


def make(
    cloud: FakeCloud,
    voice: str = "english_amy_common",
    word_timestamps: bool = False,
    **connection: object,
) -> HuaweiRTTSService:
    settings = {
        "url": cloud.url,
        "retry_backoff": 0.01,
        "start_timeout": 2.0,
        "gap_timeout": 2.0,
        **connection,
    }
    return HuaweiRTTSService(
        connection=HuaweiRTTSConnection(**settings),  # type: ignore[arg-type]
        settings=HuaweiRTTSService.Settings(voice=voice),
        word_timestamps=word_timestamps,
        sample_rate=16000,
        stop_frame_timeout_s=0.3,
    )


async def speak_once(
    tts: HuaweiRTTSService, text: str = "Hello there."
) -> tuple[list[Frame], list[ErrorFrame]]:
    """Speak one text; return what went downstream and the service's own rtts errors.

    (pipecat adds its own "completed with no audio" error after a failed utterance.)
    """
    down, up = await run_test(tts, frames_to_send=[TTSSpeakFrame(text)])
    return list(down), [
        f for f in up if isinstance(f, ErrorFrame) and isinstance(f.exception, RttsError)
    ]


def assert_bracketed(down: list[Frame]) -> None:
    names = kinds(down)
    assert names.count("TTSStartedFrame") == 1 and names.count("TTSStoppedFrame") == 1
    assert names.index("TTSStartedFrame") < names.index("TTSStoppedFrame")


@pytest.fixture
def captured_logs() -> Iterator[list[str]]:
    lines: list[str] = []
    sink = logger.add(lambda message: lines.append(str(message)), level="TRACE")
    yield lines
    logger.remove(sink)


async def test_audio_arrives_as_sent_and_the_socket_is_closed() -> None:
    async with FakeCloud().running() as cloud:
        down, errors = await speak_once(make(cloud))
    assert audio_of(down) == AUDIO and not errors
    assert_bracketed(down)
    (log,) = cloud.connections
    assert log.start == {
        "command": "START",
        "text": "Hello there.",
        "config": {
            "audio_format": "pcm",
            "sample_rate": "16000",
            "property": "english_amy_common",
            "speed": 0,
            "pitch": 0,
            "volume": 50,
        },
    }
    assert not log.client_closed_early


async def test_interruption_stops_the_audio_and_closes_the_socket_mid_stream() -> None:
    cloud = FakeCloud(default=speak(tone_pcm(4.0, 16000), frame_bytes=1920, interval=0.03))
    async with cloud.running():
        tts = make(cloud)
        down, _ = await run_test(
            tts,
            frames_to_send=[
                TTSSpeakFrame("A long answer."),
                SleepFrame(0.4),
                InterruptionFrame(),
                SleepFrame(0.3),
            ],
        )
    (log,) = cloud.connections
    assert log.client_closed_early, "the server should see the close before it finished sending"
    assert 0 < log.frames_sent < log.frames_planned
    cut = next(i for i, f in enumerate(down) if isinstance(f, InterruptionFrame))
    assert any(isinstance(f, TTSAudioRawFrame) for f in down[:cut])
    assert not any(isinstance(f, TTSAudioRawFrame) for f in down[cut:])


@pytest.mark.parametrize(
    ("status", "code", "category"),
    [
        (401, "APIG.0301", ErrorCategory.AUTHENTICATION),
        (403, "", ErrorCategory.AUTHORIZATION),
        (404, "APIG.0101", ErrorCategory.INVALID_REQUEST),
    ],
)
async def test_permanent_handshake_failures_are_not_retried(
    status: int, code: str, category: ErrorCategory
) -> None:
    cloud = FakeCloud()
    cloud.refuse_next(status, code, "token expires", times=5)
    async with cloud.running():
        tts = make(cloud, token="tok")
        down, errors = await speak_once(tts)
    assert len(cloud.requests) == 1
    (error,) = errors
    assert error.category is category and f"HTTP {status}" in error.error and (code in error.error)
    assert_bracketed(down)
    assert audio_of(down) == b""


async def test_rate_limit_at_the_handshake_is_retried_then_succeeds() -> None:
    cloud = FakeCloud()
    cloud.refuse_next(429, "APIG.0308", "throttled", times=2)
    async with cloud.running():
        down, errors = await speak_once(make(cloud, max_retries=2))
    assert len(cloud.requests) == 3 and not errors
    assert audio_of(down) == AUDIO


@pytest.mark.parametrize(
    ("status", "category"),
    [(429, ErrorCategory.RATE_LIMIT), (500, ErrorCategory.SERVER), (503, ErrorCategory.SERVER)],
)
async def test_transient_handshake_failures_give_up_after_the_retries(
    status: int, category: ErrorCategory
) -> None:
    cloud = FakeCloud()
    cloud.refuse_next(status, "", "busy", times=10)
    async with cloud.running():
        down, errors = await speak_once(make(cloud, max_retries=2))
    assert len(cloud.requests) == 3
    (error,) = errors
    assert error.category is category and f"HTTP {status}" in error.error
    assert_bracketed(down)


async def test_concurrency_quota_error_before_audio_is_retried() -> None:
    cloud = FakeCloud()
    cloud.then(fail("ERROR", "SIS.0312", "resource concurrency limit exceeded"))
    async with cloud.running():
        down, errors = await speak_once(make(cloud))
    assert len(cloud.connections) == 2 and not errors
    assert audio_of(down) == AUDIO


async def test_refused_connection_is_retried_then_reported() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    tts = HuaweiRTTSService(
        connection=HuaweiRTTSConnection(
            url=f"ws://127.0.0.1:{port}/v1/p/rtts", max_retries=1, retry_backoff=0.01
        ),
        stop_frame_timeout_s=0.3,
    )
    down, errors = await speak_once(tts)
    (error,) = errors
    assert error.category is ErrorCategory.CONNECTIVITY and "cannot connect" in error.error
    assert_bracketed(down)


async def test_fatal_error_mid_audio_is_reported_with_code_and_trace_and_not_retried() -> None:
    cloud = FakeCloud()
    cloud.then(fail("FATAL_ERROR", "SIS.0413", "TTS internal error", audio_first=AUDIO[:3200]))
    async with cloud.running():
        down, errors = await speak_once(make(cloud))
    (log,) = cloud.connections
    (error,) = errors
    assert (
        "SIS.0413" in error.error
        and "TTS internal error" in error.error
        and log.trace_id in error.error
    )
    assert error.category is ErrorCategory.SERVER
    assert audio_of(down) == AUDIO[:3200]  # what was heard stays, nothing is repeated
    assert_bracketed(down)


async def test_error_before_audio_that_is_not_transient_is_reported_once() -> None:
    cloud = FakeCloud()
    cloud.then(fail("ERROR", "SIS.0411", "invalid property"))
    async with cloud.running():
        _, errors = await speak_once(make(cloud))
    assert len(cloud.connections) == 1
    (error,) = errors
    assert "SIS.0411" in error.error and cloud.connections[0].trace_id in error.error


@pytest.mark.parametrize(
    ("behaviour", "fragment", "category"),
    [
        (stall(), "waiting for START", ErrorCategory.CONNECTIVITY),
        (
            stall(after_start=True, audio_first=AUDIO[:320]),
            "waiting for audio",
            ErrorCategory.CONNECTIVITY,
        ),
        (hang_up(), "connection closed before END", ErrorCategory.CONNECTIVITY),
    ],
)
async def test_stalls_and_hang_ups_are_errors_not_successes(
    behaviour: object, fragment: str, category: ErrorCategory
) -> None:
    cloud = FakeCloud()
    cloud.then(behaviour)  # type: ignore[arg-type]
    async with cloud.running():
        down, errors = await speak_once(
            make(cloud, start_timeout=0.3, gap_timeout=0.3, max_retries=0)
        )
    (error,) = errors
    assert fragment in error.error and error.category is category
    assert_bracketed(down)
    assert cloud.connections[0].client_closed_early or fragment == "connection closed before END"


async def test_token_and_enterprise_project_headers_are_sent() -> None:
    async with FakeCloud().running() as cloud:
        await speak_once(make(cloud, token="tok-123", enterprise_project_id="ep-9"))
    headers = cloud.requests[0].headers
    assert headers["X-Auth-Token"] == "tok-123" and headers["Enterprise-Project-Id"] == "ep-9"


async def test_iam_token_is_fetched_and_renewed_after_a_401(captured_logs: list[str]) -> None:
    iam = FakeIam("bot", "pw-Secret-42", "acme")
    cloud = FakeCloud()
    allowed = {"token-2"}  # the first token has been revoked by the time it is used
    cloud.check_request = lambda request: (
        None
        if request.headers.get("X-Auth-Token") in allowed
        else json_response(401, "APIG.0301", "token expires")
    )
    async with iam.running(), cloud.running():
        tts = make(
            cloud,
            region="cn-north-4",
            iam_username="bot",
            iam_password="pw-Secret-42",
            iam_domain="acme",
            iam_endpoint=iam.endpoint,
        )
        down, errors = await speak_once(tts)
    assert iam.issued == ["token-1", "token-2"] and not errors
    assert audio_of(down) == AUDIO
    assert not any("pw-Secret-42" in line or "token-2" in line for line in captured_logs)


async def test_aksk_signed_handshake_is_accepted() -> None:
    from tests.test_auth import AK, SK, official_signature

    cloud = FakeCloud()

    def verify(request):  # type: ignore[no-untyped-def]
        (host,) = request.headers.get_all("Host")
        expected = official_signature(
            "GET", "http", host, request.path, request.headers["X-Sdk-Date"]
        )
        return (
            None
            if request.headers["Authorization"] == expected
            else json_response(401, "APIG.0301", "verify aksk signature fail")
        )

    cloud.check_request = verify
    async with cloud.running():
        down, errors = await speak_once(make(cloud, access_key=AK, secret_key=SK))
    assert not errors and audio_of(down) == AUDIO


async def test_secrets_never_reach_errors_logs_or_repr(captured_logs: list[str]) -> None:
    cloud = FakeCloud()
    cloud.refuse_next(401, "APIG.0301", "token expires", times=3)
    async with cloud.running():
        tts = make(cloud, token="tok-VERY-SECRET-77")
        _, errors = await speak_once(tts)
    texts = [e.error for e in errors] + [str(e.exception) for e in errors] + captured_logs
    texts += [repr(tts), repr(tts._connection), repr(tts._auth), str(tts._connection)]
    assert errors
    assert not [t for t in texts if "tok-VERY-SECRET-77" in t]


async def test_text_over_the_limit_is_split_and_word_times_offset() -> None:
    words = [
        {"start_time": 0, "end_time": 200, "text": "Hello", "word_index": 0},
        {"start_time": 300, "end_time": 400, "text": "", "word_index": 1},
    ]
    cloud = FakeCloud(default=speak(tone_pcm(1.0, 16000), words=words))
    text = ("Hello. " * 1500).strip() + " Hello."  # over the 10000-character limit
    async with cloud.running():
        tts = make(cloud, voice="chinese_huaxiaomei_common", word_timestamps=True)
        down, up = await run_test(tts, frames_to_send=[TTSSpeakFrame(text)])
    assert not [f for f in up if isinstance(f, ErrorFrame)]
    starts = [str(c.start["text"]) for c in cloud.connections if c.start]
    assert len(starts) == 2 and all(len(s) <= 10_000 for s in starts)
    assert " ".join(starts) == text
    timed = [f for f in down if isinstance(f, TTSTextFrame)]
    assert len(timed) >= 2
    gap = ((timed[1].pts or 0) - (timed[0].pts or 0)) / 1e9
    assert abs(gap - 1.0) < 0.002  # the second connection's word sits one second (its audio) later
