"""Speak text to a WAV file over the rtts protocol and print the timings.

By default it starts the embedded local engine (espeak-ng, no cloud account) on a free
loopback port, so it works on a fresh machine:

    python examples/speak.py "Hello from Huawei real-time TTS."
    echo "你好，世界。" | python examples/speak.py --voice chinese_huaxiaomei_common \
        --subtitle word_level

Point ``--url`` at a running gateway (``ws://127.0.0.1:8765/v1/{project_id}/rtts``) to
use it instead.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import wave
from collections.abc import AsyncIterator
from pathlib import Path

from gateway.server import run_gateway
from gateway.settings import GatewaySettings
from rtts_plugin.errors import InvalidRequestError, RttsError
from rtts_plugin.protocol import AudioReceived, WordsReceived
from rtts_plugin.protocol.validation import validate_start_request
from rtts_plugin.transport import SynthesisTimings, stream_synthesis


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("text", nargs="?", help="text to speak (default: read standard input)")
    parser.add_argument(
        "--out", type=Path, default=Path("out/speech.wav"), help="WAV file to write"
    )
    parser.add_argument(
        "--url", help="rtts URL of a running gateway (default: start the local engine)"
    )
    parser.add_argument(
        "--voice", default="english_amy_common", help="rtts voice (config.property)"
    )
    parser.add_argument("--speed", type=int, default=0, help="-500..500 (default 0)")
    parser.add_argument("--pitch", type=int, default=0, help="-500..500 (default 0)")
    parser.add_argument("--volume", type=int, default=50, help="0..100 (default 50)")
    parser.add_argument("--sample-rate", choices=("8000", "16000"), default="16000")
    parser.add_argument(
        "--subtitle", choices=("word_level", "phoneme_level"), help="print word timings"
    )
    return parser.parse_args(argv)


@contextlib.asynccontextmanager
async def _endpoint(url: str | None) -> AsyncIterator[str]:
    if url:
        yield url
        return
    async with run_gateway(GatewaySettings(port=0)) as gateway:
        print(f"local engine listening on {gateway.url()}")
        yield gateway.url()


async def speak(args: argparse.Namespace) -> int:
    """Synthesize ``args.text`` and write it to ``args.out``; returns the exit status."""
    text = args.text if args.text is not None else sys.stdin.read()
    settings = {
        "property": args.voice,
        "speed": args.speed,
        "pitch": args.pitch,
        "volume": args.volume,
        "sample_rate": args.sample_rate,
        "subtitle": args.subtitle,
    }
    try:
        request, voice = validate_start_request(
            {"command": "START", "text": text, "config": settings}
        )
    except InvalidRequestError as exc:
        print(f"speak.py: {exc.message}", file=sys.stderr)
        return 2
    if args.subtitle and not voice.subtitles:
        print(f"note: {voice.name} has no word timestamps; try chinese_huaxiaomei_common")
    config = request.config
    audio = bytearray()
    timings = SynthesisTimings()
    async with _endpoint(args.url) as url:
        try:
            async for event in stream_synthesis(url, request, timings=timings):
                if isinstance(event, AudioReceived):
                    audio += event.data
                elif isinstance(event, WordsReceived):
                    for word in event.words:
                        print(f"  {word.start_time:6d}-{word.end_time:6d} ms  {word.text}")
        except RttsError as exc:
            print(f"speak.py: {exc}", file=sys.stderr)
            return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(args.out), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(config.sample_rate_hz)
        wav.writeframes(bytes(audio))
    seconds = len(audio) / (2 * config.sample_rate_hz)

    def ms(value: float | None) -> str:
        return f"{value * 1000:.1f} ms" if value is not None else "n/a"

    print(f"wrote {args.out.resolve()} ({seconds:.2f} s of audio at {config.sample_rate} Hz)")
    print(
        f"connect {ms(timings.connected)}, START {ms(timings.started)}, "
        f"first audio {ms(timings.first_audio)}, END {ms(timings.ended)}, "
        f"trace_id {timings.trace_id}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(speak(_arguments(None))))
