"""Metering one relayed rtts session: timings, sizes, outcome, metrics and its log line.

The meter reads only the small control messages (through the shared protocol state
machine) and counts audio bytes; audio is never decoded or copied. Every byte of audio
relayed is metered, whatever the state of the session (audio after an ERROR included), and
a session logs at most one warning about the upstream breaking the protocol (the session's
log line counts them all).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.engine.audio import bytes_per_second
from gateway.metrics import GatewayMetrics, code_label, format_label, rate_label, voice_label
from rtts_plugin.protocol.session import (
    ClientSession,
    Ended,
    Event,
    Failed,
    ProtocolViolation,
    SessionState,
    Started,
)

session_log = logging.getLogger("gateway.sessions")
logger = logging.getLogger(__name__)


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
    protocol_violations: int = 0
    on_first_audio: Callable[[], None] | None = None
    """Called once, a loop turn after the first audio is counted: once it has been relayed
    (the count comes as the scanner reads it, before it is written). What waits for it: a
    spare's replacement, the next ClientHello."""

    def client_message(self, message: str | bytes) -> None:
        """Note what the client sent; only its first text frame (START) is read."""
        if self.start_sent is not None or not isinstance(message, str):
            return
        self.start_sent = time.monotonic()
        try:
            request = json.loads(message)
            config = request.get("config") or {}
            text = request.get("text")
        except (ValueError, AttributeError, RecursionError):
            return  # the upstream will answer it with an ERROR; relay it all the same
        if isinstance(config, dict):
            self.voice = voice_label(config.get("property", "chinese_xiaoyan_common"))
            self.audio_format = format_label(config.get("audio_format", "pcm"))
            self.sample_rate = rate_label(config.get("sample_rate", "8000"))
        if isinstance(text, str):
            self.text_chars = len(text)

    def upstream_audio(self, size: int) -> None:
        """Count ``size`` bytes of audio relayed from the upstream (the hot path: no parsing)."""
        if self.state.state is not SessionState.STREAMING:
            # Before START or after the end: the state machine says what that means.
            self._events(self.state.receive_binary(b""), time.monotonic())
        self.audio_bytes += size
        if self.first_audio is None:
            self.first_audio = time.monotonic()
            if self.on_first_audio is not None:
                asyncio.get_running_loop().call_soon(self.on_first_audio)

    @property
    def counting_audio_only(self) -> bool:
        """Audio from the upstream now only adds to :attr:`audio_bytes` (the fast path's case)."""
        return self.state.state is SessionState.STREAMING and self.first_audio is not None

    def upstream_message(self, message: str) -> None:
        """Note a control message from the upstream."""
        self._events(self.state.receive_text(message), time.monotonic())

    def _events(self, events: list[Event], now: float) -> None:
        for event in events:
            match event:
                case Started():
                    self.started = now
                    self.trace_id = event.trace_id
                case Ended():
                    self.ended = now
                    self.outcome = self.outcome or "normal"
                case Failed():
                    self.outcome = self.outcome or ("fatal" if event.kind == "fatal" else "error")
                    fallback = "protocol" if event.kind == "protocol" else "other"
                    self.code = self.code or event.error_code or fallback
                    self.trace_id = self.trace_id or event.trace_id
                case ProtocolViolation():
                    self.protocol_violations += 1
                    if self.protocol_violations == 1:  # one line per session, not per frame
                        logger.warning(
                            "upstream broke the protocol (project %s, trace_id %s): %s; "
                            "further violations in this session are only counted",
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
        if outcome not in ("normal", "client_cancelled"):  # a hang-up is not an error
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
        if session_log.isEnabledFor(logging.INFO):  # the JSON is not free: build it only if logged
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
            "protocol_violations": self.protocol_violations,
            "upstream_connect_s": round(self.upstream_connect_s, 4),
            "time_to_start_s": since_start(self.started),
            "time_to_first_audio_s": since_start(self.first_audio),
            "time_to_end_s": since_start(self.ended),
            "duration_s": round(end - self.accepted, 4),
        }
