"""Turning espeak-ng's word and phoneme marks into rtts RESULT word timings.

A word runs from its mark to the next word's mark or the first pause after it, whichever
comes first; a phoneme runs to the next phoneme or pause. Times are integer milliseconds
from the start of the whole output (``offset_ms`` is where this segment starts).
"""

from __future__ import annotations

import unicodedata

from gateway.engine.espeak import Mark
from rtts_plugin.protocol.messages import PhonemeTiming, WordTiming


def _word_text(text: str, start: int, end: int) -> str:
    """The word at ``text[start:end]``: up to the first space, without edge punctuation."""
    span = text[start:end].split(maxsplit=1)
    word = span[0] if span else ""
    punctuation = "".join(ch for ch in word if unicodedata.category(ch).startswith("P"))
    return word.strip(punctuation)  # strip() touches only the edges: "don't" stays whole


def word_timings(
    text: str, marks: list[Mark], sample_rate: int, offset_ms: float, *, phonemes: bool
) -> list[WordTiming]:
    """Build the RESULT items for one synthesized segment of ``text``.

    ``marks`` are in the order espeak reported them, with samples counted from the start of
    the segment.
    """

    def ms(sample: int) -> int:
        return round(offset_ms + sample * 1000 / sample_rate)

    word_marks = [m for m in marks if m.kind == "word"]
    last_sample = max((m.sample for m in marks), default=0)
    words: list[WordTiming] = []
    for index, mark in enumerate(word_marks):
        next_word = word_marks[index + 1] if index + 1 < len(word_marks) else None
        limit = next_word.sample if next_word else last_sample
        own = [
            m
            for m in marks
            if m.kind == "phoneme"
            and mark.sample <= m.sample <= limit
            and (m.text_position >= mark.text_position)
            and (next_word is None or m.text_position < next_word.text_position)
        ]
        pauses = [m.sample for m in own if m.phoneme.startswith("_")]
        end = min([limit, *[p for p in pauses if p > mark.sample]])
        spoken = [m for m in own if not m.phoneme.startswith("_") and m.sample < end]
        phoneme_items = (
            [
                PhonemeTiming(
                    phoneme=p.phoneme,
                    start_time=ms(p.sample),
                    end_time=ms(spoken[i + 1].sample if i + 1 < len(spoken) else end),
                    phoneme_index=i,
                )
                for i, p in enumerate(spoken)
            ]
            if phonemes
            else None
        )
        start_char = mark.text_position - 1
        end_char = next_word.text_position - 1 if next_word else len(text)
        words.append(
            WordTiming(
                start_time=ms(mark.sample),
                end_time=ms(end),
                text=_word_text(text, start_char, end_char),
                word_index=index,
                phonemes=phoneme_items,
            )
        )
    return words
