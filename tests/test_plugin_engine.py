"""HuaweiRTTSService in a pipecat pipeline, against the real local engine on loopback."""

from __future__ import annotations

import asyncio
import hashlib

import pytest
from loguru import logger
from pipecat.frames.frames import (
    CancelFrame,
    ErrorFrame,
    Frame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    MetricsFrame,
    TTSAudioRawFrame,
    TTSSpeakFrame,
    TTSTextFrame,
    TTSUpdateSettingsFrame,
)
from pipecat.metrics.metrics import TTFBMetricsData, TTSUsageMetricsData
from pipecat.pipeline.worker import PipelineParams
from pipecat.tests.utils import SleepFrame, run_test
from pipecat.utils.errors import ErrorCategory

from gateway.engine.session import SessionRecord
from gateway.server import RunningGateway
from rtts_plugin import HuaweiRTTSService
from rtts_plugin.config import HuaweiRTTSConnection
from rtts_plugin.errors import InvalidSettingsError

SENTENCE = "Hello caller. Your order has shipped and arrives tomorrow."


def service(
    gateway: RunningGateway, voice: str = "english_amy_common", **kwargs: object
) -> HuaweiRTTSService:
    return HuaweiRTTSService(
        url=gateway.url("project-1"),
        settings=HuaweiRTTSService.Settings(voice=voice),
        **kwargs,  # type: ignore[arg-type]
    )


def audio_of(frames: list[Frame]) -> bytes:
    return b"".join(f.audio for f in frames if isinstance(f, TTSAudioRawFrame))


def assert_same_audio(audio: bytes, records: list[SessionRecord]) -> None:
    """The audio is exactly the engine sessions' audio, one after the other."""
    assert len(audio) == sum(r.audio_bytes for r in records)
    position = 0
    for record in records:
        piece = audio[position : position + record.audio_bytes]
        assert hashlib.sha256(piece).hexdigest() == record.audio_sha256
        position += record.audio_bytes


def kinds(frames: list[Frame]) -> list[str]:
    """Frame type names with runs of audio collapsed to one 'Audio'."""
    names: list[str] = []
    for frame in frames:
        name = "Audio" if isinstance(frame, TTSAudioRawFrame) else type(frame).__name__
        if not (name == "Audio" and names and names[-1] == "Audio"):
            names.append(name)
    return names


async def test_speak_frame_gives_bracketed_audio_equal_to_what_the_engine_sent(
    gateway: RunningGateway,
) -> None:
    tts = service(gateway, sample_rate=16000)
    down, up = await run_test(tts, frames_to_send=[TTSSpeakFrame(SENTENCE)])
    names = kinds(down)
    assert names.index("TTSStartedFrame") < names.index("Audio") < names.index("TTSStoppedFrame")
    assert (
        names.count("TTSStartedFrame") == 1
        and names.count("TTSStoppedFrame") == 1
        and names.count("Audio") == 1
    )
    assert [f.text for f in down if isinstance(f, TTSTextFrame)] == [SENTENCE]
    assert not up
    (record,) = gateway.engine.history
    assert record.outcome == "normal" and record.request is not None
    assert record.request.text == SENTENCE and record.request.config.sample_rate == "16000"
    audio = audio_of(down)
    assert len(audio) == record.audio_bytes > 16000
    assert hashlib.sha256(audio).hexdigest() == record.audio_sha256  # nothing lost, nothing changed
    assert all(
        f.sample_rate == 16000 and f.num_channels == 1
        for f in down
        if isinstance(f, TTSAudioRawFrame)
    )


@pytest.mark.parametrize(
    ("pipeline_rate", "wire_rate"),
    [(8000, "8000"), (16000, "16000"), (24000, "16000"), (48000, "16000")],
)
async def test_pipeline_rate_decides_what_is_requested(
    gateway: RunningGateway, pipeline_rate: int, wire_rate: str
) -> None:
    tts = service(gateway, sample_rate=pipeline_rate)
    down, _ = await run_test(tts, frames_to_send=[TTSSpeakFrame(SENTENCE)])
    (record,) = gateway.engine.history
    assert record.request is not None and record.request.config.sample_rate == wire_rate
    frames = [f for f in down if isinstance(f, TTSAudioRawFrame)]
    assert {f.sample_rate for f in frames} == {pipeline_rate}
    wire_seconds = record.audio_bytes / 2 / int(wire_rate)
    out_seconds = len(audio_of(down)) / 2 / pipeline_rate
    assert abs(out_seconds - wire_seconds) < 0.01  # resampling kept the whole utterance


