"""The local engine's websockets logger: connection chatter at DEBUG, not INFO.

The engine serves only the gateway, on an internal loopback port: every relayed session
opens one connection to it and the readiness check another every few seconds, so
websockets' INFO lines ("connection open", "connection closed", "server listening") would
fill an idle gateway's log. The gateway logs each session itself; these stay at DEBUG.
"""

from __future__ import annotations

import logging
from typing import Any

from rtts_plugin.logs import websockets_logger


class DemotedInfo(logging.LoggerAdapter[logging.Logger]):
    """Passes records on unchanged, except that INFO becomes DEBUG."""

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        """Log ``msg``; INFO is logged at DEBUG."""
        super().log(logging.DEBUG if level == logging.INFO else level, msg, *args, **kwargs)


def engine_websockets_logger() -> DemotedInfo:
    """The logger for the engine's websockets server (credentials redacted, INFO demoted)."""
    return DemotedInfo(websockets_logger("gateway.engine.websockets"))
