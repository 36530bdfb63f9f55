"""Workload certificates: a private key, its certificate chain and the trust roots.

`WorkloadCertificate.from_pem` is the one place where PEM from a CA (ours, istiod's or a
plug-in) becomes a certificate the proxies use, so it checks everything a TLS handshake
would otherwise fail on later with a less helpful message: the key matches the leaf, the
leaf carries exactly one SPIFFE URI SAN, and every certificate is signed by the next one,
ending at one of the roots.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from meshcore.identity.spiffe import Identity, InvalidIdentity


class CertificateError(ValueError):
    """Certificate material is unusable; the message names the certificate and the problem."""


def load_pem_certificates(pem: bytes, what: str) -> list[x509.Certificate]:
    """All certificates in a PEM blob (one or several blocks); CertificateError if none parse."""
    try:
        return x509.load_pem_x509_certificates(pem)
    except (ValueError, TypeError) as exc:
        raise CertificateError(f"{what} is not PEM certificate data: {exc}") from None


def load_pem_private_key(pem: bytes, what: str) -> PrivateKeyTypes:
    """An unencrypted PEM private key; CertificateError if it does not parse."""
    try:
        return serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise CertificateError(f"{what} is not an unencrypted PEM private key: {exc}") from None


def is_issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """True if `issuer`'s name and key signed `cert`."""
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def is_self_signed(cert: x509.Certificate) -> bool:
    return is_issued_by(cert, cert)


def public_key_der(key_or_cert: x509.Certificate | PrivateKeyTypes) -> bytes:
    public = key_or_cert.public_key()
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def to_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class WorkloadCertificate:
    """A key and certificate chain proving `identity`, and the roots used to verify peers.

    `chain_pem` is the leaf first, then intermediates, one PEM certificate per element; the
    roots are never part of it. Datetimes are timezone-aware UTC.
    """

    identity: Identity
    key_pem: bytes
    chain_pem: tuple[bytes, ...]
    roots_pem: tuple[bytes, ...]
    not_before: datetime
    not_after: datetime

    @classmethod
    def from_pem(
        cls, key_pem: bytes, chain: Sequence[bytes], roots: Sequence[bytes]
    ) -> WorkloadCertificate:
        """Validate CA output and build the certificate.

        `chain` is as a CA returns it: leaf, intermediates, optionally the root last (a
        self-signed last certificate is moved to the roots). Each element may hold one or
        more PEM blocks.
        """
        certs = [
            c for i, pem in enumerate(chain) for c in load_pem_certificates(pem, f"chain[{i}]")
        ]
        trusted = [
            c for i, pem in enumerate(roots) for c in load_pem_certificates(pem, f"roots[{i}]")
        ]
        if not certs:
            raise CertificateError("certificate chain is empty: expected the leaf first")
        if len(certs) > 1 and is_self_signed(certs[-1]):
            root = certs.pop()
            if root not in trusted:
                trusted.append(root)
        if not trusted:
            raise CertificateError("no trust roots: peers' certificates could not be verified")

        leaf = certs[0]
        identity = _leaf_identity(leaf)
        key = load_pem_private_key(key_pem, f"private key for {identity}")
        if public_key_der(key) != public_key_der(leaf):
            raise CertificateError(f"private key does not match the leaf certificate of {identity}")
        for position, (cert, issuer) in enumerate(itertools.pairwise(certs)):
            if not is_issued_by(cert, issuer):
                raise CertificateError(
                    f"certificate chain of {identity} is broken: chain[{position}] "
                    f"({cert.subject.rfc4514_string() or 'empty subject'}) is not signed by "
                    f"chain[{position + 1}] ({issuer.subject.rfc4514_string()})"
                )
        if not any(is_issued_by(certs[-1], root) for root in trusted):
            raise CertificateError(
                f"certificate chain of {identity} does not lead to any trust root: the last "
                f"certificate's issuer is {certs[-1].issuer.rfc4514_string() or 'empty'}"
            )
        return cls(
            identity=identity,
            key_pem=bytes(key_pem),
            chain_pem=tuple(to_pem(c) for c in certs),
            roots_pem=tuple(to_pem(c) for c in trusted),
            not_before=leaf.not_valid_before_utc,
            not_after=leaf.not_valid_after_utc,
        )

    @property
    def refresh_at(self) -> datetime:
        """Half-life: when to fetch the next certificate (ztunnel's `refresh_at`)."""
        return self.not_before + (self.not_after - self.not_before) / 2

    def expired(self, now: datetime) -> bool:
        return now >= self.not_after


def _leaf_identity(leaf: x509.Certificate) -> Identity:
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise CertificateError(
            "leaf certificate has no subjectAltName: expected one SPIFFE URI"
        ) from None
    except ValueError as exc:
        raise CertificateError(f"leaf certificate extensions do not parse: {exc}") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise CertificateError(
            f"leaf certificate must carry exactly one URI SAN (a SPIFFE identity), found {uris}"
        )
    try:
        return Identity.parse(uris[0])
    except InvalidIdentity as exc:
        raise CertificateError(f"leaf certificate URI SAN: {exc}") from None
