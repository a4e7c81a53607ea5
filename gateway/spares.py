"""Spare upstream connections, handshaken before a caller needs them.

Opening the upstream is the slowest step of a session that the gateway controls: to Huawei
Cloud it is a TCP and TLS handshake plus the WebSocket upgrade, several round trips before
START can even be sent. With ``--upstream-spares N`` the gateway keeps up to N connections
per recently used project already open, hands one to the next caller of that project, and
opens a replacement in the background. A spare is replaced before the cloud's idle rule
(about 20 s without a request) can close it: past half its lifetime its replacement is
opened, and it is offered until that one is ready, so there is no moment without one.
Projects idle for a while keep none, so an idle gateway makes no upstream traffic.

A replacement is opened once the session that needed it has its first audio (or has ended,
or :data:`REPLACE_WITHIN` has passed), not while that session's START and first audio are
on their way: its handshake (and, to a TLS upstream, its key exchange) would otherwise take
the gateway's CPU just when the caller waits. Across a real network the first audio takes
at least a round trip, so the bound keeps the next spare about as early as before.

Opt-in because an idle spare is an open connection to the cloud, and whether Huawei counts
it toward the account's concurrency quota is not documented.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final

from gateway.upstream_socket import UpstreamSocket
from rtts_plugin.errors import RttsError

logger = logging.getLogger(__name__)

# A project keeps spares this long after its last session.
_PROJECT_KEEP_SECONDS: Final = 300.0
# After a failed spare handshake, wait this long before trying that project again, doubling
# with each failure in a row up to the cap (a project the cloud refuses is not hammered).
_RETRY_AFTER_SECONDS: Final = 5.0
_RETRY_AFTER_CAP_SECONDS: Final = 60.0
_MAINTENANCE_PERIOD: Final = 1.0  # or a quarter of a spare's lifetime, if shorter
REPLACE_WITHIN = 0.02
"""Seconds after a take by which the replacement opens, whatever the session is doing."""


@dataclass
class _Project:
    spares: deque[tuple[float, UpstreamSocket]] = field(default_factory=deque)
    opening: int = 0
    last_used: float = field(default_factory=time.monotonic)
    retry_at: float = 0.0
    failures: int = 0  # spare handshakes failed in a row


class SparePool:
    """Up to ``spares`` open upstream connections per recently used project."""

    def __init__(
        self,
        open_upstream: Callable[[str], Awaitable[UpstreamSocket]],
        spares: int,
        max_age: float,
        on_change: Callable[[int], None] = lambda ready: None,
    ) -> None:
        self._open = open_upstream
        self._spares = spares
        self._max_age = max_age
        self._period = min(_MAINTENANCE_PERIOD, max_age / 4)
        self._on_change = on_change
        self._projects: dict[str, _Project] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.closed = False

    @property
    def ready(self) -> int:
        """Spares open and waiting."""
        return sum(len(project.spares) for project in self._projects.values())

    def has(self, project_id: str) -> bool:
        """Whether a spare for ``project_id`` is waiting (:meth:`take` may find it closed)."""
        project = self._projects.get(project_id)
        return project is not None and bool(project.spares)

    def take(self, project_id: str) -> UpstreamSocket | None:
        """A usable spare for ``project_id``, or None.

        The replacement waits for :meth:`replenish`, to be called once the caller's session
        has its first audio or has ended, and at most :data:`REPLACE_WITHIN` seconds.
        """
        if not self._spares or self.closed:
            return None
        project = self._projects.setdefault(project_id, _Project())
        project.last_used = time.monotonic()
        self._drop_stale(project, project.last_used)
        # The newest: the cloud's idle clock has run least on it (a client may yet hold it
        # idle before its START, as a bot's prewarmed connection does).
        spare = None
        while project.spares and spare is None:
            candidate = project.spares.pop()[1]
            if candidate.usable():
                spare = candidate
            else:
                candidate.retire("spare closed by the upstream")
        asyncio.get_running_loop().call_later(REPLACE_WITHIN, self.replenish, project_id)
        self._on_change(self.ready)
        return spare

    def replenish(self, project_id: str) -> None:
        """Open what ``project_id`` lacks of its spares (after :meth:`take`; else nothing)."""
        project = self._projects.get(project_id)
        if project is not None:
            self._refill(project_id, project)

    async def maintain(self) -> None:
        """Replace spares before they grow stale; forget projects not used for a while."""
        while True:
            await asyncio.sleep(self._period)
            now = time.monotonic()
            for project_id, project in list(self._projects.items()):
                self._drop_stale(project, now)
                if now - project.last_used > _PROJECT_KEEP_SECONDS:
                    if not project.spares and not project.opening:
                        del self._projects[project_id]
                    continue
                self._refill(project_id, project)
            self._on_change(self.ready)

    async def close(self) -> None:
        """Stop refilling and close every spare."""
        self.closed = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for project in self._projects.values():
            while project.spares:
                project.spares.popleft()[1].retire("gateway shutting down")
        self._on_change(0)

    def _drop_stale(self, project: _Project, now: float) -> None:
        """Close the oldest spares while they are too old or no longer usable."""
        while project.spares and (
            now - project.spares[0][0] >= self._max_age or not project.spares[0][1].usable()
        ):
            project.spares.popleft()[1].retire("spare expired")

    def _refill(self, project_id: str, project: _Project) -> None:
        now = time.monotonic()
        if self.closed or now < project.retry_at:
            return
        # A spare past half its lifetime is replaced ahead of time and offered until its
        # replacement is ready, so rotating spares leaves no moment without one.
        fresh = sum(1 for opened, _ in project.spares if now - opened < self._max_age / 2)
        loop = asyncio.get_running_loop()
        while fresh + project.opening < self._spares:
            project.opening += 1
            task = loop.create_task(self._open_spare(project_id, project))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _open_spare(self, project_id: str, project: _Project) -> None:
        try:
            connection = await self._open(project_id)
        except RttsError as exc:
            pause = min(_RETRY_AFTER_SECONDS * 2**project.failures, _RETRY_AFTER_CAP_SECONDS)
            project.failures += 1
            project.retry_at = time.monotonic() + pause
            logger.info("could not open a spare upstream for project %s: %s", project_id, exc)
            return
        finally:
            project.opening -= 1
        project.failures = 0
        if self.closed:
            connection.retire("gateway shutting down")
            return
        project.spares.append((time.monotonic(), connection))
        while len(project.spares) > self._spares:  # the oldest, now replaced
            project.spares.popleft()[1].retire("spare replaced")
        self._on_change(self.ready)
