"""Runs espeak-ng on one dedicated thread and streams its audio into asyncio.

espeak-ng has process-global state, so all synthesis is serialized on a single thread;
the event loop never blocks on it. Sessions synthesize their text one segment at a time,
and segments of different sessions queue in arrival order, so a long text cannot hold
up the first audio of a short one for more than one segment. Chunks reach the session's
coroutine as they are produced, not when the segment is done.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from gateway.engine.audio import StreamEncoder
from gateway.engine.espeak import Espeak, Mark


@dataclass(frozen=True, slots=True)
class VoiceParameters:
    """espeak-ng settings for one session."""

    voice: str
    rate_wpm: int
    pitch: int
    volume: int


@dataclass(slots=True)
class SegmentResult:
    """What one segment produced besides audio: its marks and its length in samples."""

    marks: list[Mark] = field(default_factory=list)
    samples: int = 0


class SynthesisWorker:
    """The single thread that owns espeak-ng."""

    def __init__(self, chunk_ms: int = 60) -> None:
        self._chunk_ms = chunk_ms
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="espeak-ng")
        self._espeak: Espeak | None = None

    async def start(self) -> int:
        """Load and initialize espeak-ng on the worker thread; returns its sample rate."""
        loop = asyncio.get_running_loop()
        self._espeak = await loop.run_in_executor(self._executor, Espeak.shared, self._chunk_ms)
        return self._espeak.sample_rate

    @property
    def sample_rate(self) -> int:
        """The library's output rate (22050 Hz for espeak-ng)."""
        if self._espeak is None:
            raise RuntimeError("SynthesisWorker.start() has not been awaited")
        return self._espeak.sample_rate

    def close(self) -> None:
        """Stop accepting work; a segment in progress finishes or aborts on its own."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def stream_segment(
        self, text: str, params: VoiceParameters, encoder: StreamEncoder, result: SegmentResult
    ) -> AsyncGenerator[bytes]:
        """Synthesize one segment, yielding encoded audio as it is made.

        ``result`` is filled with the segment's marks and sample count once the iterator
        is exhausted. If the consumer stops early (cancellation, disconnect), synthesis is
        aborted at the next chunk.
        """
        espeak = self._espeak
        if espeak is None:
            raise RuntimeError("SynthesisWorker.start() has not been awaited")
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[bytes | None] = asyncio.Queue()
        abort = threading.Event()

        def on_chunk(pcm: bytes, marks: list[Mark]) -> bool:
            if abort.is_set():
                return False
            result.marks.extend(marks)  # espeak counts their samples from the segment start
            result.samples += len(pcm) // 2
            encoded = encoder.encode(pcm) if pcm else b""
            if encoded:
                loop.call_soon_threadsafe(chunks.put_nowait, encoded)
            return True

        def run() -> None:
            espeak.synthesize(
                text,
                params.voice,
                rate_wpm=params.rate_wpm,
                pitch=params.pitch,
                volume=params.volume,
                on_chunk=on_chunk,
            )

        job = loop.run_in_executor(self._executor, run)
        # Runs on the loop after every chunk put scheduled by the job, so it comes last.
        job.add_done_callback(lambda _: chunks.put_nowait(None))
        try:
            while (chunk := await chunks.get()) is not None:
                yield chunk
            job.result()  # re-raise a synthesis failure
        finally:
            abort.set()
