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
    FRAMING_ALLOWANCE,
    FrameScanner,
    MessageSink,
    PingLedger,
    Violation,
    close_frame,
    sendable_close_code,
)


@dataclass
class Recorder:
    """A sink that keeps everything it is told, in order."""

    messages: list[str] = field(default_factory=list)
    binary_bytes: int = 0
    events: list[str | int] = field(default_factory=list)

    def sink(self) -> MessageSink:
        return MessageSink(message=self.text, binary_passed=self.count)

    def text(self, message: str) -> None:
        self.messages.append(message)
        self.events.append(message)

    def count(self, size: int) -> None:
        self.binary_bytes += size
        self.events.append(size)


def encode(opcode: Opcode, payload: bytes, *, fin: bool = True, mask: bool) -> bytes:
    return Frame(opcode, payload, fin=fin).serialize(mask=mask)


def scan(
    stream: bytes,
    cuts: list[int],
    *,
    masked: bool,
    max_message_bytes: int = 1 << 24,
    max_text_bytes: int | None = None,
) -> tuple[bytes, FrameScanner, Recorder]:
    """Feed ``stream`` cut at ``cuts``; return all that was forwarded, the scanner, the sink."""
    recorder = Recorder()
    scanner = FrameScanner(
        recorder.sink(),
        masked=masked,
        max_message_bytes=max_message_bytes,
        max_text_bytes=max_text_bytes,
    )
    edges = [0, *sorted({c for c in cuts if 0 < c < len(stream)}), len(stream)]
    forwarded = b""
    for a, b in itertools.pairwise(edges):
        forwarded += bytes(scanner.feed(stream[a:b]))
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
) -> tuple[bytes, bytes, list[str | bytes], int]:
    """A stream of messages, the same stream as the scanner forwards it, the texts and
    binaries expected, and the binary total.

    Forwarded, a ping inside a fragmented text goes ahead of the text (texts are held until
    complete, pings are not).
    """
    stream, forwarded, expected, binary_total = b"", b"", [], 0
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
        ping_frame = encode(Opcode.PING, b"are you there", mask=mask) if ping else b""
        frames = [
            encode(
                opcode if index == 0 else Opcode.CONT,
                piece,
                fin=index == len(pieces) - 1,
                mask=mask,
            )
            for index, piece in enumerate(pieces)
        ]
        stream += frames[0] + ping_frame + b"".join(frames[1:])
        if opcode is Opcode.TEXT and len(frames) > 1:
            forwarded += ping_frame + b"".join(frames)
        else:
            forwarded += frames[0] + ping_frame + b"".join(frames[1:])
    return stream, forwarded, expected, binary_total


def in_order(events: list[str | int] | list[str | bytes]) -> list[str | int]:
    """Texts, and binary sizes summed between them (how a stream may count them)."""
    merged: list[str | int] = []
    for event in events:
        item = event if isinstance(event, str | int) else len(event)
        if isinstance(item, int) and merged and isinstance(merged[-1], int):
            merged[-1] += item
        else:
            merged.append(item)
    return [item for item in merged if item != 0]


@given(
    parts=st.lists(messages, max_size=6),
    cuts=st.lists(st.integers(0, 300_000), max_size=12),
    masked=st.booleans(),
)
def test_every_byte_is_forwarded_and_every_message_read_or_counted(
    parts: list[tuple[Opcode, int, int, bool]], cuts: list[int], masked: bool
) -> None:
    stream, as_forwarded, expected, binary_total = build(parts, mask=masked)
    forwarded, scanner, recorder = scan(stream, cuts, masked=masked)
    assert forwarded == as_forwarded and not scanner.stopped
    assert recorder.messages == [m for m in expected if isinstance(m, str)]
    assert recorder.binary_bytes == binary_total
    assert in_order(recorder.events) == in_order(expected)


def test_a_stream_fed_one_byte_at_a_time_is_the_same_stream() -> None:
    parts = [(Opcode.TEXT, 130, 2, True), (Opcode.BINARY, 70000, 3, False)]
    stream, as_forwarded, expected, total = build(parts, mask=True)
    forwarded, _, recorder = scan(stream, list(range(len(stream))), masked=True)
    assert forwarded == as_forwarded
    assert recorder.messages == expected[:1] and recorder.binary_bytes == total


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
    recorder = Recorder()
    scanner = FrameScanner(recorder.sink(), masked=False, max_message_bytes=1 << 20)
    start = encode(Opcode.TEXT, b'{"resp_type": "START"}', mask=False)
    audio = encode(Opcode.BINARY, b"\x01" * 100, mask=False)
    assert scanner.feed(start + audio) == start + audio
    assert recorder.events == []  # forwarded first; the sink reads afterwards
    scanner.deliver()
    # The audio came after a message the sink had not seen: counted after it, in order.
    assert recorder.events == ['{"resp_type": "START"}', 100]


# -- what a scanner holds is bounded (issue: endless pings inside an unfinished text) -----------


def test_pings_inside_an_unfinished_text_are_forwarded_at_once_never_held() -> None:
    scanner = FrameScanner(Recorder().sink(), masked=True, max_message_bytes=1024)
    first = encode(Opcode.TEXT, b'{"command": ', fin=False, mask=True)
    assert scanner.feed(first) == b""
    ping = encode(Opcode.PING, b"x" * 125, mask=True)
    for _ in range(10_000):  # 1.3 MB of pings: each goes straight through
        assert scanner.feed(ping) == ping
    assert scanner.held_bytes == len(first) and not scanner.stopped
    last = encode(Opcode.CONT, b'"START"}', mask=True)
    assert scanner.feed(last) == first + last


