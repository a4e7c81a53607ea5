"""Pydantic models of every rtts message, and their (de)serialization.

Client → server: one :class:`StartRequest` (``command: START``) per connection.
Server → client: :class:`StartResponse`, :class:`ResultResponse` (word timings),
:class:`EndResponse`, :class:`ErrorResponse`, :class:`FatalErrorResponse`; audio travels as
binary frames and has no model.

Server messages are parsed liberally: unknown extra fields are ignored, missing
``trace_id`` becomes ``""``, and the single-quoted examples in Huawei's docs (a copy-paste
typo there) are accepted. What cannot be understood raises
:class:`~rtts_plugin.errors.ProtocolViolationError`, never anything else.
"""

from __future__ import annotations

import ast
import json
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError

from rtts_plugin.errors import ProtocolViolationError
from rtts_plugin.protocol.voices import DEFAULT_PROPERTY, AudioFormat, SampleRate, Subtitle

SPEED_RANGE: Final = (-500, 500)
PITCH_RANGE: Final = (-500, 500)
VOLUME_RANGE: Final = (0, 100)

# Above this a server control message is not believable; parsing it would only cost memory.
MAX_CONTROL_MESSAGE_CHARS: Final = 1 << 20
# The single-quoted fallback (Huawei's doc examples) runs Python's parser, whose time and memory
# grow far faster than the text; real messages are a few hundred characters, so cap it hard.
MAX_SINGLE_QUOTED_CHARS: Final = 4096


