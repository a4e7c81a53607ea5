"""The rtts voice catalogue: every ``property`` named in Huawei's documentation.

The catalogue is open: Huawei Cloud, not this list, decides which voices exist (its
documentation names more, and new ones appear). A name outside the catalogue gets
:func:`assumed_voice`'s conservative capabilities and is passed to the cloud as it is.

Each entry records what the docs say about the voice: its language, the per-connection text
limit, the audio formats and sample rates it produces, whether it emits word timestamps
(``subtitle``), and its billing unit. Where the docs are silent (per-voice format columns of
the China-site page were not recovered) the voice is given every format, so that valid
requests are never refused by us when the cloud would take them.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Final, Literal

AudioFormat = Literal["pcm", "alaw", "ulaw", "mp3"]
SampleRate = Literal["8000", "16000"]
Subtitle = Literal["word_level", "phoneme_level"]
Tier = Literal["standard", "premium", "international"]

ALL_FORMATS: Final[tuple[AudioFormat, ...]] = ("pcm", "alaw", "ulaw", "mp3")
ALL_RATES: Final[tuple[SampleRate, ...]] = ("8000", "16000")
SUBTITLE_LEVELS: Final[tuple[Subtitle, ...]] = ("word_level", "phoneme_level")

DEFAULT_PROPERTY: Final = "chinese_xiaoyan_common"
STANDARD_TEXT_LIMIT: Final = 500
LONG_TEXT_LIMIT: Final = 10_000


@dataclass(frozen=True, slots=True)
class Voice:
    """One rtts voice and what it supports; ``name`` is the ``config.property`` value."""

    name: str
    language: str
    tier: Tier
    text_limit: int
    formats: tuple[AudioFormat, ...] = ALL_FORMATS
    sample_rates: tuple[SampleRate, ...] = ALL_RATES
    subtitles: bool = False

    @property
    def billing_unit_chars(self) -> int:
        """Characters per billed call: 100 for standard voices, 50 for premium ones."""
        return 100 if self.tier == "standard" else 50


def _chinese(
    name: str,
    tier: Tier,
    *,
    text_limit: int,
    formats: tuple[AudioFormat, ...] = ALL_FORMATS,
    sample_rates: tuple[SampleRate, ...] = ALL_RATES,
    subtitles: bool = False,
) -> Voice:
    return Voice(
        f"chinese_{name}_common", "zh-CN", tier, text_limit, formats, sample_rates, subtitles
    )


_LONG = LONG_TEXT_LIMIT
_SHORT = STANDARD_TEXT_LIMIT

_VOICES: Final[tuple[Voice, ...]] = (
    # Standard voices [SDKREF sis_05_0066/0069].
    _chinese("xiaoqi", "standard", text_limit=_SHORT),
    _chinese("xiaoyu", "standard", text_limit=_SHORT),
    _chinese("xiaoyan", "standard", text_limit=_SHORT),
    _chinese("xiaowang", "standard", text_limit=_SHORT),
    # Premium voices. pcm-only: huaxiaomei, huaxiaofei; 16 kHz only: huaxiaolong, huaxiaorui.
    _chinese("huaxiaomei", "premium", text_limit=_LONG, formats=("pcm",), subtitles=True),
    _chinese("huaxiaofei", "premium", text_limit=_LONG, formats=("pcm",), subtitles=True),
    _chinese("huaxiaoru", "premium", text_limit=_SHORT),
    _chinese("huaxiaohan", "premium", text_limit=_SHORT),
    _chinese("huaxiaorui", "premium", text_limit=_LONG, sample_rates=("16000",)),
    _chinese("huaxiaolong", "premium", text_limit=_LONG, sample_rates=("16000",)),
    _chinese("huaxiaozhen", "premium", text_limit=_SHORT),
    _chinese("huaxiaohe", "premium", text_limit=_LONG, subtitles=True),
    _chinese("huaxiaoye", "premium", text_limit=_LONG, subtitles=True),
    _chinese("huaxiaoxue", "premium", text_limit=_LONG, subtitles=True),
    _chinese("huaxiaojiao", "premium", text_limit=_LONG, subtitles=True),
    _chinese("huaxiaohui", "premium", text_limit=_LONG, subtitles=True),
    _chinese("huaxiaokang", "premium", text_limit=_LONG, subtitles=True),
    _chinese("huaxiaokun", "premium", text_limit=_LONG, subtitles=True),
    _chinese("huaxiaoquan", "premium", text_limit=_LONG, subtitles=True),
    # English premium voices named in the China-site text-limit note.
    Voice("english_amy_common", "en-US", "premium", _LONG),
    Voice("english_alvin_common", "en-US", "premium", _LONG),
    # International site (ME-Riyadh): pcm only, 10000-character flat limit, subtitle listed.
    Voice("arabic_dh_male", "ar", "international", _LONG, ("pcm",), ALL_RATES, True),
    Voice("arabic_dh_female", "ar", "international", _LONG, ("pcm",), ALL_RATES, True),
    Voice("english_dh_male", "en-US", "international", _LONG, ("pcm",), ALL_RATES, True),
    Voice("english_dh_female", "en-US", "international", _LONG, ("pcm",), ALL_RATES, True),
)

VOICES: Final[dict[str, Voice]] = {voice.name: voice for voice in _VOICES}


def get_voice(name: str) -> Voice | None:
    """Return the catalogue entry for ``name``, or ``None`` if no such voice exists."""
    return VOICES.get(name)


def suggest_voices(name: str, limit: int = 3) -> list[str]:
    """Return the catalogue names closest to a misspelled ``name``, best first."""
    return difflib.get_close_matches(name, list(VOICES), n=limit, cutoff=0.6)


# What an unknown voice is assumed to do: what every documented voice does.
UNKNOWN_VOICE_FORMATS: Final[tuple[AudioFormat, ...]] = ("pcm",)
_LANGUAGE_PREFIXES: Final[dict[str, str]] = {
    "chinese_": "zh-CN",
    "english_": "en-US",
    "arabic_": "ar",
}


def assumed_voice(name: str) -> Voice:
    """Conservative capabilities for a voice the catalogue does not list.

    500 characters per connection, pcm at 8000 or 16000 Hz, no word timestamps; the language
    from the name's prefix (``chinese_``, ``english_``, ``arabic_``), else ``zh-CN``.
    """
    language = next(
        (tag for prefix, tag in _LANGUAGE_PREFIXES.items() if name.startswith(prefix)), "zh-CN"
    )
    return Voice(name, language, "standard", STANDARD_TEXT_LIMIT, UNKNOWN_VOICE_FORMATS, ALL_RATES)


def voice_capabilities(name: str) -> tuple[Voice, bool]:
    """The voice's entry and True if the catalogue lists it, else assumed ones and False."""
    voice = VOICES.get(name)
    return (voice, True) if voice is not None else (assumed_voice(name), False)
