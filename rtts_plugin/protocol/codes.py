"""Huawei SIS error codes used on the rtts WebSocket, with what each means.

The meanings come from Huawei's error-code pages (see ``docs/rtts-protocol.md`` §5); the
local engine answers with the same code the cloud uses for the same bad input.
"""

from __future__ import annotations

from typing import Final

SERVICE_CONNECTION_ERROR: Final = "SIS.0001"
INTERNAL_ERROR: Final = "SIS.0100"
TOKEN_INVALID: Final = "SIS.0101"  # noqa: S105 (an error code, not a secret)
AUTH_MISSING: Final = "SIS.0102"
MISSING_FIELD: Final = "SIS.0012"
UNSUPPORTED_PARAMETER: Final = "SIS.0031"
MALFORMED_REQUEST: Final = "SIS.0032"
ENGINE_TIMEOUT: Final = "SIS.0033"
INPUT_WAIT_TIMEOUT: Final = "SIS.0304"
CONCURRENCY_LIMIT: Final = "SIS.0312"
TTS_EXCEPTION: Final = "SIS.0401"
INVALID_SAMPLE_RATE: Final = "SIS.0402"
INVALID_AUDIO_FORMAT: Final = "SIS.0410"
INVALID_PROPERTY: Final = "SIS.0411"
TTS_ENGINE_CONNECT_TIMEOUT: Final = "SIS.0412"
TTS_INTERNAL_ERROR: Final = "SIS.0413"
SYNTHESIS_TIMEOUT: Final = "SIS.0414"
INVALID_PARAMETER: Final = "SIS.0415"
TEXT_WAIT_TIMEOUT: Final = "SIS.0416"

DESCRIPTIONS: Final[dict[str, str]] = {
    SERVICE_CONNECTION_ERROR: "connection error inside the service",
    "SIS.0003": "token has no user info / internal error",
    INTERNAL_ERROR: "internal error",
    TOKEN_INVALID: "token invalid: use a project-scoped token of the endpoint's region",
    AUTH_MISSING: "authentication missing: send X-Auth-Token or an AK/SK signature",
    "SIS.0103": "real-name verification missing (China site)",
    MISSING_FIELD: "a required field is missing",
    UNSUPPORTED_PARAMETER: "unsupported parameter",
    MALFORMED_REQUEST: "malformed JSON or a bad value",
    ENGINE_TIMEOUT: "engine response timeout",
    INPUT_WAIT_TIMEOUT: "waited too long for input (about 20 s with nothing received)",
    CONCURRENCY_LIMIT: "resource concurrency limit exceeded: lower the request rate",
    TTS_EXCEPTION: "TTS exception",
    INVALID_SAMPLE_RATE: "invalid sample_rate, or a rate the voice does not support",
    INVALID_AUDIO_FORMAT: "invalid audio_format, or a format the voice does not support",
    INVALID_PROPERTY: "invalid property (voice)",
    TTS_ENGINE_CONNECT_TIMEOUT: "timeout connecting to the TTS engine",
    TTS_INTERNAL_ERROR: "TTS internal error",
    SYNTHESIS_TIMEOUT: "timed out waiting for synthesis",
    INVALID_PARAMETER: "bad request-body parameter",
    TEXT_WAIT_TIMEOUT: "timed out waiting for the client to send text",
}
