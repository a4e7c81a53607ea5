"""Turning espeak-ng's word and phoneme marks into RESULT messages shaped like the cloud's.

Huawei's documentation (``docs/rtts-protocol.md`` §4) shows one item per Chinese character
and one per other word with its punctuation attached (``you.``), ``word_index`` counting
from 0 within each sentence, an empty closing item after each sentence's last word, and
times in integer milliseconds from the start of the whole output. espeak-ng has its own idea
of words (``你好`` is one, ``使用`` two), so the items are cut from the text and only timed
with espeak's marks:

- an item owns the word marks that point into it; it runs from its first mark to the end
  of its last, a mark ending at the next mark or at the first pause after it;
- items that own no mark (``好`` inside espeak's ``你好``) share the time of the item before
  them: at syllable boundaries when the phonemes show one vowel per character, else evenly;
- phonemes go to the item their start falls in; espeak's language-switch markers such as
  ``(en)`` are not phonemes and never appear.

A sentence may span the engine's segments; :class:`SubtitleTrack` carries ``word_index`` on.
"""

from __future__ import annotations

import itertools
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from gateway.engine.espeak import Mark
from rtts_plugin.protocol.messages import PhonemeTiming, WordTiming

# Characters written without spaces that the cloud times one by one (CJK ideographs, kana).
_CJK: Final = r"\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f"
# A piece of a word: one such character, or a run of anything else but white space.
_PIECE: Final = re.compile(rf"[{_CJK}]|[^\s{_CJK}]+")
_SENTENCE_END: Final = re.compile(r"[.!?…。！？]+[\"'”’)\]）】」』]*$")
_VOWEL: Final = re.compile(r"[aeiouyAEIOUVQ@3]")
_CODA: Final = frozenset({"n", "N", "r"})


@dataclass(slots=True)
class _Item:
    start: int  # character span in the segment's text
    end: int
    marks: list[Mark] = field(default_factory=list)
    t0: float = 0.0  # samples from the segment's start
    t1: float = 0.0
    phonemes: list[Mark] = field(default_factory=list)

    def text(self, source: str) -> str:
        return source[self.start : self.end]


def _is_punctuation(piece: str) -> bool:
    return all(unicodedata.category(ch)[0] in "PS" for ch in piece)


def _items(text: str) -> list[_Item]:
    """Cut ``text`` into items: each CJK character, each other word; punctuation attached."""
    items: list[_Item] = []
    leading: int | None = None  # where pending opening punctuation starts ("“你")
    for token in re.finditer(r"\S+", text):
        pieces = [
            (token.start() + m.start(), token.start() + m.end())
            for m in _PIECE.finditer(token.group())
        ]
        worded = False  # an item was started in this token
        for n, (start, end) in enumerate(pieces):
            if _is_punctuation(text[start:end]):
                # Opening marks at the end of a run ("。“") belong to what follows.
                opening = end
                while opening > start and unicodedata.category(text[opening - 1]) in ("Ps", "Pi"):
                    opening -= 1
                later_word = any(not _is_punctuation(text[s:e]) for s, e in pieces[n + 1 :])
                rest = start
                if opening > start and items and leading is None and (worded or not later_word):
                    items[-1].end = rest = opening  # "好，", "you.", and a lone "—" after a word
                if rest < end and leading is None:
                    leading = rest
                continue
            items.append(_Item(start if leading is None else leading, end))
            leading, worded = None, True
    return items


def _is_sentence_end(text: str) -> bool:
    return _SENTENCE_END.search(text) is not None


class SubtitleTrack:
    """The RESULT messages of one session, built segment by segment as espeak speaks them."""

    def __init__(self, sample_rate: int, *, phonemes: bool) -> None:
        self._rate = sample_rate
        self._phonemes = phonemes
        self._index = 0  # word_index of the next item in the current sentence

    def segment(
        self, text: str, marks: list[Mark], offset_ms: float, samples: int, *, last: bool
    ) -> list[list[WordTiming]]:
        """The RESULT messages for one synthesized segment: one per sentence (or part of one).

        ``marks`` are in the order espeak reported them, with samples counted from the start
        of the segment, which begins ``offset_ms`` into the output and lasts ``samples``.
        ``last`` closes the final sentence even without a full stop.
        """
        items = _timed(text, marks)

        def ms(sample: float) -> int:
            return round(offset_ms + sample * 1000 / self._rate)

        messages: list[list[WordTiming]] = []
        sentence: list[WordTiming] = []
        for position, item in enumerate(items):
            sentence.append(self._word(text, item, ms))
            closes = _is_sentence_end(item.text(text)) or (last and position == len(items) - 1)
            if closes:
                following = items[position + 1].t0 if position + 1 < len(items) else samples
                sentence.append(
                    WordTiming(
                        start_time=ms(item.t1),
                        end_time=max(ms(item.t1), ms(following)),
                        text="",
                        word_index=self._index,
                        phonemes=[] if self._phonemes else None,  # every item, the same keys
                    )
                )
                messages.append(sentence)
                sentence, self._index = [], 0
        if sentence:
            messages.append(sentence)  # the sentence goes on in the next segment
        return messages

    def _word(self, text: str, item: _Item, ms: Callable[[float], int]) -> WordTiming:
        phoneme_items = None
        if self._phonemes:
            spoken = item.phonemes
            phoneme_items = [
                PhonemeTiming(
                    phoneme=p.phoneme,
                    start_time=ms(p.sample),
                    end_time=ms(spoken[i + 1].sample if i + 1 < len(spoken) else item.t1),
                    phoneme_index=i,
                )
                for i, p in enumerate(spoken)
            ]
        word = WordTiming(
            start_time=ms(item.t0),
            end_time=ms(item.t1),
            text=item.text(text),
            word_index=self._index,
            phonemes=phoneme_items,
        )
        self._index += 1
        return word


