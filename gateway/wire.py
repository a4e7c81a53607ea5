"""Finding WebSocket frame boundaries in a byte stream without re-encoding it (pure, no I/O).

The gateway relays a session by passing each hop's bytes to the other hop unchanged (see
:mod:`gateway.splice`). That is valid because a client masks its frames, as the upstream
expects from a client, and a server does not, as the client expects from a server, and
because neither hop negotiates an extension. What the relay still needs from the stream is
what a :class:`FrameScanner` finds: where a close frame begins (closing handshakes are run
per hop), whether a frame breaks RFC 6455 (the hop is failed with the right close code), and
the content of the few messages the meter reads. Audio payloads are only counted.

What a scanner holds is bounded: a frame header split between reads (at most 14 bytes), a
close frame's payload (at most 125 bytes) and the raw bytes of one unfinished text message
(its payload limit plus :data:`FRAMING_ALLOWANCE` for fragment headers). Control frames are
never held: a ping or pong that arrives inside a fragmented text message is forwarded at
once, ahead of the message (RFC 6455 §5.4 lets control frames be injected anywhere), and a
binary payload is never copied.
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
FRAMING_ALLOWANCE: Final = 64 * 1024
"""Raw bytes an unfinished text message may hold beyond its payload limit: frame headers.

About 10,000 minimal fragments: room for a client that streams its text a token at a time,
while endless empty fragments (no payload, so no payload limit) still end in 1009.
"""

OP_CONTINUATION: Final = Opcode.CONT.value
OP_TEXT: Final = Opcode.TEXT.value
OP_BINARY: Final = Opcode.BINARY.value
OP_CLOSE: Final = Opcode.CLOSE.value
OP_PING: Final = Opcode.PING.value
OP_PONG: Final = Opcode.PONG.value
_DATA_OPCODES: Final = frozenset({OP_CONTINUATION, OP_TEXT, OP_BINARY})
_CONTROL_OPCODES: Final = frozenset({OP_CLOSE, Opcode.PING.value, Opcode.PONG.value})


@dataclass(frozen=True, slots=True)
class MessageSink:
    """Where a scanner reports what it reads."""

    message: Callable[[str], None]
    """Takes a complete text message (decoded)."""
    binary_passed: Callable[[int], None]
    """Takes how many more payload bytes of binary messages went through (never read)."""


def _ignore(_: object) -> None:
    return None


IGNORE: Final = MessageSink(message=_ignore, binary_passed=_ignore)
"""A sink for a stream that is only scanned for its close frame any more."""


@dataclass(slots=True)
class PingLedger:
    """Pings one side sent through the relay, and the pongs the other side answered.

    A peer answers every ping with a pong, which it buffers if nobody reads it (websockets
    does, so the local engine would): past ``limit`` pings unanswered, the sender is
    closed with 1008 instead of being relayed more of them.
    """

    limit: int
    sent: int = 0
    answered: int = 0

    @property
    def full(self) -> bool:
        """No further ping may be relayed until pongs come back."""
        return self.sent - self.answered >= self.limit


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


_SMALL_PIECE: Final = 4096
_GATHERED_PIECE: Final = 64 * 1024

# What happens to the bytes of the frame being scanned.
_FORWARD: Final = 0
_HOLD: Final = 1  # part of a text message: forwarded once it is complete and valid UTF-8
_DROP: Final = 2  # a close frame (answered per hop), a violation, or anything after them


class _Held:
    """The raw bytes of an unfinished text message, kept as pieces, never one growing buffer.

    A buffer grown read by read is reallocated again and again; with many sessions doing it
    at once the heap fragments to about twice what they hold. Large pieces of a read are
    kept as they are; small ones are gathered into pieces of up to 64 KiB, so a peer that
    sends a byte at a time costs no more than one that sends big reads.
    """

    __slots__ = ("_pieces", "_small", "size")

    def __init__(self) -> None:
        self._pieces: list[bytes] = []
        self._small = bytearray()
        self.size = 0

    def add(self, data: bytes) -> None:
        self.size += len(data)
        if len(data) >= _SMALL_PIECE:
            self._seal()
            self._pieces.append(data)
            return
        self._small += data
        if len(self._small) >= _GATHERED_PIECE:
            self._seal()

    def clear(self) -> None:
        self._pieces, self._small, self.size = [], bytearray(), 0

    def take(self) -> bytes:
        """All of it, in one piece; the holder is empty again."""
        self._seal()
        pieces, self._pieces, self.size = self._pieces, [], 0
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def _seal(self) -> None:
        if self._small:
            self._pieces.append(bytes(self._small))
            self._small = bytearray()


class FrameScanner:
    """Scans one direction of a WebSocket stream: what may be passed on, and what it says.

    ``masked`` is whether this direction's frames must be masked (client to server).
    :meth:`feed` returns the bytes that may be forwarded now, unchanged and in order:
    binary frames (audio) and control frames at once; a text message once it is complete
    and valid UTF-8, as the receiving hop would check it; nothing of a close frame, of a
    frame that breaks the protocol, or of what follows them. A frame header split between
    reads is held until it is complete. Binary payloads are only counted, never copied.
    What is read reaches the sink through :meth:`deliver`.

    ``max_message_bytes`` bounds every message's payload; ``max_text_bytes`` (default the
    same) bounds text messages, the only ones held. ``pings_sent`` limits the pings of this
    direction awaiting an answer; ``pongs_answered`` is the other direction's ledger, which
    this direction's pongs settle.
    """

    def __init__(
        self,
        sink: MessageSink,
        *,
        masked: bool,
        max_message_bytes: int,
        max_text_bytes: int | None = None,
        max_unread_texts: int | None = None,
        pings_sent: PingLedger | None = None,
        pongs_answered: PingLedger | None = None,
    ) -> None:
        self.sink = sink
        """Where messages go; replaceable (with :data:`IGNORE` once relaying stops)."""
        self._masked = masked
        self._max_message_bytes = max_message_bytes
        self._max_text_bytes = max_message_bytes if max_text_bytes is None else max_text_bytes
        self._max_unread_texts = max_unread_texts  # texts read ahead of the sink, if limited
        self._pings_sent = pings_sent  # the pings of this direction, if they are limited
        self._pongs_answered = pongs_answered  # the pings this direction's pongs answer
        # The current read: its bytes, what is to be returned, and where the run of bytes
        # with the current fate began.
        self._data = b""
        self._out: list[bytes] = []
        self._run_start = 0
        self._fate = _FORWARD
        self._held = _Held()  # raw frames of a text message not yet complete
        self._holding = True
        self._header = b""  # a frame header split between reads
        # The current frame and message.
        self._remaining = 0  # payload bytes of the current frame still to come
        self._frame_fate = _FORWARD
        self._opcode = 0
        self._fin = True
        self._mask = b""
        self._counting = False  # the current frame is binary: its payload is counted
        self._frame = bytearray()  # a close frame's payload (at most 125 bytes)
        self._message_opcode: int | None = None  # of a fragmented message in progress
        self._message_size = 0  # its payload so far
        self._message_raw = 0  # a text message's frames so far, headers included
        # Read or counted, not yet given to the sink: texts, and binary sizes after them.
        self._pending: list[str | int] = []
        self._delivered = 0  # of _pending, by a deliver() with a limit
        self.unread_texts = 0
        """Texts in :attr:`_pending` not given to the sink yet."""
        self.close: Close | None = None
        """The close frame received, once complete (its code is 1005 if it carried none)."""
        self.violation: Violation | None = None
        """Why this direction must be failed, if it broke the protocol."""

    def deliver(self, limit: int | None = None) -> bool:
        """Give the sink the messages read by :meth:`feed`, in order; at most ``limit`` texts.

        Separate from :meth:`feed` so that the relay can forward the bytes first, and the
        frames that follow them too (:class:`~gateway.splice.Splice`): parsing a control
        message for the meter then costs the caller no latency. Returns whether some are
        left (``limit``: a flood of texts is metered over several loop turns).
        """
        pending = self._pending
        if not pending:  # the usual case, once per read: no new list
            return False
        index, texts, count = self._delivered, 0, len(pending)
        sink = self.sink
        while index < count:
            item = pending[index]
            index += 1
            if isinstance(item, str):
                sink.message(item)
                texts += 1
                if texts == limit:
                    break
            else:
                sink.binary_passed(item)
        self.unread_texts -= texts
        if index < count:
            self._delivered = index
            return True
        self._pending, self._delivered = [], 0
        return False

    @property
    def _over_unread_texts(self) -> bool:
        limit = self._max_unread_texts
        return limit is not None and self.unread_texts >= limit

    @property
    def undelivered(self) -> bool:
        """Messages were read that :meth:`deliver` has not given the sink yet."""
        return bool(self._pending)

    @property
    def stopped(self) -> bool:
        """Nothing more is scanned or forwarded: a close frame or a violation was seen."""
        return self.close is not None or self.violation is not None

    @property
    def at_rest(self) -> bool:
        """Between frames and messages with nothing held or pending, and not stopped.

        A read of whole binary frames would then only be forwarded and counted, leaving the
        scanner as it is: what the compiled fast path (:mod:`gateway.fastpath`) relies on.
        """
        return not (
            self._remaining
            or self._header
            or self._message_opcode is not None
            or self._pending
            or self.stopped
        )

    @property
    def mid_frame(self) -> bool:
        """What was forwarded so far ends inside a frame: nothing else may be written next."""
        return self._remaining > 0 and self._frame_fate == _FORWARD

    def stop_holding(self) -> None:
        """Nothing will be forwarded any more: drop what is held, and hold nothing again."""
        self._holding = False
        self._held.clear()

    @property
    def held_bytes(self) -> int:
        """Raw bytes held for an unfinished text message and a split header."""
        return self._held.size + len(self._header)

    def feed(self, data: bytes) -> bytes:
        """Scan the next bytes of the stream; return those that may be forwarded now."""
        if self.stopped:
            return b""
        self._data, self._out, self._run_start = data, [], 0
        pos, end = 0, len(data)
        while pos < end and not self.stopped:
            if self._remaining:
                take = min(self._remaining, end - pos)
                if self._counting:
                    self._count(take)
                elif self._opcode == OP_CLOSE:
                    self._frame += data[pos : pos + take]
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._frame_complete(pos)
                continue
            if not self._header and self._message_opcode is None:
                skipped = 0 if self._masked else self._skip_audio_frame(data, pos, end)
                if not skipped:
                    skipped = self._whole_text_frame(data, pos, end)
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
                elif fate == _HOLD and self._holding:
                    self._held.add(carried)
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
        if data[pos] != 0x82 or pos + 2 > end or data[pos + 1] & 0x80:  # FIN + binary, unmasked
            return 0
        short = _short_length(data, pos, end)
        if short is None:
            return 0
        length, size = short
        if pos + size + length > end or length > self._max_message_bytes:
            return 0
        self._switch(pos, _FORWARD)
        self._count(length)
        return size + length

    def _whole_text_frame(self, data: bytes, pos: int, end: int) -> int:
        """A control message's usual shape: one whole unfragmented text frame in this read.

        Read and queued for the sink in one step, with the checks the general path makes
        (masking as this direction must, the text bound, UTF-8). Returns its size, or 0 to
        take the general path (anything else, or a frame that fails a check: the general
        path reports it).
        """
        if data[pos] != 0x81 or pos + 2 > end:  # FIN + text, no reserved bits
            return 0
        short = _short_length(data, pos, end)
        if short is None or bool(data[pos + 1] & 0x80) != self._masked:
            return 0
        length, size = short
        if self._masked:
            size += 4
        stop = pos + size + length
        if stop > end or length > self._max_text_bytes or self._over_unread_texts:
            return 0
        payload = data[pos + size : stop]
        if self._masked:
            payload = apply_mask(payload, data[pos + size - 4 : pos + size])
        try:
            text = payload.decode()
        except UnicodeDecodeError:
            return 0
        self._switch(pos, _FORWARD)
        self._pending.append(text)
        self.unread_texts += 1
        return size + length

    def _count(self, size: int) -> None:
        """Binary payload bytes went through: to the sink now, or after a pending text."""
        if self._pending:
            self._pending.append(size)
        else:
            self.sink.binary_passed(size)

    # -- runs of bytes ---------------------------------------------------------------------

    def _flush(self, at: int) -> None:
        """Settle the bytes from the run's start to ``at`` according to their fate."""
        if at > self._run_start:
            if self._fate == _FORWARD:
                self._out.append(self._data[self._run_start : at])
            elif self._fate == _HOLD and self._holding:
                self._held.add(self._data[self._run_start : at])
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
        self._counting = False
        problem = self._check(first, second, fin, opcode, length)
        if problem is None and opcode not in _CONTROL_OPCODES:
            problem = self._grow_message(opcode, len(header), length)
        if problem is not None:
            self.violation, self._remaining = problem, 0
            self._frame_fate = _DROP
            return _DROP
        if opcode == OP_CLOSE:
            fate = _DROP
        elif opcode in _CONTROL_OPCODES:  # pings and pongs pass through at once
            problem = self._ping_or_pong(opcode)
            if problem is not None:
                self.violation, self._remaining = problem, 0
                self._frame_fate = _DROP
                return _DROP
            fate = _FORWARD
        elif self._message_opcode == OP_TEXT:
            fate = _HOLD
        else:
            self._counting = True
            fate = _FORWARD
        self._frame_fate = fate
        return fate

    def _ping_or_pong(self, opcode: int) -> Violation | None:
        if opcode == OP_PING and self._pings_sent is not None:
            if self._pings_sent.full:
                return Violation(
                    CloseCode.POLICY_VIOLATION,
                    f"more than {self._pings_sent.limit} pings unanswered",
                )
            self._pings_sent.sent += 1
        elif opcode == OP_PONG and self._pongs_answered is not None:
            ledger = self._pongs_answered
            ledger.answered = min(ledger.answered + 1, ledger.sent)
        return None

    def _grow_message(self, opcode: int, header_size: int, length: int) -> Violation | None:
        """Account for a data frame; a message that outgrows its bound is a violation."""
        if opcode != OP_CONTINUATION:
            if opcode == OP_TEXT and self._over_unread_texts:
                return Violation(
                    CloseCode.POLICY_VIOLATION,
                    f"over {self._max_unread_texts} control messages unread",
                )
            self._message_opcode, self._message_size, self._message_raw = opcode, 0, 0
        self._message_size += length
        if self._message_opcode == OP_TEXT:
            self._message_raw += header_size + length
            if self._message_size > self._max_text_bytes:
                return Violation(
                    CloseCode.MESSAGE_TOO_BIG, f"text message over {self._max_text_bytes} bytes"
                )
            if self._message_raw > self._max_text_bytes + FRAMING_ALLOWANCE:
                return Violation(
                    CloseCode.MESSAGE_TOO_BIG,
                    f"text message over {self._max_text_bytes} bytes with its frame headers",
                )
        elif self._message_size > self._max_message_bytes:
            return Violation(
                CloseCode.MESSAGE_TOO_BIG, f"message over {self._max_message_bytes} bytes"
            )
        return None

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
        opcode = self._opcode
        if opcode == OP_CLOSE:
            payload = bytes(self._frame)
            if self._mask and payload:
                payload = apply_mask(payload, self._mask)
            try:
                self.close = Close.parse(payload)
            except ProtocolError as exc:
                self.violation = Violation(CloseCode.PROTOCOL_ERROR, str(exc))
            except UnicodeDecodeError:
                self.violation = Violation(CloseCode.INVALID_DATA, "close reason is not UTF-8")
            return
        if opcode in _CONTROL_OPCODES or not self._fin:
            return
        message_opcode, self._message_opcode = self._message_opcode, None
        if message_opcode != OP_TEXT:
            return
        self._flush(at)  # the message's last bytes join the held ones
        held = self._held.take()
        self._fate = _FORWARD
        try:
            text = _payload_of(held, masked=self._masked).decode()
        except UnicodeDecodeError as exc:
            self._fate = _DROP  # nothing after it is forwarded either
            self.violation = Violation(
                CloseCode.INVALID_DATA, f"{exc.reason} at position {exc.start}"
            )
            return
        self._out.append(held)  # the raw frames, unchanged
        self._pending.append(text)
        self.unread_texts += 1


