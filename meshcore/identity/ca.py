"""A certificate authority for workload certificates: CSR in, chain out.

This is the signing half of Istio's `IstioCertificateService/CreateCertificate`; who may ask
for which identity is decided by the caller (istiod_lite authenticates the node first).
Like istiod, the CA does not copy anything from the CSR but its public key: the leaf's only
SAN is the identity it was asked to sign for.

Roots are ECDSA P-256 and self-signed (`generate`), or an operator's CA loaded from PEM
(`load`, the "plug-in CA" case, which may be an intermediate under an offline root).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshcore.identity.certs import (
    CertificateError,
    WorkloadCertificate,
    is_issued_by,
    is_self_signed,
    load_pem_certificates,
    load_pem_private_key,
    public_key_der,
    to_pem,
)
from meshcore.identity.spiffe import SCHEME, Identity, check_trust_domain

# Certificates start this long before they are issued: nodes' clocks are never quite in sync,
# and a certificate "not yet valid" on a peer is an outage.
CLOCK_SKEW_ALLOWANCE = timedelta(minutes=1)
MIN_RSA_KEY_BITS = 2048


class CsrError(ValueError):
    """A signing request was refused; the message names the identity and the reason."""


class CertificateAuthority:
    """Signs workload certificates for one trust domain. Build with `generate` or `load`."""

    def __init__(
        self,
        *,
        trust_domain: str,
        cert: x509.Certificate,
        key: PrivateKeyTypes,
        intermediates: tuple[x509.Certificate, ...],
        roots: tuple[x509.Certificate, ...],
    ) -> None:
        self.trust_domain = check_trust_domain(trust_domain)
        self._cert = cert
        self._key = key
        # What a leaf's chain carries above itself: the signing cert unless it is the root.
        above_leaf = () if cert in roots else (cert, *intermediates)
        self._issued_chain_tail = tuple(to_pem(c) for c in (*above_leaf, roots[0]))
        self.cert_pem = to_pem(cert)
        self.key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        self.roots_pem: tuple[bytes, ...] = tuple(to_pem(r) for r in roots)

    @classmethod
    def generate(
        cls, trust_domain: str = "cluster.local", *, ttl: timedelta = timedelta(days=3650)
    ) -> CertificateAuthority:
        """A new self-signed ECDSA P-256 root (istiod's self-signed root: O=<trust domain>)."""
        check_trust_domain(trust_domain)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain)])
        now = datetime.now(UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW_ALLOWANCE)
            .not_valid_after(now + ttl)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(SCHEME + trust_domain)]
                ),
                critical=False,
            )
            .sign(key, hashes.SHA256())
        )
        return cls(trust_domain=trust_domain, cert=cert, key=key, intermediates=(), roots=(cert,))

    @classmethod
    def load(
        cls,
        cert_pem: bytes,
        key_pem: bytes,
        *,
        chain_pem: bytes = b"",
        trust_domain: str = "cluster.local",
    ) -> CertificateAuthority:
        """An operator's CA: signing cert + key, and (for an intermediate) the chain to its root.

        `chain_pem` may hold intermediates and one or more self-signed roots in any order
        (Istio's cert-chain.pem and root-cert.pem concatenated work). Raises CertificateError.
        """
        check_trust_domain(trust_domain)
        cert, *extra = load_pem_certificates(cert_pem, "CA certificate")
        if chain_pem.strip():
            extra += load_pem_certificates(chain_pem, "CA chain")
        key = load_pem_private_key(key_pem, "CA private key")
        if public_key_der(key) != public_key_der(cert):
            raise CertificateError("CA private key does not match the CA certificate")
        _require_ca(cert, "CA certificate")
        extra = [c for c in extra if c != cert]
        roots = [c for c in extra if is_self_signed(c)]
        if is_self_signed(cert):
            return cls(
                trust_domain=trust_domain,
                cert=cert,
                key=key,
                intermediates=(),
                roots=(cert, *roots),
            )
        candidates = [c for c in extra if c not in roots]
        intermediates: list[x509.Certificate] = []
        current = cert
        while True:
            if issuer := next((r for r in roots if is_issued_by(current, r)), None):
                other_roots = [r for r in roots if r != issuer]
                return cls(
                    trust_domain=trust_domain,
                    cert=cert,
                    key=key,
                    intermediates=tuple(intermediates),
                    roots=(issuer, *other_roots),
                )
            issuer = next((c for c in candidates if is_issued_by(current, c)), None)
            if issuer is None:
                raise CertificateError(
                    "CA chain does not reach a self-signed root: no certificate in chain_pem "
                    f"issued {current.subject.rfc4514_string()!r}"
                )
            _require_ca(issuer, f"intermediate {issuer.subject.rfc4514_string()!r}")
            candidates.remove(issuer)
            intermediates.append(issuer)
            current = issuer

    def sign_csr(
        self,
        csr_pem: bytes,
        identity: Identity,
        *,
        ttl: timedelta = timedelta(hours=24),
        not_before: datetime | None = None,
    ) -> list[bytes]:
        """Issue a leaf for `identity` with the CSR's key; returns [leaf, intermediates..., root].

        Without `not_before` the leaf is valid from now (less the clock-skew allowance) for
        `ttl`; with it, from `not_before` for `ttl`. A leaf never outlives the signing cert.
        """
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except (ValueError, TypeError) as exc:
            raise CsrError(
                f"CSR for {identity} is not a PEM certificate signing request: {exc}"
            ) from None
        try:
            signature_ok = csr.is_signature_valid
            public_key = csr.public_key()
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise CsrError(
                f"CSR for {identity} uses an unsupported key or algorithm: {exc}"
            ) from None
        if not signature_ok:
            raise CsrError(
                f"CSR for {identity} has an invalid signature: the requester does not hold its key"
            )
        if identity.trust_domain != self.trust_domain:
            raise CsrError(
                f"identity {identity} is outside this CA's trust domain {self.trust_domain!r}"
            )
        if ttl <= timedelta(0):
            raise CsrError(f"requested validity for {identity} must be positive, got {ttl}")
        key_usage = _leaf_key_usage(public_key, identity)

        now = datetime.now(UTC)
        ca_expiry = self._cert.not_valid_after_utc
        if ca_expiry <= now:
            raise CsrError(f"cannot sign for {identity}: the CA certificate expired at {ca_expiry}")
        start, end = (
            (now - CLOCK_SKEW_ALLOWANCE, now + ttl)
            if not_before is None
            else (not_before, not_before + ttl)
        )
        end = min(end, ca_expiry)
        if end <= start:
            raise CsrError(f"cannot sign for {identity}: validity would end before it starts")

        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self._cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            # The subject is empty, so RFC 5280 requires the SAN to be critical.
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]),
                critical=True,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(key_usage, critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(_authority_key_id(self._cert), critical=False)
            .sign(self._key, _signature_hash(self._key))
        )
        return [to_pem(leaf), *self._issued_chain_tail]

    def issue(
        self,
        identity: Identity,
        *,
        ttl: timedelta = timedelta(hours=24),
        not_before: datetime | None = None,
    ) -> WorkloadCertificate:
        """Generate a key and CSR for `identity` and sign it (for local use and tests)."""
        key_pem, csr_pem = generate_key_and_csr(identity)
        chain = self.sign_csr(csr_pem, identity, ttl=ttl, not_before=not_before)
        return WorkloadCertificate.from_pem(key_pem, chain, self.roots_pem)


