"""Types of the compiled fast path (gateway/_relay.c and gateway/_heads.c)."""

import ssl
from collections.abc import Callable

class AudioForwarder:
    """A ``data_received``: reads of whole binary frames are written and counted in C."""

    enabled: bool
    """While false, every read goes to the fallback."""
    payload_bytes: int
    """Audio payload bytes forwarded so far (the caller folds them into its meter)."""
    last_read: float
    """``time.monotonic()`` of the last read forwarded here (0.0 before the first)."""
    fd: int
    """The client's socket it sends on itself, or -1 (everything goes through ``write``)."""
    def __init__(
        self,
        write: Callable[[bytes], object],
        fallback: Callable[[bytes], object],
        max_payload: int,
        *,
        fd: int = -1,
        closing: Callable[[], bool] | None = None,
        buffered: Callable[[], int] | None = None,
    ) -> None: ...
    def __call__(self, data: bytes, /) -> None: ...

class TLSReader:
    """A TLS layer's ``data_received``: each socket read fed to the BIO, records read out in C."""

    enabled: bool
    """While false, every read goes to the fallback."""
    deliver: Callable[[bytes], object]
    """Where decrypted records go."""
    def __init__(
        self,
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
    ) -> None: ...
    def __call__(self, data: bytes, /) -> None: ...

def scan_request(
    data: bytes | bytearray, max_line: int, max_headers: int, /
) -> tuple[int, str, str, str | None] | None:
    """A whole upgrade request that check_upgrade accepts: size, path, key, authorization."""

def scan_switching(
    data: bytes | bytearray, accept: bytes, max_line: int, max_headers: int, /
) -> int | None:
    """The size of a whole 101 that check_switching accepts for ``accept``."""