def _short_length(data: bytes, pos: int, end: int) -> tuple[int, int] | None:
    """The payload length and header size (no mask key) of a frame with a short length.

    None if the frame at ``pos`` has a 64-bit length or its length bytes are not all in
    ``data`` (up to ``end``).
    """
    length = data[pos + 1] & 0x7F
    if length < 126:
        return length, 2
    if length == 126 and pos + 4 <= end:
        return int.from_bytes(data[pos + 2 : pos + 4]), 4
    return None


def _payload_of(frames: bytes, *, masked: bool) -> bytes:
    """The payload of a text message from its raw frames (checked already, so well formed).

    The frames are kept raw, to be forwarded unchanged; the payload is only needed once
    the message is complete, so it is not kept beside them while the message is held.
    """
    parts: list[bytes] = []
    pos, end = 0, len(frames)
    with memoryview(frames) as view:
        while pos < end:
            size = _header_size(view[pos : pos + _LONGEST_HEADER])
            assert size is not None
            length = view[pos + 1] & 0x7F
            if length == 126:
                length = int.from_bytes(view[pos + 2 : pos + 4])
            elif length == 127:
                length = int.from_bytes(view[pos + 2 : pos + 10])
            payload = view[pos + size : pos + size + length]
            parts.append(
                apply_mask(payload, bytes(view[pos + size - 4 : pos + size]))
                if masked
                else bytes(payload)
            )
            pos += size + length
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _header_size(header: bytes | bytearray | memoryview) -> int | None:
    """The length of the frame header that ``header`` begins, if it is known yet."""
    if len(header) < 2:
        return None
    second = header[1]
    length = second & 0x7F
    size = 2 + (2 if length == 126 else 8 if length == 127 else 0)
    return size + 4 if second & 0x80 else size
