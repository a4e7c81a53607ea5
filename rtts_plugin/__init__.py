"""Huawei Cloud real-time TTS (rtts) for pipecat.

``from rtts_plugin import HuaweiRTTSService`` gives the pipecat service (pipecat is imported
only then). ``rtts_plugin.protocol`` is the shared, I/O-free protocol core used by the
plugin, the gateway and the local engine.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from rtts_plugin.errors import (
    AuthenticationError,
    HandshakeError,
    InvalidRequestError,
    InvalidSettingsError,
    ProtocolViolationError,
    RttsError,
    RttsTimeoutError,
    SynthesisError,
)

if TYPE_CHECKING:
    from rtts_plugin.config import HuaweiRTTSConnection
    from rtts_plugin.tts import HuaweiRTTSService, HuaweiRTTSSettings

_LAZY = {
    "HuaweiRTTSService": "rtts_plugin.tts",
    "HuaweiRTTSSettings": "rtts_plugin.tts",
    "HuaweiRTTSConnection": "rtts_plugin.config",
}


def __getattr__(name: str) -> Any:
    """Import the pipecat service on first use, so the gateway never loads pipecat."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rtts_plugin' has no attribute {name!r}")


__all__ = [
    "AuthenticationError",
    "HandshakeError",
    "HuaweiRTTSConnection",
    "HuaweiRTTSService",
    "HuaweiRTTSSettings",
    "InvalidRequestError",
    "InvalidSettingsError",
    "ProtocolViolationError",
    "RttsError",
    "RttsTimeoutError",
    "SynthesisError",
]
