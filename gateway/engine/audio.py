"""Streaming conversion of espeak-ng's PCM into what the client asked for.

Resamples 16-bit mono PCM from the library's rate to 8000 or 16000 Hz (soxr, streaming, so
chunk boundaries leave no clicks) and encodes it as PCM (16-bit little-endian), A-law,
mu-law (G.711, via ``audioop``) or MP3 (LAME, via ``lameenc``).
"""

from __future__ import annotations

import warnings
from typing import Final

import lameenc
import numpy as np
import soxr

from rtts_plugin.protocol.voices import AudioFormat

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

# LAME bit rates (kbit/s) for speech at each output rate: MPEG-2.5 at 8 kHz, MPEG-2 at 16 kHz.
_MP3_KBPS: Final[dict[int, int]] = {8000: 24, 16000: 32}


class StreamEncoder:
    """Resample and encode one session's audio, chunk by chunk; not thread-safe."""

    def __init__(self, in_rate: int, out_rate: int, audio_format: AudioFormat) -> None:
        self.audio_format = audio_format
        self._resampler = soxr.ResampleStream(in_rate, out_rate, 1, dtype="int16", quality="HQ")
        self._mp3: lameenc.Encoder | None = None
        if audio_format == "mp3":
            self._mp3 = lameenc.Encoder()
            self._mp3.set_in_sample_rate(out_rate)
            self._mp3.set_channels(1)
            self._mp3.set_bit_rate(_MP3_KBPS.get(out_rate, 32))
            self._mp3.set_quality(5)

    def encode(self, pcm: bytes) -> bytes:
        """Convert one chunk of 16-bit PCM at the input rate; may return ``b""`` (buffering)."""
        samples = np.frombuffer(pcm, dtype="<i2")
        return self._encode(self._resampler.resample_chunk(samples, last=False))

    def finish(self) -> bytes:
        """Flush the resampler and encoder; call once after the last chunk."""
        tail = self._encode(self._resampler.resample_chunk(np.zeros(0, dtype="<i2"), last=True))
        if self._mp3 is not None:
            tail += bytes(self._mp3.flush())
        return tail

    def _encode(self, samples: np.ndarray) -> bytes:
        pcm = samples.astype("<i2", copy=False).tobytes()
        if not pcm and self._mp3 is None:
            return b""
        match self.audio_format:
            case "pcm":
                return pcm
            case "ulaw":
                return audioop.lin2ulaw(pcm, 2)
            case "alaw":
                return audioop.lin2alaw(pcm, 2)
            case "mp3":
                assert self._mp3 is not None
                return bytes(self._mp3.encode(pcm)) if pcm else b""
        raise AssertionError(f"unknown audio format {self.audio_format!r}")  # pragma: no cover


def bytes_per_second(audio_format: AudioFormat, sample_rate: int) -> int | None:
    """Bytes of audio per second for the fixed-rate formats; ``None`` for MP3."""
    match audio_format:
        case "pcm":
            return sample_rate * 2
        case "alaw" | "ulaw":
            return sample_rate
    return None
