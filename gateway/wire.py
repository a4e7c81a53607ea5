"""Finding WebSocket frame boundaries in a byte stream without re-encoding it (pure, no I/O).

The gateway relays a session by passing each hop's bytes to the other hop unchanged (see
:mod:`gateway.splice`). That is valid because a client masks its frames, as the upstream
expects from a client, and a server does not, as the client expects from a server, and
because neither hop negotiates an extension. What the relay still needs from the stream is
what a :class:`FrameScanner` finds: where a close frame begins (closing handshakes are run
per hop), whether a frame breaks RFC 6455 (the hop is failed with the right close code), and
the content of the few messages the meter reads. Audio payloads are only counted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from websockets.exceptions import ProtocolError
from websockets.frames import Close, CloseCode, Frame, Opcode

try:  # websockets' C implementation, as websockets.frames itself picks it
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover (a build without the extension)
    from websockets.utils import apply_mask

_CONTROL_MAX: Final = 125
_LONGEST_HEADER: Final = 14  # 2 + 8 (64-bit length) + 4 (mask)
_REASON_MAX_BYTES: Final = 123  # a control frame's 125 bytes minus the 2-byte code

OP_CONTINUATION: Final = Opcode.CONT.value
OP_TEXT: Final = Opcode.TEXT.value
OP_BINARY: Final = Opcode.BINARY.value
OP_CLOSE: Final = Opcode.CLOSE.value
_DATA_OPCODES: Final = frozenset({OP_CONTINUATION, OP_TEXT, OP_BINARY})
_CONTROL_OPCODES: Final = frozenset({OP_CLOSE, Opcode.PING.value, Opcode.PONG.value})


@dataclass(frozen=True, slots=True)
class MessageSink:
    """Where a scanner reports what it reads."""

    wants_binary: Callable[[], bool]
    """Whether the binary message that begins now should be read (else only counted)."""
    message: Callable[[str | bytes], None]
    """Takes a complete text message (decoded), or a binary one that was asked for."""
    binary_passed: Callable[[int], None]
    """Takes how many more payload bytes of binary messages not read went through."""


def _ignore(_: object) -> None:
    return None


IGNORE: Final = MessageSink(wants_binary=lambda: False, message=_ignore, binary_passed=_ignore)
"""A sink for a stream that is only scanned for its close frame any more."""


@dataclass(frozen=True, slots=True)
class Violation:
    """A frame that breaks the protocol: the hop that sent it is failed with ``code``."""

    code: int
    reason: str


def close_frame(code: int, reason: str, *, mask: bool) -> bytes:
    """A close frame (masked when we are the client on that hop); the reason is cut to fit.

    Code 1005 ("no status") makes an empty close frame, the echo of one that had no code.
    """
    if code == CloseCode.NO_STATUS_RCVD:
        payload = b""
    else:
        cut = reason.encode()[:_REASON_MAX_BYTES].decode(errors="ignore")
        payload = Close(code, cut).serialize()
    return Frame(Opcode.CLOSE, payload).serialize(mask=mask)


def sendable_close_code(code: int | None, fallback: int) -> int:
    """``code`` if a close frame may carry it (RFC 6455 §7.4), else ``fallback``."""
    if code is None:
        return fallback
    try:
        Close(code, "").check()
    except ProtocolError:
        return fallback
    return code


# What happens to the bytes of the frame being scanned.
_FORWARD: Final = 0
_HOLD: Final = 1  # part of a text message: forwarded once it is complete and valid UTF-8
_DROP: Final = 2  # a close frame (answered per hop), a violation, or anything after them


class FrameScanner:
    """Scans one direction of a WebSocket stream: what may be passed on, and what it says.

    ``masked`` is whether this direction's frames must be masked (client to server).
    :meth:`feed` returns the bytes that may be forwarded now, unchanged and in order:
    binary frames (audio) at once; a text message once it is complete and valid UTF-8, as
    the receiving hop would check it; nothing of a close frame, of a frame that breaks the
    protocol, or of what follows them. A frame header split between reads is held until
    it is complete. Binary messages are read only when the sink asks, so audio is never
    copied, only counted. What is read reaches the sink through :meth:`deliver`.
    """

    def __init__(self, sink: MessageSink, *, masked: bool, max_message_bytes: int) -> None:
        self.sink = sink
        """Where messages go; replaceable (with :data:`IGNORE` once relaying stops)."""
        self._masked = masked
        self._max_message_bytes = max_message_bytes
        # The current read: its bytes, what is to be returned, and where the run of bytes
        # with the current fate began.
        self._data = b""
        self._out: list[bytes] = []
        self._run_start = 0
        self._fate = _FORWARD
        self._held = bytearray()  # raw bytes of a text message not yet complete
        self._header = b""  # a frame header split between reads
        # The current frame and message.
        self._remaining = 0  # payload bytes of the current frame still to come
        self._opcode = 0
        self._fin = True
        self._mask = b""
        self._reading = False  # collecting the current frame's payload
        self._counting = False  # counting it as binary that was not read (audio)
        self._frame = bytearray()
        self._message_opcode: int | None = None  # of a fragmented message in progress
        self._message_size = 0
        self._message_read = False
        self._message = bytearray()
        self._pending: list[str | bytes] = []  # read, not yet given to the sink
        self.close: Close | None = None
        """The close frame received, once complete (its code is 1005 if it carried none)."""
        self.violation: Violation | None = None
        """Why this direction must be failed, if it broke the protocol."""

    def deliver(self) -> None:
        """Give the sink the messages read by :meth:`feed`, in order.

        Separate from :meth:`feed` so that the relay can forward the bytes first: parsing a
        control message for the meter then costs the caller no latency.
        """
        if not self._pending:  # the usual case, once per read: no new list
            return
        pending, self._pending = self._pending, []
        for message in pending:
            self.sink.message(message)

    @property
    def stopped(self) -> bool:
        """Nothing more is scanned or forwarded: a close frame or a violation was seen."""
        return self.close is not None or self.violation is not None

    def feed(self, data: bytes) -> bytes:
        """Scan the next bytes of the stream; return those that may be forwarded now."""
        if self.stopped:
            return b""
        self._data, self._out, self._run_start = data, [], 0
        pos, end = 0, len(data)
        while pos < end and not self.stopped:
            if self._remaining:
                take = min(self._remaining, end - pos)
                if self._reading:
                    self._frame += data[pos : pos + take]
                elif self._counting:
                    self.sink.binary_passed(take)
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._frame_complete(pos)
                continue
            if not self._masked and not self._header and self._message_opcode is None:
                skipped = self._skip_audio_frame(data, pos, end)
                if skipped:
                    pos += skipped
                    continue
            start = pos
            carried = self._header
            header = carried + data[pos : pos + _LONGEST_HEADER - len(carried)]
            size = _header_size(header)
            if size is None or len(header) < size:
                self._flush(start)
                self._header, self._run_start = header, end  # wait for the rest of it
                break
            pos += size - len(carried)
            self._header = b""
            fate = self._begin_frame(header[:size])
            if carried:  # the header's first bytes came with the previous read
                if fate == _FORWARD:
                    self._out.append(carried)
                elif fate == _HOLD:
                    self._held += carried
            self._switch(start, fate)
            if not self._remaining and self.violation is None:
                self._frame_complete(pos)
        self._flush(end)
        out, self._out, self._data = self._out, [], b""
        return out[0] if len(out) == 1 else b"".join(out)

    def _skip_audio_frame(self, data: bytes, pos: int, end: int) -> int:
        """The hot path: a whole unfragmented binary frame from a server, only counted.

        Returns its size, or 0 to take the general path (anything else, or a frame cut
        by the end of this read).
        """
        if data[pos] != 0x82 or pos + 2 > end:  # FIN + binary
            return 0
        length = data[pos + 1]  # and no mask bit, or the general path reports it
        size = 2
        if length == 126:
            if pos + 4 > end:
                return 0
            length, size = int.from_bytes(data[pos + 2 : pos + 4]), 4
        elif length > 126:
            return 0
        if pos + size + length > end or length > self._max_message_bytes:
            return 0
        if self._pending or self.sink.wants_binary():
            return 0
        self._switch(pos, _FORWARD)
        self.sink.binary_passed(length)
        return size + length

    # -- runs of bytes ---------------------------------------------------------------------

    def _flush(self, at: int) -> None:
        """Settle the bytes from the run's start to ``at`` according to their fate."""
        if at > self._run_start:
            if self._fate == _FORWARD:
                self._out.append(self._data[self._run_start : at])
            elif self._fate == _HOLD:
                self._held += self._data[self._run_start : at]
        self._run_start = at

    def _switch(self, at: int, fate: int) -> None:
        if fate != self._fate:
            self._flush(at)
            self._fate = fate

    # -- frames ----------------------------------------------------------------------------

    def _begin_frame(self, header: bytes) -> int:
        """Check a complete header, prepare for its payload, and say what becomes of it."""
        first, second = header[0], header[1]
        fin, opcode, length = bool(first & 0x80), first & 0x0F, second & 0x7F
        if length == 126:
            length = int.from_bytes(header[2:4])
        elif length == 127:
            length = int.from_bytes(header[2:10])
        self._fin, self._opcode, self._remaining = fin, opcode, length
        self._mask = header[-4:] if second & 0x80 else b""
        self._frame.clear()
        self._reading = self._counting = False
        problem = self._check(first, second, fin, opcode, length)
        if problem is None and opcode not in _CONTROL_OPCODES:
            if opcode != OP_CONTINUATION:
                self._message_opcode, self._message_size = opcode, 0
                # After a message not yet delivered, the sink cannot know: read it too.
                self._message_read = (
                    opcode == OP_TEXT or bool(self._pending) or self.sink.wants_binary()
                )
                self._message.clear()
            self._message_size += length
            if self._message_size > self._max_message_bytes:
                problem = Violation(
                    CloseCode.MESSAGE_TOO_BIG, f"message over {self._max_message_bytes} bytes"
                )
        if problem is not None:
            self.violation, self._remaining = problem, 0
            return _DROP
        if opcode == OP_CLOSE:
            self._reading = True
            return _DROP
        if opcode in _CONTROL_OPCODES:  # pings and pongs pass through, in order
            return _HOLD if self._message_opcode == OP_TEXT else _FORWARD
        self._reading = self._message_read
        self._counting = not self._message_read and self._message_opcode == OP_BINARY
        return _HOLD if self._message_opcode == OP_TEXT else _FORWARD

    def _check(
        self, first: int, second: int, fin: bool, opcode: int, length: int
    ) -> Violation | None:
        if first & 0x70:
            return Violation(CloseCode.PROTOCOL_ERROR, "reserved bits must be 0")
        if bool(second & 0x80) != self._masked:
            side = "a client must mask its frames" if self._masked else "a server must not mask"
            return Violation(CloseCode.PROTOCOL_ERROR, side)
        if opcode in _CONTROL_OPCODES:
            if not fin or length > _CONTROL_MAX:
                return Violation(CloseCode.PROTOCOL_ERROR, "control frame fragmented or too long")
            return None
        if opcode not in _DATA_OPCODES:
            return Violation(CloseCode.PROTOCOL_ERROR, f"invalid opcode {opcode}")
        if opcode == OP_CONTINUATION and self._message_opcode is None:
            return Violation(CloseCode.PROTOCOL_ERROR, "unexpected continuation frame")
        if opcode != OP_CONTINUATION and self._message_opcode is not None:
            return Violation(CloseCode.PROTOCOL_ERROR, "expected a continuation frame")
        return None

    def _frame_complete(self, at: int) -> None:
        """The current frame's last byte is just before ``at``."""
        payload = bytes(self._frame) if self._reading else b""
        if self._mask and payload:
            payload = apply_mask(payload, self._mask)
        if self._opcode == OP_CLOSE:
            try:
                self.close = Close.parse(payload)
            except ProtocolError as exc:
                self.violation = Violation(CloseCode.PROTOCOL_ERROR, str(exc))
            except UnicodeDecodeError:
                self.violation = Violation(CloseCode.INVALID_DATA, "close reason is not UTF-8")
            return
        if self._opcode not in _DATA_OPCODES:
            return
        if self._reading:
            self._message += payload
        if not self._fin:
            return
        opcode, self._message_opcode = self._message_opcode, None
        if opcode == OP_TEXT:
            try:
                text = self._message.decode()
            except UnicodeDecodeError as exc:
                self._switch(at, _DROP)
                self._held.clear()
                self.violation = Violation(
                    CloseCode.INVALID_DATA, f"{exc.reason} at position {exc.start}"
                )
                return
            self._flush(at)  # the message's last bytes join the held ones, then all go
            self._out.append(bytes(self._held))
            self._held.clear()
            self._fate = _FORWARD
            self._pending.append(text)
        elif self._message_read:
            self._pending.append(bytes(self._message))
        self._message.clear()


def _header_size(header: bytes) -> int | None:
    """The length of the frame header that ``header`` begins, if it is known yet."""
    if len(header) < 2:
        return None
    second = header[1]
    length = second & 0x7F
    size = 2 + (2 if length == 126 else 8 if length == 127 else 0)
    return size + 4 if second & 0x80 else size