def _whole_number(value: object) -> object:
    """Accept JSON integers and integral floats (``5.0``); refuse booleans and strings."""
    if isinstance(value, bool | str):
        raise ValueError("must be a JSON number, not a string or boolean")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _rate_as_string(value: object) -> object:
    """The docs type ``sample_rate`` as a string; an integer 8000/16000 is accepted too."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


WholeNumber = Annotated[int, BeforeValidator(_whole_number)]


class SynthesisConfig(BaseModel):
    """``config`` of a START request. Defaults are the cloud's when a field is left out.

    The voice is ``voice`` in Python and ``property`` on the wire (Huawei's name).
    """

    model_config = ConfigDict(
        extra="ignore",
        frozen=True,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
    )

    audio_format: AudioFormat = "pcm"
    sample_rate: Annotated[SampleRate, BeforeValidator(_rate_as_string)] = "8000"
    voice: str = Field(DEFAULT_PROPERTY, alias="property")
    speed: Annotated[WholeNumber, Field(ge=SPEED_RANGE[0], le=SPEED_RANGE[1])] = 0
    pitch: Annotated[WholeNumber, Field(ge=PITCH_RANGE[0], le=PITCH_RANGE[1])] = 0
    volume: Annotated[WholeNumber, Field(ge=VOLUME_RANGE[0], le=VOLUME_RANGE[1])] = 50
    subtitle: Subtitle | None = None

    @property
    def sample_rate_hz(self) -> int:
        """The sample rate as an integer number of hertz."""
        return int(self.sample_rate)


class StartRequest(BaseModel):
    """The one message a client sends: the text and how to speak it."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    command: Literal["START"]
    text: str
    config: SynthesisConfig = Field(default_factory=SynthesisConfig)

    def to_json(self) -> str:
        """Serialize for the wire, always sending every config field (as the SDK does)."""
        return self.model_dump_json(exclude_none=True)


class PhonemeTiming(BaseModel):
    """One phoneme inside a word, with times in ms from the start of the output."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    phoneme: str = ""
    start_time: int
    end_time: int
    phoneme_index: int | None = None


class WordTiming(BaseModel):
    """One word of a RESULT message, with times in ms from the start of the output."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    start_time: int
    end_time: int
    text: str = ""
    word_index: int | None = None
    phonemes: list[PhonemeTiming] | None = None  # present with phoneme_level only


def _text_or_empty(value: object) -> object:
    """``trace_id`` is liberal: missing or null becomes ``""``, a number becomes its text."""
    if value is None:
        return ""
    return str(value) if isinstance(value, int | float) else value


class _ServerMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    resp_type: str  # narrowed to a literal by each subclass; first on the wire, as Huawei's
    trace_id: Annotated[str, BeforeValidator(_text_or_empty)] = ""

    def to_json(self) -> str:
        """Serialize for the wire."""
        return self.model_dump_json(exclude_none=True)


class StartResponse(_ServerMessage):
    """The engine accepted the request; audio follows."""

    resp_type: Literal["START"] = "START"


class ResultResponse(_ServerMessage):
    """Word (and with ``phoneme_level``, phoneme) timings for audio sent or about to be."""

    resp_type: Literal["RESULT"] = "RESULT"
    result: list[WordTiming] = Field(default_factory=list)


class EndResponse(_ServerMessage):
    """Synthesis finished; ``reason`` is ``NORMAL`` or ``ERROR`` (others are kept as sent)."""

    resp_type: Literal["END"] = "END"
    reason: str = "NORMAL"


class ErrorResponse(_ServerMessage):
    """The engine refused or failed the request."""

    resp_type: Literal["ERROR"] = "ERROR"
    error_code: str = ""
    error_msg: str = ""


class FatalErrorResponse(_ServerMessage):
    """The session failed and the server closes the connection."""

    resp_type: Literal["FATAL_ERROR"] = "FATAL_ERROR"
    error_code: str = ""
    error_msg: str = ""


ServerMessage = StartResponse | ResultResponse | EndResponse | ErrorResponse | FatalErrorResponse
_SERVER_MESSAGE: Final[TypeAdapter[ServerMessage]] = TypeAdapter(
    Annotated[ServerMessage, Field(discriminator="resp_type")]
)
KNOWN_RESP_TYPES: Final = frozenset({"START", "RESULT", "END", "ERROR", "FATAL_ERROR"})


def excerpt(value: object, limit: int = 80) -> str:
    """A short ``repr`` of a value or message for error text and logs; long ones end in "…"."""
    if isinstance(value, bytes | str) and len(value) > limit:
        cut = value[:limit]
        return repr(cut.decode("utf-8", "replace") if isinstance(cut, bytes) else cut) + "…"
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    shown = repr(value)
    return shown if len(shown) <= limit else shown[:limit] + "…"


def _load_object(text: str) -> dict[str, Any]:
    # Linear in time and memory: json's C scanner stops at its recursion limit (RecursionError)
    # and the literal fallback only ever sees a few KiB.
    try:
        loaded: object = json.loads(text)
    except RecursionError:
        raise ProtocolViolationError(
            f"server message is nested too deeply: {excerpt(text)}"
        ) from None
    except ValueError as exc:
        if len(text) > MAX_SINGLE_QUOTED_CHARS:
            raise ProtocolViolationError(
                f"server sent malformed JSON ({exc}): {excerpt(text)}"
            ) from None
        # Huawei's examples use single quotes; accept that (small, literal-only) form too.
        try:
            loaded = ast.literal_eval(text.strip())
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            raise ProtocolViolationError(
                f"server sent malformed JSON ({exc}): {excerpt(text)}"
            ) from None
    if not isinstance(loaded, dict):
        raise ProtocolViolationError(f"server message is not a JSON object: {excerpt(text)}")
    return loaded


def parse_server_message(text: str) -> ServerMessage:
    """Parse one server text frame into its model.

    Raises:
        ProtocolViolationError: the frame is not JSON, has no known ``resp_type``, or its
            fields have impossible types.
    """
    if len(text) > MAX_CONTROL_MESSAGE_CHARS:
        raise ProtocolViolationError(f"server control message too large ({len(text)} chars)")
    payload = _load_object(text)
    resp_type = payload.get("resp_type")
    if resp_type not in KNOWN_RESP_TYPES:
        raise ProtocolViolationError(
            f"unknown resp_type {resp_type!r}: {excerpt(text)}", recoverable=resp_type is not None
        )
    try:
        return _SERVER_MESSAGE.validate_python(payload)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ProtocolViolationError(
            f"bad {resp_type} message ({problems}): {excerpt(text)}"
        ) from None
