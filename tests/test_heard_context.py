"""The LLM context holds what the caller heard, also when synthesis fails or is cut.

Real pipecat pipelines (HuaweiRTTSService → recorder → LLMAssistantAggregator on an
LLMContext) fed an LLM-style reply, against the local engine through the gateway (success)
and the in-process fake cloud, directly and through the gateway (scripted failures). After
each failure kind the context's last assistant message is compared with the text whose audio
reached the output: each sentence's audio is a tone of its own, so the output is split back
into sentences by its bytes.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
from pipecat.frames.frames import (
    AggregatedTextProgressFrame,
    ErrorFrame,
    Frame,
    InterruptionFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    TTSAudioRawFrame,
    TTSSpeakFrame,
    TTSStartedFrame,
    TTSTextFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import LLMAssistantAggregator
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.services.tts_service import TextAggregationMode
from pipecat.tests.utils import SleepFrame, run_test
from websockets.asyncio.server import ServerConnection

from gateway.server import RunningGateway, run_gateway
from gateway.settings import GatewaySettings
from rtts_plugin import HuaweiRTTSService
from rtts_plugin.config import HuaweiRTTSConnection
from rtts_plugin.errors import RttsError
from rtts_plugin.heard import Outcome, Utterance, WordGate, split_heard
from rtts_plugin.protocol.messages import WordTiming
from tests.fakes import Behaviour, ConnectionLog, FakeCloud, fail, speak, tone_pcm

RATE = 16000
MS_PER_WORD = 150
FIRST = "The invoice was paid on Monday."
CUT = "Please hold while I check the last three payments on your account right now."
LAST = "Anything else?"
QUESTION = {"role": "user", "content": "What is my balance?"}


# -- the conversation -------------------------------------------------------------------------


class Recorder(FrameProcessor):
    """Passes every frame on and keeps the downstream ones: what the aggregator is given."""

    def __init__(self) -> None:
        super().__init__()
        self.frames: list[Frame] = []
        self.times: list[int] = []  # the pipeline clock as each frame passed (ns)

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if direction is FrameDirection.DOWNSTREAM:
            self.frames.append(frame)
            self.times.append(self.get_clock().get_time())
        await self.push_frame(frame, direction)


def reply(*sentences: str) -> list[Frame]:
    """An LLM reply as an LLM streams it: start, one token per word, end."""
    tokens = re.findall(r"\s*\S+", " ".join(sentences))
    return [
        LLMFullResponseStartFrame(),
        *[LLMTextFrame(token) for token in tokens],
        LLMFullResponseEndFrame(),
    ]


class Conversation:
    """One run: the context afterwards, what reached the output, the service's errors."""

    def __init__(self, context: LLMContext, recorder: Recorder, up: list[Frame]) -> None:
        self.context = context
        self.frames = recorder.frames
        self.times = recorder.times
        self.errors = [
            f for f in up if isinstance(f, ErrorFrame) and isinstance(f.exception, RttsError)
        ]

    @property
    def said(self) -> str | None:
        """The last assistant message, or None if the reply added none."""
        last = self.context.get_messages()[-1]
        return str(last["content"]) if last["role"] == "assistant" else None

    @property
    def audio(self) -> bytes:
        return b"".join(f.audio for f in self.frames if isinstance(f, TTSAudioRawFrame))


async def converse(tts: HuaweiRTTSService, frames: list[Frame]) -> Conversation:
    context = LLMContext(messages=[QUESTION])
    recorder = Recorder()
    _, up = await run_test(
        Pipeline([tts, recorder, LLMAssistantAggregator(context)]), frames_to_send=frames
    )
    return Conversation(context, recorder, list(up))


def words(text: str) -> list[str]:
    return text.split()


# -- the scripted cloud -----------------------------------------------------------------------


def timings(sentence: str) -> list[dict[str, object]]:
    """RESULT items: one word every 150 ms, each ending 10 ms before the next starts."""
    return [
        {
            "start_time": i * MS_PER_WORD,
            "end_time": (i + 1) * MS_PER_WORD - 10,
            "text": word,
            "word_index": i,
        }
        for i, word in enumerate(words(sentence))
    ]


