"""Mesh mTLS: pyOpenSSL contexts, a sans-IO TLS engine, and (in meshcore.tls.stream) a trio
stream over it. This package namespace stays free of trio so the engine can be used alone.
"""

from meshcore.tls.context import (
    client_context,
    server_context,
    verify_client_peer,
    verify_server_peer,
)
from meshcore.tls.engine import TlsEngine
from meshcore.tls.errors import PeerIdentityError, TlsClosed, TlsError

__all__ = [
    "PeerIdentityError",
    "TlsClosed",
    "TlsEngine",
    "TlsError",
    "client_context",
    "server_context",
    "verify_client_peer",
    "verify_server_peer",
]