@pytest.mark.parametrize("wire_format", ["ulaw", "alaw"])
async def test_g711_on_the_wire_is_decoded_locally(
    gateway: RunningGateway, wire_format: str
) -> None:
    tts = HuaweiRTTSService(
        connection=HuaweiRTTSConnection(url=gateway.url(), wire_format=wire_format),
        settings=HuaweiRTTSService.Settings(voice="english_amy_common"),
        sample_rate=8000,
    )
    down, _ = await run_test(tts, frames_to_send=[TTSSpeakFrame(SENTENCE)])
    (record,) = gateway.engine.history
    assert record.request is not None and record.request.config.audio_format == wire_format
    assert len(audio_of(down)) == 2 * record.audio_bytes  # one byte per sample on the wire, two out


async def test_pcm_only_voice_falls_back_to_pcm(gateway: RunningGateway) -> None:
    tts = HuaweiRTTSService(
        connection=HuaweiRTTSConnection(url=gateway.url(), wire_format="ulaw"),
        settings=HuaweiRTTSService.Settings(voice="chinese_huaxiaomei_common"),
        sample_rate=8000,
    )
    down, up = await run_test(tts, frames_to_send=[TTSSpeakFrame("你好。")])
    (record,) = gateway.engine.history
    assert record.request is not None and record.request.config.audio_format == "pcm"
    assert len(audio_of(down)) == record.audio_bytes and not up


async def test_each_llm_sentence_is_one_connection_in_one_context(gateway: RunningGateway) -> None:
    tts = service(gateway, sample_rate=16000)
    down, _ = await run_test(
        tts,
        frames_to_send=[
            LLMFullResponseStartFrame(),
            LLMTextFrame("Good morning. "),
            LLMTextFrame("How can I help you today?"),
            LLMFullResponseEndFrame(),
        ],
    )
    records = list(gateway.engine.history)
    assert [r.request.text for r in records if r.request] == [
        "Good morning.",
        "How can I help you today?",
    ]
    assert kinds(down).count("TTSStartedFrame") == 1 and kinds(down).count("TTSStoppedFrame") == 1
    assert_same_audio(audio_of(down), records)
    contexts = {f.context_id for f in down if isinstance(f, TTSAudioRawFrame)}
    assert len(contexts) == 1


async def test_settings_update_applies_from_the_next_utterance(gateway: RunningGateway) -> None:
    tts = service(gateway)
    _, up = await run_test(
        tts,
        frames_to_send=[
            TTSSpeakFrame("First."),
            SleepFrame(0.2),
            TTSUpdateSettingsFrame(
                delta=HuaweiRTTSService.Settings(
                    voice="chinese_huaxiaomei_common", speed=200, pitch=-100, volume=80
                )
            ),
            TTSSpeakFrame("第二句。"),
        ],
    )
    first, second = (r.request for r in gateway.engine.history)
    assert first is not None and second is not None
    assert (first.config.voice, first.config.speed) == ("english_amy_common", 0)
    assert (
        second.config.voice,
        second.config.speed,
        second.config.pitch,
        second.config.volume,
    ) == (
        "chinese_huaxiaomei_common",
        200,
        -100,
        80,
    )
    assert tts._settings.language == "zh-CN"  # follows the voice
    assert not up


