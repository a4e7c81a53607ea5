"""TLS to the upstream, run by the gateway over a plain socket (memory BIOs, no TLS transport).

uvloop's TLS transport (asyncio's too) is a general one: its own read buffer (256 KiB per
connection), a state machine, write backlogs, the peer's certificate decoded into a dict
after every handshake, a Python call per record read. A relayed session needs little of
that, and an upstream on Huawei Cloud is always TLS. So an upstream's TLS is this small
layer instead: :class:`TLSLayer` is the plain socket's protocol; it drives the handshake,
decrypts what arrives and hands it to the application protocol, and :class:`TLSTransport`
is what that protocol writes to. The same OpenSSL does the same TLS (certificates and host
names verified by the context, sessions resumed by
:class:`~gateway.upstream_socket.ResumingTLS`); only the Python around it is less. On the
relay's compiled path (``--relay``) the socket's ``data_received`` is a ``TLSReader`` from
``gateway/_relay.c``: while records simply flow it feeds each read to the BIO and hands the
records on with no Python between them, and everything else (the handshake, a paused
reader, close_notify, a broken record) comes here, to the same code as on the pure-Python
path.

What it keeps of a transport's contract: ``connection_made`` once the handshake is done;
``data_received`` with decrypted bytes, never while reading is paused (what was already
read stays in the BIO: at most one socket read); ``eof_received`` on the peer's close_notify
or its TCP end, once; ``connection_lost`` once, and only after ``connection_made``;
``pause_writing`` and ``resume_writing`` passed on from the socket. ``close()`` sends
close_notify and closes the socket once what was written is sent; ``abort()`` drops it. A
record that fails to decrypt breaks the connection: the socket is dropped and the
application's ``connection_lost`` gets the error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import types
from typing import TYPE_CHECKING, Any, Final, NamedTuple, cast

from gateway.errors import detached
from gateway.fastpath import tls_reader

if TYPE_CHECKING:
    from gateway._relay import TLSReader

logger = logging.getLogger(__name__)

# A record's plaintext is at most 16 KiB (RFC 8446 §5.1), and a read returns one record's.
# No more: CPython allocates the whole size for every read, then shrinks it. 16 KiB stays
# under glibc's mmap threshold; uvloop's 256 KiB is over it until glibc raises it, and until
# then every read maps and drops memory (20.8 µs a record against 2.0, in a fresh process).
_READ_SIZE = 16 * 1024


class StartedHandshake(NamedTuple):
    """A client's TLS object whose ClientHello is made and waits, unsent, in ``outgoing``."""

    ssl_object: ssl.SSLObject
    incoming: ssl.MemoryBIO
    outgoing: ssl.MemoryBIO


def start_handshake(context: ssl.SSLContext, server_hostname: str) -> StartedHandshake | None:
    """Make a connection's ClientHello before it has a socket (its key share included).

    None if OpenSSL refuses to start one: the connection then fails the same way, with the
    error where it belongs.
    """
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    try:
        ssl_object = context.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
        ssl_object.do_handshake()
    except ssl.SSLWantReadError:
        return StartedHandshake(ssl_object, incoming, outgoing)
    except (ssl.SSLError, ValueError):
        pass
    return None


