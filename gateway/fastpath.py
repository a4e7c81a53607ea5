"""The gateway's compiled fast path, and the choice between it and pure Python.

A relayed session spends almost all of its life streaming audio from the upstream, one read
of whole binary frames after another. ``gateway/_relay.c`` forwards and counts such reads in
C, and reads a TLS upstream's records out of its memory BIO in C (see its header comment);
``gateway/_heads.c`` reads and checks the handshake's two heads, the client's upgrade request
and the upstream's 101. The pure-Python path in :mod:`gateway.splice`, :mod:`gateway.wire`,
:mod:`gateway.upstream_tls`, :mod:`gateway.http_head`, :mod:`gateway.frontdoor` and
:mod:`gateway.upgrade` does the same, and everything else, for all. The C module is
built by ``pip install`` where a C compiler and the Python headers are present (Debian:
``gcc`` and ``python3-dev``) and skipped where they are not, so this module reports what
was built.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Final, Literal

from websockets.http11 import MAX_LINE_LENGTH, MAX_NUM_HEADERS

if TYPE_CHECKING:
    import asyncio
    import ssl

    from gateway._relay import AudioForwarder, TLSReader

try:
    from gateway import _relay
except ImportError:  # pragma: no cover (an install with no C compiler)
    _relay = None  # type: ignore[assignment]

RelayPath = Literal["compiled", "python"]

COMPILED_AVAILABLE: Final = _relay is not None
"""Whether ``gateway._relay`` was built for this interpreter."""


def resolve(choice: Literal["auto", "compiled", "python"]) -> RelayPath:
    """The relay path to run for the ``--relay`` setting ('auto': compiled when built)."""
    if choice == "auto":
        return "compiled" if COMPILED_AVAILABLE else "python"
    return choice


def audio_forwarder(
    write: Callable[[bytes], object],
    fallback: Callable[[bytes], object],
    max_payload: int,
    *,
    client: asyncio.Transport | None = None,
) -> AudioForwarder:
    """The compiled forwarder (its interface: ``gateway/_relay.pyi``).

    Reads of whole binary frames of at most ``max_payload`` bytes go to ``write`` and set
    its ``last_read``; any other read goes to ``fallback``. ``client``: the transport
    ``write`` writes to; on a plain socket, the forwarder sends on it itself while it is
    open and has nothing buffered (the rest still goes to ``write``). It must not be
    half-closed (``write_eof``) while the forwarder may run (see ``gateway/_relay.c``).
    """
    if _relay is None:  # pragma: no cover (settings refuse 'compiled' when it was not built)
        raise RuntimeError("gateway._relay was not built")
    sock = client.get_extra_info("socket") if client is not None else None
    if client is None or sock is None or client.get_extra_info("sslcontext") is not None:
        return _relay.AudioForwarder(write, fallback, max_payload)
    return _relay.AudioForwarder(
        write,
        fallback,
        max_payload,
        fd=sock.fileno(),
        closing=client.is_closing,
        buffered=client.get_write_buffer_size,
    )


def tls_reader(
    *,
    feed: Callable[[bytes], object],
    read: Callable[[int], bytes],
    incoming: ssl.MemoryBIO,
    outgoing: ssl.MemoryBIO,
    deliver: Callable[[bytes], object],
    fallback: Callable[[bytes], object],
    on_error: Callable[[BaseException], object],
    flush: Callable[[], object],
    want_read: type[BaseException],
    size: int,
) -> TLSReader:
    """The compiled reader of a TLS layer's records (its interface: ``gateway/_relay.pyi``)."""
    if _relay is None:  # pragma: no cover (settings refuse 'compiled' when it was not built)
        raise RuntimeError("gateway._relay was not built")
    return _relay.TLSReader(
        feed, read, incoming, outgoing, deliver, fallback, on_error, flush, want_read, size
    )


def scan_request(data: bytes | bytearray) -> tuple[int, str, str, str | None] | None:
    """An upgrade request at the start of ``data`` that ``check_upgrade`` accepts, read in C.

    Its size, path, ``Sec-WebSocket-Key`` and ``Authorization`` (None without one); ``None``
    for anything else (incomplete, malformed, refused, unusual), which the Python path reads.
    """
    return _relay.scan_request(data, MAX_LINE_LENGTH, MAX_NUM_HEADERS)


def scan_switching(data: bytes | bytearray, accept: bytes) -> int | None:
    """The size of a 101 at the start of ``data`` that ``check_switching`` accepts, read in C.

    ``accept`` is the ``Sec-WebSocket-Accept`` the request's key asks for. ``None`` for
    anything else (incomplete, a refusal, unusual), which the Python path reads.
    """
    return _relay.scan_switching(data, accept, MAX_LINE_LENGTH, MAX_NUM_HEADERS)
