"""The local engine: serves rtts sessions the way Huawei Cloud does, with espeak-ng speech.

Per connection: wait for one START (``idle_timeout``, then FATAL_ERROR SIS.0304), validate
it with the shared protocol code (ERROR with the cloud's code, then close), answer START
with a fresh ``trace_id``, stream the audio as binary frames while it is synthesized,
interleave RESULT word timings when ``subtitle`` is set on a voice that has them, send END
``NORMAL`` and close. Further client messages during synthesis get ERROR; synthesis goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from gateway.engine.audio import StreamEncoder
from gateway.engine.timings import SubtitleTrack
from gateway.engine.voices import espeak_pitch, espeak_voice, espeak_volume, rate_wpm
from gateway.engine.worker import SegmentResult, SynthesisWorker, VoiceParameters
from gateway.errors import EngineError
from rtts_plugin.errors import InvalidRequestError
from rtts_plugin.protocol import codes
from rtts_plugin.protocol.messages import (
    EndResponse,
    ErrorResponse,
    FatalErrorResponse,
    ResultResponse,
    StartRequest,
    StartResponse,
)
from rtts_plugin.protocol.text import split_text
from rtts_plugin.protocol.validation import parse_start_request
from rtts_plugin.protocol.voices import Voice

logger = logging.getLogger(__name__)
# One line per session with the SHA-256 of the audio sent, so clients can prove nothing was lost.
session_log = logging.getLogger("gateway.engine.sessions")

# Characters synthesized per espeak call: small enough that sessions take turns often.
SEGMENT_CHARS = 200


@dataclass(slots=True)
class SessionRecord:
    """What one connection asked for and was sent; the engine keeps the latest ones.

    ``outcome`` is ``normal``, ``error``, ``fatal`` or ``client_closed``; ``audio_sha256``
    hashes every audio byte sent, in order, so a client can prove it lost nothing.
    """

    trace_id: str
    request: StartRequest | None = None
    audio_bytes: int = 0
    outcome: str = "client_closed"
    error_code: str = ""
    _hash: Any = field(default_factory=hashlib.sha256, repr=False)

    @property
    def audio_sha256(self) -> str:
        """Hex SHA-256 of the audio sent so far."""
        return str(self._hash.hexdigest())

    def add_audio(self, chunk: bytes) -> None:
        """Account for one binary frame sent."""
        self.audio_bytes += len(chunk)
        self._hash.update(chunk)


@dataclass(frozen=True, slots=True)
class EngineLimits:
    """Bounds the engine enforces on every session."""

    idle_timeout: float = 20.0
    history: int = 1024


class LocalEngine:
    """An rtts backend that synthesizes locally; one instance serves every connection."""

    def __init__(self, worker: SynthesisWorker, limits: EngineLimits) -> None:
        self._worker = worker
        self._limits = limits
        self.active_sessions = 0
        self.history: deque[SessionRecord] = deque(maxlen=limits.history)
        self._idle = asyncio.Event()
        self._idle.set()

    async def wait_idle(self) -> None:
        """Return once no session is in progress."""
        await self._idle.wait()

    async def handle(self, websocket: ServerConnection) -> None:
        """Serve one rtts connection from handshake to close."""
        record = SessionRecord(trace_id=str(uuid.uuid4()))
        self.active_sessions += 1
        self._idle.clear()
        try:
            await self._serve(websocket, record)
        except ConnectionClosed:
            record.outcome = "client_closed"
            logger.debug("client left session %s early", record.trace_id)
        finally:
            self.history.append(record)
            session_log.info(
                json.dumps(
                    {
                        "event": "engine_session",
                        "trace_id": record.trace_id,
                        "outcome": record.outcome,
                        "code": record.error_code,
                        "audio_bytes": record.audio_bytes,
                        "audio_sha256": record.audio_sha256,
                    }
                )
            )
            self.active_sessions -= 1
            if self.active_sessions == 0:
                self._idle.set()

    async def _serve(self, websocket: ServerConnection, record: SessionRecord) -> None:
        trace_id = record.trace_id
        try:
            async with asyncio.timeout(self._limits.idle_timeout):
                message = await websocket.recv()
        except TimeoutError:
            await websocket.send(
                FatalErrorResponse(
                    trace_id=trace_id,
                    error_code=codes.INPUT_WAIT_TIMEOUT,
                    error_msg="wait voice timeout: no START within "
                    f"{self._limits.idle_timeout:g} s",
                ).to_json()
            )
            record.outcome, record.error_code = "fatal", codes.INPUT_WAIT_TIMEOUT
            return
        if isinstance(message, bytes):
            await self._refuse(
                websocket,
                record,
                codes.MALFORMED_REQUEST,
                "binary frames are not accepted; send START as a JSON text frame",
            )
            return
        try:
            request, voice = parse_start_request(message)
        except InvalidRequestError as exc:
            await self._refuse(websocket, record, exc.code, exc.message)
            return
        record.request = request
        logger.debug(
            "session %s: %d chars, %s, %s Hz, %s",
            trace_id,
            len(request.text),
            voice.name,
            request.config.sample_rate,
            request.config.audio_format,
        )
        await websocket.send(StartResponse(trace_id=trace_id).to_json())
        guard = asyncio.create_task(self._refuse_further_messages(websocket, trace_id))
        try:
            await self._synthesize(websocket, request, voice, record)
        except EngineError:
            logger.exception("synthesis failed in session %s", trace_id)
            await self._refuse(
                websocket,
                record,
                codes.TTS_INTERNAL_ERROR,
                "TTS internal error: the local engine failed; see the gateway log",
            )
            return
        finally:
            guard.cancel()
        await websocket.send(EndResponse(trace_id=trace_id, reason="NORMAL").to_json())
        record.outcome = "normal"

    async def _synthesize(
        self,
        websocket: ServerConnection,
        request: StartRequest,
        voice: Voice,
        record: SessionRecord,
    ) -> None:
        config = request.config
        params = VoiceParameters(
            voice=espeak_voice(voice),
            rate_wpm=rate_wpm(config.speed),
            pitch=espeak_pitch(config.pitch),
            volume=espeak_volume(config.volume),
        )
        source_rate = self._worker.sample_rate
        encoder = StreamEncoder(source_rate, config.sample_rate_hz, config.audio_format)
        track = (
            SubtitleTrack(source_rate, phonemes=config.subtitle == "phoneme_level")
            if config.subtitle is not None and voice.subtitles
            else None
        )
        samples_done = 0
        segments = split_text(request.text, SEGMENT_CHARS)
        for number, segment in enumerate(segments, 1):
            result = SegmentResult()
            async with contextlib.aclosing(
                self._worker.stream_segment(segment, params, encoder, result)
            ) as chunks:
                async for chunk in chunks:
                    await websocket.send(chunk)
                    record.add_audio(chunk)
            if track is not None:
                for words in track.segment(
                    segment,
                    result.marks,
                    samples_done * 1000 / source_rate,
                    result.samples,
                    last=number == len(segments),
                ):
                    await websocket.send(
                        ResultResponse(trace_id=record.trace_id, result=words).to_json()
                    )
            samples_done += result.samples
        tail = encoder.finish()
        if tail:
            await websocket.send(tail)
            record.add_audio(tail)

    async def _refuse_further_messages(self, websocket: ServerConnection, trace_id: str) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for _ in websocket:
                await websocket.send(
                    ErrorResponse(
                        trace_id=trace_id,
                        error_code=codes.INVALID_PARAMETER,
                        error_msg="only one START is allowed per connection; open a new "
                        "connection for the next text",
                    ).to_json()
                )

    @staticmethod
    async def _refuse(
        websocket: ServerConnection, record: SessionRecord, code: str, message: str
    ) -> None:
        record.outcome, record.error_code = "error", code
        await websocket.send(
            ErrorResponse(trace_id=record.trace_id, error_code=code, error_msg=message).to_json()
        )
