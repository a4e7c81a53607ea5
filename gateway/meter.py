"""Relaying one rtts session between a client and the upstream, and metering it.

Frames are forwarded unchanged and in order in both directions. Metering only looks at the
small control messages (through the shared protocol state machine) and counts audio bytes;
audio is never decoded or copied beyond what the sockets need.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Final

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode

from gateway.engine.audio import bytes_per_second
from gateway.metrics import GatewayMetrics, code_label, format_label, rate_label, voice_label
from rtts_plugin.protocol.session import (
    AudioReceived,
    ClientSession,
    Ended,
    Failed,
    ProtocolViolation,
    SessionState,
    Started,
)

session_log = logging.getLogger("gateway.sessions")
logger = logging.getLogger(__name__)

# Close codes that cannot be sent on the wire (RFC 6455 §7.4.1); replaced when propagating.
_RESERVED_CLOSE_CODES: Final = frozenset({1005, 1006, 1015})
BAD_GATEWAY: Final = 1014


def sendable(code: int | None, fallback: int) -> int:
    """A close code that may be sent: the peer's own, else ``fallback``."""
    if code is None or code in _RESERVED_CLOSE_CODES or not (1000 <= code < 5000):
        return fallback
    return code


@dataclass
class SessionMeter:
    """Timings, sizes and outcome of one relayed session."""

    metrics: GatewayMetrics
    project_id: str
    upstream_connect_s: float = 0.0
    accepted: float = field(default_factory=time.monotonic)
    state: ClientSession = field(default_factory=ClientSession)
    voice: str = "none"
    audio_format: str = "pcm"
    sample_rate: str = "8000"
    text_chars: int = 0
    start_sent: float | None = None
    started: float | None = None
    first_audio: float | None = None
    ended: float | None = None
    last_upstream: float = field(default_factory=time.monotonic)
    audio_bytes: int = 0
    outcome: str | None = None
    code: str | int | None = None
    trace_id: str = ""

    def client_message(self, message: str | bytes) -> None:
        """Note what the client sent; only its first text frame (START) is read."""
        if self.start_sent is not None or not isinstance(message, str):
            return
        self.start_sent = time.monotonic()
        try:
            request = json.loads(message)
            config = request.get("config") or {}
            text = request.get("text")
        except (ValueError, AttributeError):
            return  # the upstream will answer it with an ERROR; relay it all the same
        if isinstance(config, dict):
            self.voice = voice_label(config.get("property", "chinese_xiaoyan_common"))
            self.audio_format = format_label(config.get("audio_format", "pcm"))
            self.sample_rate = rate_label(config.get("sample_rate", "8000"))
        if isinstance(text, str):
            self.text_chars = len(text)

    def upstream_message(self, message: str | bytes) -> None:
        """Note what the upstream sent: audio is only counted, control messages are parsed."""
        now = self.last_upstream = time.monotonic()
        if isinstance(message, bytes) and self.state.state is SessionState.STREAMING:
            self.audio_bytes += len(message)  # the hot path: no parsing, no allocation
            if self.first_audio is None:
                self.first_audio = now
            return
        events = (
            self.state.receive_binary(message)
            if isinstance(message, bytes)
            else self.state.receive_text(message)
        )
        for event in events:
            match event:
                case Started():
                    self.started = now
                    self.trace_id = event.trace_id
                case AudioReceived():
                    self.audio_bytes += len(event.data)
                    self.first_audio = self.first_audio or now
                case Ended():
                    self.ended = now
                    self.outcome = self.outcome or "normal"
                case Failed():
                    self.outcome = self.outcome or ("fatal" if event.kind == "fatal" else "error")
                    fallback = "protocol" if event.kind == "protocol" else "other"
                    self.code = self.code or event.error_code or fallback
                    self.trace_id = self.trace_id or event.trace_id
                case ProtocolViolation():
                    logger.warning(
                        "upstream broke the protocol (project %s, trace_id %s): %s",
                        self.project_id,
                        self.trace_id,
                        event.description,
                    )

    def fail(self, outcome: str, code: str | int | None = None) -> None:
        """Record why the session ended, unless an outcome is already known."""
        if self.outcome is None:
            self.outcome, self.code = outcome, code

    def finish(self) -> None:
        """Record the session in the metrics and write its log line."""
        metrics, backend = self.metrics, self.metrics.backend
        outcome = self.outcome or ("normal" if self.ended else "client_cancelled")
        end = time.monotonic()
        metrics.sessions.labels(
            backend, outcome, self.voice, self.sample_rate, self.audio_format
        ).inc()
        if outcome != "normal":
            metrics.errors.labels(backend, outcome, code_label(self.code)).inc()
        metrics.session_duration.labels(backend, outcome).observe(end - self.accepted)
        if self.upstream_connect_s:
            metrics.upstream_connect.labels(backend).observe(self.upstream_connect_s)
        audio_seconds = self._audio_seconds()
        if self.start_sent is not None:
            metrics.text_characters.labels(backend, self.voice).inc(self.text_chars)
            for histogram, moment in (
                (metrics.time_to_start, self.started),
                (metrics.time_to_first_audio, self.first_audio),
                (metrics.time_to_end, self.ended),
            ):
                if moment is not None:
                    histogram.labels(backend, self.voice).observe(moment - self.start_sent)
            if self.ended is not None and audio_seconds:
                rtf = (self.ended - self.start_sent) / audio_seconds
                metrics.real_time_factor.labels(backend, self.voice).observe(rtf)
        if self.audio_bytes:
            metrics.audio_bytes.labels(backend, self.audio_format, self.sample_rate).inc(
                self.audio_bytes
            )
        if audio_seconds:
            metrics.audio_seconds.labels(backend, self.voice).inc(audio_seconds)
        session_log.info(
            json.dumps(self._log_record(outcome, end, audio_seconds), ensure_ascii=False)
        )

    def _audio_seconds(self) -> float:
        if self.audio_format == "other" or self.sample_rate == "other":
            return 0.0
        rate = bytes_per_second(self.audio_format, int(self.sample_rate))  # type: ignore[arg-type]
        return self.audio_bytes / rate if rate else 0.0

    def _log_record(self, outcome: str, end: float, audio_seconds: float) -> dict[str, object]:
        def since_start(moment: float | None) -> float | None:
            if moment is None or self.start_sent is None:
                return None
            return round(moment - self.start_sent, 4)

        return {
            "event": "rtts_session",
            "trace_id": self.trace_id,
            "project_id": self.project_id,
            "backend": self.metrics.backend,
            "voice": self.voice,
            "audio_format": self.audio_format,
            "sample_rate": self.sample_rate,
            "outcome": outcome,
            "code": code_label(self.code),
            "text_chars": self.text_chars,
            "audio_bytes": self.audio_bytes,
            "audio_seconds": round(audio_seconds, 3),
            "upstream_connect_s": round(self.upstream_connect_s, 4),
            "time_to_start_s": since_start(self.started),
            "time_to_first_audio_s": since_start(self.first_audio),
            "time_to_end_s": since_start(self.ended),
            "duration_s": round(end - self.accepted, 4),
        }


