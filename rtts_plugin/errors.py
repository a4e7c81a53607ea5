"""Exception hierarchy of the rtts plugin; every error it raises is an :class:`RttsError`."""

from __future__ import annotations


class RttsError(Exception):
    """Root of every exception raised by ``rtts_plugin``."""


class InvalidRequestError(RttsError):
    """A START request breaks the rtts rules; carries the Huawei error code the cloud would use.

    ``field`` names the offending field (``None`` for whole-message problems such as
    malformed JSON) so callers can point the user at it.
    """

    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.field = field


class ProtocolViolationError(RttsError):
    """A peer sent something the rtts protocol does not allow at that point.

    ``recoverable`` is true for a well-formed message of an unknown ``resp_type`` (perhaps a
    newer protocol): it can be skipped. A message that cannot be read at all is not.
    """

    def __init__(self, message: str, *, recoverable: bool = False) -> None:
        super().__init__(message)
        self.recoverable = recoverable


class HandshakeError(RttsError):
    """The WebSocket upgrade was refused (HTTP ``status``) or could not be made (``status`` 0).

    ``error_code`` is Huawei's code from the response body (``APIG.0301``, ``SIS.0101`` …)
    when the body carried one. ``retry_after`` is the response's ``Retry-After`` in seconds
    when it had one (a gateway whose upstream's circuit is open answers 503 with it).
    """

    def __init__(
        self, status: int, error_code: str, message: str, *, retry_after: float | None = None
    ) -> None:
        prefix = f"HTTP {status}" if status else "connection failed"
        code = f" {error_code}" if error_code else ""
        super().__init__(f"rtts handshake failed ({prefix}{code}): {message}")
        self.status = status
        self.error_code = error_code
        self.message = message
        self.retry_after = retry_after


def retry_after_seconds(error: RttsError) -> float | None:
    """The seconds a refusal asked the client to wait (its ``Retry-After``), if it asked."""
    return error.retry_after if isinstance(error, HandshakeError) else None


class SynthesisError(RttsError):
    """The server reported ERROR or FATAL_ERROR, or the connection ended before END."""

    def __init__(self, kind: str, error_code: str, error_msg: str, trace_id: str) -> None:
        parts = [error_code or kind.upper(), error_msg or "no message"]
        text = ": ".join(parts)
        super().__init__(f"{text} (trace_id={trace_id})" if trace_id else text)
        self.kind = kind
        self.error_code = error_code
        self.error_msg = error_msg
        self.trace_id = trace_id


class RttsTimeoutError(RttsError):
    """A bounded wait ran out: ``phase`` is connect, START, audio (gap) or END.

    ``setting`` names the connection setting whose limit ran out (e.g. ``first_audio_timeout``)
    when the wait was bounded by one.
    """

    def __init__(self, phase: str, seconds: float, trace_id: str = "", setting: str = "") -> None:
        notes = [f"trace_id={trace_id}"] if trace_id else []
        if setting:
            notes.append(f"limit: {setting}")
        where = f" ({', '.join(notes)})" if notes else ""
        super().__init__(f"timed out after {seconds:g} s waiting for {phase}{where}")
        self.phase = phase
        self.seconds = seconds
        self.trace_id = trace_id
        self.setting = setting


class AuthenticationError(RttsError):
    """Credentials could not be obtained or were rejected (IAM token request, 401/403)."""


class InvalidSettingsError(RttsError, ValueError):
    """A setting of the plugin is invalid; the message names it, its value and the rule."""
