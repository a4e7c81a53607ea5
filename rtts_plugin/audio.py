"""Turning rtts binary frames into pipeline PCM: G.711 decoding, odd bytes, resampling.

One :class:`WireAudioDecoder` per connection. Frames may split a 16-bit sample between
them, so an odd trailing byte is carried to the next frame. When the pipeline's rate is not
one rtts produces, pipecat's stream resampler converts it, and :meth:`finish` flushes the
filter so the end of every utterance is kept.
"""

from __future__ import annotations

import warnings

from loguru import logger
from pipecat.audio.utils import create_stream_resampler

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop


class WireAudioDecoder:
    """Decode one connection's audio to 16-bit mono PCM at ``out_rate``."""

    def __init__(self, wire_format: str, wire_rate: int, out_rate: int) -> None:
        self._format = wire_format
        self._wire_rate = wire_rate
        self._out_rate = out_rate
        self._carry = b""
        self._resampler = (
            create_stream_resampler(clear_after_secs=None) if wire_rate != out_rate else None
        )
        self.wire_pcm_bytes = 0

    @property
    def seconds(self) -> float:
        """Audio decoded so far, in seconds."""
        return self.wire_pcm_bytes / 2 / self._wire_rate

    async def decode(self, data: bytes) -> bytes:
        """PCM at the output rate for one binary frame (may be empty while buffering)."""
        if self._format == "ulaw":
            pcm = audioop.ulaw2lin(data, 2)
        elif self._format == "alaw":
            pcm = audioop.alaw2lin(data, 2)
        else:
            pcm = self._carry + data
            cut = len(pcm) & ~1
            pcm, self._carry = pcm[:cut], pcm[cut:]
        self.wire_pcm_bytes += len(pcm)
        if self._resampler is None or not pcm:
            return pcm
        return await self._resampler.resample(pcm, self._wire_rate, self._out_rate)

    async def finish(self) -> bytes:
        """The audio still held in the resampler; call once after the last frame."""
        if self._carry:
            logger.warning("rtts audio ended with half a 16-bit sample; dropping one byte")
            self._carry = b""
        if self._resampler is None:
            return b""
        return await self._resampler.flush()
