"""ztunnel/proxy/socks5: explicit outbound for clients that cannot be captured (RFC 1928).

Only what ztunnel supports: no authentication, CONNECT, IPv4/IPv6 literal targets. The reply
is sent once the upstream (TCP, or the HBONE tunnel's 200) is established, so a client sees
a refused/denied connection as a SOCKS error instead of an immediate close.
"""

from __future__ import annotations

import ipaddress
import socket

import trio

from meshcore import netio
from meshcore.log import get_logger
from ztunnel.proxy.errors import HboneRejected, PolicyDenied, ProxyError
from ztunnel.proxy.outbound import Outbound

_log = get_logger("socks5")

HANDSHAKE_TIMEOUT = 10.0
_VERSION = 5
_NO_AUTH = 0
_CONNECT = 1
_ATYP_IPV4, _ATYP_DOMAIN, _ATYP_IPV6 = 1, 3, 4
REPLY_OK, REPLY_FAILURE, REPLY_NOT_ALLOWED, REPLY_REFUSED = 0, 1, 2, 5
REPLY_COMMAND_UNSUPPORTED, REPLY_ADDRESS_UNSUPPORTED = 7, 8


class Socks5Error(Exception):
    def __init__(self, message: str, reply: int) -> None:
        super().__init__(message)
        self.reply = reply


async def _read_exactly(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = bytearray(n - len(data))
        got = await netio.recv_into(sock, chunk)
        if got == 0:
            raise Socks5Error("client closed during the SOCKS5 handshake", REPLY_FAILURE)
        data += chunk[:got]
    return bytes(data)


def _reply(code: int) -> bytes:
    return bytes([_VERSION, code, 0, _ATYP_IPV4, 0, 0, 0, 0, 0, 0])


async def read_request(sock: socket.socket) -> tuple[str, int]:
    """Run the greeting and read the CONNECT target; raises Socks5Error."""
    version, count = await _read_exactly(sock, 2)
    if version != _VERSION:
        raise Socks5Error(f"not SOCKS5 (version byte {version})", REPLY_FAILURE)
    methods = await _read_exactly(sock, count)
    if _NO_AUTH not in methods:
        await netio.send_all(sock, bytes([_VERSION, 0xFF]))
        raise Socks5Error("client offers no 'no authentication' method", REPLY_FAILURE)
    await netio.send_all(sock, bytes([_VERSION, _NO_AUTH]))
    version, command, _, atyp = await _read_exactly(sock, 4)
    if version != _VERSION:
        raise Socks5Error(f"bad request version {version}", REPLY_FAILURE)
    if command != _CONNECT:
        raise Socks5Error(f"command {command} is not supported (only CONNECT)", REPLY_COMMAND_UNSUPPORTED)
    if atyp == _ATYP_IPV4:
        host = str(ipaddress.IPv4Address(await _read_exactly(sock, 4)))
    elif atyp == _ATYP_IPV6:
        host = str(ipaddress.IPv6Address(await _read_exactly(sock, 16)))
    elif atyp == _ATYP_DOMAIN:
        (length,) = await _read_exactly(sock, 1)
        name = await _read_exactly(sock, length)
        raise Socks5Error(f"domain targets are not supported ({name.decode(errors='replace')!r}); use an IP", REPLY_ADDRESS_UNSUPPORTED)
    else:
        raise Socks5Error(f"unknown address type {atyp}", REPLY_ADDRESS_UNSUPPORTED)
    port = int.from_bytes(await _read_exactly(sock, 2), "big")
    return host, port


class Socks5:
    def __init__(self, outbound: Outbound) -> None:
        self._outbound = outbound

    async def serve_listener(self, listener: socket.socket, connections: trio.Nursery) -> None:
        await netio.serve_listener(listener, connections, self._serve_connection)

    async def _serve_connection(self, sock: socket.socket) -> None:
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                host, port = await read_request(sock)
        except (Socks5Error, trio.TooSlowError, OSError) as exc:
            reply = exc.reply if isinstance(exc, Socks5Error) else REPLY_FAILURE
            _log.info("SOCKS5 request refused", error=str(exc) or "handshake timed out")
            try:
                netio.send_nowait(sock, _reply(reply))
            except OSError:
                pass
            netio.close(sock)
            return

        async def established() -> None:
            await netio.send_all(sock, _reply(REPLY_OK))

        def failed(error: ProxyError) -> None:
            try:
                netio.send_nowait(sock, _reply(_failure_reply(error)))
            except OSError:
                pass

        await self._outbound.proxy(sock, host, port, on_established=established, on_failed=failed)


def _failure_reply(error: ProxyError) -> int:
    if isinstance(error, PolicyDenied) or (isinstance(error, HboneRejected) and error.status == 401):
        return REPLY_NOT_ALLOWED
    return REPLY_REFUSED