def audio_for(sentence: str, hz: float) -> bytes:
    """The sentence's audio: 150 ms per word, a tone of its own so the output can be split."""
    return tone_pcm(len(words(sentence)) * MS_PER_WORD / 1000, RATE, hz)


MOMENT = "One moment."
AUDIO = {
    FIRST: audio_for(FIRST, 220),
    CUT: audio_for(CUT, 330),
    LAST: audio_for(LAST, 440),
    MOMENT: audio_for(MOMENT, 550),
}

Ending = Callable[[ServerConnection, ConnectionLog], Awaitable[None]]


async def end_normally(ws: ServerConnection, log: ConnectionLog) -> None:
    await ws.send(json.dumps({"resp_type": "END", "trace_id": log.trace_id, "reason": "NORMAL"}))


async def close(ws: ServerConnection, log: ConnectionLog) -> None:
    return None  # the handler returns: the server closes (1000) without END


async def error(ws: ServerConnection, log: ConnectionLog) -> None:
    await ws.send(
        json.dumps(
            {
                "resp_type": "ERROR",
                "trace_id": log.trace_id,
                "error_code": "SIS.0413",
                "error_msg": "tts internal error",
            }
        )
    )


async def fatal(ws: ServerConnection, log: ConnectionLog) -> None:
    await ws.send(
        json.dumps(
            {
                "resp_type": "FATAL_ERROR",
                "trace_id": log.trace_id,
                "error_code": "SIS.0304",
                "error_msg": "wait voice timeout",
            }
        )
    )


async def stall(ws: ServerConnection, log: ConnectionLog) -> None:
    await ws.wait_closed()  # silence until the client's gap timeout gives up


def utterance(
    sentence: str,
    *,
    seconds: float | None = None,
    ending: Ending = end_normally,
    upfront: bool = True,
    pace: float = 0.0,
) -> Behaviour:
    """START, ``seconds`` of the sentence's audio in 100 ms frames, RESULT, then ``ending``.

    With ``upfront`` every word's timing comes before the audio (the harshest case: the
    plugin knows all 14 words before it has heard one); otherwise each frame is followed by
    the timings of the words it completed, as the engine does. Timings only when asked for.
    """
    audio = AUDIO[sentence]
    if seconds is not None:
        audio = audio[: int(seconds * RATE) * 2]
    items = timings(sentence)

    async def behaviour(ws: ServerConnection, log: ConnectionLog) -> None:
        timed = (log.start or {}).get("config", {}).get("subtitle") is not None  # type: ignore[union-attr]
        result = {"resp_type": "RESULT", "trace_id": log.trace_id}
        await ws.send(json.dumps({"resp_type": "START", "trace_id": log.trace_id}))
        if timed and upfront:
            await ws.send(json.dumps({**result, "result": items}))
        sent_ms = 0.0
        pending = list(items)
        step = RATE // 10 * 2
        for offset in range(0, len(audio), step):
            chunk = audio[offset : offset + step]
            await ws.send(chunk)
            log.frames_sent += 1
            sent_ms += len(chunk) / 2 / RATE * 1000
            done = [w for w in pending if int(w["end_time"]) <= sent_ms]  # type: ignore[call-overload]
            pending = pending[len(done) :]
            if timed and not upfront and done:
                await ws.send(json.dumps({**result, "result": done}))
            if pace:
                await asyncio.sleep(pace)
        if timed and not upfront and pending and ending is end_normally:
            await ws.send(json.dumps({**result, "result": pending}))
        await ending(ws, log)

    return behaviour


