"""Validation of a client's START request, with the error code the cloud gives for each fault.

The mapping: ``sample_rate`` → SIS.0402, ``audio_format`` → SIS.0410, ``property`` →
SIS.0411, a missing required field → SIS.0012, malformed JSON → SIS.0032, any other bad
value (``command``, ``text``, ``speed``, ``pitch``, ``volume``, ``subtitle``, text length)
→ SIS.0415. A rate or format the chosen voice does not produce gets the rate or format code.
Every message names the field, the bad value and what is allowed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Final

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from rtts_plugin.errors import InvalidRequestError
from rtts_plugin.protocol import codes
from rtts_plugin.protocol.messages import (
    PITCH_RANGE,
    SPEED_RANGE,
    VOLUME_RANGE,
    StartRequest,
    SynthesisConfig,
    excerpt,
)
from rtts_plugin.protocol.voices import (
    ALL_FORMATS,
    ALL_RATES,
    SUBTITLE_LEVELS,
    Voice,
    get_voice,
    suggest_voices,
)

_VOICE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")

# field → (error code, what is allowed)
_FIELD_RULES: Final[dict[str, tuple[str, str]]] = {
    "command": (codes.INVALID_PARAMETER, "'START'"),
    "text": (codes.INVALID_PARAMETER, "a non-empty string"),
    "config": (codes.MALFORMED_REQUEST, "a JSON object"),
    "audio_format": (codes.INVALID_AUDIO_FORMAT, "one of " + ", ".join(ALL_FORMATS)),
    "sample_rate": (codes.INVALID_SAMPLE_RATE, 'one of "' + '", "'.join(ALL_RATES) + '"'),
    "property": (codes.INVALID_PROPERTY, "a voice name such as chinese_xiaoyan_common"),
    "speed": (codes.INVALID_PARAMETER, "an integer from {} to {}".format(*SPEED_RANGE)),
    "pitch": (codes.INVALID_PARAMETER, "an integer from {} to {}".format(*PITCH_RANGE)),
    "volume": (codes.INVALID_PARAMETER, "an integer from {} to {}".format(*VOLUME_RANGE)),
    "subtitle": (codes.INVALID_PARAMETER, "one of " + ", ".join(SUBTITLE_LEVELS)),
}


def _field_error(error: ErrorDetails) -> InvalidRequestError:
    field = str(error["loc"][-1]) if error["loc"] else "request"
    if error["type"] == "missing":
        return InvalidRequestError(codes.MISSING_FIELD, f"'{field}' is required", field)
    code, allowed = _FIELD_RULES.get(field, (codes.INVALID_PARAMETER, "a valid value"))
    return InvalidRequestError(
        code, f"'{field}' is invalid: got {excerpt(error['input'])}; expected {allowed}", field
    )


def lookup_voice(name: str) -> Voice:
    """The catalogue entry of voice ``name``.

    Raises:
        InvalidRequestError: SIS.0411, suggesting the closest names.
    """
    voice = get_voice(name)
    if voice is None:
        hint = suggest_voices(name)
        did_you_mean = f"; did you mean {', '.join(hint)}?" if hint else "; see the voice catalogue"
        raise InvalidRequestError(
            codes.INVALID_PROPERTY,
            f"'property' is invalid: unknown voice {excerpt(name)}{did_you_mean}",
            "property",
        )
    return voice


def check_voice_name(name: str) -> None:
    """Refuse a voice name no voice can have (the open catalogue passes any other on).

    Raises:
        InvalidRequestError: SIS.0411 for an empty name, one over 64 characters, or one
            with characters other than letters, digits, ``_``, ``.`` and ``-``.
    """
    if not _VOICE_NAME.fullmatch(name):
        raise InvalidRequestError(
            codes.INVALID_PROPERTY,
            f"'property' is invalid: {excerpt(name)} is not a voice name (1 to 64 letters, "
            "digits, '_', '.' or '-', e.g. chinese_xiaoyan_common)",
            "property",
        )


def validate_config(data: Mapping[str, object]) -> SynthesisConfig:
    """Validate a ``config`` object (types and ranges; not what depends on the voice).

    Raises:
        InvalidRequestError: with the cloud's code and a message naming field and value.
    """
    try:
        return SynthesisConfig.model_validate(data)
    except ValidationError as exc:
        raise _field_error(exc.errors()[0]) from None


def check_voice_constraints(text: str, config: SynthesisConfig) -> Voice:
    """Check what depends on the voice: it exists, its rates and formats, its text limit.

    Returns the voice's catalogue entry.

    Raises:
        InvalidRequestError: with the cloud's code for the first rule broken.
    """
    voice = lookup_voice(config.voice)
    if config.sample_rate not in voice.sample_rates:
        raise InvalidRequestError(
            codes.INVALID_SAMPLE_RATE,
            f"'sample_rate' is invalid: {voice.name} does not support {config.sample_rate}; "
            f"it supports {', '.join(voice.sample_rates)}",
            "sample_rate",
        )
    if config.audio_format not in voice.formats:
        raise InvalidRequestError(
            codes.INVALID_AUDIO_FORMAT,
            f"'audio_format' is invalid: {voice.name} does not support {config.audio_format}; "
            f"it supports {', '.join(voice.formats)}",
            "audio_format",
        )
    if not text.strip():
        raise InvalidRequestError(
            codes.INVALID_PARAMETER,
            "'text' is invalid: it is empty; send the text to speak",
            "text",
        )
    if len(text) > voice.text_limit:
        raise InvalidRequestError(
            codes.INVALID_PARAMETER,
            f"'text' is invalid: {len(text)} characters is over the {voice.text_limit}-character "
            f"limit of {voice.name}; split it over several connections",
            "text",
        )
    return voice


def validate_start_request(data: Mapping[str, object]) -> tuple[StartRequest, Voice]:
    """Validate a START request given as a decoded JSON object.

    Returns the request and the catalogue entry of its voice.

    Raises:
        InvalidRequestError: carrying the Huawei error code, with a message that names the
            field, the bad value and the allowed values.
    """
    try:
        request = StartRequest.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        # Report a missing required field before a bad value, as the cloud checks presence first.
        missing = [err for err in errors if err["type"] == "missing"]
        raise _field_error((missing or errors)[0]) from None
    return request, check_voice_constraints(request.text, request.config)


def parse_start_request(payload: str) -> tuple[StartRequest, Voice]:
    """Parse and fully validate the text of a client's START frame.

    Raises:
        InvalidRequestError: as :func:`validate_start_request`; SIS.0032 for malformed JSON.
    """
    try:
        data: object = json.loads(payload)
    except ValueError as exc:
        raise InvalidRequestError(
            codes.MALFORMED_REQUEST, f"request is not valid JSON ({exc}); send a START object"
        ) from None
    except RecursionError:
        raise InvalidRequestError(
            codes.MALFORMED_REQUEST, "request JSON is nested too deeply"
        ) from None
    if not isinstance(data, dict):
        raise InvalidRequestError(
            codes.MALFORMED_REQUEST,
            f"request must be a JSON object, got {type(data).__name__}",
        )
    return validate_start_request(data)