def generate_key_and_csr(identity: Identity) -> tuple[bytes, bytes]:
    """(key_pem, csr_pem): a fresh ECDSA P-256 key and a SHA-256 CSR with one URI SAN."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, csr.public_bytes(serialization.Encoding.PEM)


def _require_ca(cert: x509.Certificate, what: str) -> None:
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except (x509.ExtensionNotFound, ValueError):
        constraints = None
    if constraints is None or not constraints.ca:
        raise CertificateError(f"{what} is not a CA certificate (basicConstraints CA:TRUE missing)")


def _leaf_key_usage(public_key: object, identity: Identity) -> x509.KeyUsage:
    # TLS 1.3 only signs with the leaf key; RSA keys additionally get keyEncipherment because
    # TLS 1.2 peers (Envoy with TLS 1.2 enabled) may use RSA key transport.
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < MIN_RSA_KEY_BITS:
            raise CsrError(
                f"CSR for {identity} has a {public_key.key_size}-bit RSA key; "
                f"at least {MIN_RSA_KEY_BITS} bits are required"
            )
        key_encipherment = True
    elif isinstance(
        public_key, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey
    ):
        key_encipherment = False
    else:
        raise CsrError(
            f"CSR for {identity} has an unsupported {type(public_key).__name__}: "
            "use ECDSA, RSA or EdDSA"
        )
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def _authority_key_id(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key())
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _signature_hash(key: PrivateKeyTypes) -> hashes.HashAlgorithm | None:
    # EdDSA keys hash internally and must be given no digest.
    if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return None
    return hashes.SHA256()