def make(
    cloud: FakeCloud | str,
    word_timestamps: bool,
    voice: str = "chinese_huaxiaomei_common",
    **kwargs: object,
) -> HuaweiRTTSService:
    """The service on the fake cloud (or a URL); short timeouts so failures come quickly."""
    return HuaweiRTTSService(
        connection=HuaweiRTTSConnection(
            url=cloud if isinstance(cloud, str) else cloud.url,
            retry_backoff=0.01,
            start_timeout=2.0,
            gap_timeout=0.8,
        ),
        settings=HuaweiRTTSService.Settings(voice=voice),
        word_timestamps=word_timestamps,
        sample_rate=RATE,
        stop_frame_timeout_s=0.3,
        **kwargs,  # type: ignore[arg-type]
    )


def heard_of(conversation: Conversation) -> bytes:
    """The part of CUT's audio that reached the output (between FIRST's and LAST's audio)."""
    audio = conversation.audio
    assert audio.startswith(AUDIO[FIRST]) and audio.endswith(AUDIO[LAST])
    middle = audio[len(AUDIO[FIRST]) : len(audio) - len(AUDIO[LAST])]
    assert AUDIO[CUT].startswith(middle)  # a prefix of what the cloud sent, nothing else
    return middle


def words_within(sentence: str, audio: bytes) -> list[str]:
    """The sentence's words whose audio is complete in ``audio`` (by the scripted timings)."""
    heard_ms = len(audio) / 2 / RATE * 1000
    return [str(w["text"]) for w in timings(sentence) if int(w["end_time"]) <= heard_ms]  # type: ignore[call-overload]


def mistimed(conversation: Conversation) -> list[str]:
    """Word frames whose time is not when their audio starts playing, as pipecat plays it.

    pipecat times a word from the first audio of its context's playback (a TTSStartedFrame
    starts one), or from the previous word if that is later: the word must come exactly as
    much later as the audio before it in that playback lasts. Each sentence's audio is found
    there by its tone.
    """
    wrong: list[str] = []
    playback, baseline, last_word = b"", 0, 0
    for frame, time in zip(conversation.frames, conversation.times, strict=True):
        if isinstance(frame, TTSStartedFrame):
            playback, baseline = b"", 0
        elif isinstance(frame, TTSAudioRawFrame):
            baseline = baseline or max(time, last_word)
            playback += frame.audio
        elif isinstance(frame, TTSTextFrame) and frame.text.strip():
            heard_at = [
                (playback.find(audio[:3200]) / 2 / RATE + index * MS_PER_WORD / 1000)
                for sentence, audio in AUDIO.items()
                for index, word in enumerate(words(sentence))
                if word == frame.text and playback.find(audio[:3200]) >= 0
            ]
            timed = (frame.pts - baseline) / 1e9 if frame.pts else None
            if timed is None or not any(abs(timed - at) < 0.05 for at in heard_at):
                wrong.append(f"{frame.text} at {timed} s, its audio at {heard_at} s")
            last_word = frame.pts or last_word
    return wrong


# -- failures ---------------------------------------------------------------------------------

FAILURES = {
    # A transient error: the reply goes on with its next sentence. (SIS.0411, a bad voice, is
    # permanent: it writes the service off, so nothing after it would be spoken.)
    "error-before-audio": fail("ERROR", "SIS.0413", "tts internal error"),
    # START, the words' timings when asked, END: a sentence the caller never heard.
    "end-without-audio": utterance(CUT, seconds=0),
    "close-mid-audio": utterance(CUT, seconds=0.5, ending=close),
    "close-mid-audio-interleaved": utterance(CUT, seconds=0.5, ending=close, upfront=False),
    "timeout-mid-audio": utterance(CUT, seconds=0.5, ending=stall),
    "error-mid-audio": utterance(CUT, seconds=0.5, ending=error),
    "fatal-error-mid-audio": utterance(CUT, seconds=0.5, ending=fatal),
}


@asynccontextmanager
async def relayed(cloud: FakeCloud, via_gateway: bool) -> AsyncIterator[str]:
    """The URL the plugin uses: the fake cloud, or a gateway relaying to it."""
    if not via_gateway:
        yield cloud.url
        return
    settings = GatewaySettings(
        port=0,
        metrics_port=0,
        backend="huawei",
        upstream_url=cloud.url.split("/v1/")[0],
        token="a-token",
        drain_timeout=1,
    )
    async with run_gateway(settings) as front:
        yield front.url("0123456789abcdef")


