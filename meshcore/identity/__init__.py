"""Workload identity: SPIFFE IDs, workload certificates, the CA and the certificate manager."""

from meshcore.identity.ca import CertificateAuthority, CsrError, generate_key_and_csr
from meshcore.identity.certs import CertificateError, WorkloadCertificate
from meshcore.identity.spiffe import Identity, InvalidIdentity, identities_from_certificate

__all__ = [
    "CertificateAuthority",
    "CertificateError",
    "CsrError",
    "Identity",
    "InvalidIdentity",
    "WorkloadCertificate",
    "generate_key_and_csr",
    "identities_from_certificate",
]
