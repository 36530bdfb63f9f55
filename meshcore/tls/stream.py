"""TlsStream: a trio Stream that runs a TlsEngine over another Stream.

Modelled on trio's SSLStream (trio/_ssl.py), specialised to what the mesh needs: TLS 1.3
only, so no renegotiation, and after the handshake only `receive_some` ever reads the
transport. That leaves two rules to keep:

- Ciphertext leaves in the order the engine produced it. Whoever drains the engine's
  outgoing buffer enters the FIFO send lock without yielding in between, so two tasks
  (a sender, and a receiver answering a post-handshake message) cannot reorder records.
- The handshake runs once, under a lock; the first send_all/receive_some (or an explicit
  do_handshake) drives it and concurrent callers wait for it.
- A TLS 1.3 server finishes its handshake with bytes to send (session tickets) while the
  client may already be sending rather than reading; over a transport without buffering
  that deadlocks. Like trio's SSLStream, the server holds those bytes back and sends them
  ahead of its next output.

Errors: a TLS failure raises TlsStreamBroken, which is both a TlsError (`.reason`,
`.response_flag` for logs) and a trio.BrokenResourceError (for generic stream code).
Failures of the transport are trio's own exceptions, passed through. Either leaves the
stream broken, and later calls raise trio.BrokenResourceError. A transport EOF without
close_notify is a TLS failure too: TLS cannot tell it from truncation by an attacker.
"""

from __future__ import annotations

import enum
import operator

import trio
from OpenSSL import SSL

from meshcore.tls.engine import READ_SIZE, TlsEngine
from meshcore.tls.errors import TlsClosed, TlsError

# Bound on how long a failing side waits to deliver its alert, so that the peer learns why.
_ALERT_SEND_TIMEOUT = 1.0


class TlsStreamBroken(TlsError, trio.BrokenResourceError):
    """A TLS failure on a TlsStream (handshake refused, bad record, truncated session)."""


class _State(enum.Enum):
    OK = enum.auto()
    BROKEN = enum.auto()
    CLOSED = enum.auto()


class _ConflictDetector:
    """Raise BusyResourceError when two tasks use the same direction of a stream at once."""

    def __init__(self, message: str) -> None:
        self._message = message
        self._held = False

    def __enter__(self) -> None:
        if self._held:
            raise trio.BusyResourceError(self._message)
        self._held = True

    def __exit__(self, *exc_info: object) -> None:
        self._held = False


