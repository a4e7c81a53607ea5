"""Keeping a TLS session and offering it to new connections as OpenSSL takes it.

CPython's ``ssl`` makes both ends of this slow. Its ``SSLObject.session`` setter (which
``wrap_bio(session=...)`` uses) copies the session by serializing it to DER and parsing it
back, the server's certificate included: 0.2-0.5 ms of CPU on every upstream connection, as
much as the resumed handshake itself. Its getter (3.11) makes the same copy, then drops it
unfreed and returns the connection's own session. It copies because OpenSSL 1.1.0 had no
public ``SSL_SESSION_dup``.

So where it can, a :class:`KeptSession` holds its own in-memory copy (``SSL_SESSION_dup``,
the certificate shared by reference) and gives each new connection another one through
``SSL_set_session``, as nginx hands its kept session over. The copies matter: OpenSSL marks
the session a connection holds not resumable when the connection is freed without a TLS
shutdown (an aborted one), and after a TLS 1.2 resumption that is the very session offered.
A kept session must never be one a connection holds. The calls go through ctypes to the
very libssl CPython's ``_ssl`` module is linked against.

That needs one pointer from CPython's private object layout, ``PySSLSocket.ssl`` (in the
same place from 3.7 to 3.13); the sessions themselves are only ever handled through libssl.
The pointer is trusted only after a check made of pointer comparisons alone, with nothing
dereferenced: the object's next field must point at the very context it belongs to. At
import, a probe object must also report, through libssl, the server name it was given.
Where any of this fails (another Python, a static ``_ssl``, OpenSSL before 1.1.1),
:data:`DIRECT` is false and sessions are kept and offered through CPython's getter and
setter.
"""

from __future__ import annotations

import ctypes
import ssl
import sys
from typing import Any, Final

_POINTER: Final = ctypes.sizeof(ctypes.c_void_p)
_HEAD: Final = object.__basicsize__  # PyObject_HEAD: the fields start after it
# PySSLSocket: {HEAD; PyObject *Socket; SSL *ssl; PySSLContext *ctx; ...}
_SSL_AT: Final = _HEAD + _POINTER
_SOCKET_CONTEXT_AT: Final = _HEAD + 2 * _POINTER


def _libssl() -> ctypes.CDLL | None:
    """The libssl CPython's ``_ssl`` uses (its symbols resolve through the module's handle)."""
    if sys.implementation.name != "cpython" or ssl.OPENSSL_VERSION_INFO < (1, 1, 1):
        return None
    try:
        import _ssl  # noqa: PLC0415 (checked only here: the names below may be missing)

        library = ctypes.CDLL(_ssl.__file__)
        signatures: list[tuple[Any, list[Any], Any]] = [
            (library.SSL_get_servername, [ctypes.c_void_p, ctypes.c_int], ctypes.c_char_p),
            (library.SSL_get1_session, [ctypes.c_void_p], ctypes.c_void_p),
            (library.SSL_set_session, [ctypes.c_void_p, ctypes.c_void_p], ctypes.c_int),
            (library.SSL_SESSION_dup, [ctypes.c_void_p], ctypes.c_void_p),
            (library.SSL_SESSION_free, [ctypes.c_void_p], None),
            (library.SSL_SESSION_get_time, [ctypes.c_void_p], ctypes.c_long),
            (library.SSL_SESSION_get_timeout, [ctypes.c_void_p], ctypes.c_long),
        ]
    except (ImportError, AttributeError, OSError):  # built in, or not OpenSSL's names
        return None
    for function, arguments, result in signatures:
        function.argtypes, function.restype = arguments, result
    return library


def _ssl_pointer(ssl_object: ssl.SSLObject, context: ssl.SSLContext) -> int | None:
    """``ssl_object``'s ``SSL *``, if its layout checks out against ``context``."""
    native = ssl_object._sslobj  # type: ignore[attr-defined]
    if type(native).__basicsize__ < _SOCKET_CONTEXT_AT + _POINTER:
        return None
    if ctypes.c_void_p.from_address(id(native) + _SOCKET_CONTEXT_AT).value != id(context):
        return None
    return ctypes.c_void_p.from_address(id(native) + _SSL_AT).value


def _probe(library: ctypes.CDLL) -> bool:
    """Whether a client object's ``SSL *`` is where :func:`_ssl_pointer` reads it."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    name = "probe.invalid"
    probe = context.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname=name)
    pointer = _ssl_pointer(probe, context)
    return pointer is not None and library.SSL_get_servername(pointer, 0) == name.encode()


_LIBSSL: Final = _libssl()
DIRECT: Final = _LIBSSL is not None and _probe(_LIBSSL)
"""Sessions are kept and offered as in-memory copies (else through CPython's getter/setter)."""


class KeptSession:
    """A TLS session kept for the next connection to the same host."""

    def __init__(self, session: ssl.SSLSession | None, native: int | None = None) -> None:
        self._session = session  # the public object, when not DIRECT
        self._native = native  # our own SSL_SESSION reference, when DIRECT
        # When it was made (seconds since the epoch), and how long it may be resumed.
        self.time: int
        self.timeout: int
        if native is not None and _LIBSSL is not None:
            self.time = _LIBSSL.SSL_SESSION_get_time(native)
            self.timeout = _LIBSSL.SSL_SESSION_get_timeout(native)
        else:
            assert session is not None
            self.time, self.timeout = session.time, session.timeout

    @classmethod
    def of(cls, ssl_object: ssl.SSLObject, context: ssl.SSLContext) -> KeptSession | None:
        """The session of ``ssl_object`` (made by ``context``, handshaken), or None."""
        library = _LIBSSL
        pointer = _ssl_pointer(ssl_object, context) if DIRECT and library is not None else None
        if library is None or pointer is None:
            session = ssl_object.session
            return None if session is None else cls(session)
        current = library.SSL_get1_session(pointer)
        if not current:
            return None
        copy = library.SSL_SESSION_dup(current)
        library.SSL_SESSION_free(current)
        return cls(None, copy) if copy else None

    def offer(self, ssl_object: ssl.SSLObject, context: ssl.SSLContext) -> None:
        """Have ``ssl_object`` (made by ``context``, not yet handshaken) offer this session."""
        library = _LIBSSL
        if self._native is not None and library is not None:
            pointer = _ssl_pointer(ssl_object, context)
            copy = library.SSL_SESSION_dup(self._native) if pointer is not None else None
            if copy:
                library.SSL_set_session(pointer, copy)  # takes its own reference
                library.SSL_SESSION_free(copy)
            return  # a session OpenSSL cannot take only costs a full handshake
        assert self._session is not None
        ssl_object.session = self._session

    def __del__(self) -> None:
        if self._native is not None and _LIBSSL is not None:
            _LIBSSL.SSL_SESSION_free(self._native)
            self._native = None
