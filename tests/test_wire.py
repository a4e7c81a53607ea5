"""The frame scanner behind the gateway's splice: what it forwards, reads, counts and refuses.

Streams are built with websockets' own frame encoder, so the scanner is checked against an
independent implementation of RFC 6455, and cut into chunks at arbitrary points (one byte at
a time included) because TCP delivers them that way.
"""

from __future__ import annotations

import itertools
import struct
from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st
from websockets.frames import Close, CloseCode, Frame, Opcode

from gateway.wire import (
    FrameScanner,
    MessageSink,
    Violation,
    close_frame,
    sendable_close_code,
)


@dataclass
class Recorder:
    """A sink that keeps everything it is told."""

    read_binary: bool = False
    messages: list[str | bytes] = field(default_factory=list)
    binary_bytes: int = 0

    def sink(self) -> MessageSink:
        return MessageSink(
            wants_binary=lambda: self.read_binary,
            message=self.messages.append,
            binary_passed=self.count,
        )

    def count(self, size: int) -> None:
        self.binary_bytes += size


def encode(opcode: Opcode, payload: bytes, *, fin: bool = True, mask: bool) -> bytes:
    return Frame(opcode, payload, fin=fin).serialize(mask=mask)


def scan(
    stream: bytes,
    cuts: list[int],
    *,
    masked: bool,
    read_binary: bool = False,
    max_message_bytes: int = 1 << 24,
) -> tuple[bytes, FrameScanner, Recorder]:
    """Feed ``stream`` cut at ``cuts``; return all that was forwarded, the scanner, the sink."""
    recorder = Recorder(read_binary)
    scanner = FrameScanner(recorder.sink(), masked=masked, max_message_bytes=max_message_bytes)
    edges = [0, *sorted({c for c in cuts if 0 < c < len(stream)}), len(stream)]
    forwarded = b""
    for a, b in itertools.pairwise(edges):
        forwarded += scanner.feed(stream[a:b])
        scanner.deliver()
    return forwarded, scanner, recorder


# A message: text or binary, its payload, and into how many frames it is fragmented.
sizes = st.one_of(st.integers(0, 300), st.sampled_from([125, 126, 127, 65535, 65536, 70000]))
messages = st.tuples(
    st.sampled_from([Opcode.TEXT, Opcode.BINARY]),
    sizes,
    st.integers(1, 3),
    st.booleans(),  # a ping between its fragments
)


