"""Exception hierarchy of the gateway; every error it raises is a :class:`GatewayError`."""

from __future__ import annotations


class GatewayError(Exception):
    """Root of every exception raised by ``gateway``."""


class EngineError(GatewayError):
    """The local synthesis engine could not be loaded or failed while synthesizing."""


class HandshakesBusy(GatewayError):
    """A caller waited too long for one of the gateway's upstream handshakes in flight.

    The upstream was not asked, so its breaker hears nothing of it.
    """

    def __init__(self, limit: int, waited: float) -> None:
        super().__init__(
            f"gateway busy: {limit} upstream handshakes already in flight, none free after "
            f"{waited:.2g} s; retry shortly"
        )
        self.limit = limit
        self.waited = waited
