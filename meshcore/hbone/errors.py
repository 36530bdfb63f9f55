"""meshcore/hbone/errors: failures of HBONE tunnels that callers map to their own errors."""

from __future__ import annotations


class TunnelRejected(Exception):
    """The peer answered our CONNECT with a status other than 200."""

    def __init__(self, status: int, authority: str) -> None:
        super().__init__(f"HBONE CONNECT {authority} was answered {status}")
        self.status = status
        self.authority = authority