@pytest.mark.parametrize(
    ("delta", "fragments"),
    [
        (HuaweiRTTSService.Settings(speed=900), ["'speed'", "900", "-500 to 500"]),
        (HuaweiRTTSService.Settings(volume=-3), ["'volume'", "-3", "0 to 100"]),
        (
            HuaweiRTTSService.Settings(voice="chinese_huaxiaomai_common"),
            ["unknown voice", "did you mean chinese_huaxiaomei_common"],
        ),
    ],
)
async def test_invalid_settings_update_is_rejected_and_the_old_ones_stay(
    gateway: RunningGateway, delta: HuaweiRTTSService.Settings, fragments: list[str]
) -> None:
    tts = service(gateway)
    _, up = await run_test(
        tts,
        frames_to_send=[
            TTSUpdateSettingsFrame(delta=delta),
            SleepFrame(0.1),
            TTSSpeakFrame("Still fine."),
        ],
    )
    (error,) = [f for f in up if isinstance(f, ErrorFrame)]
    assert error.category is ErrorCategory.APPLICATION
    for fragment in fragments:
        assert fragment in error.error
    (record,) = gateway.engine.history
    assert record.request is not None and record.request.config.voice == "english_amy_common"
    assert record.request.config.speed == 0 and record.outcome == "normal"
    assert tts.is_usable


def test_invalid_settings_at_construction_raise(gateway: RunningGateway) -> None:
    with pytest.raises(
        InvalidSettingsError,
        match="'pitch' is invalid: got 501; expected an integer from -500 to 500",
    ):
        HuaweiRTTSService(url=gateway.url(), settings=HuaweiRTTSService.Settings(pitch=501))
    with pytest.raises(InvalidSettingsError, match="unknown setting"):
        HuaweiRTTSService(
            url=gateway.url(), settings=HuaweiRTTSService.Settings.from_mapping({"colour": "blue"})
        )


async def test_text_over_the_voice_limit_is_split_without_gap_or_duplicate(
    gateway: RunningGateway,
) -> None:
    sentences = [
        f"这是第{n}句话，用来测试长文本的切分。" for n in range(40)
    ]  # about 700 characters
    text = "".join(sentences)
    assert len(text) > 500
    tts = service(gateway, voice="chinese_xiaoyan_common", sample_rate=8000)
    down, up = await run_test(tts, frames_to_send=[TTSSpeakFrame(text)])
    records = [r for r in gateway.engine.history if r.request]
    assert len(records) == 2 and all(len(r.request.text) <= 500 for r in records)  # type: ignore[union-attr]
    assert "".join(r.request.text for r in records) == text  # type: ignore[union-attr]
    assert records[0].request.text.endswith("。")  # type: ignore[union-attr]  # cut at a sentence end
    assert_same_audio(audio_of(down), records)
    assert kinds(down).count("TTSStartedFrame") == 1 and not up


async def test_word_timestamps_follow_the_audio_across_sentences(gateway: RunningGateway) -> None:
    tts = service(
        gateway, voice="chinese_huaxiaomei_common", word_timestamps=True, sample_rate=16000
    )
    down, _ = await run_test(
        tts,
        frames_to_send=[
            LLMFullResponseStartFrame(),
            LLMTextFrame("Welcome to the support line. "),
            LLMTextFrame("Please hold while I connect you."),
            LLMFullResponseEndFrame(),
        ],
    )
    first, _ = (r for r in gateway.engine.history if r.request)
    assert first.request is not None and first.request.config.subtitle == "word_level"
    words = [f for f in down if isinstance(f, TTSTextFrame)]
    assert [w.text for w in words] == [
        "Welcome",
        "to",
        "the",
        "support",
        "line.",  # with its punctuation, as the cloud gives it
        "Please",
        "hold",
        "while",
        "I",
        "connect",
        "you.",
    ]
    pts = [w.pts or 0 for w in words]
    assert pts == sorted(pts) and len(set(pts)) == len(pts)
    # Sentence two's words are offset by sentence one's audio: seconds from the context's start.
    first_seconds = first.audio_bytes / 2 / 16000
    assert abs((pts[5] - pts[0]) / 1e9 - first_seconds) < 0.002
    assert (pts[-1] - pts[0]) / 1e9 < len(audio_of(down)) / 2 / 16000


