"""Exception hierarchy of the gateway; every error it raises is a :class:`GatewayError`."""

from __future__ import annotations

from typing import TypeVar

_Error = TypeVar("_Error", bound=BaseException)


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


def detached(error: _Error) -> _Error:
    """``error`` without its traceback, nor the errors it chains (cause, context) theirs.

    For an error kept where it was set (a future, a connection, a returned value): the frames
    of its traceback hold, through their locals, what keeps the error, and that cycle would
    be freed by the garbage collector only, whose passes pause every stream.
    """
    pending: list[BaseException] = [error]
    seen: set[int] = set()
    while pending:
        chained = pending.pop()
        if id(chained) not in seen:
            seen.add(id(chained))
            chained.with_traceback(None)
            pending += [e for e in (chained.__cause__, chained.__context__) if e is not None]
    return error