@pytest.mark.parametrize("masked", [True, False])
def test_endless_empty_fragments_of_a_text_end_in_1009_at_the_framing_allowance(
    masked: bool,
) -> None:
    scanner = FrameScanner(Recorder().sink(), masked=masked, max_message_bytes=1024)
    scanner.feed(encode(Opcode.TEXT, b"{", fin=False, mask=masked))
    empty = encode(Opcode.CONT, b"", fin=False, mask=masked)
    sent = 0
    while not scanner.stopped and sent < 10 * FRAMING_ALLOWANCE:
        assert scanner.feed(empty) == b""
        sent += len(empty)
        assert scanner.held_bytes <= 1024 + FRAMING_ALLOWANCE
    assert scanner.violation is not None and scanner.violation.code == 1009
    assert "with its frame headers" in scanner.violation.reason


@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("size", [0, 125, 126, 1024, 1025, 65535, 65536])
@pytest.mark.parametrize("valid", [True, False])
def test_a_whole_text_frame_in_one_read_is_read_as_in_pieces(
    masked: bool, size: int, valid: bool
) -> None:
    # A read that holds a whole text frame is read in one step: the same bytes forwarded,
    # messages, counts and verdicts as when the frame arrives one byte at a time.
    payload = ("é" * (size // 2) + "x" * (size % 2)).encode() if valid else b"\xff" * size
    audio = encode(Opcode.BINARY, b"\x01" * 300, mask=masked)
    stream = audio + encode(Opcode.TEXT, payload, mask=masked) + audio
    whole = scan(stream, [], masked=masked, max_text_bytes=1024)
    pieces = scan(stream, list(range(len(stream))), masked=masked, max_text_bytes=1024)
    assert whole[0] == pieces[0] and whole[1].violation == pieces[1].violation
    assert in_order(whole[2].events) == in_order(pieces[2].events)
    if size > 1024:
        assert whole[1].violation == Violation(1009, "text message over 1024 bytes")
    elif not valid and size:
        assert whole[1].violation is not None and whole[1].violation.code == 1007
        assert whole[0] == audio
    else:
        assert whole[0] == stream and whole[1].violation is None
        assert in_order(whole[2].events) == [300, payload.decode(), 300]


def test_a_text_over_its_own_limit_is_refused_while_binary_may_be_larger() -> None:
    stream = encode(Opcode.BINARY, b"\x00" * 5000, mask=False)
    stream += encode(Opcode.TEXT, b"x" * 1025, mask=False)
    forwarded, scanner, _ = scan(
        stream, [3000], masked=False, max_message_bytes=8192, max_text_bytes=1024
    )
    assert forwarded == stream[:5004]
    assert scanner.violation == Violation(1009, "text message over 1024 bytes")


@pytest.mark.parametrize("masked", [True, False])
def test_an_unfinished_text_holds_its_raw_frames_once(masked: bool) -> None:
    payload = ("好" * 87_000).encode()  # 255 KiB
    frames = encode(Opcode.TEXT, payload[:100_000], fin=False, mask=masked) + encode(
        Opcode.CONT, payload[100_000:], mask=masked
    )
    recorder = Recorder()
    scanner = FrameScanner(recorder.sink(), masked=masked, max_message_bytes=256 * 1024)
    fed = 0
    while len(frames) - fed > 4096:
        assert scanner.feed(frames[fed : fed + 4096]) == b""
        fed += 4096
        # Only the raw bytes, not a second (unmasked) copy beside them.
        assert scanner.held_bytes == fed
    forwarded = bytes(scanner.feed(frames[fed:]))
    scanner.deliver()
    assert forwarded == frames and recorder.messages == [payload.decode()]
    assert scanner.held_bytes == 0


def test_mid_frame_says_whether_what_was_forwarded_ends_inside_a_frame() -> None:
    scanner = FrameScanner(Recorder().sink(), masked=False, max_message_bytes=1 << 20)
    audio = encode(Opcode.BINARY, b"\x01" * 1000, mask=False)
    scanner.feed(audio[:1])  # a header cut short is held, not forwarded
    assert not scanner.mid_frame
    scanner.feed(audio[1:500])
    assert scanner.mid_frame
    scanner.feed(audio[500:])
    assert not scanner.mid_frame
    text = encode(Opcode.TEXT, b'{"resp_type": "END"}', mask=False)
    scanner.feed(text[:10])  # held, so nothing of it went out
    assert not scanner.mid_frame


def test_pings_past_the_unanswered_limit_are_refused_until_pongs_come_back() -> None:
    ledger = PingLedger(limit=3)
    client = FrameScanner(Recorder().sink(), masked=True, max_message_bytes=1024, pings_sent=ledger)
    upstream = FrameScanner(
        Recorder().sink(), masked=False, max_message_bytes=1024, pongs_answered=ledger
    )
    ping = encode(Opcode.PING, b"p", mask=True)
    for _ in range(3):
        assert client.feed(ping) == ping
    assert upstream.feed(encode(Opcode.PONG, b"p", mask=False))  # one answered: room for one
    assert client.feed(ping) == ping and not client.stopped
    assert client.feed(ping + ping) == b""
    assert client.violation == Violation(1008, "more than 3 pings unanswered")
