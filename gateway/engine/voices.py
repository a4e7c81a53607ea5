"""How each rtts voice and its speed, pitch and volume map onto espeak-ng.

Every catalogue voice gets an espeak-ng language voice (Mandarin ``cmn``, English
``en-us``, Arabic ``ar``) and a variant, so voices sound distinct. Huawei's ranges map
monotonically onto espeak's: speed −500..500 → 87..350 words per minute (0 → 175, espeak's
default; each ±500 halves or doubles), pitch −500..500 → 0..100, volume 0..100 → 0..200.
"""

from __future__ import annotations

from typing import Final

from rtts_plugin.protocol.voices import VOICES, Voice

_LANGUAGE_VOICE: Final[dict[str, str]] = {"zh-CN": "cmn", "en-US": "en-us", "ar": "ar"}
_VARIANTS: Final[tuple[str, ...]] = ("f2", "m3", "f3", "m1", "f4", "m2", "f1", "m4", "f5", "m5")

ESPEAK_VOICES: Final[dict[str, str]] = {
    name: f"{_LANGUAGE_VOICE[voice.language]}+{_VARIANTS[index % len(_VARIANTS)]}"
    for index, (name, voice) in enumerate(VOICES.items())
}


def espeak_voice(voice: Voice) -> str:
    """The espeak-ng voice name (``language+variant``) that speaks an rtts voice."""
    return ESPEAK_VOICES[voice.name]


def rate_wpm(speed: int) -> int:
    """Espeak words per minute for an rtts speed (−500..500)."""
    return round(175 * 2 ** (speed / 500))


def espeak_pitch(pitch: int) -> int:
    """Espeak pitch (0..100, default 50) for an rtts pitch (−500..500)."""
    return round(50 + pitch / 10)


def espeak_volume(volume: int) -> int:
    """Espeak amplitude (0..200, default 100) for an rtts volume (0..100, default 50)."""
    return volume * 2