async def test_without_word_timestamps_text_comes_per_sentence(gateway: RunningGateway) -> None:
    tts = service(gateway, voice="chinese_huaxiaomei_common")
    down, _ = await run_test(tts, frames_to_send=[TTSSpeakFrame("One sentence here.")])
    assert [f.text for f in down if isinstance(f, TTSTextFrame)] == ["One sentence here."]
    (record,) = gateway.engine.history
    assert record.request is not None and record.request.config.subtitle is None


async def test_word_timestamps_on_a_voice_without_subtitles_warn_once(
    gateway: RunningGateway,
) -> None:
    warnings: list[str] = []
    sink = logger.add(lambda m: warnings.append(m.record["message"]), level="WARNING")
    try:
        tts = service(gateway, voice="english_amy_common", word_timestamps=True)
        down, _ = await run_test(
            tts, frames_to_send=[TTSSpeakFrame("First one."), TTSSpeakFrame("Second one.")]
        )
    finally:
        logger.remove(sink)
    # The text still comes, per sentence, and the user is told why once, not per utterance.
    assert [f.text for f in down if isinstance(f, TTSTextFrame)] == ["First one.", "Second one."]
    about = [w for w in warnings if "has no subtitles" in w]
    assert about == [
        f"{tts}: voice english_amy_common has no subtitles: its text comes per sentence, "
        "without word timestamps"
    ]


async def test_ttfb_is_measured_for_every_utterance_and_characters_counted(
    gateway: RunningGateway,
) -> None:
    tts = service(gateway)
    down, _ = await run_test(
        tts,
        frames_to_send=[
            TTSSpeakFrame("First one."),
            SleepFrame(0.2),
            TTSSpeakFrame("And the second."),
        ],
        pipeline_params=PipelineParams(enable_metrics=True, enable_usage_metrics=True),
    )
    data = [d for f in down if isinstance(f, MetricsFrame) for d in f.data]
    ttfb = [d.value for d in data if isinstance(d, TTFBMetricsData) and d.value > 0]
    usage = [d.value for d in data if isinstance(d, TTSUsageMetricsData)]
    assert len(ttfb) == 2 and all(0 < v < 10 for v in ttfb)
    assert usage == [len("First one."), len("And the second.")]
    assert tts.can_generate_metrics()


async def test_prewarm_reuses_a_handshaken_connection_and_replaces_stale_ones(
    gateway: RunningGateway,
) -> None:
    tts = HuaweiRTTSService(
        connection=HuaweiRTTSConnection(url=gateway.url(), prewarm=True, prewarm_max_age=0.3),
        settings=HuaweiRTTSService.Settings(voice="english_amy_common"),
    )
    await run_test(
        tts,
        frames_to_send=[
            SleepFrame(0.1),
            TTSSpeakFrame("One."),
            SleepFrame(1.0),
            TTSSpeakFrame("Two."),
        ],
    )
    assert tts.prewarm_hits == 2  # both utterances skipped the handshake
    history = list(gateway.engine.history)
    spoken = [r for r in history if r.request]
    unused = [r for r in history if not r.request]
    assert len(spoken) == 2 and all(r.outcome == "normal" for r in spoken)
    assert len(unused) >= 2  # spares older than 0.3 s were closed and replaced
    assert all(r.outcome == "client_closed" for r in unused)
    await asyncio.wait_for(gateway.gateway.wait_idle(), 5)  # nothing left open after EndFrame
    await asyncio.wait_for(gateway.engine.wait_idle(), 5)


async def test_cancel_closes_the_spare_and_the_utterance_in_flight(gateway: RunningGateway) -> None:
    tts = HuaweiRTTSService(
        connection=HuaweiRTTSConnection(url=gateway.url(), prewarm=True),
        settings=HuaweiRTTSService.Settings(voice="english_amy_common"),
    )
    await run_test(
        tts,
        frames_to_send=[
            SleepFrame(0.1),
            TTSSpeakFrame(SENTENCE * 40),
            SleepFrame(0.05),
            CancelFrame(),
        ],
        send_end_frame=False,
    )
    await asyncio.wait_for(gateway.engine.wait_idle(), 5)
    assert gateway.engine.active_sessions == 0
    assert tts._spare is None