class TLSLayer(asyncio.Protocol):
    """The plain socket's protocol: TLS between it and the application protocol ``app``."""

    def __init__(
        self,
        context: ssl.SSLContext,
        server_hostname: str,
        app: asyncio.Protocol,
        *,
        compiled: bool = False,
        started: StartedHandshake | None = None,
    ) -> None:
        """``compiled``: read records in C (``gateway/_relay.c``), the relay's compiled path.

        ``started``: a handshake begun ahead (:func:`start_handshake`, made by ``context``
        for ``server_hostname``) whose ClientHello goes out on connecting; else one is begun
        then.
        """
        if started is None:
            self._incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            self.ssl_object = context.wrap_bio(
                self._incoming, self._outgoing, server_side=False, server_hostname=server_hostname
            )
        else:
            self.ssl_object, self._incoming, self._outgoing = started
        # CPython's SSLObject is a Python wrapper around its C object: reading through the
        # C object's own methods saves a Python call per record (the wrapper's are the same).
        inner = getattr(self.ssl_object, "_sslobj", self.ssl_object)
        self._read, self._pending = inner.read, inner.pending
        self._app = app
        self._deliver = app.data_received  # looked up again when the protocol changes
        self._raw: asyncio.Transport | None = None
        self.established: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        """Done once the handshake is: its exception if it failed."""
        self._open = False  # handshake done, the app's connection_made called
        self._reading_paused = False
        self._eof_passed = False  # the app's eof_received was called
        self._closing = False
        self._lost = False
        self._error: BaseException | None = None
        self._reader: TLSReader | None = None
        if compiled:  # data_received in C while records simply flow; this class's otherwise
            self._reader = tls_reader(
                feed=self._incoming.write,
                read=self._read,
                incoming=self._incoming,
                outgoing=self._outgoing,
                deliver=self._deliver,
                fallback=types.MethodType(TLSLayer.data_received, self),
                on_error=self._read_failed,
                flush=self._flush,
                want_read=ssl.SSLWantReadError,
                size=_READ_SIZE,
            )
            self.data_received = self._reader  # type: ignore[method-assign,assignment]

    # the plain socket's side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Start the handshake (the ClientHello goes out now, made now unless it waits)."""
        self._raw = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        if self._outgoing.pending:  # a handshake begun ahead: its ClientHello waits
            self._flush()
        else:
            self._handshake()

    def data_received(self, data: bytes) -> None:
        """Decrypt and deliver every whole record, unless the application paused reading.

        One record per audio frame: the pure-Python path's hot path, and what the compiled
        reader falls back to (see the module's docstring).
        """
        self._incoming.write(data)
        if not self._open:
            if not self.established.done():
                self._handshake()
            return
        read, pending, incoming = self._read, self._pending, self._incoming
        while self._reading_records():
            try:
                plain = read(_READ_SIZE)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLError as exc:  # close_notify raised, or a record that is broken
                self._read_failed(exc)
                return
            if not plain:  # the peer's close_notify (CPython returns b"" for it)
                self._pass_eof()
                break
            self._deliver(plain)
            # A read returns one record: go on only if there is more (no futile read).
            if not incoming.pending and not pending():
                break
        if self._outgoing.pending:  # e.g. an answer to a key update
            self._flush()

    def _reading_records(self) -> bool:
        """Whether records go to the application now (and so the compiled reader runs)."""
        reading = self._open and not (
            self._reading_paused or self._eof_passed or self._closing or self._error is not None
        )
        if self._reader is not None:
            self._reader.enabled = reading
        return reading

    def _read_failed(self, exc: BaseException) -> None:
        """A read that raised (here, or in the compiled reader): the end, or a broken link."""
        if isinstance(exc, ssl.SSLZeroReturnError):
            self._pass_eof()
        elif isinstance(exc, ssl.SSLError):
            self._fatal(exc)
        else:
            raise exc

    def eof_received(self) -> bool:
        """The peer ended TCP: the application hears of it once; the socket then closes."""
        if not self._open:
            self._fail_handshake(_closed_in_handshake())
        else:
            self._pass_eof()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        """The socket is closed: the application hears it once (after a handshake)."""
        self._lost = True
        try:
            if not self._open:
                self._fail_handshake(exc or _closed_in_handshake())
                return
            error = self._error or exc
            self._app.connection_lost(error if isinstance(error, Exception) else None)
        finally:
            self._release()

    def _release(self) -> None:
        """Let go of the application protocol, and the compiled reader of us.

        Once the socket is closed nothing more is delivered, and the application's transport
        (this layer) then holds nothing that holds it: reference counting frees the
        connection's objects at once instead of leaving them in cycles for the collector.
        """
        if self._reader is not None:
            self._reader.enabled = False
            del self.data_received  # the reader, set on the instance; its callbacks are ours
            self._reader = None
        self._app = _DETACHED
        self._deliver = _DETACHED.data_received

    def pause_writing(self) -> None:
        """The socket's send buffer is full."""
        if self._open:
            self._app.pause_writing()

    def resume_writing(self) -> None:
        """The socket's send buffer drained."""
        if self._open:
            self._app.resume_writing()

    # handshake

    def _handshake(self) -> None:
        try:
            self.ssl_object.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except (ssl.SSLError, OSError) as exc:
            self._flush()  # an alert, if OpenSSL made one
            self._fail_handshake(exc)
            return
        # The Finished goes out with the application's first write (the upgrade request), in
        # one segment: flushed by that write, or just below if it writes nothing.
        self._open = True
        self._reading_records()
        self._app.connection_made(TLSTransport(self))  # the app holds it; we do not
        self._flush()
        if not self.established.done():  # not cancelled meanwhile (a connect timeout)
            self.established.set_result(None)
        if self._incoming.pending:  # records that came with the server's last flight
            self.data_received(b"")

    def _fail_handshake(self, exc: BaseException) -> None:
        if not self.established.done():
            self.established.set_exception(exc)
        if self._raw is not None and not self._lost:
            self._raw.abort()

    def _pass_eof(self) -> None:
        if self._eof_passed:
            return
        self._eof_passed = True
        self._reading_records()
        if not self._app.eof_received():
            self.close()

    def _fatal(self, exc: BaseException) -> None:
        logger.debug("TLS connection broken: %s", exc)
        self._error = detached(exc)  # its frames hold this layer
        self._reading_records()
        self._flush()  # OpenSSL's alert, if it made one
        if self._raw is not None:
            self._raw.abort()

    def _flush(self) -> None:
        if self._outgoing.pending and self._raw is not None and not self._raw.is_closing():
            self._raw.write(self._outgoing.read())

    # the application's side (through TLSTransport)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt ``data`` and send it."""
        if self._closing or self._error is not None or self._raw is None:
            return
        try:
            self.ssl_object.write(data)
        except ssl.SSLError as exc:  # a TLS 1.2 renegotiation the server started, or worse
            self._fatal(exc)
            return
        self._flush()

    def close(self) -> None:
        """Send close_notify, then close the socket once what was written is sent."""
        if self._closing or self._raw is None:
            return
        self._closing = True
        self._reading_records()
        if self._open:
            # unwrap() then waits for the peer's close_notify (SSLWantReadError): we do not.
            with contextlib.suppress(ssl.SSLError):
                self.ssl_object.unwrap()
            self._flush()
        self._raw.close()

    def abort(self) -> None:
        """Drop the socket at once."""
        self._closing = True
        self._reading_records()
        if self._raw is not None:
            self._raw.abort()

    def pause_reading(self) -> None:
        """Stop delivering; what arrives stays in the socket (and the BIO)."""
        self._reading_paused = True
        self._reading_records()
        if self._raw is not None:
            self._raw.pause_reading()

    def resume_reading(self) -> None:
        """Deliver again: first what the BIO holds (on the next loop turn, as a read would)."""
        if not self._reading_paused:
            return
        self._reading_paused = False
        self._reading_records()
        if self._raw is not None and not self._raw.is_closing():
            self._raw.resume_reading()
        if self._open and self.held_bytes:
            asyncio.get_running_loop().call_soon(self.data_received, b"")

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        """Deliver to ``protocol`` from now on (its ``data_received`` as it is now)."""
        self._app = cast(asyncio.Protocol, protocol)
        self._deliver = self._app.data_received
        if self._reader is not None:
            self._reader.deliver = self._deliver

    def get_protocol(self) -> asyncio.BaseProtocol:
        """The application protocol."""
        return self._app

    def is_closing(self) -> bool:
        """Closed, or closing."""
        return self._closing or self._raw is None or self._raw.is_closing()

    def is_reading(self) -> bool:
        """Delivering data."""
        return not self._reading_paused and not self.is_closing()

    @property
    def held_bytes(self) -> int:
        """Bytes read from the socket and not yet delivered (still encrypted, or not)."""
        return self._incoming.pending + self._pending()

    @property
    def raw(self) -> asyncio.Transport | None:
        """The plain socket's transport (once connected)."""
        return self._raw


