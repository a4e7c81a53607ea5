"""What the caller heard: the LLM context gets the text whose audio arrived, and no more.

pipecat writes a TTS service's ``TTSTextFrame`` text marked ``append_to_context`` into the
assistant's context. Left alone it also does so for text that was never spoken: without word
timestamps the whole sentence follows its ``run_tts`` whatever happened, and with them the
sequencer force-completes every word still missing when the audio context ends. So a failed or
cut utterance would leave the LLM believing it said what the caller never heard.

Three pieces, each small and mostly pure:

- :class:`Utterance` is one ``run_tts`` call: its text, how much of it was heard (the pieces
  whose END arrived, plus the words whose audio arrived) and how it ended.
- :class:`WordGate` holds one connection's word timings back until the audio they cover has
  arrived, so pipecat never receives a word the caller did not hear.
- :class:`HeardLedger` sees every frame the service pushes, in order, and lets a
  ``TTSTextFrame`` through only as far as its utterance was heard. :class:`UtteranceMark`
  frames, yielded by ``run_tts`` into the audio context, tell it where each utterance starts
  and ends in that order.

Heard is measured in letters and digits (``str.isalnum``), so punctuation, spacing and the
way a provider splits words do not matter.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from loguru import logger
from pipecat.frames.frames import (
    AggregatedTextFrame,
    AggregatedTextProgressFrame,
    ControlFrame,
    Frame,
    TTSTextFrame,
)

from rtts_plugin.protocol.messages import WordTiming

# Word end times are whole milliseconds; the audio is counted in samples.
_ROUNDING_MS = 1.0
# Segments remembered for late force-completed text; a turn has far fewer.
_MAX_SEGMENTS = 256
# Longest quote of unspoken text in an error message.
_QUOTE_CHARS = 160


def spoken_chars(text: str) -> int:
    """The letters and digits of ``text``: what "how much was heard" is counted in."""
    return sum(1 for ch in text if ch.isalnum())


def split_heard(text: str, chars: int) -> tuple[str, str]:
    """``text`` cut after its first ``chars`` letters and digits, the word's punctuation kept.

    Returns:
        The heard part and the rest, both stripped.
    """
    if chars <= 0:
        return "", text.strip()
    count = 0
    end = len(text)
    for index, ch in enumerate(text):
        if ch.isalnum():
            count += 1
            if count == chars:
                end = index + 1
                break
    # Punctuation closing the last heard word ("Monday.") belongs to it.
    while end < len(text) and not text[end].isspace() and not text[end].isalnum():
        end += 1
    return text[:end].strip(), text[end:].strip()


def _quote(text: str) -> str:
    text = " ".join(text.split())
    if len(text) > _QUOTE_CHARS:
        text = text[: _QUOTE_CHARS - 1].rstrip() + "…"
    return f"[{text}]"


class Outcome(enum.Enum):
    """How an utterance ended."""

    SPEAKING = "speaking"  # still in run_tts (or cancelled by an interruption)
    SPOKEN = "spoken"  # every piece reached END: all of it was heard
    CUT = "cut"  # failed after some audio
    SILENT = "silent"  # failed before any audio


class Utterance:
    """One ``run_tts`` call: its text and how much of it the caller heard.

    Args:
        text: The text handed to the TTS (split into pieces over the voice's limit).
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.outcome = Outcome.SPEAKING
        self._done_chars = 0  # letters and digits of the pieces whose END arrived
        self._done_seconds = 0.0
        self._gate: WordGate | None = None

    def connection(self) -> WordGate:
        """The word gate of the next connection (a new piece, or a retry of one)."""
        self._gate = WordGate()
        return self._gate

    def piece_spoken(self, piece: str) -> None:
        """The connection speaking ``piece`` reached END: all of ``piece`` was heard."""
        self._done_chars += spoken_chars(piece)
        if self._gate is not None:
            self._done_seconds += self._gate.seconds
        self._gate = None

    @property
    def heard_chars(self) -> int:
        """Letters and digits heard: whole pieces, then the words whose audio arrived."""
        return self._done_chars + (self._gate.heard_chars if self._gate else 0)

    @property
    def audio_seconds(self) -> float:
        """Audio that arrived for this utterance, in seconds."""
        return self._done_seconds + (self._gate.seconds if self._gate else 0.0)

    def finished(self, ok: bool) -> None:
        """Record how ``run_tts`` ended."""
        if ok:
            self.outcome = Outcome.SPOKEN
        else:
            self.outcome = Outcome.CUT if self.audio_seconds > 0 else Outcome.SILENT

    def loss(self) -> str:
        """What the caller did not hear, for the ``ErrorFrame`` of a failed utterance."""
        heard, unheard = split_heard(self.text, self.heard_chars)
        if self.outcome is Outcome.SILENT or not self.audio_seconds:
            return f"nothing of {_quote(self.text)} was spoken; none of it enters the LLM context"
        if not heard:
            return (
                f"the caller heard only {self.audio_seconds:.2f} s of {_quote(self.text)}; "
                "none of it enters the LLM context"
            )
        if not unheard:
            return (
                f"the caller heard all of {_quote(self.text)} ({self.audio_seconds:.2f} s of "
                "audio) before the failure; it enters the LLM context"
            )
        return (
            f"the caller heard {_quote(heard)} ({self.audio_seconds:.2f} s of audio); "
            f"{_quote(unheard)} was not spoken and does not enter the LLM context"
        )


class WordGate:
    """One connection's word timings, handed on only once the audio they cover has arrived.

    A word is heard when its audio, and all audio before it, has arrived: its ``end_time`` is
    within the audio received. Words are released in the order the server sent them.
    """

    def __init__(self) -> None:
        self._pending: list[WordTiming] = []
        self.seconds = 0.0
        self.heard_chars = 0

    def offer(self, words: Sequence[WordTiming]) -> list[WordTiming]:
        """Words from a RESULT message; returns those whose audio has already arrived."""
        self._pending.extend(word for word in words if word.text.strip())
        return self._release()

    def audio(self, seconds: float) -> list[WordTiming]:
        """The connection's audio now totals ``seconds``; returns the words it completes."""
        self.seconds = seconds
        return self._release()

    def finish(self) -> list[WordTiming]:
        """END arrived, so every word was spoken: returns those still held."""
        released, self._pending = self._pending, []
        self.heard_chars += sum(spoken_chars(word.text) for word in released)
        return released

    def _release(self) -> list[WordTiming]:
        heard_ms = self.seconds * 1000 + _ROUNDING_MS
        count = 0
        while (
            self.seconds > 0
            and count < len(self._pending)
            and self._pending[count].end_time <= heard_ms
        ):
            count += 1
        released, self._pending = self._pending[:count], self._pending[count:]
        self.heard_chars += sum(spoken_chars(word.text) for word in released)
        return released


@dataclass(kw_only=True)
class UtteranceMark(ControlFrame):
    """Where an utterance starts or ends among the service's frames; never leaves the service.

    Parameters:
        utterance: The utterance.
        context_id: Its audio context.
        end: False at its start, True at its end.
    """

    utterance: Utterance
    context_id: str
    end: bool = False


@dataclass
class _Segment:
    """One spoken text segment (``AggregatedTextFrame``) and the utterance that spoke it."""

    context_id: str
    utterance: Utterance | None = None
    ended: bool = False
    admitted_chars: int = 0
    held: list[TTSTextFrame | AggregatedTextProgressFrame] = field(default_factory=list)


class HeardLedger:
    """Lets ``TTSTextFrame`` text reach the context only as far as its utterance was heard.

    Fed every frame the service pushes downstream, in order (:meth:`route`). In sentence
    aggregation a spoken segment is announced (``AggregatedTextFrame`` with
    ``will_be_spoken``) just before its utterance's start mark; its text frames are then
    admitted while the letters they carry fit within what was heard, held while more may yet
    arrive, and at the utterance's end released in full (spoken) or cut to what was heard
    (failed). A segment announced but never synthesized (the service was no longer usable)
    gets nothing. With token streaming, text is grouped into sentences only after it was
    synthesized, so there the rule is per context: nothing more of a context enters once one
    of its utterances failed.

    Args:
        streaming: Whether the service streams tokens (``TextAggregationMode.TOKEN``).
    """

    def __init__(self, streaming: bool = False) -> None:
        self._streaming = streaming
        self._segments: OrderedDict[int, _Segment] = OrderedDict()
        self._announced: dict[str, int] = {}  # context -> segment awaiting its start mark
        self._context_started: set[str] = set()
        self._context_failed: set[str] = set()
        # The text frame just dropped or held: the progress frame after it shares its fate.
        self._withheld: TTSTextFrame | None = None

    def route(self, frame: Frame) -> list[Frame]:
        """The frames to push in place of ``frame`` (none, it, or it with held ones)."""
        withheld, self._withheld = self._withheld, None
        if isinstance(frame, UtteranceMark):
            return list(self._mark(frame))
        if (
            isinstance(frame, AggregatedTextProgressFrame)
            and withheld is not None
            and frame.segment_id == withheld.segment_id
        ):
            segment = self._segments.get(frame.segment_id)
            if segment is not None and segment.held:
                segment.held.append(frame)  # pushed only if its text is
            return []
        if isinstance(frame, TTSTextFrame):
            if not frame.append_to_context:
                return [frame]
            admitted = self._admit(frame)
            if admitted is None:
                self._withheld = frame
            return [admitted] if admitted is not None else []
        if isinstance(frame, AggregatedTextFrame) and frame.will_be_spoken and frame.context_id:
            self._announce(frame.id, frame.context_id)
        return [frame]

    def interrupted(self, surviving_contexts: set[str]) -> None:
        """Forget the contexts an interruption dropped; their text follows pipecat's rule."""
        for segment_id, segment in list(self._segments.items()):
            if segment.context_id not in surviving_contexts:
                del self._segments[segment_id]
        for context_id in list(self._announced):
            if context_id not in surviving_contexts:
                del self._announced[context_id]
        self._context_started &= surviving_contexts
        self._context_failed &= surviving_contexts

    # -- internals -------------------------------------------------------------------------

    def _announce(self, segment_id: int, context_id: str) -> None:
        if self._streaming:
            return  # announced after synthesis; the per-context rule applies
        self._segments[segment_id] = _Segment(context_id)
        self._announced[context_id] = segment_id
        while len(self._segments) > _MAX_SEGMENTS:
            self._segments.popitem(last=False)

    def _mark(self, mark: UtteranceMark) -> list[Frame]:
        utterance = mark.utterance
        if self._streaming:
            self._context_started.add(mark.context_id)
            if mark.end and utterance.outcome is not Outcome.SPOKEN:
                self._context_failed.add(mark.context_id)
            return []
        if not mark.end:
            segment_id = self._announced.pop(mark.context_id, None)
            segment = self._segments.get(segment_id) if segment_id is not None else None
            if segment is not None:
                segment.utterance = utterance
            return []
        segment = next((s for s in self._segments.values() if s.utterance is utterance), None)
        if segment is None:
            return []
        segment.ended = True
        held, segment.held = segment.held, []
        if utterance.outcome is Outcome.SPOKEN:
            return list(held)
        released: list[Frame] = []
        for frame in held:
            if isinstance(frame, TTSTextFrame):
                admitted = self._take(frame, segment)
                if admitted is not None:
                    released.append(admitted)
        return released

    def _admit(self, frame: TTSTextFrame) -> TTSTextFrame | None:
        if self._streaming:
            context_id = frame.context_id or ""
            if context_id in self._context_started and context_id not in self._context_failed:
                return frame
            logger.debug(f"not adding unheard text to the LLM context: {frame.text!r}")
            return None
        segment = self._segments.get(frame.segment_id) if frame.segment_id is not None else None
        if segment is None:
            return frame  # not text of a segment this service spoke
        if segment.utterance is None:
            logger.debug(f"not adding unsynthesized text to the LLM context: {frame.text!r}")
            return None
        if segment.held:
            segment.held.append(frame)  # keep the order of the words
            return None
        return self._take(frame, segment)

    def _take(self, frame: TTSTextFrame, segment: _Segment) -> TTSTextFrame | None:
        utterance = segment.utterance
        assert utterance is not None
        if utterance.outcome is Outcome.SPOKEN:
            return frame
        chars = spoken_chars(frame.text)
        budget = utterance.heard_chars - segment.admitted_chars
        if chars <= budget:
            segment.admitted_chars += chars
            return frame
        if not segment.ended:
            segment.held.append(frame)  # its audio may still arrive
            return None
        return self._cut(frame, segment, budget)

    def _cut(self, frame: TTSTextFrame, segment: _Segment, budget: int) -> TTSTextFrame | None:
        """The heard start of ``frame``, if it is the text the utterance was at; else None."""
        utterance = segment.utterance
        assert utterance is not None
        letters = [ch for ch in frame.text if ch.isalnum()]
        expected = [ch for ch in utterance.text if ch.isalnum()]
        start = segment.admitted_chars
        consistent = letters == expected[start : start + len(letters)]
        heard, unheard = split_heard(frame.text, budget) if consistent else ("", frame.text)
        if unheard:
            logger.debug(f"not adding unheard text to the LLM context: {unheard!r}")
        if not heard:
            return None
        segment.admitted_chars += spoken_chars(heard)
        frame.text = heard
        if frame.raw_text is not None:
            frame.raw_text = heard  # the original's tags no longer match a cut text
        return frame
