"""The one implementation of Huawei's rtts protocol: messages, voices, validation, session.

Pure code with no I/O; the plugin, the gateway and the local engine all import it.
"""

from __future__ import annotations

from rtts_plugin.protocol import codes
from rtts_plugin.protocol.messages import (
    EndResponse,
    ErrorResponse,
    FatalErrorResponse,
    PhonemeTiming,
    ResultResponse,
    ServerMessage,
    StartRequest,
    StartResponse,
    SynthesisConfig,
    WordTiming,
    parse_server_message,
)
from rtts_plugin.protocol.session import (
    AudioReceived,
    ClientSession,
    Ended,
    Event,
    Failed,
    ProtocolViolation,
    SessionState,
    Started,
    WordsReceived,
)
from rtts_plugin.protocol.validation import (
    check_voice_constraints,
    lookup_voice,
    parse_start_request,
    validate_config,
    validate_start_request,
)
from rtts_plugin.protocol.voices import VOICES, Voice, get_voice

__all__ = [
    "VOICES",
    "AudioReceived",
    "ClientSession",
    "EndResponse",
    "Ended",
    "ErrorResponse",
    "Event",
    "Failed",
    "FatalErrorResponse",
    "PhonemeTiming",
    "ProtocolViolation",
    "ResultResponse",
    "ServerMessage",
    "SessionState",
    "StartRequest",
    "StartResponse",
    "Started",
    "SynthesisConfig",
    "Voice",
    "WordTiming",
    "WordsReceived",
    "check_voice_constraints",
    "codes",
    "get_voice",
    "lookup_voice",
    "parse_server_message",
    "parse_start_request",
    "validate_config",
    "validate_start_request",
]
