"""Server message parsing and the client session state machine."""

from __future__ import annotations

import json

import pytest

from rtts_plugin.errors import ProtocolViolationError, SynthesisError
from rtts_plugin.protocol import (
    AudioReceived,
    ClientSession,
    Ended,
    EndResponse,
    ErrorResponse,
    Failed,
    FatalErrorResponse,
    ProtocolViolation,
    ResultResponse,
    SessionState,
    Started,
    StartResponse,
    WordsReceived,
    parse_server_message,
)

TRACE = "567e8537-a89c-13c3-a882-826321939651"
START = json.dumps({"resp_type": "START", "trace_id": TRACE})
END = json.dumps({"resp_type": "END", "trace_id": TRACE, "reason": "NORMAL"})
RESULT = json.dumps(
    {
        "resp_type": "RESULT",
        "trace_id": TRACE,
        "result": [
            {"start_time": 0, "end_time": 384, "text": "Nice", "word_index": 0},
            {"start_time": 384, "end_time": 43980, "text": "", "word_index": 1},
        ],
    }
)
ERROR = json.dumps(
    {
        "resp_type": "ERROR",
        "trace_id": TRACE,
        "error_code": "SIS.0032",
        "error_msg": "'audio_format' is invalid",
    }
)
FATAL = json.dumps(
    {
        "resp_type": "FATAL_ERROR",
        "trace_id": TRACE,
        "error_code": "SIS.0304",
        "error_msg": "wait voice timeout",
    }
)


# --- parsing -------------------------------------------------------------------------------


def test_documented_examples_parse() -> None:
    assert parse_server_message(START) == StartResponse(trace_id=TRACE)
    assert parse_server_message(END) == EndResponse(trace_id=TRACE, reason="NORMAL")
    result = parse_server_message(RESULT)
    assert isinstance(result, ResultResponse)
    assert [w.text for w in result.result] == ["Nice", ""]
    assert result.result[1].end_time == 43980
    error = parse_server_message(ERROR)
    assert isinstance(error, ErrorResponse) and error.error_code == "SIS.0032"
    fatal = parse_server_message(FATAL)
    assert isinstance(fatal, FatalErrorResponse) and fatal.error_msg == "wait voice timeout"


def test_phoneme_level_items_parse() -> None:
    raw = json.dumps(
        {
            "resp_type": "RESULT",
            "trace_id": "t",
            "result": [
                {
                    "start_time": 458,
                    "end_time": 800,
                    "text": "x",
                    "word_index": 0,
                    "phonemes": [
                        {"phoneme": "x", "start_time": 458, "end_time": 602, "phoneme_index": 0}
                    ],
                }
            ],
        }
    )
    message = parse_server_message(raw)
    assert isinstance(message, ResultResponse)
    assert message.result[0].phonemes is not None
    assert message.result[0].phonemes[0].end_time == 602


def test_single_quoted_doc_examples_are_accepted() -> None:
    raw = "{'resp_type':'END','trace_id':'abc','reason':'NORMAL'}"
    assert parse_server_message(raw) == EndResponse(trace_id="abc")


def test_unknown_fields_ignored_and_trace_id_liberal() -> None:
    assert parse_server_message('{"resp_type":"START","extra":{"a":1}}') == StartResponse(
        trace_id=""
    )
    assert parse_server_message('{"resp_type":"START","trace_id":null}').trace_id == ""
    assert parse_server_message('{"resp_type":"START","trace_id":12345}').trace_id == "12345"


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ('{"resp_type":"PING"}', "unknown resp_type 'PING'"),
        ('{"trace_id":"x"}', "unknown resp_type None"),
        ("not json at all", "malformed JSON"),
        ("[1,2]", "not a JSON object"),
        (
            '{"resp_type":"RESULT","result":[{"start_time":"soon","end_time":1}]}',
            "bad RESULT message",
        ),
        ('{"resp_type":"RESULT","result":"words"}', "bad RESULT message"),
        ("{'resp_type': __import__('os')}", "malformed JSON"),
        # Hostile shapes: each must fail as a violation, in bounded time and memory.
        ("[" * 200_000, "nested too deeply"),
        ('{"a":' * 200_000, "nested too deeply"),
        ("{'resp_type': " + "[" * 3000, "malformed JSON"),
        ("{'resp_type': '" + "x" * (1 << 19) + "'", "malformed JSON"),
        ("(" * 100_000 + "1" + ")" * 100_000, "malformed JSON"),
    ],
    ids=lambda value: value if len(value) < 40 else f"{value[:12]}...({len(value)} chars)",
)
def test_what_cannot_be_understood_is_a_violation(raw: str, fragment: str) -> None:
    with pytest.raises(ProtocolViolationError) as caught:
        parse_server_message(raw)
    assert fragment in str(caught.value)


