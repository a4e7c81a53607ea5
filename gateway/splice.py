"""Relaying an admitted session: each hop's raw frames written straight to the other hop.

After both opening handshakes, the bytes a hop sends are written to the other hop's socket
in the callback that received them, unchanged (:mod:`gateway.wire` says why that is valid
and what is still read), so relaying a frame costs one scan of its header and one write:
no message objects, no re-encoding, no task switch. The gateway still runs each hop's
closing handshake itself, so a client sees the upstream's close code after END, 1014 if
the upstream went away before END, and the gateway's own codes on timeouts and shutdown.
The gateway's own close frame never lands inside a relayed frame: a hop whose stream was
cut in the middle of a frame is ended at the TCP level instead (its peer sees 1006).

The client's socket comes from :mod:`gateway.front door <gateway.frontdoor>` right after
the 101. The upstream's comes from :mod:`gateway.upstream_socket`, which runs only the
opening handshake and holds every later byte unread, so the splice takes the socket over
with nothing parsed or lost.

With the compiled fast path (:mod:`gateway.fastpath`), the upstream hop's reads go to a C
forwarder first. It is enabled only while the upstream's scanner rests between frames with
nothing held or pending and the meter only counts audio; then a read of whole binary frames
is written and counted in C, and any other read comes here, to the same scanner as without it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Final

from websockets.frames import CloseCode

from gateway.fastpath import audio_forwarder
from gateway.meter import SessionMeter
from gateway.upstream_socket import UpstreamSocket
from gateway.wire import (
    IGNORE,
    FrameScanner,
    MessageSink,
    PingLedger,
    Violation,
    close_frame,
    sendable_close_code,
)
from rtts_plugin.protocol.messages import MAX_CONTROL_MESSAGE_CHARS
from rtts_plugin.transport import MAX_SERVER_MESSAGE_BYTES

if TYPE_CHECKING:
    from gateway._relay import AudioForwarder

logger = logging.getLogger(__name__)

# How long a hop gets to finish its closing handshake before its socket is dropped.
CLOSE_TIMEOUT_SECONDS: Final = 10.0
BAD_GATEWAY: Final = CloseCode.BAD_GATEWAY
# Client pings the upstream has not answered yet (a keepalive sends one every few seconds).
PINGS_UNANSWERED_LIMIT: Final = 32
# Upstream control messages metered per loop turn. A session gets a handful; a flood of them
# (tens of thousands in one read) is metered over many turns, its upstream not read meanwhile,
# so the other sessions keep streaming.
METERED_PER_TURN: Final = 64
# Upstream control messages read ahead of the meter (in one read, since reading waits for the
# meter past METERED_PER_TURN): more is a flood no real upstream sends, refused with 1008.
MAX_UNREAD_CONTROL_MESSAGES: Final = 4096


# How a violation is counted (``code`` label); any other is ``protocol``.
_VIOLATION_CODES: Final[dict[int, str]] = {
    CloseCode.MESSAGE_TOO_BIG: "too_big",
    CloseCode.POLICY_VIOLATION: "policy",
}


class _Hop(asyncio.Protocol):
    """One socket of a spliced session: its scanner and its side of the closing handshake."""

    def __init__(
        self,
        splice: Splice,
        transport: asyncio.Transport,
        scanner: FrameScanner,
        *,
        upstream: bool,
    ) -> None:
        self.splice = splice
        self.transport = transport
        self.scanner = scanner
        self.upstream = upstream  # we are the client on this hop: our frames are masked
        self.peer: _Hop = self
        self.close_sent = False
        self.lost = False
        self.cut_mid_frame = False
        """What was written to this hop ended inside a frame when relaying stopped."""
        self.write_paused_since: float | None = None
        """Since when this hop has not been taking what is written to it."""

    # asyncio.Protocol

    def data_received(self, data: bytes) -> None:
        """Scan, forward and meter (the hot path)."""
        self.splice.received(self, data)

    def eof_received(self) -> bool:
        """The peer closed its socket; ours closes too (returning False)."""
        self.splice.ended(self)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        """The socket is closed."""
        self.lost = True
        self.splice.hop_lost(self)

    def pause_writing(self) -> None:
        """This socket's buffer is full: stop reading what would be written to it."""
        self.write_paused_since = time.monotonic()
        if self.splice.relaying:  # afterwards nothing read is written: read on, for the close
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        """This socket's buffer drained: read from the other hop again.

        The upstream only once the meter has caught up with it too.
        """
        self.write_paused_since = None
        if not self.upstream:  # the upstream was not read meanwhile: not its silence
            self.splice.meter.last_upstream = time.monotonic()
        if not (self.peer.upstream and self.splice.metering_behind):
            self.peer.transport.resume_reading()

    # closing handshake

    def send_close(self, code: int, reason: str) -> None:
        """Send our close frame once, then finish the handshake if the peer's is in."""
        if self.close_sent:
            return
        self.close_sent = True
        if self.cut_mid_frame:
            # A frame of ours there would corrupt the peer's last frame: end at TCP level,
            # after what was relayed (the close timeout covers a peer that reads no more).
            self.transport.close()
            return
        if not self.transport.is_closing():
            self.transport.write(close_frame(code, reason, mask=self.upstream))
        self.finish_closing()

    def finish_closing(self) -> None:
        """Once both close frames are exchanged, the server side closes the socket.

        On the upstream hop we are the client: the server closes it (RFC 6455 §7.1.1),
        and the splice's close timeout covers one that does not.
        """
        if self.close_sent and self.scanner.stopped and not self.upstream:
            self.transport.close()