def build(
    parts: list[tuple[Opcode, int, int, bool]], mask: bool
) -> tuple[bytes, list[str | bytes], int]:
    """A stream of messages; also the texts and binaries expected, and the binary total."""
    stream, expected, binary_total = b"", [], 0
    for number, (opcode, size, fragments, ping) in enumerate(parts):
        if opcode is Opcode.TEXT:
            text = ("é" * size)[: max(size, 0)] + str(number)
            payload = text.encode()
            expected.append(text)
        else:
            payload = bytes((number + i) % 256 for i in range(size))
            expected.append(payload)
            binary_total += len(payload)
        step = max(1, -(-len(payload) // fragments))
        pieces = [payload[i : i + step] for i in range(0, len(payload), step)] or [b""]
        for index, piece in enumerate(pieces):
            kind = opcode if index == 0 else Opcode.CONT
            stream += encode(kind, piece, fin=index == len(pieces) - 1, mask=mask)
            if ping and index == 0:
                stream += encode(Opcode.PING, b"are you there", mask=mask)
    return stream, expected, binary_total


@given(
    parts=st.lists(messages, max_size=6),
    cuts=st.lists(st.integers(0, 300_000), max_size=12),
    masked=st.booleans(),
    read_binary=st.booleans(),
)
def test_every_byte_is_forwarded_and_every_message_read_or_counted(
    parts: list[tuple[Opcode, int, int, bool]], cuts: list[int], masked: bool, read_binary: bool
) -> None:
    stream, expected, binary_total = build(parts, mask=masked)
    forwarded, scanner, recorder = scan(stream, cuts, masked=masked, read_binary=read_binary)
    assert forwarded == stream and not scanner.stopped
    if read_binary:
        assert recorder.messages == expected and recorder.binary_bytes == 0
    else:
        # Every text is read; a binary is counted, or read when it follows a text not yet
        # delivered; in order either way.
        texts = [m for m in recorder.messages if isinstance(m, str)]
        read = [m for m in recorder.messages if isinstance(m, bytes)]
        assert texts == [m for m in expected if isinstance(m, str)]
        assert read == [m for m in expected if m in read]
        assert recorder.binary_bytes + sum(map(len, read)) == binary_total


def test_a_stream_fed_one_byte_at_a_time_is_the_same_stream() -> None:
    stream, expected, _ = build(
        [(Opcode.TEXT, 130, 2, True), (Opcode.BINARY, 70000, 3, False)], mask=True
    )
    forwarded, _, recorder = scan(stream, list(range(len(stream))), masked=True, read_binary=True)
    assert forwarded == stream and recorder.messages == expected


@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("split", [0, 1, 3, 7])
def test_a_close_frame_stops_forwarding_where_it_begins(masked: bool, split: int) -> None:
    before = encode(Opcode.BINARY, b"\x01" * 200, mask=masked)
    closing = encode(Opcode.CLOSE, Close(1000, "bye").serialize(), mask=masked)
    after = encode(Opcode.TEXT, b"too late", mask=masked)
    stream = before + closing + after
    forwarded, scanner, recorder = scan(stream, [len(before) + split], masked=masked)
    assert forwarded == before
    assert scanner.close == Close(1000, "bye") and scanner.stopped and not recorder.messages
    assert scanner.feed(b"more") == b""


def test_an_empty_close_frame_means_no_status() -> None:
    _, scanner, _ = scan(encode(Opcode.CLOSE, b"", mask=True), [], masked=True)
    assert scanner.close is not None and scanner.close.code == CloseCode.NO_STATUS_RCVD


def header(first: int, second: int, extra: bytes = b"") -> bytes:
    return bytes([first, second]) + extra


MASK = b"\x01\x02\x03\x04"


@pytest.mark.parametrize(
    ("frame", "masked", "code", "reason"),
    [
        (header(0x82, 0x80 | 2, MASK) + b"ab", False, 1002, "a server must not mask"),
        (header(0x82, 2) + b"ab", True, 1002, "a client must mask its frames"),
        (header(0xC2, 0x80 | 2, MASK) + b"ab", True, 1002, "reserved bits must be 0"),
        (header(0x83, 0x80 | 2, MASK) + b"ab", True, 1002, "invalid opcode 3"),
        (header(0x80, 0x80 | 2, MASK) + b"ab", True, 1002, "unexpected continuation frame"),
        (header(0x09, 0x80, MASK), True, 1002, "control frame fragmented or too long"),
        (
            header(0x89, 0x80 | 126, struct.pack("!H", 126) + MASK),
            True,
            1002,
            "control frame fragmented or too long",
        ),
        (
            encode(Opcode.TEXT, b"\xff\xfe", mask=True),
            True,
            1007,
            "invalid start byte at position 0",
        ),
        (encode(Opcode.CLOSE, b"\x03", mask=True), True, 1002, "close frame too short"),
        (
            encode(Opcode.CLOSE, struct.pack("!H", 1005), mask=True),
            True,
            1002,
            "invalid status code",
        ),
        (
            encode(Opcode.CLOSE, struct.pack("!H", 1000) + b"\xff", mask=True),
            True,
            1007,
            "close reason is not UTF-8",
        ),
        (encode(Opcode.BINARY, b"x" * 101, mask=True), True, 1009, "message over 100 bytes"),
    ],
)
def test_a_frame_that_breaks_the_protocol_is_never_forwarded(
    frame: bytes, masked: bool, code: int, reason: str
) -> None:
    good = encode(Opcode.BINARY, b"\x00" * 10, mask=masked)
    forwarded, scanner, _ = scan(good + frame + good, [], masked=masked, max_message_bytes=100)
    assert scanner.violation == Violation(code, reason) and forwarded == good


def test_a_message_over_the_limit_in_fragments_is_refused_at_the_fragment_that_crosses() -> None:
    first = encode(Opcode.BINARY, b"x" * 60, fin=False, mask=True)
    second = encode(Opcode.CONT, b"x" * 60, mask=True)
    forwarded, scanner, _ = scan(first + second, [], masked=True, max_message_bytes=100)
    assert forwarded == first and scanner.violation is not None
    assert scanner.violation.code == CloseCode.MESSAGE_TOO_BIG


def test_a_new_message_inside_a_fragmented_one_is_refused() -> None:
    first = encode(Opcode.BINARY, b"ab", fin=False, mask=True)
    intruder = encode(Opcode.TEXT, b"cd", mask=True)
    forwarded, scanner, _ = scan(first + intruder, [], masked=True)
    assert forwarded == first
    assert scanner.violation == Violation(1002, "expected a continuation frame")


def test_binary_is_read_or_counted_as_the_sink_decides_per_message() -> None:
    recorder = Recorder(read_binary=True)
    scanner = FrameScanner(recorder.sink(), masked=False, max_message_bytes=1000)
    scanner.feed(encode(Opcode.BINARY, b"read me", mask=False))
    scanner.deliver()
    recorder.read_binary = False
    scanner.feed(encode(Opcode.BINARY, b"count me", mask=False))
    scanner.deliver()
    assert recorder.messages == [b"read me"] and recorder.binary_bytes == len(b"count me")


def test_close_frames_we_send_are_valid_and_fit_a_control_frame() -> None:
    long_reason = "é" * 100  # 200 bytes in UTF-8: cut to 123 at a character boundary
    for mask in (True, False):
        frame = close_frame(1014, long_reason, mask=mask)
        _, scanner, _ = scan(frame, [], masked=mask)
        assert scanner.close is not None and scanner.close.code == 1014
        assert len(scanner.close.reason.encode()) <= 123 and set(scanner.close.reason) == {"é"}
    _, scanner, _ = scan(close_frame(1005, "ignored", mask=False), [], masked=False)
    assert scanner.close == Close(CloseCode.NO_STATUS_RCVD, "")


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (None, 1014),
        (1000, 1000),
        (1005, 1014),
        (1006, 1014),
        (1015, 1014),
        (1016, 1014),
        (2999, 1014),
        (3000, 3000),
        (4999, 4999),
        (5000, 1014),
        (1011, 1011),
    ],
)
def test_only_codes_a_close_frame_may_carry_are_passed_on(code: int | None, expected: int) -> None:
    assert sendable_close_code(code, 1014) == expected


