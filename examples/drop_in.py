"""Swap HuaweiRTTSService into an existing pipeline: one line changes.

The usual shape is ``transport.input() → stt → context → llm → tts → transport.output()``.
Here a scripted stand-in streams the LLM's reply token by token (so no LLM account is
needed) and the audio goes to a WAV file instead of a call; the TTS line is the only one a
real bot would change. Runs against the embedded local engine by default:

    python examples/drop_in.py --out out/drop_in.wav
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import wave
from pathlib import Path

from loguru import logger
from pipecat.frames.frames import (
    EndFrame,
    Frame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    TranscriptionFrame,
    TTSAudioRawFrame,
    TTSTextFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.workers.runner import WorkerRunner

from gateway.server import url_or_local_engine
from rtts_plugin import HuaweiRTTSService

REPLY = (
    "Your balance is twelve dollars. It is due on Friday. Is there anything else I can help with?"
)
SAMPLE_RATE = 24000  # pipecat's default output rate: requested at 16 kHz and resampled


class ScriptedLLM(FrameProcessor):
    """Stands in for an LLM service: answers each user turn with a reply streamed in tokens."""

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        """Answer a transcription; pass everything else on."""
        await super().process_frame(frame, direction)
        if not isinstance(frame, TranscriptionFrame):
            await self.push_frame(frame, direction)
            return
        await self.push_frame(LLMFullResponseStartFrame())
        for token in REPLY.split(" "):
            await self.push_frame(LLMTextFrame(token + " "))
        await self.push_frame(LLMFullResponseEndFrame())


class WavSink(FrameProcessor):
    """Stands in for the transport's output: keeps the audio and the spoken words."""

    def __init__(self) -> None:
        super().__init__()
        self.audio = bytearray()
        self.words: list[str] = []

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        """Record audio and words, and pass them on."""
        await super().process_frame(frame, direction)
        if isinstance(frame, TTSAudioRawFrame):
            self.audio += frame.audio
        elif isinstance(frame, TTSTextFrame):
            self.words.append(frame.text)
        await self.push_frame(frame, direction)


async def converse(url: str | None) -> WavSink:
    """Run one turn through the pipeline; returns what reached the output."""
    async with url_or_local_engine(url, "drop-in") as tts_url:
        llm = ScriptedLLM()
        # Before: any pipecat TTS service, for example
        #   tts = CartesiaTTSService(api_key=os.getenv("CARTESIA_API_KEY"),
        #                            settings=CartesiaTTSService.Settings(voice="..."))
        # After: the one line that changes.
        tts = HuaweiRTTSService(
            url=tts_url, settings=HuaweiRTTSService.Settings(voice="english_amy_common")
        )
        sink = WavSink()
        worker = PipelineWorker(
            Pipeline([llm, tts, sink]), params=PipelineParams(audio_out_sample_rate=SAMPLE_RATE)
        )

        @worker.event_handler("on_pipeline_started")
        async def on_started(worker: PipelineWorker, frame: Frame) -> None:
            user = TranscriptionFrame("What is my balance?", user_id="caller", timestamp="")
            await worker.queue_frames([user, EndFrame()])

        runner = WorkerRunner(handle_sigint=True)
        await runner.add_workers(worker)
        await runner.run()
    return sink


def main() -> int:
    """Parse arguments, run one turn, write the reply to a WAV file."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("out/drop_in.wav"))
    parser.add_argument("--url", help="rtts URL of a gateway (default: start a local engine)")
    args = parser.parse_args()
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    sink = asyncio.run(converse(args.url))
    if not sink.audio:
        print("drop_in.py: no audio came back", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(args.out), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(SAMPLE_RATE)
        wav.writeframes(bytes(sink.audio))
    print(f"bot said: {' '.join(sink.words)}")
    seconds = len(sink.audio) / 2 / SAMPLE_RATE
    print(f"wrote {args.out.resolve()} ({seconds:.2f} s at {SAMPLE_RATE} Hz)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
