"""pyOpenSSL contexts for mesh mTLS, and the identity checks made right after a handshake.

Mirrors ztunnel (src/tls/certificate.rs, src/tls/workload.rs): TLS 1.3 only, AES-GCM suites
only, ALPN exactly "h2", client certificates required, no SNI, no session resumption.
OpenSSL verifies chains and validity periods during the handshake; which SPIFFE identity is
acceptable is checked afterwards by `verify_server_peer` / `verify_client_peer`, because the
answer depends on the connection (the destination's identity, the local trust domain).

Contexts are cached per WorkloadCertificate (weakly: a rotated-out certificate takes its
contexts with it), since building one costs far more than a handshake's worth of CPU.
"""

from __future__ import annotations

import weakref
from collections.abc import Collection

from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from OpenSSL import SSL, crypto
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib

from meshcore.identity.certs import WorkloadCertificate
from meshcore.identity.spiffe import Identity, identities_from_certificate
from meshcore.tls.errors import PeerIdentityError, TlsError

ALPN_H2 = b"h2"
_SSL_MODE_NO_AUTO_CHAIN = 0x8  # ssl.h SSL_MODE_NO_AUTO_CHAIN; not exported by the binding
# ztunnel offers both AES-GCM suites; AES-128 first because it is the cheaper of the two.
TLS13_CIPHERSUITES = b"TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384"
# Classical key exchange, as ztunnel without COMPLIANCE_POLICY=pqc and Envoy by default.
# OpenSSL 3.5+ would lead with X25519MLKEM768: measured here, that costs ~25% more CPU and
# ~2.3 KB more per handshake, and new connections are the Python data path's weak spot.
KEY_EXCHANGE_GROUPS = b"X25519:P-256"

_server_contexts: weakref.WeakKeyDictionary[WorkloadCertificate, SSL.Context] = (
    weakref.WeakKeyDictionary()
)
_client_contexts: weakref.WeakKeyDictionary[WorkloadCertificate, SSL.Context] = (
    weakref.WeakKeyDictionary()
)


def server_context(cert: WorkloadCertificate) -> SSL.Context:
    """The inbound (HBONE server) context presenting `cert` and requiring client certificates."""
    context = _server_contexts.get(cert)
    if context is None:
        context = _server_contexts[cert] = _build_context(cert, server_side=True)
    return context


def client_context(cert: WorkloadCertificate) -> SSL.Context:
    """The outbound (HBONE client) context presenting `cert` and verifying the server's chain."""
    context = _client_contexts.get(cert)
    if context is None:
        context = _client_contexts[cert] = _build_context(cert, server_side=False)
    return context


def verify_server_peer(conn: SSL.Connection, expected: Collection[Identity]) -> Identity:
    """Client side, after the handshake: h2 was negotiated and the server is one of `expected`.

    Returns the matching identity; raises TlsError (no h2) or PeerIdentityError.
    """
    _require_h2(conn)
    presented = _peer_identities(conn)
    for identity in presented:
        if identity in expected:
            return identity
    raise PeerIdentityError(
        f"peer identity {_names(presented)} is not one of the expected {_names(expected)}"
    )


def verify_client_peer(conn: SSL.Connection, trust_domain: str) -> Identity:
    """Server side, after the handshake: h2 was negotiated and the client has an identity in
    `trust_domain`. Which identities may connect is authorization's job, not this check's.
    """
    _require_h2(conn)
    presented = _peer_identities(conn)
    for identity in presented:
        if identity.trust_domain == trust_domain:
            return identity
    raise PeerIdentityError(
        f"peer identity {_names(presented)} is not in trust domain {trust_domain!r}"
    )


# --- internals ---


def _build_context(cert: WorkloadCertificate, *, server_side: bool) -> SSL.Context:
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(SSL.TLS1_3_VERSION)
    context.set_max_proto_version(SSL.TLS1_3_VERSION)
    context.set_tls13_ciphersuites(TLS13_CIPHERSUITES)
    if _lib.SSL_CTX_set1_curves_list(context._context, KEY_EXCHANGE_GROUPS) != 1:
        raise RuntimeError(f"OpenSSL refused key exchange groups {KEY_EXCHANGE_GROUPS!r}")
    # No resumption: every connection proves its identity with a full handshake.
    context.set_options(SSL.OP_NO_TICKET | SSL.OP_NO_COMPRESSION)
    context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    # Send exactly our chain: OpenSSL would otherwise complete it from the trust store and
    # send the root too, which the peer must not rely on and which costs bytes per handshake.
    context.set_mode(_SSL_MODE_NO_AUTO_CHAIN)

    chain = [x509.load_pem_x509_certificate(pem) for pem in cert.chain_pem]
    context.use_certificate(chain[0])
    for intermediate in chain[1:]:
        context.add_extra_chain_cert(intermediate)
    context.use_privatekey(load_pem_private_key(cert.key_pem, password=None))
    context.check_privatekey()

    store = context.get_cert_store()
    assert store is not None  # a fresh context always has a store
    for root_pem in cert.roots_pem:
        store.add_cert(crypto.X509.from_cryptography(x509.load_pem_x509_certificate(root_pem)))

    if server_side:
        context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT)
        # pyOpenSSL's own ALPN hook can only ignore a mismatch or fail with an internal error;
        # ours fails the handshake with the no_application_protocol alert, like ztunnel.
        _lib.SSL_CTX_set_alpn_select_cb(context._context, _select_h2, _ffi.NULL)
    else:
        context.set_verify(SSL.VERIFY_PEER)
        context.set_alpn_protos([ALPN_H2])
    return context


_H2_PROTOCOL = _ffi.new("unsigned char[]", ALPN_H2)


@_ffi.callback(
    "int (*)(SSL *, const unsigned char **, unsigned char *, const unsigned char *, "
    "unsigned int, void *)",
    error=_lib.SSL_TLSEXT_ERR_ALERT_FATAL,
)
def _select_h2(ssl, out, outlen, offered, offered_len, arg):  # type: ignore[no-untyped-def]
    wire = _ffi.buffer(offered, offered_len)[:]
    position = 0
    while position < len(wire):
        length = wire[position]
        if wire[position + 1 : position + 1 + length] == ALPN_H2:
            out[0] = _H2_PROTOCOL
            outlen[0] = len(ALPN_H2)
            return _lib.SSL_TLSEXT_ERR_OK
        position += 1 + length
    return _lib.SSL_TLSEXT_ERR_ALERT_FATAL


def _require_h2(conn: SSL.Connection) -> None:
    negotiated = conn.get_alpn_proto_negotiated()
    if negotiated != ALPN_H2:
        shown = negotiated.decode("ascii", "replace") if negotiated else "none"
        raise TlsError(f"peer negotiated ALPN protocol {shown!r}; the mesh requires h2")


def _peer_identities(conn: SSL.Connection) -> list[Identity]:
    cert = conn.get_peer_certificate(as_cryptography=True)
    if cert is None:
        raise PeerIdentityError("peer presented no certificate")
    identities = identities_from_certificate(cert)
    if not identities:
        raise PeerIdentityError("peer certificate carries no SPIFFE identity")
    return identities


def _names(identities: Collection[Identity]) -> str:
    return (
        "[" + ", ".join(str(i) for i in identities) + "]"
        if len(identities) != 1
        else str(next(iter(identities)))
    )
