"""When each session next needs the watchdog's look: a heap of times, not a scan of all.

The watchdog's rules (no START, upstream silent, client not reading, session too long) can
only fire at or after a time known in advance: the earliest of a session's deadlines, each
measured from a moment that only moves forward (the last upstream message, the start of a
stall). Scanning every session every tick cost each 5 s session about 20 looks that found
nothing; :class:`Deadlines` hands the watchdog only the sessions whose earliest deadline has
come. The watchdog then applies its rules as before and, if the session goes on, files it
again at its new earliest deadline.

Items are held weakly: a session that ended is freed at once (with its sockets' buffers),
whatever its entry, and entries of items gone are dropped when they come due, or sooner
when they outnumber the live items (:meth:`Deadlines.prune`), so the heap stays within a
small multiple of the sessions running.
"""

from __future__ import annotations

import heapq
import itertools
import weakref
from collections.abc import Collection
from typing import Generic, TypeVar

Item = TypeVar("Item")

# Stale entries (of items gone) tolerated beside the live ones before the heap is rebuilt.
_SLACK = 64


class Deadlines(Generic[Item]):
    """Items filed under a time, handed back once that time has come (earliest first).

    Held by weak reference: an item nothing else holds is dropped, never handed back.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, weakref.ref[Item]]] = []
        self._order = itertools.count()  # ties keep filing order; items need no ordering

    def __len__(self) -> int:
        return len(self._heap)

    def file(self, when: float, item: Item) -> None:
        """Hand ``item`` back from :meth:`due` once ``when`` has come (if it still exists)."""
        heapq.heappush(self._heap, (when, next(self._order), weakref.ref(item)))

    def due(self, now: float) -> list[Item]:
        """The items whose time is ``now`` or earlier, removed (refile the ones still live)."""
        heap, found = self._heap, []
        while heap and heap[0][0] <= now:
            item = heapq.heappop(heap)[2]()
            if item is not None:
                found.append(item)
        return found

    def prune(self, live: Collection[Item]) -> None:
        """Drop the entries of items not in ``live``, once they outnumber the live ones."""
        if len(self._heap) > 2 * len(live) + _SLACK:
            self._heap = [entry for entry in self._heap if entry[2]() in live]
            heapq.heapify(self._heap)
