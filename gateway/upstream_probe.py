"""The upstream's reachability, checked in the background: a metric, never readiness.

Every few seconds a TCP connection is opened to the upstream's host and port (no TLS, no
request, nothing billed) and closed; to its HTTP(S) proxy's instead when the upstream is
reached through one (``HTTPS_PROXY``), since the gateway may not reach the upstream itself.
The result feeds ``rtts_upstream_reachable`` and the ``detail`` of ``/readyz``; for the
local backend the upstream is the embedded engine, so the same check tells whether the
engine answers (see :mod:`gateway.readiness`). Running apart from ``/readyz`` keeps the
probe endpoint instant: a blackholed upstream never makes a kubelet probe time out.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Final
from urllib.parse import urlsplit

from websockets.uri import parse_uri

from gateway.upstream_socket import proxy_for

PROBE_PERIOD_SECONDS: Final = 5.0
PROBE_TIMEOUT_SECONDS: Final = 2.0


class UpstreamProbe:
    """Whether the upstream at ``base`` (``ws[s]://host[:port]``) accepted the last connection."""

    def __init__(
        self,
        base: str,
        on_result: Callable[[bool], None],
        period: float = PROBE_PERIOD_SECONDS,
        timeout: float = PROBE_TIMEOUT_SECONDS,
    ) -> None:
        proxy = proxy_for(parse_uri(base))
        parts = urlsplit(proxy or base)
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if parts.scheme in ("wss", "https") else 80)
        self._what = f"{'proxy to the upstream' if proxy else 'upstream'} {self.host}:{self.port}"
        self._on_result = on_result
        self._period = period
        self._timeout = timeout
        self.reachable: bool | None = None
        """The last result; ``None`` before the first check."""
        self.detail = f"{self._what} not checked yet"

    async def check(self) -> bool:
        """Connect once, record and report the result."""
        try:
            async with asyncio.timeout(self._timeout):
                _, writer = await asyncio.open_connection(self.host, self.port)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            self.reachable, self.detail = True, f"{self._what} reachable"
        except (OSError, TimeoutError) as exc:
            self.reachable = False
            self.detail = f"{self._what} unreachable ({type(exc).__name__})"
        self._on_result(self.reachable)
        return self.reachable

    async def run(self) -> None:
        """Check every period, until cancelled."""
        while True:
            await asyncio.sleep(self._period)
            await self.check()