@pytest.mark.parametrize("via_gateway", [False, True], ids=["direct", "gateway"])
@pytest.mark.parametrize("word_timestamps", [True, False], ids=["timed", "untimed"])
@pytest.mark.parametrize("failure", list(FAILURES))
async def test_context_holds_exactly_what_reached_the_output(
    failure: str, word_timestamps: bool, via_gateway: bool
) -> None:
    async with FakeCloud().running() as cloud, relayed(cloud, via_gateway) as url:
        cloud.then(utterance(FIRST), FAILURES[failure], utterance(LAST))
        conversation = await converse(make(url, word_timestamps), reply(FIRST, CUT, LAST))

    heard = heard_of(conversation)
    cut_words = words_within(CUT, heard)
    silent = failure in ("error-before-audio", "end-without-audio")
    if silent:
        assert heard == b""
    else:
        assert len(heard) == RATE  # 0.5 s of 16-bit audio got out, then the failure
        assert cut_words == ["Please", "hold", "while"]
    # Timed: the cut sentence's words whose audio arrived. Untimed: the cut sentence is left
    # out (its audio did not fully arrive). The sentences around it are there in full.
    expected = [*words(FIRST), *(cut_words if word_timestamps else []), *words(LAST)]
    assert conversation.said is not None
    assert words(conversation.said) == expected
    # Transcripts and word highlighting see no more than the context does.
    shown = [f.text for f in conversation.frames if isinstance(f, TTSTextFrame)]
    assert words(" ".join(shown)) == expected
    if word_timestamps:  # LAST's words follow the cut audio too, as the caller hears them
        assert mistimed(conversation) == []
    progress = [
        words(f.accumulated_text)
        for f in conversation.frames
        if isinstance(f, AggregatedTextProgressFrame) and f.text == CUT
    ]
    assert all(p == cut_words[: len(p)] for p in progress)

    (error_frame,) = conversation.errors
    if silent:
        assert f"nothing of [{CUT}] was spoken" in error_frame.error
    elif word_timestamps:
        assert "the caller heard [Please hold while] (0.50 s of audio)" in error_frame.error
        assert "[I check the last three payments on your account right now.]" in error_frame.error
    else:
        assert f"the caller heard only 0.50 s of [{CUT}]" in error_frame.error


@pytest.mark.parametrize("word_timestamps", [True, False], ids=["timed", "untimed"])
async def test_a_reply_that_produced_no_audio_adds_nothing_to_the_context(
    word_timestamps: bool,
) -> None:
    async with FakeCloud(  # transient: each sentence is tried, and each fails
        default=fail("ERROR", "SIS.0413", "tts internal error")
    ).running() as cloud:
        conversation = await converse(
            make(cloud, word_timestamps),
            reply("The invoice was paid on Monday.", "Your balance is zero dollars."),
        )
    assert conversation.audio == b""
    assert conversation.said is None
    assert conversation.context.get_messages() == [QUESTION]
    assert [e.error.partition("; ")[2] for e in conversation.errors] == [
        "nothing of [The invoice was paid on Monday.] was spoken; none of it enters the LLM context",
        "nothing of [Your balance is zero dollars.] was spoken; none of it enters the LLM context",
    ]
    assert not any(isinstance(f, TTSTextFrame) for f in conversation.frames)


@pytest.mark.parametrize("word_timestamps", [True, False], ids=["timed", "untimed"])
async def test_text_of_a_service_no_longer_usable_is_not_added(word_timestamps: bool) -> None:
    """After it is written off, the service speaks nothing, and nothing enters the context."""
    async with FakeCloud(
        default=fail("ERROR", "SIS.0411", "the property is invalid")
    ).running() as cloud:
        tts = make(cloud, word_timestamps, max_consecutive_zero_audio_contexts=1)
        conversation = await converse(tts, [*reply(FIRST), SleepFrame(0.5), *reply(LAST)])
        connections = len(cloud.connections)
    assert not tts.is_usable
    assert connections == 1  # the second reply was never synthesized
    assert conversation.said is None