def test_audio_is_forwarded_as_it_arrives_and_text_once_complete() -> None:
    scanner = FrameScanner(Recorder().sink(), masked=False, max_message_bytes=1 << 20)
    audio = encode(Opcode.BINARY, b"\x01" * 1000, mask=False)
    assert scanner.feed(audio[:500]) == audio[:500]  # no wait for the rest of the frame
    assert scanner.feed(audio[500:]) == audio[500:]
    text = encode(Opcode.TEXT, b'{"resp_type": "END"}', mask=False)
    assert scanner.feed(text[:10]) == b""
    assert scanner.feed(text[10:]) == text


def test_messages_reach_the_sink_in_order_only_when_delivered() -> None:
    recorder = Recorder(read_binary=False)
    scanner = FrameScanner(recorder.sink(), masked=False, max_message_bytes=1 << 20)
    start = encode(Opcode.TEXT, b'{"resp_type": "START"}', mask=False)
    audio = encode(Opcode.BINARY, b"\x01" * 100, mask=False)
    assert scanner.feed(start + audio) == start + audio
    assert recorder.messages == []  # forwarded first; the sink reads afterwards
    scanner.deliver()
    # The audio came after a message the sink had not seen: read, in order, not just counted.
    assert recorder.messages == ['{"resp_type": "START"}', b"\x01" * 100]
    assert recorder.binary_bytes == 0
