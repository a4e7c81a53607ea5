"""Sans-I/O state machine of one rtts connection, seen from the client side.

Feed it what arrives (:meth:`ClientSession.receive_text`, :meth:`~ClientSession.receive_binary`,
:meth:`~ClientSession.connection_closed`) and act on the events it returns. It performs no
I/O, so the plugin, the gateway's metering and the tests all drive the same code.

Normal order: ``START`` → (binary audio | ``RESULT``)* → ``END``. ``ERROR``,
``FATAL_ERROR`` and a close before ``END`` are terminal failures. Whether ``END`` with
reason ``ERROR`` follows an ``ERROR`` is not documented, so both readings are accepted.
Violations (audio before ``START``, a second ``START``, anything after ``END``, malformed or
unknown messages) are reported as :class:`ProtocolViolation` events; they never raise.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from rtts_plugin.errors import ProtocolViolationError, SynthesisError
from rtts_plugin.protocol.messages import (
    EndResponse,
    ErrorResponse,
    FatalErrorResponse,
    ResultResponse,
    StartResponse,
    WordTiming,
    parse_server_message,
)


class SessionState(enum.Enum):
    """Where a session stands."""

    AWAITING_START = "awaiting_start"
    STREAMING = "streaming"
    ENDED = "ended"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Started:
    """The server accepted the request."""

    trace_id: str


@dataclass(frozen=True, slots=True)
class AudioReceived:
    """A binary audio segment, in arrival order."""

    data: bytes


@dataclass(frozen=True, slots=True)
class WordsReceived:
    """Word timings (ms from the start of this connection's output)."""

    words: tuple[WordTiming, ...]
    trace_id: str


@dataclass(frozen=True, slots=True)
class Ended:
    """Synthesis finished normally; the connection should now be closed."""

    trace_id: str


@dataclass(frozen=True, slots=True)
class Failed:
    """The session failed. ``error_code`` is Huawei's (``SIS.xxxx``) when the server gave one.

    ``kind`` is ``"error"`` (ERROR or END with reason ERROR), ``"fatal"`` (FATAL_ERROR),
    ``"protocol"`` (an unreadable control message) or ``"closed"`` (the connection ended
    before END).
    """

    kind: str
    error_code: str
    error_msg: str
    trace_id: str

    def to_error(self) -> SynthesisError:
        """The exception that reports this failure: code, message and trace id in its text."""
        return SynthesisError(self.kind, self.error_code, self.error_msg, self.trace_id)


@dataclass(frozen=True, slots=True)
class ProtocolViolation:
    """The server broke the protocol; the session goes on where that is possible."""

    description: str


Event = Started | AudioReceived | WordsReceived | Ended | Failed | ProtocolViolation


class ClientSession:
    """Tracks one rtts connection from the client's side and turns frames into events."""

    def __init__(self) -> None:
        self.state = SessionState.AWAITING_START
        self.trace_id = ""
        self.audio_bytes = 0
        self.failure: Failed | None = None
        self._end_seen = False

    @property
    def finished(self) -> bool:
        """True once the session ended or failed; nothing more is expected."""
        return self.state in (SessionState.ENDED, SessionState.FAILED)

    def receive_binary(self, data: bytes) -> list[Event]:
        """Consume one binary frame (audio)."""
        events: list[Event] = []
        if self.state is SessionState.AWAITING_START:
            # Deliver it anyway: losing audio is worse than tolerating a missing START.
            events.append(ProtocolViolation("audio received before START"))
            self.state = SessionState.STREAMING
        elif self.finished:
            return [ProtocolViolation(f"audio received after {self._terminal_name()}")]
        self.audio_bytes += len(data)
        events.append(AudioReceived(data))
        return events

    def receive_text(self, text: str) -> list[Event]:
        """Consume one text frame (a JSON control message)."""
        try:
            message = parse_server_message(text)
        except ProtocolViolationError as exc:
            if exc.recoverable or self.finished:
                return [ProtocolViolation(str(exc))]
            # An unreadable control message may have been an ERROR: fail now, precisely,
            # rather than wait for a timeout.
            return [
                ProtocolViolation(str(exc)),
                self._fail("protocol", "", str(exc), self.trace_id),
            ]
        if message.trace_id and not self.trace_id:
            self.trace_id = message.trace_id
        trace_id = message.trace_id or self.trace_id

        if isinstance(message, EndResponse) and self.state is SessionState.FAILED:
            if self._end_seen:
                return [ProtocolViolation("second END received")]
            self._end_seen = True  # END(ERROR) after ERROR: documented as possible
            return []
        if self.finished:
            return [
                ProtocolViolation(f"{message.resp_type} received after {self._terminal_name()}")
            ]

        match message:
            case StartResponse():
                if self.state is SessionState.STREAMING:
                    return [ProtocolViolation("second START received")]
                self.state = SessionState.STREAMING
                return [Started(trace_id)]
            case ResultResponse():
                events: list[Event] = []
                if self.state is SessionState.AWAITING_START:
                    events.append(ProtocolViolation("RESULT received before START"))
                    self.state = SessionState.STREAMING
                events.append(WordsReceived(tuple(message.result), trace_id))
                return events
            case EndResponse():
                self._end_seen = True
                if message.reason != "NORMAL":
                    return [
                        self._fail(
                            "error", "", f"synthesis ended with reason {message.reason}", trace_id
                        )
                    ]
                self.state = SessionState.ENDED
                return [Ended(trace_id)]
            case ErrorResponse():
                return [self._fail("error", message.error_code, message.error_msg, trace_id)]
            case FatalErrorResponse():
                return [self._fail("fatal", message.error_code, message.error_msg, trace_id)]
        raise AssertionError(f"unhandled message {message!r}")  # pragma: no cover

    def connection_closed(self, code: int | None = None, reason: str = "") -> list[Event]:
        """Record that the connection closed; a close before END is a failure."""
        if self.finished:
            return []
        detail = f"connection closed before END (close code {code if code is not None else 'none'}"
        detail += f", reason {reason!r})" if reason else ")"
        if code == 1009:
            detail += ": a message was larger than the size limit"
        return [self._fail("closed", "", detail, self.trace_id)]

    def _fail(self, kind: str, code: str, message: str, trace_id: str) -> Failed:
        self.state = SessionState.FAILED
        self.failure = Failed(kind, code, message, trace_id)
        return self.failure

    def _terminal_name(self) -> str:
        if self.state is SessionState.ENDED:
            return "END"
        return "FATAL_ERROR" if self.failure and self.failure.kind == "fatal" else "the error"
