"""The upstream's addresses, resolved once per host for a while, not once per session.

Every session opens its own upstream connection. Resolving the host each time costs a
thread-pool round trip and DNS queries on the caller's path (in Kubernetes, with its
search domains, several per name). nginx resolves a ``proxy_pass`` host once, at start;
here an answer is kept for :data:`ADDRESS_TTL_SECONDS`, and dropped at once when none of
its addresses can be connected to, so a moved upstream is looked up again by the next
session. IP literals are never looked up.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

ADDRESS_TTL_SECONDS: Final = 30.0
"""How long a host's resolved addresses are used before it is resolved again."""
_MAX_HOSTS: Final = 64  # a gateway talks to a handful of upstream hosts

Address = tuple[str, int]
# loop.getaddrinfo's shape: (host, port, type=...) -> [(family, type, proto, name, sockaddr)]
Lookup = Callable[..., Awaitable[list[tuple[Any, ...]]]]


@functools.lru_cache(maxsize=_MAX_HOSTS)
def is_ip_literal(host: str) -> bool:
    """True for an IPv4 or IPv6 address (nothing to resolve)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class AddressCache:
    """Resolved (host, port) pairs, each kept for :data:`ADDRESS_TTL_SECONDS`."""

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, lookup: Lookup | None = None
    ) -> None:
        self._clock = clock
        self._lookup = lookup  # default: the running loop's getaddrinfo
        self._known: dict[Address, tuple[float, list[Address]]] = {}

    async def resolve(self, host: str, port: int) -> list[Address]:
        """The addresses to connect to for ``host``, in the resolver's order.

        Raises:
            OSError: the name does not resolve (``socket.gaierror``).
        """
        if is_ip_literal(host):
            return [(host, port)]
        now = self._clock()
        known = self._known.get((host, port))
        if known is not None and now - known[0] < ADDRESS_TTL_SECONDS:
            return known[1]
        lookup = self._lookup or asyncio.get_running_loop().getaddrinfo
        found = await lookup(host, port, type=socket.SOCK_STREAM)
        addresses = list(dict.fromkeys((str(info[4][0]), port) for info in found))
        if len(self._known) >= _MAX_HOSTS:
            self._known.clear()
        self._known[(host, port)] = (now, addresses)
        return addresses

    def forget(self, host: str, port: int) -> None:
        """None of the addresses answered: resolve ``host`` again next time."""
        self._known.pop((host, port), None)


ADDRESSES: Final = AddressCache()
"""The gateway's cache (one process, one set of upstream hosts)."""