# --- state machine -------------------------------------------------------------------------


def run(*frames: str | bytes) -> tuple[ClientSession, list[object]]:
    session = ClientSession()
    events: list[object] = []
    for frame in frames:
        events += (
            session.receive_binary(frame)
            if isinstance(frame, bytes)
            else session.receive_text(frame)
        )
    return session, events


def test_normal_flow() -> None:
    session, events = run(START, b"\x01\x02", RESULT, b"\x03", END)
    assert [type(e) for e in events] == [
        Started,
        AudioReceived,
        WordsReceived,
        AudioReceived,
        Ended,
    ]
    assert session.state is SessionState.ENDED and session.finished
    assert session.audio_bytes == 3
    assert session.trace_id == TRACE
    assert session.connection_closed(1000) == []


def test_audio_before_start_is_reported_and_kept() -> None:
    _, events = run(b"\x01", END)
    assert isinstance(events[0], ProtocolViolation) and "before START" in events[0].description
    assert events[1] == AudioReceived(b"\x01")
    assert isinstance(events[2], Ended)


def test_second_start_is_a_violation() -> None:
    session, events = run(START, START, END)
    assert isinstance(events[1], ProtocolViolation) and "second START" in events[1].description
    assert session.state is SessionState.ENDED


@pytest.mark.parametrize("late", [b"\x00", START, RESULT, END, ERROR])
def test_anything_after_end_is_a_violation(late: str | bytes) -> None:
    _, events = run(START, END, late)
    assert isinstance(events[-1], ProtocolViolation)
    assert "after END" in events[-1].description


def test_error_is_terminal_with_code_and_trace() -> None:
    session, events = run(START, b"\x00", ERROR)
    failure = events[-1]
    assert isinstance(failure, Failed)
    assert (failure.kind, failure.error_code, failure.trace_id) == ("error", "SIS.0032", TRACE)
    assert session.state is SessionState.FAILED
    error = failure.to_error()
    assert isinstance(error, SynthesisError)
    assert "SIS.0032" in str(error) and TRACE in str(error) and "audio_format" in str(error)


def test_end_error_after_error_is_accepted_both_ways() -> None:
    with_end, events = run(
        ERROR, json.dumps({"resp_type": "END", "trace_id": TRACE, "reason": "ERROR"})
    )
    assert [type(e) for e in events] == [Failed]
    assert with_end.connection_closed(1000) == []
    without_end, events = run(ERROR)
    assert [type(e) for e in events] == [Failed]
    assert without_end.connection_closed(1000) == []


def test_end_with_reason_error_alone_is_a_failure() -> None:
    _, events = run(START, json.dumps({"resp_type": "END", "reason": "ERROR"}))
    assert isinstance(events[-1], Failed) and "reason ERROR" in events[-1].error_msg


def test_fatal_error_then_audio() -> None:
    session, events = run(START, FATAL, b"\x00")
    assert isinstance(events[1], Failed) and events[1].kind == "fatal"
    assert isinstance(events[2], ProtocolViolation) and "after FATAL_ERROR" in events[2].description
    assert session.failure is events[1]


@pytest.mark.parametrize("frames", [(), (START,), (START, b"\x00\x01")])
def test_close_before_end_is_a_failure(frames: tuple[str | bytes, ...]) -> None:
    session, _ = run(*frames)
    events = session.connection_closed(1006)
    assert len(events) == 1 and isinstance(events[0], Failed)
    assert (
        events[0].kind == "closed"
        and "before END" in events[0].error_msg
        and "1006" in events[0].error_msg
    )
    assert session.finished


def test_result_before_start_and_unknown_types_do_not_break_the_session() -> None:
    session, events = run(RESULT, '{"resp_type":"PING"}', b"\x00", END)
    kinds = [type(e) for e in events]
    assert kinds == [ProtocolViolation, WordsReceived, ProtocolViolation, AudioReceived, Ended]
    assert session.state is SessionState.ENDED


@pytest.mark.parametrize(
    "garbage", ["garbage", "[1, 2]", '{"resp_type":"RESULT","result":"words"}', '{"trace_id":"x"}']
)
def test_an_unreadable_control_message_fails_the_session_precisely(garbage: str) -> None:
    session, events = run(START, b"\x00", garbage, END)
    assert isinstance(events[2], ProtocolViolation) and isinstance(events[3], Failed)
    assert events[3].kind == "protocol" and events[3].error_msg == events[2].description
    assert len(events) == 4  # an END after a failure is tolerated, as after ERROR
    assert session.state is SessionState.FAILED


def test_close_for_an_oversized_message_says_so() -> None:
    session, _ = run(START)
    (failure,) = session.connection_closed(1009)
    assert isinstance(failure, Failed) and "larger than the size limit" in failure.error_msg
