"""TLS errors for the mesh, and the translation of OpenSSL's error reasons into operator language.

OpenSSL reports failures as terse reason strings ("tlsv1 alert unknown ca", "certificate
verify failed"). `describe_openssl_failure` turns them into a sentence that says which side
refused what, so access logs and test failures read without an OpenSSL manual.
"""

from __future__ import annotations

import re
from collections.abc import Sequence


class TlsError(Exception):
    """A TLS handshake or record failure; `reason` says what happened in plain words."""

    response_flag = "TLS_FAILURE"

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PeerIdentityError(TlsError):
    """The peer's certificate is valid but its identity is not one we accept."""

    response_flag = "IDENTITY_ERROR"


class TlsClosed(TlsError):
    """The peer closed the TLS session cleanly (close_notify)."""

    def __init__(self, reason: str = "peer closed the TLS session (close_notify)") -> None:
        super().__init__(reason)


# Alerts the peer sent us, by alert name. OpenSSL reports them as "<prefix> alert <name>"
# with a prefix that differs between versions (sslv3, tlsv1, tlsv13, tls).
_PEER_ALERT = re.compile(r"(?:sslv3|tlsv1|tlsv13|tls) alert (.+)")
_PEER_ALERTS = {
    "certificate expired": "peer rejected our certificate: certificate has expired",
    "bad certificate": "peer rejected our certificate: bad certificate",
    "certificate unknown": "peer rejected our certificate: certificate unknown",
    "unsupported certificate": "peer rejected our certificate: unsupported certificate",
    "certificate revoked": "peer rejected our certificate: certificate revoked",
    "unknown ca": "peer rejected our certificate: it does not chain to a root the peer trusts",
    "certificate required": "peer requires a client certificate and we sent none",
    "no application protocol": (
        "peer refused the handshake: no ALPN protocol in common (h2 required)"
    ),
    "protocol version": "peer refused the handshake: no TLS version in common (TLS 1.3 required)",
}

# X.509 verification results worth a plainer explanation than OpenSSL's.
_VERIFY_HINTS = {
    "unable to get local issuer certificate": "peer's certificate does not chain to a trusted root",
    "self-signed certificate in certificate chain": "peer's chain ends at a root we do not trust",
}

# Failures detected on our side.
_LOCAL_FAILURES = {
    "peer did not return a certificate": "peer presented no client certificate",
    "no application protocol": "peer offered no ALPN protocol we accept (h2 required)",
    "unsupported protocol": "peer does not support TLS 1.3",
    "no shared cipher": "no TLS 1.3 cipher suite in common (AES-GCM required)",
    "no suitable signature algorithm": "no signature algorithm in common with the peer",
    "wrong version number": "peer is not speaking TLS (wrong version number)",
    "http request": "peer sent plaintext HTTP instead of TLS",
    "packet length too long": "peer is not speaking TLS (record too long)",
    "record layer failure": "corrupt TLS record",
    "decryption failed or bad record mac": "corrupt TLS record (bad record MAC)",
    "bad record mac": "corrupt TLS record (bad record MAC)",
    "unexpected eof while reading": "peer closed the connection in the middle of a TLS record",
}


def describe_openssl_failure(reasons: Sequence[str], *, verify_error: str | None = None) -> str:
    """A readable reason for a failed TLS operation.

    `reasons` are OpenSSL's error-queue reason strings (first is the root cause);
    `verify_error` is the X.509 verification result when our side rejected the peer's chain.
    """
    for reason in reasons:
        if reason == "certificate verify failed":
            detail = verify_error or "unknown verification error"
            if detail in _VERIFY_HINTS:
                detail = f"{_VERIFY_HINTS[detail]} ({detail})"
            return f"certificate verify failed: {detail}"
        if alert := _PEER_ALERT.fullmatch(reason):
            name = alert.group(1)
            return _PEER_ALERTS.get(name, f"peer refused the handshake: {name} alert")
        if reason in _LOCAL_FAILURES:
            return _LOCAL_FAILURES[reason]
    if reasons:
        return f"TLS failure: {'; '.join(reasons)}"
    return "TLS failure without an OpenSSL reason"
