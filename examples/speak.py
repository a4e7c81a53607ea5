r"""Speak text through a pipecat pipeline with HuaweiRTTSService and write a WAV file.

The single-file foundational example of this integration: one ``HuaweiRTTSService`` in a
pipecat pipeline, with its audio, word timestamps and TTFB metrics. By default it starts
the embedded local engine (espeak-ng, no cloud account) on a free loopback port, so it
works on a fresh machine:

    python examples/speak.py "Hello from Huawei real-time TTS."
    echo "你好，世界。" | python examples/speak.py --voice chinese_huaxiaomei_common \
        --subtitle word_level

With ``--url`` it uses a running gateway (``ws://127.0.0.1:8765/v1/{project_id}/rtts``); with
``HUAWEI_RTTS_REGION``, ``HUAWEI_RTTS_PROJECT_ID`` and credentials in the environment
(``HUAWEI_RTTS_TOKEN``, or ``HUAWEI_RTTS_ACCESS_KEY``/``HUAWEI_RTTS_SECRET_KEY``, or the
``HUAWEI_RTTS_IAM_*`` variables) it speaks through Huawei Cloud directly.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import sys
import time
import wave
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from loguru import logger

# pipecat logs a banner at INFO when it is imported; --log-level (WARNING) decides instead.
logger.remove()
logger.add(sys.stderr, level="WARNING")

from pipecat.frames.frames import (
    EndFrame,
    ErrorFrame,
    Frame,
    MetricsFrame,
    TTSAudioRawFrame,
    TTSSpeakFrame,
    TTSTextFrame,
)
from pipecat.metrics.metrics import TTFBMetricsData
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.workers.runner import WorkerRunner

from gateway.server import url_or_local_engine
from rtts_plugin import HuaweiRTTSService, InvalidSettingsError


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("text", nargs="?", help="text to speak (default: read standard input)")
    parser.add_argument("--out", type=Path, default=Path("out/speech.wav"), help="WAV to write")
    parser.add_argument("--url", help="rtts URL of a running gateway")
    parser.add_argument("--voice", default="english_amy_common", help="rtts voice (property)")
    parser.add_argument("--speed", type=int, default=0, help="-500..500 (default 0)")
    parser.add_argument("--pitch", type=int, default=0, help="-500..500 (default 0)")
    parser.add_argument("--volume", type=int, default=50, help="0..100 (default 50)")
    parser.add_argument(
        "--sample-rate", type=int, default=16000, help="pipeline output rate (default 16000)"
    )
    parser.add_argument(
        "--subtitle",
        choices=("word_level",),
        help="ask for word timings and print them (voices with subtitles only)",
    )
    parser.add_argument(
        "--log-level", default="WARNING", help="pipecat/plugin log level (default WARNING)"
    )
    return parser.parse_args(argv)


@dataclass
class Collected:
    """What came out of the TTS service."""

    audio: bytearray = field(default_factory=bytearray)
    words: list[tuple[str, float]] = field(default_factory=list)
    ttfb: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    first_audio_at: float | None = None


class Collector(FrameProcessor):
    """Keeps the audio, words, TTFB and errors that reach it."""

    def __init__(self, collected: Collected) -> None:
        super().__init__()
        self._collected = collected

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        """Record the frame and pass it on."""
        await super().process_frame(frame, direction)
        got = self._collected
        if isinstance(frame, TTSAudioRawFrame):
            got.audio += frame.audio
            got.first_audio_at = got.first_audio_at or time.perf_counter()
        elif isinstance(frame, TTSTextFrame) and frame.pts is not None:
            got.words.append((frame.text, frame.pts / 1e9))
        elif isinstance(frame, MetricsFrame):
            got.ttfb += [d.value for d in frame.data if isinstance(d, TTFBMetricsData) and d.value]
        elif isinstance(frame, ErrorFrame):
            got.errors.append(frame.error)
        await self.push_frame(frame, direction)


@contextlib.asynccontextmanager
async def endpoint(url: str | None) -> AsyncIterator[str | None]:
    """The URL to use: given, Huawei Cloud from the environment (None), or a local engine."""
    if url or os.environ.get("HUAWEI_RTTS_URL") or os.environ.get("HUAWEI_RTTS_REGION"):
        yield url
        return
    async with url_or_local_engine(None) as local:
        print(f"local engine listening on {local}")
        yield local


# The settings as this script's flags, for messages about them.
_FLAGS = {"property": "--voice", "speed": "--speed", "pitch": "--pitch", "volume": "--volume"}


def in_flags(message: str) -> str:
    """The plugin's "'property' is invalid: ..." in the words the user typed ("--voice: ...")."""
    named = re.match(r"'(\w+)' is invalid: (.*)", message, re.DOTALL)
    return f"{_FLAGS[named[1]]}: {named[2]}" if named and named[1] in _FLAGS else message