async def test_long_text_keeps_the_pieces_spoken_before_the_cut() -> None:
    """Without timings, the pieces (over the voice's limit) whose END arrived are kept."""
    first_piece = " ".join(["The invoice was paid on Monday."] * 15)  # 465 characters
    second_piece = "Your balance is zero dollars."
    async with FakeCloud().running() as cloud:
        cloud.then(
            utterance(FIRST),  # any complete audio will do for the first piece
            utterance(CUT, seconds=0.5, ending=close),
        )
        conversation = await converse(
            make(cloud, False, voice="chinese_xiaoqi_common"),
            [TTSSpeakFrame(f"{first_piece} {second_piece}")],
        )
        pieces = [str((c.start or {}).get("text")) for c in cloud.connections]  # type: ignore[union-attr]
    assert pieces == [first_piece, second_piece]
    assert conversation.said == first_piece
    (error_frame,) = conversation.errors
    assert f"[{second_piece}] was not spoken" in error_frame.error


@pytest.mark.parametrize("word_timestamps", [True, False], ids=["timed", "untimed"])
async def test_token_streaming_stops_adding_at_the_first_failed_utterance(
    word_timestamps: bool,
) -> None:
    """Streaming tokens, sentences are formed after synthesis: the per-context rule applies."""
    tokens = ["Good", "morning.", "Your", "balance", "is", "zero."]
    script = [
        speak(
            tone_pcm(0.2, RATE),
            words=[{"start_time": 0, "end_time": 190, "text": token, "word_index": 0}],
        )
        for token in tokens
    ]
    script[3] = fail("ERROR", "SIS.0413", "tts internal error")  # "balance"; transient
    async with FakeCloud().running() as cloud:
        cloud.then(*script)
        tts = make(cloud, word_timestamps, text_aggregation_mode=TextAggregationMode.TOKEN)
        conversation = await converse(tts, reply("Good morning.", "Your balance is zero."))
        spoken = [str((c.start or {}).get("text")) for c in cloud.connections]  # type: ignore[union-attr]
    assert spoken == tokens  # one utterance per token; the failure did not stop the rest
    # "Your" was heard, but is dropped with the rest of the reply after the failure.
    assert conversation.said is not None
    if word_timestamps:
        # pipecat's token mode replays buffered words out of order (also without this plugin's
        # rule), so only which words entered is compared.
        assert sorted(words(conversation.said)) == ["Good", "morning."]
    else:
        assert conversation.said == "Good morning."
    (error_frame,) = conversation.errors
    assert "nothing of [balance] was spoken" in error_frame.error


async def test_words_after_another_context_are_timed_within_their_own_playback() -> None:
    """A TTSSpeakFrame inside a reply is spoken in a context of its own; the reply's next
    sentence is timed after the reply's earlier audio, not from 0 on top of it."""
    async with FakeCloud().running() as cloud:
        cloud.then(utterance(FIRST), utterance(MOMENT), utterance(LAST))
        frames = reply(FIRST, LAST)
        frames.insert(len(words(FIRST)) + 2, TTSSpeakFrame(MOMENT))  # after " Anything"
        conversation = await converse(make(cloud, True), frames)
    shown = [f.text for f in conversation.frames if isinstance(f, TTSTextFrame)]
    assert sorted(shown) == sorted([*words(FIRST), *words(MOMENT), *words(LAST)])
    assert mistimed(conversation) == []


async def test_words_after_a_quiet_context_are_timed_from_its_new_playback() -> None:
    """The LLM pauses longer than stop_frame_timeout_s between sentences: pipecat ends the
    context's playback and starts a new one for the next sentence, timed from 0 again."""
    async with FakeCloud().running() as cloud:
        cloud.then(utterance(FIRST), utterance(LAST))
        frames = reply(FIRST, LAST)
        frames.insert(len(words(FIRST)) + 2, SleepFrame(1.0))  # stop_frame_timeout_s is 0.3
        conversation = await converse(make(cloud, True), frames)
    assert sum(isinstance(f, TTSStartedFrame) for f in conversation.frames) == 2
    assert mistimed(conversation) == []
    assert conversation.said == f"{FIRST} {LAST}"


