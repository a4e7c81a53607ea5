"""Loggers for websockets connections that never write credentials.

At DEBUG level websockets logs every handshake header, which would put ``X-Auth-Token`` and
``Authorization`` (AK/SK signatures, gateway keys) in the logs. These loggers keep the debug
output but replace the values of those headers with ``***``.
"""

from __future__ import annotations

import logging
from typing import Final

SENSITIVE_HEADERS: Final = frozenset({"authorization", "x-auth-token", "x-subject-token"})


class RedactCredentials(logging.Filter):
    """Hide the value of credential headers in websockets' ``"> %s: %s"`` header lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the record's arguments if it logs a credential header; keep the record."""
        args = record.args
        if isinstance(args, tuple) and len(args) == 2 and str(args[0]).lower() in SENSITIVE_HEADERS:
            record.args = (args[0], "***")
        return True


def websockets_logger(name: str) -> logging.Logger:
    """The logger ``name``, with credential headers redacted (the filter is added once)."""
    logger = logging.getLogger(name)
    if not any(isinstance(f, RedactCredentials) for f in logger.filters):
        logger.addFilter(RedactCredentials())
    return logger