class TlsStream(trio.abc.Stream):
    """TLS over `transport_stream` with a context from meshcore.tls.context."""

    def __init__(
        self, transport_stream: trio.abc.Stream, context: SSL.Context, *, server_side: bool
    ) -> None:
        self.transport_stream = transport_stream
        self._engine = TlsEngine(context, server_side=server_side)
        self._server_side = server_side
        self._held_back = b""
        self._state = _State.OK
        self._handshake_lock = trio.Lock()
        self._transport_send_lock = trio.StrictFIFOLock()
        self._send_conflict = _ConflictDetector("another task is sending on this TlsStream")
        self._receive_conflict = _ConflictDetector("another task is receiving on this TlsStream")

    @property
    def engine(self) -> TlsEngine:
        """The TLS engine; `engine.ssl_connection` is what verify_*_peer take."""
        return self._engine

    async def do_handshake(self) -> None:
        """Complete the handshake if no one has yet. Raises TlsStreamBroken if it fails."""
        self._check_state()
        await trio.lowlevel.checkpoint()
        await self._ensure_handshake()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        with self._send_conflict:
            self._check_state()
            await trio.lowlevel.checkpoint()
            await self._ensure_handshake()
            if not data:
                return
            try:
                self._engine.write_plaintext(data)
            except TlsError as exc:
                self._mark_broken()
                raise TlsStreamBroken(exc.reason) from None
            await self._send_pending()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        with self._receive_conflict:
            if max_bytes is None:
                max_bytes = READ_SIZE
            else:
                max_bytes = operator.index(max_bytes)
                if max_bytes < 1:
                    raise ValueError("max_bytes must be >= 1")
            self._check_state()
            await trio.lowlevel.checkpoint()
            await self._ensure_handshake()
            while True:
                try:
                    plaintext = self._engine.read_plaintext(max_bytes)
                except TlsClosed:
                    return b""
                except TlsError as exc:
                    self._mark_broken()
                    await self._send_alert()
                    raise TlsStreamBroken(exc.reason) from None
                # Reading may have produced an answer (e.g. to a TLS 1.3 KeyUpdate).
                await self._send_pending()
                if plaintext:
                    return plaintext
                await self._receive_ciphertext()

    async def wait_send_all_might_not_block(self) -> None:
        with self._send_conflict:
            self._check_state()
            # A receiver may be flushing through the transport; wait our turn rather than
            # report a conflict the caller did not cause.
            async with self._transport_send_lock:
                await self.transport_stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        """Send close_notify (best effort, without waiting for the peer's) and close."""
        if self._state is _State.CLOSED:
            await trio.lowlevel.checkpoint()
            return
        # Nothing to protect before the handshake, and a task blocked mid-send means we
        # cannot put a record on the wire without waiting behind it: close uncleanly then.
        send_close_notify = (
            self._state is _State.OK
            and self._engine.handshake_done
            and not self._transport_send_lock.locked()
        )
        self._state = _State.CLOSED
        if not send_close_notify:
            await self.transport_stream.aclose()
            return
        try:
            self._engine.send_close_notify()
            closing = self._take_outgoing()
            try:
                async with self._transport_send_lock:
                    await self.transport_stream.send_all(closing)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the peer closed first; that is a normal way for both to end
        except BaseException:
            await trio.aclose_forcefully(self.transport_stream)
            raise
        await self.transport_stream.aclose()

    # --- internals ---

    def _check_state(self) -> None:
        if self._state is _State.BROKEN:
            raise trio.BrokenResourceError("TLS stream is broken by an earlier failure")
        if self._state is _State.CLOSED:
            raise trio.ClosedResourceError("TLS stream was closed")

    def _mark_broken(self) -> None:
        if self._state is _State.OK:
            self._state = _State.BROKEN

    async def _ensure_handshake(self) -> None:
        if self._engine.handshake_done:
            return
        async with self._handshake_lock:
            self._check_state()  # the task that held the lock may have failed
            if self._engine.handshake_done:
                return
            try:
                while not self._engine.do_handshake():
                    await self._send_pending()
                    await self._receive_ciphertext(during_handshake=True)
            except TlsStreamBroken:
                raise
            except TlsError as exc:
                self._mark_broken()
                await self._send_alert()
                raise TlsStreamBroken(exc.reason) from None
            except BaseException:
                self._mark_broken()
                raise
            if self._server_side:
                self._held_back = self._engine.ciphertext_to_send()
            else:
                await self._send_pending()

    def _take_outgoing(self) -> bytes:
        """Ciphertext to send now: new engine output, preceded by any held-back bytes."""
        ciphertext = self._engine.ciphertext_to_send()
        if ciphertext and self._held_back:
            ciphertext, self._held_back = self._held_back + ciphertext, b""
        return ciphertext

    async def _send_pending(self) -> None:
        ciphertext = self._take_outgoing()
        if not ciphertext:
            return
        # No await between draining and queueing on the FIFO lock: keeps records in order.
        try:
            async with self._transport_send_lock:
                await self.transport_stream.send_all(ciphertext)
        except BaseException:
            # An unknown prefix of the records reached the peer; the session cannot go on.
            self._mark_broken()
            raise

    async def _receive_ciphertext(self, *, during_handshake: bool = False) -> None:
        try:
            ciphertext = await self.transport_stream.receive_some(READ_SIZE)
        except trio.Cancelled:
            raise  # nothing was consumed: the stream is intact
        except BaseException:
            self._mark_broken()
            raise
        if not ciphertext:
            self._mark_broken()
            if during_handshake:
                raise TlsStreamBroken("peer closed the connection during the TLS handshake")
            raise TlsStreamBroken("peer closed the connection without TLS close_notify")
        self._engine.receive_ciphertext(ciphertext)

    async def _send_alert(self) -> None:
        """Best effort: deliver the alert OpenSSL queued, so the peer sees why we failed."""
        alert = self._take_outgoing()
        if not alert or self._transport_send_lock.locked():
            return
        with trio.move_on_after(_ALERT_SEND_TIMEOUT):
            try:
                async with self._transport_send_lock:
                    await self.transport_stream.send_all(alert)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