async def test_a_cut_utterance_pushes_all_the_audio_its_heard_words_cover() -> None:
    """Resampled (16 kHz from the cloud, 24 kHz out), the resampler holds the last few ms:
    on a cut they are pushed too, so the last word counted as heard is heard in full."""
    async with FakeCloud().running() as cloud:
        cloud.then(utterance(CUT, seconds=0.44, ending=close))  # "while" ends at 0.44 s
        tts = HuaweiRTTSService(
            connection=HuaweiRTTSConnection(url=cloud.url, gap_timeout=0.8),
            settings=HuaweiRTTSService.Settings(voice="chinese_huaxiaomei_common"),
            word_timestamps=True,
            sample_rate=24000,
            stop_frame_timeout_s=0.3,
        )
        conversation = await converse(tts, [TTSSpeakFrame(CUT)])
    assert conversation.said == "Please hold while"
    assert len(conversation.audio) / 2 / 24000 >= 0.44


async def test_word_timings_sent_unasked_do_not_add_the_text_twice() -> None:
    """Without word timestamps each sentence's text goes as a whole; a server that sends
    RESULT anyway (not asked: no subtitle in START) adds nothing to it."""
    async with FakeCloud().running() as cloud:
        cloud.then(*(speak(AUDIO[s], words=timings(s)) for s in (FIRST, LAST)))
        conversation = await converse(make(cloud, False), reply(FIRST, LAST))
        asked = [(c.start or {}).get("config", {}).get("subtitle") for c in cloud.connections]  # type: ignore[union-attr]
    assert asked == [None, None]
    assert conversation.said == f"{FIRST} {LAST}"
    shown = [f.text for f in conversation.frames if isinstance(f, TTSTextFrame)]
    assert shown == [FIRST, LAST]


# -- what stays as it was ---------------------------------------------------------------------


@pytest.mark.parametrize("word_timestamps", [True, False], ids=["timed", "untimed"])
async def test_interruption_keeps_the_words_heard_up_to_the_barge_in(
    word_timestamps: bool,
) -> None:
    async with FakeCloud().running() as cloud:
        cloud.then(utterance(FIRST), utterance(CUT, upfront=False, pace=0.1))
        frames = [*reply(FIRST, CUT), SleepFrame(1.2), InterruptionFrame()]
        conversation = await converse(make(cloud, word_timestamps), frames)

    cut = next(i for i, f in enumerate(conversation.frames) if isinstance(f, InterruptionFrame))
    before = conversation.frames[:cut]
    passed = words(" ".join(f.text for f in before if isinstance(f, TTSTextFrame)))
    assert conversation.said is not None
    # The aggregator commits what it had when the barge-in reached it (an InterruptionFrame
    # may overtake text still queued there): the text handed on before it, or less.
    assert words(conversation.said) == passed[: len(words(conversation.said))]
    assert not conversation.errors  # a barge-in is not a failure
    said = words(conversation.said)
    if word_timestamps:
        # The words pipecat was given up to the barge-in: more than the first sentence,
        # fewer than the whole reply, and each one's audio had reached the output.
        heard = b"".join(f.audio for f in before if isinstance(f, TTSAudioRawFrame))
        cut_heard = words_within(CUT, heard[len(AUDIO[FIRST]) :])
        assert said[: len(words(FIRST))] == words(FIRST)
        assert said[len(words(FIRST)) :] == cut_heard[: len(said) - len(words(FIRST))]
        assert len(words(FIRST)) < len(said) < len(words(FIRST)) + len(words(CUT))
    else:
        assert said == words(FIRST)  # sentence by sentence: the cut one is not there


# -- through the gateway to the local engine --------------------------------------------------


