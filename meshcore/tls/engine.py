"""A sans-IO TLS engine: ciphertext in, plaintext out, over OpenSSL memory BIOs.

No sockets and no trio: the caller moves bytes between the engine and its transport. After
any call, `ciphertext_to_send()` may have bytes for the peer (handshake flights, alerts,
TLS 1.3 post-handshake messages); callers drain it after every step.

This sits on the HBONE data path, so the record layer calls OpenSSL through cffi directly
(the "fasttls" measurements in reference/python-hbone-ceiling.md): one reused scratch buffer
per thread instead of a fresh allocation per read, many records per `read_plaintext`, and
partial writes switched off so one `write_plaintext` encrypts a whole batch. The handshake
runs once per connection and goes through the same calls for uniform error handling.

Trap (OpenSSL's SSL_get_error): a stale entry in the thread's error queue turns "want more
data" into a fatal error, so the queue is cleared before every operation.
"""

from __future__ import annotations

import threading

from OpenSSL import SSL
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib

from meshcore.tls.errors import TlsClosed, TlsError, describe_openssl_failure

# Reads of 256 KiB get nearly all of the bulk-throughput gain (python-hbone-ceiling.md).
READ_SIZE = 256 * 1024

_allocate = _ffi.new_allocator(should_clear_after_alloc=False)


class _Scratch(threading.local):
    """One buffer per thread; its contents are copied out before any other engine runs."""

    def __init__(self) -> None:
        self.buffer = _allocate("char[]", READ_SIZE)


_scratch = _Scratch()


class TlsEngine:
    """One TLS connection's state machine. See the module docstring for the calling pattern."""

    __slots__ = ("_conn", "_deferred_error", "_from_ssl", "_handshake_done", "_into_ssl", "_ssl")

    def __init__(self, context: SSL.Context, *, server_side: bool) -> None:
        self._conn = SSL.Connection(context, None)  # None: memory BIOs
        if server_side:
            self._conn.set_accept_state()
        else:
            self._conn.set_connect_state()
        # pyOpenSSL's private handles are what its own methods use; we call OpenSSL with them
        # to skip a per-call allocation and exception translation layer.
        self._ssl = self._conn._ssl
        self._into_ssl = self._conn._into_ssl
        self._from_ssl = self._conn._from_ssl
        _lib.SSL_clear_mode(self._ssl, _lib.SSL_MODE_ENABLE_PARTIAL_WRITE)
        self._handshake_done = False
        # A failure met after some plaintext was already decrypted is raised on the next read.
        self._deferred_error: TlsError | None = None

    @property
    def ssl_connection(self) -> SSL.Connection:
        """The pyOpenSSL connection, for verify_server_peer / verify_client_peer."""
        return self._conn

    @property
    def handshake_done(self) -> bool:
        return self._handshake_done

    def do_handshake(self) -> bool:
        """Advance the handshake; True once complete. Raises TlsError on failure."""
        if self._handshake_done:
            return True
        _lib.ERR_clear_error()
        result = _lib.SSL_do_handshake(self._ssl)
        if result == 1:
            self._handshake_done = True
            return True
        error = _lib.SSL_get_error(self._ssl, result)
        if error == _lib.SSL_ERROR_WANT_READ:
            return False
        raise self._failure(error)

    def receive_ciphertext(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes received from the peer."""
        # A memory BIO grows as needed; a write can only fail on allocation failure.
        if len(data) and _lib.BIO_write(self._into_ssl, _ffi.from_buffer(data), len(data)) <= 0:
            raise MemoryError("could not buffer received TLS bytes")

    def read_plaintext(self, max_bytes: int = READ_SIZE) -> bytes:
        """Decrypted bytes available now, up to `max_bytes`; b"" if none yet.

        Raises TlsClosed once the peer's close_notify is reached, TlsError on a bad record or
        a fatal alert from the peer.
        """
        if self._deferred_error is not None:
            raise self._deferred_error
        buffer = _scratch.buffer
        wanted = min(max_bytes, READ_SIZE)
        total = 0
        _lib.ERR_clear_error()
        # SSL_read returns at most one record (16 KiB) per call.
        while total < wanted:
            result = _lib.SSL_read(self._ssl, buffer + total, wanted - total)
            if result <= 0:
                error = _lib.SSL_get_error(self._ssl, result)
                if error == _lib.SSL_ERROR_WANT_READ:
                    break
                failure = (
                    TlsClosed() if error == _lib.SSL_ERROR_ZERO_RETURN else self._failure(error)
                )
                if total == 0:
                    raise failure
                if not isinstance(failure, TlsClosed):  # close_notify is sticky; errors are not
                    self._deferred_error = failure
                break
            total += result
        return _ffi.buffer(buffer, total)[:] if total else b""

    def write_plaintext(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt all of `data` into the outgoing buffer (never partial: memory BIOs grow)."""
        if not self._handshake_done:
            raise RuntimeError("write_plaintext before the TLS handshake completed")
        length = len(data)
        if not length:
            return
        _lib.ERR_clear_error()
        result = _lib.SSL_write(self._ssl, _ffi.from_buffer(data), length)
        if result != length:
            raise self._failure(_lib.SSL_get_error(self._ssl, result))

    def ciphertext_to_send(self) -> bytes:
        """Drain the bytes waiting for the peer; b"" if there are none."""
        buffer = _scratch.buffer
        count = _lib.BIO_read(self._from_ssl, buffer, READ_SIZE)
        if count <= 0:
            return b""
        first = _ffi.buffer(buffer, count)[:]
        if count < READ_SIZE:
            return first
        chunks = [first]
        while (count := _lib.BIO_read(self._from_ssl, buffer, READ_SIZE)) > 0:
            chunks.append(_ffi.buffer(buffer, count)[:])
        return b"".join(chunks)

    def send_close_notify(self) -> None:
        """Queue a close_notify alert. A courtesy: errors are ignored, and before the
        handshake there is nothing to close."""
        if not self._handshake_done:
            return
        _lib.ERR_clear_error()
        if _lib.SSL_shutdown(self._ssl) < 0:
            _lib.ERR_clear_error()

    def _failure(self, ssl_error: int) -> TlsError:
        """Translate the current OpenSSL failure into a TlsError and clear the error queue."""
        reasons = []
        while code := _lib.ERR_get_error():
            text = _lib.ERR_reason_error_string(code)
            reasons.append(
                _ffi.string(text).decode("ascii", "replace") if text else f"error {code:#x}"
            )
        verify_error = None
        verify_result = _lib.SSL_get_verify_result(self._ssl)
        if verify_result != 0:  # X509_V_OK
            verify_error = _ffi.string(_lib.X509_verify_cert_error_string(verify_result)).decode()
        if not reasons and ssl_error == _lib.SSL_ERROR_SYSCALL:
            return TlsError("TLS transport reported end of stream")
        return TlsError(describe_openssl_failure(reasons, verify_error=verify_error))
