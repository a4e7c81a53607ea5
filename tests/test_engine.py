"""The local engine over a real WebSocket on loopback: audio, timings, errors, limits."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from typing import Any

import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from gateway.server import RunningGateway, run_gateway
from gateway.settings import GatewaySettings
from tests.support import Exchange, exchange, rms, start, to_samples

SENTENCE = "The quick brown fox jumps over the lazy dog."


def duration(seen: Exchange, audio_format: str, rate: int) -> float:
    return len(to_samples(seen.audio, audio_format, rate)) / rate


def fundamental_hz(samples: np.ndarray, rate: int) -> float:
    """Median pitch of the voiced 40 ms frames, by autocorrelation (50..500 Hz)."""
    frame = int(0.04 * rate)
    loud = rms(samples) * 0.5
    estimates = []
    for begin in range(0, len(samples) - frame, frame):
        chunk = samples[begin : begin + frame] - np.mean(samples[begin : begin + frame])
        if rms(chunk) < loud:
            continue
        corr = np.correlate(chunk, chunk, mode="full")[frame - 1 :]
        low, high = rate // 500, rate // 50
        lag = low + int(np.argmax(corr[low:high]))
        if corr[lag] > 0.3 * corr[0]:
            estimates.append(rate / lag)
    assert estimates, "no voiced frames found"
    return float(np.median(estimates))


@pytest.mark.parametrize("audio_format", ["pcm", "alaw", "ulaw", "mp3"])
@pytest.mark.parametrize("rate", [8000, 16000])
async def test_each_format_and_rate_is_real_speech_of_plausible_length(
    gateway: RunningGateway, audio_format: str, rate: int
) -> None:
    seen = await exchange(
        gateway.url(),
        start(
            SENTENCE,
            audio_format=audio_format,
            sample_rate=str(rate),
            property="english_amy_common",
        ),
    )
    assert seen.kinds == ["START", "AUDIO", "END"]
    assert seen.close_code == 1000
    samples = to_samples(seen.audio, audio_format, rate)
    seconds = len(samples) / rate
    assert 1.5 < seconds < 6.0, seconds  # nine words at about 175 words per minute
    assert rms(samples) > 0.02  # speech, not silence
    if audio_format in ("pcm", "alaw", "ulaw"):
        bytes_per_sample = 2 if audio_format == "pcm" else 1
        assert len(seen.audio) % bytes_per_sample == 0


async def test_encodings_carry_the_same_speech(gateway: RunningGateway) -> None:
    # espeak-ng jitters its output a little from run to run, so compare loudness and length.
    reference = None
    for audio_format in ("pcm", "ulaw", "alaw", "mp3"):
        seen = await exchange(
            gateway.url(),
            start(
                SENTENCE,
                sample_rate="16000",
                property="english_amy_common",
                audio_format=audio_format,
            ),
        )
        samples = to_samples(seen.audio, audio_format, 16000)
        reference = reference or (len(samples), rms(samples))
        assert abs(len(samples) / reference[0] - 1) < 0.05, audio_format
        assert abs(rms(samples) / reference[1] - 1) < 0.1, audio_format


async def test_sample_rates_differ_by_their_ratio(gateway: RunningGateway) -> None:
    low = await exchange(
        gateway.url(), start(SENTENCE, sample_rate="8000", property="english_amy_common")
    )
    high = await exchange(
        gateway.url(), start(SENTENCE, sample_rate="16000", property="english_amy_common")
    )
    assert abs(len(high.audio) / len(low.audio) - 2.0) < 0.01


async def test_messages_carry_one_fresh_trace_id(gateway: RunningGateway) -> None:
    first = await exchange(
        gateway.url(), start("One.", property="chinese_huaxiaomei_common", subtitle="word_level")
    )
    second = await exchange(gateway.url(), start("Two.", property="chinese_huaxiaomei_common"))
    ids = {m["trace_id"] for m in first.messages}
    assert len(ids) == 1
    trace_id = ids.pop()
    assert uuid.UUID(trace_id).version == 4
    assert {m["trace_id"] for m in second.messages} != {trace_id}


async def test_audio_streams_while_synthesizing(gateway: RunningGateway) -> None:
    seen = await exchange(
        gateway.url(), start(SENTENCE * 6, property="english_amy_common", sample_rate="16000")
    )
    frames = [f for f in seen.frames if isinstance(f, bytes)]
    assert len(frames) > 50  # many small frames, not one blob at the end
    assert max(len(f) for f in frames) <= 16000 * 2 * 0.2  # none longer than 200 ms


def results(seen: Exchange) -> list[list[dict[str, Any]]]:
    return [m["result"] for m in seen.messages if m["resp_type"] == "RESULT"]


async def test_result_messages_have_the_documented_shape(gateway: RunningGateway) -> None:
    # docs/rtts-protocol.md §4 (Huawei's sis_03_0125): {"start_time":0,"end_time":384,
    # "text":"Nice","word_index":0}, …; one item per English word with its punctuation
    # attached ("you."), word_index from 0 within the sentence, an empty closing item.
    seen = await exchange(
        gateway.url(),
        start(
            "Nice to meet you.",
            property="chinese_huaxiaomei_common",
            sample_rate="16000",
            subtitle="word_level",
        ),
    )
    assert seen.kinds == ["START", "AUDIO", "RESULT", "AUDIO", "END"]
    (items,) = results(seen)
    assert [(w["text"], w["word_index"]) for w in items] == [
        ("Nice", 0),
        ("to", 1),
        ("meet", 2),
        ("you.", 3),
        ("", 4),
    ]
    assert all(set(w) == {"start_time", "end_time", "text", "word_index"} for w in items)
    assert all(isinstance(w["start_time"], int) and isinstance(w["end_time"], int) for w in items)
    assert items[0]["start_time"] == 0
    closing = items[-1]
    assert closing["start_time"] == items[-2]["end_time"] <= closing["end_time"]
    assert closing["end_time"] == round(duration(seen, "pcm", 16000) * 1000)


async def test_chinese_is_timed_one_character_per_item(gateway: RunningGateway) -> None:
    # espeak-ng's own words (你好, 欢迎, and a wrong 用语 in 使用语音) must not show through.
    text = "你好，欢迎使用语音服务。今天天气很好！"
    seen = await exchange(
        gateway.url(), start(text, property="chinese_huaxiaomei_common", subtitle="word_level")
    )
    first, second = results(seen)
    assert [w["text"] for w in first] == [*"你", "好，", *"欢迎使用语音服", "务。", ""]
    assert [w["text"] for w in second] == [*"今天天气很", "好！", ""]
    for sentence in (first, second):
        assert [w["word_index"] for w in sentence] == list(range(len(sentence)))
    assert "".join(w["text"] for w in first + second) == text
    assert all(w["start_time"] < w["end_time"] for w in first[:-1] + second[:-1])


@pytest.mark.parametrize("level", ["word_level", "phoneme_level"])
async def test_subtitle_timings_are_monotonic_and_inside_the_audio(
    gateway: RunningGateway, level: str
) -> None:
    text = "Hello there, caller. Your order has shipped! 你好 world, it arrives tomorrow"
    seen = await exchange(
        gateway.url(),
        start(text, property="chinese_huaxiaomei_common", sample_rate="16000", subtitle=level),
    )
    assert seen.kinds[0] == "START" and seen.kinds[-1] == "END"
    sentences = results(seen)
    assert [[w["text"] for w in items] for items in sentences] == [
        ["Hello", "there,", "caller.", ""],
        ["Your", "order", "has", "shipped!", ""],
        # the last sentence is closed at the end of the text, full stop or not
        ["你", "好", "world,", "it", "arrives", "tomorrow", ""],
    ]
    total_ms = duration(seen, "pcm", 16000) * 1000
    previous_end = 0
    for items in sentences:
        assert [w["word_index"] for w in items] == list(range(len(items)))
        for word in items:
            assert previous_end <= word["start_time"] <= word["end_time"] <= total_ms + 1
            assert word["start_time"] < word["end_time"] or not word["text"]
            previous_end = word["end_time"]
            if level == "phoneme_level" and not word["text"]:
                assert word["phonemes"] == []  # the closing item has the same keys
            elif level == "phoneme_level":
                phonemes = word["phonemes"]
                assert phonemes and [p["phoneme_index"] for p in phonemes] == list(
                    range(len(phonemes))
                )
                assert all(
                    word["start_time"] <= p["start_time"] < p["end_time"] <= word["end_time"]
                    for p in phonemes
                )
                # espeak's language switch "(en)" is a marker, not a phoneme
                assert all(p["phoneme"] and "(" not in p["phoneme"] for p in phonemes)
            else:
                assert "phonemes" not in word


async def test_word_index_follows_sentences_not_the_engines_segments(
    gateway: RunningGateway,
) -> None:
    # The engine synthesizes 200 characters at a time; a sentence longer than that goes on
    # counting across the cut, and every sentence starts again at 0.
    long_sentence = " ".join(["word"] * 60) + "."
    text = f"Short one. {long_sentence} Last one."
    seen = await exchange(
        gateway.url(), start(text, property="chinese_huaxiaomei_common", subtitle="word_level")
    )
    items = [w for r in results(seen) for w in r]
    sentences: list[list[dict[str, Any]]] = [[]]
    for word in items:
        sentences[-1].append(word)
        if not word["text"]:
            sentences.append([])
    assert sentences.pop() == []
    assert [len(s) for s in sentences] == [3, 61, 3]
    for sentence in sentences:
        assert [w["word_index"] for w in sentence] == list(range(len(sentence)))
    assert len(results(seen)) > 3  # the long sentence came in more than one RESULT


async def test_no_timings_for_voices_without_subtitles(gateway: RunningGateway) -> None:
    seen = await exchange(
        gateway.url(), start(SENTENCE, property="english_amy_common", subtitle="word_level")
    )
    assert seen.kinds == ["START", "AUDIO", "END"]


async def test_speed_pitch_and_volume_change_the_audio_measurably(gateway: RunningGateway) -> None:
    async def samples(**config: object) -> np.ndarray:
        seen = await exchange(
            gateway.url(),
            start(SENTENCE, property="english_amy_common", sample_rate="16000", **config),
        )
        return to_samples(seen.audio, "pcm", 16000)

    slow, normal, fast = await samples(speed=-500), await samples(), await samples(speed=500)
    assert len(slow) > 1.5 * len(normal) > 2.2 * len(fast)
    low, high = await samples(pitch=-500), await samples(pitch=500)
    assert fundamental_hz(high, 16000) > 1.3 * fundamental_hz(low, 16000)
    quiet, loud = await samples(volume=10), await samples(volume=100)
    assert rms(loud) > 5 * rms(quiet)
    assert rms(await samples(volume=0)) < 0.001


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (start("x", audio_format="wav"), "SIS.0410"),
        (start("x", sample_rate="22050"), "SIS.0402"),
        (start("x", property="chinese_nobody_common"), "SIS.0411"),
        (start("x", property="chinese_huaxiaolong_common", sample_rate="8000"), "SIS.0402"),
        (start("x", property="chinese_huaxiaomei_common", audio_format="ulaw"), "SIS.0410"),
        (start("x", speed=1000), "SIS.0415"),
        (start(""), "SIS.0415"),
        (start("a" * 501), "SIS.0415"),
        (json.dumps({"command": "START"}), "SIS.0012"),
        ("{oops", "SIS.0032"),
        (b"\x00\x01binary", "SIS.0032"),
    ],
)
async def test_bad_requests_get_the_clouds_code_and_no_audio(
    gateway: RunningGateway, payload: str | bytes, code: str
) -> None:
    seen = await exchange(gateway.url(), payload)
    assert seen.kinds == ["ERROR"]
    (error,) = seen.messages
    assert error["error_code"] == code and error["error_msg"] and uuid.UUID(error["trace_id"])
    assert seen.audio == b""
    assert seen.close_code == 1000
    # and the server goes on serving
    assert (await exchange(gateway.url(), start("Still here."))).kinds == ["START", "AUDIO", "END"]


async def test_text_at_the_limit_is_spoken(gateway: RunningGateway) -> None:
    seen = await exchange(gateway.url(), start("好" * 500, property="chinese_xiaoyan_common"))
    assert seen.kinds == ["START", "AUDIO", "END"]


async def test_further_messages_get_error_and_synthesis_goes_on(gateway: RunningGateway) -> None:
    long_text = SENTENCE * 60
    seen = await exchange(
        gateway.url(), start(long_text, property="english_amy_common"), start("again"), b"\x00"
    )
    errors = [m for m in seen.messages if m["resp_type"] == "ERROR"]
    assert [e["error_code"] for e in errors] == ["SIS.0415", "SIS.0415"]
    assert "one START" in errors[0]["error_msg"]
    assert seen.messages[0]["resp_type"] == "START" and seen.messages[-1]["resp_type"] == "END"
    assert duration(seen, "pcm", 8000) > 100  # the whole long text was spoken


async def test_idle_client_gets_fatal_error_and_close() -> None:
    async with run_gateway(GatewaySettings(port=0, metrics_port=0, idle_timeout=0.3)) as gateway:
        seen = await exchange(gateway.url())
    assert seen.kinds == ["FATAL_ERROR"]
    assert seen.messages[0]["error_code"] == "SIS.0304"
    assert "wait voice timeout" in seen.messages[0]["error_msg"]
    assert seen.close_code == 1000


async def test_oversized_message_is_refused_with_1009() -> None:
    async with run_gateway(
        GatewaySettings(port=0, metrics_port=0, max_message_bytes=4096)
    ) as gateway:
        seen = await exchange(gateway.url(), start("a" * 5000))
        assert seen.close_code == 1009 and seen.frames == []
        assert (await exchange(gateway.url(), start("fine"))).kinds == ["START", "AUDIO", "END"]


async def test_sessions_over_the_limit_are_refused_with_429() -> None:
    async with run_gateway(GatewaySettings(port=0, metrics_port=0, max_sessions=1)) as gateway:
        async with connect(gateway.url(), compression=None, proxy=None) as holder:
            with pytest.raises(InvalidStatus) as caught:
                await exchange(gateway.url(), start("hello"))
            assert caught.value.response.status_code == 429
            assert json.loads(caught.value.response.body)["error_code"] == "SIS.0312"
            await holder.send(start("hello"))
            assert isinstance(await holder.recv(), str)
        await asyncio.wait_for(gateway.gateway.wait_idle(), 5)
        assert (await exchange(gateway.url(), start("hello"))).kinds == ["START", "AUDIO", "END"]


@pytest.mark.parametrize(
    "path", ["/", "/v1/rtts", "/v1/p/rtts/extra", "/v2/p/rtts", "/v1/p%2Fq/rtts"]
)
async def test_other_paths_are_refused_at_the_handshake(gateway: RunningGateway, path: str) -> None:
    url = f"ws://127.0.0.1:{gateway.port}{path}"
    with pytest.raises(InvalidStatus) as caught:
        async with connect(url, proxy=None):
            pass
    response = caught.value.response
    assert response.status_code == 404
    assert json.loads(response.body)["error_code"] == "APIG.0101"


async def test_query_strings_and_trailing_slash_are_accepted(gateway: RunningGateway) -> None:
    url = f"ws://127.0.0.1:{gateway.port}/v1/0123abcd/rtts/?lang=en"
    assert (await exchange(url, start("Hi."))).kinds == ["START", "AUDIO", "END"]


async def test_client_leaving_mid_audio_frees_the_session(gateway: RunningGateway) -> None:
    async with connect(gateway.url(), compression=None, proxy=None) as ws:
        await ws.send(start(SENTENCE * 100, property="english_amy_common"))
        assert json.loads(await ws.recv())["resp_type"] == "START"
        assert isinstance(await ws.recv(), bytes)
    for _ in range(100):
        if gateway.engine.active_sessions == 0:
            break
        await asyncio.sleep(0.02)
    assert gateway.engine.active_sessions == 0
    assert (await exchange(gateway.url(), start("Next caller."))).kinds == ["START", "AUDIO", "END"]


async def test_fifty_concurrent_sessions_all_get_their_own_complete_audio(
    gateway: RunningGateway,
) -> None:
    requests = [
        (start(SENTENCE, property="english_amy_common", sample_rate="16000"), "pcm", 16000),
        (
            start(
                "你好，欢迎致电。请问有什么可以帮您？",
                property="chinese_huaxiaomei_common",
                subtitle="word_level",
            ),
            "pcm",
            8000,
        ),
        (
            start(
                "Your balance is twelve dollars.",
                property="english_alvin_common",
                audio_format="ulaw",
            ),
            "ulaw",
            8000,
        ),
        (
            start(
                "Press one for sales, two for support.",
                property="chinese_xiaoyu_common",
                audio_format="mp3",
                sample_rate="16000",
            ),
            "mp3",
            16000,
        ),
        (
            start("Goodbye!", property="english_dh_female", speed=200, pitch=-100, volume=80),
            "pcm",
            8000,
        ),
    ]
    expected = [await exchange(gateway.url(), payload) for payload, _, _ in requests]
    results = await asyncio.gather(
        *(exchange(gateway.url(), requests[i % 5][0]) for i in range(50))
    )
    for i, seen in enumerate(results):
        reference = expected[i % 5]
        _, audio_format, rate = requests[i % 5]
        assert seen.kinds == reference.kinds and "ERROR" not in seen.kinds, f"session {i}"
        assert (
            abs(duration(seen, audio_format, rate) / duration(reference, audio_format, rate) - 1)
            < 0.05
        ), f"session {i}"
        assert [w["text"] for w in seen.words()] == [w["text"] for w in reference.words()]
        assert len({m["trace_id"] for m in seen.messages}) == 1
    assert len({r.messages[0]["trace_id"] for r in results}) == 50
    await asyncio.wait_for(gateway.engine.wait_idle(), 5)


@pytest.mark.parametrize("path", ["//[", "//x:y/v1/p/rtts", "/v1/p/rtts#frag", "/%zz"])
async def test_request_targets_that_are_not_urls_get_404(
    gateway: RunningGateway, path: str
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    status = await reader.readline()
    writer.close()
    assert status.startswith(b"HTTP/1.1 404"), status


async def test_engine_connections_are_logged_at_debug_only(
    gateway: RunningGateway, caplog: pytest.LogCaptureFixture
) -> None:
    # Every relayed session and every readiness check opens a connection to the internal
    # engine; an idle gateway at INFO must not log each one.
    caplog.set_level(logging.DEBUG, logger="gateway.engine.websockets")
    await exchange(gateway.url(), start("Quiet.", property="english_amy_common"))
    ready, _ = await gateway.gateway.readiness()
    assert ready
    chatter = [r for r in caplog.records if r.name == "gateway.engine.websockets"]
    assert {"connection open", "connection closed"} <= {r.getMessage() for r in chatter}
    assert all(r.levelno == logging.DEBUG for r in chatter), [
        (r.levelname, r.getMessage()) for r in chatter
    ]