@pytest.mark.parametrize("word_timestamps", [True, False], ids=["timed", "untimed"])
async def test_a_reply_spoken_in_full_is_in_the_context_in_full(
    gateway: RunningGateway, word_timestamps: bool
) -> None:
    tts = HuaweiRTTSService(
        url=gateway.url("project-1"),
        settings=HuaweiRTTSService.Settings(voice="chinese_huaxiaomei_common"),
        word_timestamps=word_timestamps,
        sample_rate=RATE,
    )
    text = ("Welcome to the support line.", "Your balance is 42 dollars, due on Monday.")
    conversation = await converse(tts, reply(*text))
    records = [r for r in gateway.engine.history if r.request]
    assert len(conversation.audio) == sum(r.audio_bytes for r in records)
    assert conversation.said == " ".join(text)
    assert not conversation.errors


# -- the pure parts ---------------------------------------------------------------------------


def test_split_heard_cuts_after_whole_letters_and_keeps_the_word_punctuation() -> None:
    assert split_heard("The invoice was paid on Monday.", 0) == (
        "",
        "The invoice was paid on Monday.",
    )
    assert split_heard("The invoice was paid on Monday.", 10) == (
        "The invoice",
        "was paid on Monday.",
    )
    assert split_heard("paid on Monday. Your", 12) == ("paid on Monday.", "Your")
    assert split_heard("您好，世界", 2) == ("您好，", "世界")
    assert split_heard("short", 99) == ("short", "")


def test_word_gate_releases_words_only_once_their_audio_arrived() -> None:
    gate = WordGate()
    items = [WordTiming(start_time=i * 150, end_time=i * 150 + 140, text=f"w{i}") for i in range(4)]
    assert gate.offer([*items, WordTiming(start_time=600, end_time=600, text="")]) == []
    assert gate.audio(0.2) == items[:1]
    assert gate.audio(0.29) == items[1:2]  # 290 ms is w1's end: its audio is complete
    assert gate.audio(0.3) == []
    assert gate.heard_chars == 4
    assert gate.finish() == items[2:]  # END: the rest was spoken; the empty item is dropped
    assert gate.heard_chars == 8


def test_the_loss_names_what_was_and_was_not_heard() -> None:
    silent = Utterance("Your balance is zero dollars.")
    silent.connection()
    silent.finished(ok=False)
    assert silent.outcome is Outcome.SILENT
    assert silent.loss() == (
        "nothing of [Your balance is zero dollars.] was spoken; none of it enters the LLM context"
    )

    timed = Utterance("Your balance is zero dollars.")
    gate = timed.connection()
    gate.offer([WordTiming(start_time=0, end_time=300, text="Your")])
    gate.offer([WordTiming(start_time=300, end_time=700, text="balance")])
    gate.audio(0.5)
    timed.finished(ok=False)
    assert timed.outcome is Outcome.CUT and timed.heard_chars == 4
    assert timed.loss() == (
        "the caller heard [Your] (0.50 s of audio); [balance is zero dollars.] was not spoken "
        "and does not enter the LLM context"
    )

    untimed = Utterance("Your balance is zero dollars.")
    untimed.connection().audio(0.5)
    untimed.finished(ok=False)
    assert untimed.loss() == (
        "the caller heard only 0.50 s of [Your balance is zero dollars.]; "
        "none of it enters the LLM context"
    )

    whole = Utterance("Your balance")
    gate = whole.connection()
    gate.offer([WordTiming(start_time=0, end_time=300, text="Your balance")])
    gate.audio(0.4)
    whole.finished(ok=False)
    assert whole.loss().startswith("the caller heard all of [Your balance] (0.40 s of audio)")

    spoken = Utterance("Two pieces. Of text.")
    spoken.connection().audio(0.3)
    spoken.piece_spoken("Two pieces.")
    spoken.connection().audio(0.1)
    assert spoken.heard_chars == 9 and abs(spoken.audio_seconds - 0.4) < 1e-9
    spoken.finished(ok=False)
    assert "the caller heard [Two pieces.] (0.40 s of audio); [Of text.] was not spoken" in (
        spoken.loss()
    )