def _timed(text: str, marks: list[Mark]) -> list[_Item]:
    """The items of ``text`` with their times (in samples) and phonemes, from espeak's marks."""
    items = _items(text)
    words = [m for m in marks if m.kind == "word"]
    if not items or not words:
        return []
    last_sample = max(m.sample for m in marks)
    spans: dict[int, tuple[int, int, list[Mark]]] = {}  # per word mark: start, end, phonemes
    for index, mark in enumerate(words):
        following = words[index + 1] if index + 1 < len(words) else None
        limit = following.sample if following else last_sample
        own = [
            m
            for m in marks
            if m.kind == "phoneme"
            and mark.sample <= m.sample <= limit
            and m.text_position >= mark.text_position
            and (following is None or m.text_position < following.text_position)
        ]
        end = min(
            [
                limit,
                *[m.sample for m in own if m.phoneme.startswith("_") and m.sample > mark.sample],
            ]
        )
        spoken = [m for m in own if not m.phoneme.startswith(("_", "(")) and m.sample < end]
        spans[id(mark)] = (mark.sample, end, spoken)
    # Each word mark belongs to the item its text position points into (or the first item).
    bounds = [item.start for item in items[1:]] + [len(text) + 1]
    for mark in words:
        position = mark.text_position - 1
        owner = next((i for i, b in enumerate(bounds) if position < b), len(items) - 1)
        items[owner].marks.append(mark)
    # Items without marks share the time of the item with marks before them.
    groups: list[list[_Item]] = []
    for item in items:
        if item.marks or not groups:
            groups.append([item])
        else:
            groups[-1].append(item)
    if not groups[0][0].marks and len(groups) > 1:  # leading items with no mark of their own
        groups[1][:0] = groups.pop(0)
    for group in groups:
        owned = [m for item in group for m in item.marks]
        if not owned:
            return []
        start = spans[id(owned[0])][0]
        end = max(spans[id(m)][1] for m in owned)
        spoken = [p for m in owned for p in spans[id(m)][2]]
        _share(group, start, end, spoken)
    return items


def _share(group: list[_Item], start: int, end: int, spoken: list[Mark]) -> None:
    """Divide ``start..end`` among the items of ``group``, at syllable boundaries if clear."""
    cuts = _syllable_starts(spoken, len(group))
    if cuts is None:
        step = (end - start) / len(group)
        cuts = [start + k * step for k in range(len(group))]
    cuts[0] = start
    for k, item in enumerate(group):
        item.t0 = cuts[k]
        item.t1 = cuts[k + 1] if k + 1 < len(group) else end
        item.phonemes = [
            p for p in spoken if item.t0 <= p.sample < item.t1 or (k == 0 and p.sample < item.t0)
        ]


def _syllable_starts(spoken: list[Mark], count: int) -> list[float] | None:
    """Where each of ``count`` syllables starts, if the phonemes have exactly one vowel each.

    Between two vowels, a lone consonant starts the next syllable; of two or more, a nasal
    first one (Mandarin's only codas: n, ng, r) ends the previous syllable.
    """
    if count == 1:
        return [spoken[0].sample if spoken else 0.0]
    nuclei = [i for i, p in enumerate(spoken) if _VOWEL.search(p.phoneme)]
    if len(nuclei) != count:
        return None
    starts = [float(spoken[0].sample)]
    for previous, nucleus in itertools.pairwise(nuclei):
        consonants = list(range(previous + 1, nucleus))
        first = nucleus
        if consonants:
            coda = len(consonants) > 1 and spoken[consonants[0]].phoneme.lstrip("'") in _CODA
            first = consonants[1] if coda else consonants[0]
        starts.append(float(spoken[first].sample))
    return starts