async def relay(client: ServerConnection, upstream: ClientConnection, meter: SessionMeter) -> None:
    """Forward frames both ways until one side closes, then close the other side to match."""

    async def client_to_upstream() -> None:
        try:
            async for message in client:
                meter.client_message(message)
                await upstream.send(message)
        except ConnectionClosed:
            pass

    async def upstream_to_client() -> None:
        try:
            async for message in upstream:
                meter.upstream_message(message)
                await client.send(message)
        except ConnectionClosed:
            pass

    downstream = asyncio.create_task(upstream_to_client())
    upstream_bound = asyncio.create_task(client_to_upstream())
    try:
        done, _ = await asyncio.wait(
            {downstream, upstream_bound}, return_when=asyncio.FIRST_COMPLETED
        )
        if downstream in done:
            await _upstream_finished(client, upstream, meter)
        else:
            await _client_finished(client, upstream, meter)
    finally:
        for task in (downstream, upstream_bound):
            task.cancel()
        await asyncio.gather(downstream, upstream_bound, return_exceptions=True)


async def _upstream_finished(
    client: ServerConnection, upstream: ClientConnection, meter: SessionMeter
) -> None:
    """The upstream closed: pass its close on; before END that is an error for the client."""
    received, sent = upstream.protocol.close_rcvd, upstream.protocol.close_sent
    code = received.code if received else None
    if not meter.state.finished:
        too_big = sent is not None and sent.code == CloseCode.MESSAGE_TOO_BIG
        meter.fail(
            "upstream_closed", "too_big" if too_big else "network" if code is None else "other"
        )
        meter.state.connection_closed(code)
        error_code = None if code == CloseCode.NORMAL_CLOSURE else code
        await client.close(sendable(error_code, BAD_GATEWAY), "upstream closed before END")
    else:
        await client.close(
            sendable(code, CloseCode.NORMAL_CLOSURE), received.reason if received else ""
        )


async def _client_finished(
    client: ServerConnection, upstream: ClientConnection, meter: SessionMeter
) -> None:
    """The client closed: close the upstream the same way (a cancellation before END)."""
    received, sent = client.protocol.close_rcvd, client.protocol.close_sent
    code = received.code if received else None
    if sent is not None and sent.code == CloseCode.MESSAGE_TOO_BIG:
        meter.fail("rejected", "too_big")
    elif not meter.state.finished:
        meter.fail("client_cancelled")
    await upstream.close(sendable(code, CloseCode.GOING_AWAY), received.reason if received else "")
