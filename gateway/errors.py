"""Exception hierarchy of the gateway; every error it raises is a :class:`GatewayError`."""

from __future__ import annotations


class GatewayError(Exception):
    """Root of every exception raised by ``gateway``."""


class EngineError(GatewayError):
    """The local synthesis engine could not be loaded or failed while synthesizing."""
