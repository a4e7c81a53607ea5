"""The engine's streaming resampler and encoders, checked against independent decoders."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile

from gateway.engine.audio import StreamEncoder, bytes_per_second
from tests.support import rms, to_samples


def tone(seconds: float = 1.0, rate: int = 22050, hz: float = 440.0) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * 32767 * np.sin(2 * np.pi * hz * t)).astype("<i2").tobytes()


def encode_in_chunks(audio_format: str, out_rate: int, pcm: bytes, chunk: int = 2646) -> bytes:
    encoder = StreamEncoder(22050, out_rate, audio_format)  # type: ignore[arg-type]
    out = b"".join(encoder.encode(pcm[i : i + chunk]) for i in range(0, len(pcm), chunk))
    return out + encoder.finish()


@pytest.mark.parametrize("rate", [8000, 16000])
def test_pcm_is_resampled_whole_and_clean(rate: int) -> None:
    samples = to_samples(encode_in_chunks("pcm", rate, tone()), "pcm", rate)
    assert abs(len(samples) - rate) <= 2  # one second in, one second out
    spectrum = np.abs(np.fft.rfft(samples))
    assert abs(np.argmax(spectrum) * rate / len(samples) - 440) < 2
    assert rms(samples) == pytest.approx(0.5 / np.sqrt(2), rel=0.02)


@pytest.mark.parametrize("audio_format", ["ulaw", "alaw"])
def test_g711_decodes_to_the_pcm_stream(audio_format: str) -> None:
    pcm = to_samples(encode_in_chunks("pcm", 8000, tone()), "pcm", 8000)
    coded_bytes = encode_in_chunks(audio_format, 8000, tone())
    assert len(coded_bytes) == len(pcm)  # one byte per sample
    coded = to_samples(coded_bytes, audio_format, 8000)
    assert np.corrcoef(pcm, coded)[0, 1] > 0.999


@pytest.mark.parametrize("rate", [8000, 16000])
def test_mp3_decodes_with_an_independent_decoder(rate: int) -> None:
    data, decoded_rate = soundfile.read(
        io.BytesIO(encode_in_chunks("mp3", rate, tone())), dtype="float32"
    )
    assert decoded_rate == rate
    assert rate <= len(data) <= 1.2 * rate  # one second, plus the codec's padding
    middle = np.asarray(data)[rate // 4 : 3 * rate // 4]  # away from the codec's delay and padding
    assert rms(middle) == pytest.approx(0.5 / np.sqrt(2), rel=0.1)


def test_bytes_per_second() -> None:
    assert bytes_per_second("pcm", 16000) == 32000
    assert bytes_per_second("ulaw", 8000) == 8000
    assert bytes_per_second("mp3", 8000) is None
