"""Upstream host names are resolved once for a while, not on every session's path."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from gateway.addresses import ADDRESS_TTL_SECONDS, AddressCache
from gateway.upstream_socket import open_upstream
from tests.test_upstream_socket import accepting, listening


class Resolver:
    """Answers every name with two addresses and counts the lookups."""

    def __init__(self) -> None:
        self.lookups: list[str] = []

    async def __call__(self, host: str, port: int, **_: Any) -> list[tuple[Any, ...]]:
        self.lookups.append(host)
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.2", port)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port)),  # once is enough
        ]


async def test_a_name_is_looked_up_once_per_ttl_and_again_once_forgotten() -> None:
    now = [100.0]
    resolver = Resolver()
    cache = AddressCache(clock=lambda: now[0], lookup=resolver)
    expected = [("127.0.0.2", 443), ("127.0.0.1", 443)]
    assert await cache.resolve("rtts.example", 443) == expected
    now[0] += ADDRESS_TTL_SECONDS - 1
    assert await cache.resolve("rtts.example", 443) == expected
    assert resolver.lookups == ["rtts.example"]
    now[0] += 1  # the answer has expired
    await cache.resolve("rtts.example", 443)
    cache.forget("rtts.example", 443)  # none of its addresses answered
    await cache.resolve("rtts.example", 443)
    assert resolver.lookups == ["rtts.example"] * 3


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
async def test_an_ip_literal_is_never_looked_up(host: str) -> None:
    resolver = Resolver()
    assert await AddressCache(lookup=resolver).resolve(host, 80) == [(host, 80)]
    assert resolver.lookups == []


async def test_the_upstream_is_reached_by_name_on_the_address_that_answers() -> None:
    # "localhost" may come first as ::1, where nothing listens: the next address is tried.
    async with listening(accepting(b"")) as port:
        for _ in range(2):
            upstream = await open_upstream(
                f"ws://localhost:{port}/v1/p/rtts", {}, connect_timeout=5
            )
            assert upstream.usable()
            upstream.abort()
    with pytest.raises(Exception, match="cannot connect to localhost"):
        await asyncio.wait_for(
            open_upstream(f"ws://localhost:{port}/v1/p/rtts", {}, connect_timeout=5), 10
        )
