"""Huawei Cloud real-time TTS (rtts) for pipecat.

``rtts_plugin.protocol`` is the shared, I/O-free protocol core used by the plugin, the
gateway and the local engine.
"""

from __future__ import annotations

from rtts_plugin.errors import InvalidRequestError, ProtocolViolationError, RttsError

__all__ = ["InvalidRequestError", "ProtocolViolationError", "RttsError"]