# The application protocol of a layer whose socket is closed: takes nothing, holds nothing.
_DETACHED: Final = asyncio.Protocol()


def _closed_in_handshake() -> ConnectionResetError:
    return ConnectionResetError("connection closed during the TLS handshake")


class TLSTransport(asyncio.Transport):
    """The transport an application protocol over :class:`TLSLayer` writes to."""

    def __init__(self, layer: TLSLayer) -> None:
        super().__init__()
        self._layer = layer

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt and send."""
        self._layer.write(data)

    def writelines(self, list_of_data: Any) -> None:
        """Encrypt and send each."""
        self._layer.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        """TLS has no half-close."""
        return False

    def close(self) -> None:
        """close_notify, then close once sent."""
        self._layer.close()

    def abort(self) -> None:
        """Drop the connection."""
        self._layer.abort()

    def is_closing(self) -> bool:
        """Closed, or closing."""
        return self._layer.is_closing()

    def pause_reading(self) -> None:
        """Stop delivering data."""
        self._layer.pause_reading()

    def resume_reading(self) -> None:
        """Deliver data again."""
        self._layer.resume_reading()

    def is_reading(self) -> bool:
        """Delivering data."""
        return self._layer.is_reading()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        """Deliver to ``protocol`` from now on."""
        self._layer.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        """The application protocol."""
        return self._layer.get_protocol()

    def get_write_buffer_size(self) -> int:
        """Bytes the socket has yet to send."""
        raw = self._layer.raw
        return raw.get_write_buffer_size() if raw is not None else 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        """The socket's send buffer limits."""
        raw = self._layer.raw
        if raw is not None:
            raw.set_write_buffer_limits(high, low)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """``ssl_object``, ``peercert``, ``cipher``..., else the socket's."""
        ssl_object = self._layer.ssl_object
        if name == "ssl_object":
            return ssl_object
        if name == "peercert":
            return ssl_object.getpeercert()
        if name == "cipher":
            return ssl_object.cipher()
        if name == "compression":
            return ssl_object.compression()
        raw = self._layer.raw
        return raw.get_extra_info(name, default) if raw is not None else default