def read_text(args: argparse.Namespace) -> str | None:
    """The text to speak: the argument, else standard input (with a prompt at a terminal)."""
    if args.text is not None:
        return str(args.text)
    if sys.stdin.isatty():
        print(
            "speak.py: type the text to speak, then Ctrl-D on an empty line (Ctrl-C stops)",
            file=sys.stderr,
            flush=True,
        )
    try:
        return sys.stdin.read()
    except KeyboardInterrupt:
        return None


async def speak(args: argparse.Namespace, text: str) -> int:
    """Speak ``text`` into ``args.out``; returns the exit status."""
    if not text.strip():
        print("speak.py: nothing to say: give the text as an argument or on stdin", file=sys.stderr)
        return 2
    collected = Collected()
    async with endpoint(args.url) as url:
        try:
            tts = HuaweiRTTSService(
                url=url,
                settings=HuaweiRTTSService.Settings(
                    voice=args.voice, speed=args.speed, pitch=args.pitch, volume=args.volume
                ),
                word_timestamps=args.subtitle is not None,
                sample_rate=args.sample_rate,
            )
        except InvalidSettingsError as exc:
            print(f"speak.py: {in_flags(str(exc))}", file=sys.stderr)
            return 2
        worker = PipelineWorker(
            Pipeline([tts, Collector(collected)]),
            params=PipelineParams(audio_out_sample_rate=args.sample_rate, enable_metrics=True),
            cancel_on_idle_timeout=False,
        )

        @worker.event_handler("on_pipeline_started")
        async def on_started(worker: PipelineWorker, frame: Frame) -> None:
            await worker.queue_frames([TTSSpeakFrame(text), EndFrame()])

        started = time.perf_counter()
        runner = WorkerRunner(handle_sigint=True)
        await runner.add_workers(worker)
        await runner.run()
        finished = time.perf_counter()
    if collected.errors or not collected.audio:
        for error in collected.errors or ["no audio came back"]:
            print(f"speak.py: {error}", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(args.out), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(args.sample_rate)
        wav.writeframes(bytes(collected.audio))
    first = collected.words[0][1] if collected.words else 0.0
    for word, seconds in collected.words:
        print(f"  {seconds - first:7.3f} s  {word}")
    seconds = len(collected.audio) / 2 / args.sample_rate
    ttfb = f"{collected.ttfb[0] * 1000:.1f} ms" if collected.ttfb else "n/a"
    print(f"wrote {args.out.resolve()} ({seconds:.2f} s of audio at {args.sample_rate} Hz)")
    print(f"TTFB {ttfb}, synthesis took {(finished - started) * 1000:.1f} ms in all")
    return 0


def main() -> int:
    """Run from the command line; Ctrl-C stops at once (exit status 130), without a traceback."""
    options = arguments()
    logger.remove()
    logger.add(sys.stderr, level=options.log_level.upper())
    # Read before the event loop starts: a blocking read inside it would hold off Ctrl-C.
    text = read_text(options)
    try:
        if text is not None:
            return asyncio.run(speak(options, text))
    except KeyboardInterrupt:
        pass
    print("speak.py: stopped", file=sys.stderr)
    return 130


if __name__ == "__main__":
    sys.exit(main())