class Splice:
    """Relays one admitted session between ``client`` and ``upstream`` until both close."""

    def __init__(
        self,
        client: asyncio.Transport,
        client_early: bytes,
        upstream: UpstreamSocket,
        meter: SessionMeter,
        *,
        max_message_bytes: int,
        compiled: bool = False,
    ) -> None:
        self.meter = meter
        self._client_early = client_early
        self._upstream_socket = upstream
        client_sink = MessageSink(message=meter.client_message, binary_passed=IGNORE.binary_passed)
        upstream_sink = MessageSink(
            message=meter.upstream_message, binary_passed=meter.upstream_audio
        )
        client_pings = PingLedger(PINGS_UNANSWERED_LIMIT)
        self.client = _Hop(
            self,
            client,
            FrameScanner(
                client_sink,
                masked=True,
                max_message_bytes=max_message_bytes,
                pings_sent=client_pings,
            ),
            upstream=False,
        )
        assert upstream.transport is not None  # opened
        self.upstream = _Hop(
            self,
            upstream.transport,
            FrameScanner(
                upstream_sink,
                masked=False,
                max_message_bytes=MAX_SERVER_MESSAGE_BYTES,
                # Control messages only: the parser would refuse a longer one anyway.
                max_text_bytes=MAX_CONTROL_MESSAGE_CHARS,
                max_unread_texts=MAX_UNREAD_CONTROL_MESSAGES,
                pongs_answered=client_pings,
            ),
            upstream=True,
        )
        self.client.peer, self.upstream.peer = self.upstream, self.client
        self._forwarder: AudioForwarder | None = None
        if compiled:
            self._forwarder = audio_forwarder(
                client.write, self._upstream_read, MAX_SERVER_MESSAGE_BYTES, client=client
            )
            # Before set_protocol: uvloop keeps the data_received it finds there.
            self.upstream.data_received = self._forwarder  # type: ignore[method-assign,assignment]
        self.relaying = True
        self._metering_due = False  # a _meter_due is scheduled
        self.metering_behind = False
        """The upstream is not read until the meter has read its control messages."""
        self._done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._close_timer: asyncio.TimerHandle | None = None

    async def run(self) -> None:
        """Take over both sockets and relay until both are closed."""
        upstream = self._upstream_socket
        try:
            # The client's socket comes from the front door with the 101 already written.
            self.client.transport.set_protocol(self.client)
            self.client.transport.resume_reading()  # the front door pauses a flood of early bytes
            # The upstream's socket holds every byte after its 101 (gateway.upstream_socket).
            upstream_early, upstream_gone = bytes(upstream.early), upstream.eof
            upstream.early.clear()
            if upstream.lost:
                self.upstream.lost = True  # and its connection_lost never comes to us
            else:
                self.upstream.transport.set_protocol(self.upstream)
                self.upstream.transport.resume_reading()  # paused by a flood of early bytes
            if self._client_early:
                self.received(self.client, self._client_early)
            if upstream_early:
                self.received(self.upstream, upstream_early)
            if upstream_gone:
                self.ended(self.upstream)
            self._check_done()
            await self._done
        finally:
            self._meter(self.upstream)  # cancelled while relaying: the meter is read next
            self._meter_fast_audio()
            if self._close_timer is not None:
                self._close_timer.cancel()
            for hop in (self.client, self.upstream):
                if not hop.lost:
                    hop.transport.abort()  # only when cancelled: the run ends once both are lost

    @property
    def last_upstream(self) -> float:
        """When the upstream last sent something (the compiled forwarder keeps its own clock)."""
        if self._forwarder is None:
            return self.meter.last_upstream
        return max(self.meter.last_upstream, self._forwarder.last_read)

    def close(self, client_code: int, upstream_code: int, reason: str) -> None:
        """End the session from the gateway's side (timeouts, shutdown)."""
        self._stop_relaying()
        self.client.send_close(client_code, reason)
        self.upstream.send_close(upstream_code, reason)

    # -- events from the hops ----------------------------------------------------------------

    def _upstream_read(self, data: bytes) -> None:
        """A read of the upstream's that the compiled forwarder leaves to the scanner."""
        self.received(self.upstream, data)

    def received(self, hop: _Hop, data: bytes) -> None:
        """Forward what may be forwarded, then act on a close frame or a violation.

        The meter reads a control message once it is relayed. The upstream's, after what it
        sends right behind it too (the audio after START or a RESULT): two loop turns later,
        so after the next poll of the sockets, or at once when the upstream stops (what it
        sent before its close decides the outcome) or relaying stops. The client's at once:
        what follows it is the upstream's answer, which takes longer than reading it.
        """
        if hop.upstream:
            self.meter.last_upstream = time.monotonic()
        out = hop.scanner.feed(data)
        if out and self.relaying:
            hop.peer.transport.write(out)
        if hop.scanner.stopped:
            self._meter(hop)
            violation = hop.scanner.violation
            if violation is not None:
                hop.send_close(violation.code, violation.reason)
                self.ended(hop, violation=violation)
            else:
                close = hop.scanner.close
                assert close is not None
                hop.send_close(close.code, close.reason)  # the echo (or our close, now answered)
                hop.finish_closing()
                self.ended(hop, close.code, close.reason)
        elif not hop.upstream:
            self._meter(hop)
        elif hop.scanner.undelivered:
            if hop.scanner.unread_texts > METERED_PER_TURN and not self.metering_behind:
                self.metering_behind = True
                hop.transport.pause_reading()
            if not self._metering_due:
                self._metering_due = True
                loop = asyncio.get_running_loop()
                loop.call_soon(loop.call_soon, self._meter_due)
        else:
            self._enable_forwarder()

    def _meter_due(self) -> None:
        self._metering_due = False
        if not self.relaying:
            return  # metered in full when relaying stopped
        if self._meter(self.upstream, METERED_PER_TURN):
            self._metering_due = True
            asyncio.get_running_loop().call_soon(self._meter_due)
            return
        if self.metering_behind:
            self.metering_behind = False
            if self.client.write_paused_since is None:
                self.upstream.transport.resume_reading()
        self._enable_forwarder()

    def _meter(self, hop: _Hop, limit: int | None = None) -> bool:
        """Give the meter what ``hop`` sent that it has not read yet; at most ``limit``.

        Returns whether some are left.
        """
        try:
            return hop.scanner.deliver(limit)
        except Exception:  # a bug in metering must not take the relay down with it
            logger.exception("metering failed for project %s", self.meter.project_id)
            hop.scanner.sink = IGNORE
            return False

    def _enable_forwarder(self) -> None:
        """Let the compiled forwarder take the upstream's reads, if they need nothing else."""
        if self._forwarder is not None:
            scanner = self.upstream.scanner
            self._forwarder.enabled = (
                self.relaying
                and scanner.at_rest
                and scanner.sink is not IGNORE  # metering did not fail
                and self.meter.counting_audio_only
            )

    def ended(
        self,
        hop: _Hop,
        code: int | None = None,
        reason: str = "",
        violation: Violation | None = None,
    ) -> None:
        """``hop`` closed, went away, or broke the protocol: end the other hop to match."""
        if not self.relaying:
            return
        self._stop_relaying()
        meter = self.meter
        if hop.upstream:
            if meter.state.finished:
                self.client.send_close(sendable_close_code(code, CloseCode.NORMAL_CLOSURE), reason)
                return
            if violation is not None:
                kind = _VIOLATION_CODES.get(violation.code, "protocol")
            else:
                kind = "network" if code is None else "other"
            meter.fail("upstream_closed", kind)
            meter.state.connection_closed(code)
            if self.client.cut_mid_frame:
                logger.warning(
                    "upstream of session %s ended inside a frame; closing the client's "
                    "connection without a close frame",
                    meter.trace_id or "(no trace_id)",
                )
            error_code = None if code == CloseCode.NORMAL_CLOSURE else code
            self.client.send_close(
                sendable_close_code(error_code, BAD_GATEWAY), "upstream closed before END"
            )
        else:
            if violation is not None:
                meter.fail("rejected", _VIOLATION_CODES.get(violation.code, "protocol"))
            elif not meter.state.finished:
                meter.fail("client_cancelled")
            self.upstream.send_close(sendable_close_code(code, CloseCode.GOING_AWAY), reason)

    def hop_lost(self, hop: _Hop) -> None:
        """A socket closed: if it went without a close frame, that ends the session too."""
        self.ended(hop)
        self._check_done()

    # -- internals ---------------------------------------------------------------------------

    def _stop_relaying(self) -> None:
        if not self.relaying:
            return
        self.relaying = False
        self.metering_behind = False  # both hops are read again below
        self._meter(self.upstream)  # what was relayed is metered (the client's already is)
        self._meter_fast_audio()
        for scanner in (self.client.scanner, self.upstream.scanner):
            scanner.sink = IGNORE
            scanner.stop_holding()  # released now, not when the splice is collected
        # Nothing more is relayed: what each hop got so far is all it gets. Each hop is read
        # again (only scanned for its close frame), whether or not its peer reads.
        self.client.cut_mid_frame = self.upstream.scanner.mid_frame
        self.upstream.cut_mid_frame = self.client.scanner.mid_frame
        for hop in (self.client, self.upstream):
            if not hop.lost:
                hop.transport.resume_reading()
        loop = asyncio.get_running_loop()
        self._close_timer = loop.call_later(CLOSE_TIMEOUT_SECONDS, self.abort)

    def _meter_fast_audio(self) -> None:
        """Stop the compiled forwarder and give the meter the audio it counted."""
        if self._forwarder is not None:
            self._forwarder.enabled = False
            self.meter.audio_bytes += self._forwarder.payload_bytes
            self._forwarder.payload_bytes = 0

    def abort(self) -> None:
        """Drop both sockets at once (after the close timeout, or at shutdown)."""
        for hop in (self.client, self.upstream):
            if not hop.lost:
                hop.transport.abort()

    def _check_done(self) -> None:
        if self.client.lost and self.upstream.lost and not self._done.done():
            self._done.set_result(None)
            self._release()

    def _release(self) -> None:
        """Untie the session's objects once both sockets are closed.

        Reference counting then frees them there and then. Each hop points back at the
        splice and at its peer, and the forwarder at the splice: left as they are, every
        finished session would be garbage in a cycle, found only by the collector, whose
        passes pause every stream (a young-generation pass every few sessions, an older one
        every few dozen). No callback comes to a closed hop, and what :meth:`run` does after
        this needs none of these references.
        """
        for hop in (self.client, self.upstream):
            del hop.splice, hop.peer
        if self._forwarder is not None:
            self.meter.last_upstream = self.last_upstream
            del self.upstream.data_received  # the forwarder, set on the instance
            self._forwarder = None
        if self._close_timer is not None:  # nothing left to abort
            self._close_timer.cancel()
            self._close_timer = None
