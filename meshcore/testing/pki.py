"""A ready-made mesh PKI for tests: a CA, certificates for a client and a server, and the
certificates tests need to exercise refusals (another trust domain, an expired one).

Plain functions, no pytest fixtures, so any test module (or a perf script) can call them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshcore.identity.ca import CertificateAuthority
from meshcore.identity.certs import WorkloadCertificate
from meshcore.identity.spiffe import Identity

TRUST_DOMAIN = "cluster.local"
FOREIGN_TRUST_DOMAIN = "other.example"


@dataclass(frozen=True, kw_only=True)
class MeshPki:
    """Certificates issued by `ca` (trust domain cluster.local) unless noted."""

    ca: CertificateAuthority
    client: WorkloadCertificate  # spiffe://cluster.local/ns/default/sa/client
    server: WorkloadCertificate  # spiffe://cluster.local/ns/default/sa/server
    expired: WorkloadCertificate  # the client's identity, expired an hour ago
    foreign_ca: CertificateAuthority  # a separate root for trust domain other.example
    # spiffe://other.example/ns/default/sa/client from `foreign_ca`; it trusts both roots, so
    # it accepts our servers while they refuse it.
    foreign: WorkloadCertificate


def make_mesh_pki() -> MeshPki:
    """A fresh PKI (a few milliseconds of key generation)."""
    ca = CertificateAuthority.generate(TRUST_DOMAIN)
    foreign_ca = CertificateAuthority.generate(FOREIGN_TRUST_DOMAIN)
    client_identity = Identity(TRUST_DOMAIN, "default", "client")
    foreign = foreign_ca.issue(Identity(FOREIGN_TRUST_DOMAIN, "default", "client"))
    return MeshPki(
        ca=ca,
        client=ca.issue(client_identity),
        server=ca.issue(Identity(TRUST_DOMAIN, "default", "server")),
        expired=ca.issue(
            client_identity,
            not_before=datetime.now(UTC) - timedelta(hours=2),
            ttl=timedelta(hours=1),
        ),
        foreign_ca=foreign_ca,
        foreign=with_extra_roots(foreign, ca),
    )


def with_extra_roots(cert: WorkloadCertificate, *cas: CertificateAuthority) -> WorkloadCertificate:
    """`cert`, also trusting the roots of `cas` (a federated trust bundle)."""
    roots = cert.roots_pem + tuple(r for ca in cas for r in ca.roots_pem if r not in cert.roots_pem)
    return WorkloadCertificate(
        identity=cert.identity,
        key_pem=cert.key_pem,
        chain_pem=cert.chain_pem,
        roots_pem=roots,
        not_before=cert.not_before,
        not_after=cert.not_after,
    )


def make_intermediate_ca(
    root: CertificateAuthority, *, name: str = "intermediate", ttl: timedelta = timedelta(days=30)
) -> CertificateAuthority:
    """An ECDSA intermediate CA signed by `root`, loaded as a plug-in CA would be."""
    key = ec.generate_private_key(ec.SECP256R1())
    root_cert = x509.load_pem_x509_certificate(root.cert_pem)
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, name)]))
        .issuer_name(root_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + ttl)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(serialization.load_pem_private_key(root.key_pem, None), hashes.SHA256())  # type: ignore[arg-type]
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return CertificateAuthority.load(
        cert.public_bytes(serialization.Encoding.PEM),
        key_pem,
        chain_pem=root.cert_pem,
        trust_domain=root.trust_domain,
    )
