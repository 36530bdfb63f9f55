"""SPIFFE workload identities: `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.

The shape is exactly the one ztunnel accepts (src/identity/manager.rs `Identity::from_str`):
five path segments, the second "ns" and the fourth "sa". Characters follow the SPIFFE ID
spec (trust domain: lower-case letters, digits, `.`, `-`, `_`; path segments: letters,
digits, `.`, `-`, `_`), so an Identity always round-trips through its URI unchanged and
URI SANs can be compared by value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cryptography import x509

SCHEME = "spiffe://"

_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")
_PATH_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")
_SHAPE = "spiffe://<trust domain>/ns/<namespace>/sa/<service account>"


class InvalidIdentity(ValueError):
    """A string or field is not a valid SPIFFE workload identity; the message says why."""


def check_trust_domain(trust_domain: str) -> str:
    """Return `trust_domain` unchanged if it is a valid SPIFFE trust domain, else raise."""
    if not isinstance(trust_domain, str) or not _TRUST_DOMAIN.fullmatch(trust_domain):
        raise InvalidIdentity(
            f"trust domain {trust_domain!r} is invalid: "
            "expected lower-case letters, digits, '.', '-' or '_'"
        )
    return trust_domain


def _check_segment(field: str, value: str) -> None:
    if not isinstance(value, str) or not _PATH_SEGMENT.fullmatch(value) or value in (".", ".."):
        raise InvalidIdentity(
            f"{field} {value!r} is invalid: "
            "expected a non-empty name of letters, digits, '.', '-' or '_'"
        )


@dataclass(frozen=True, slots=True)
class Identity:
    """A workload identity; `uri` is its SPIFFE ID, `principal` what RBAC rules match."""

    trust_domain: str
    namespace: str
    service_account: str

    def __post_init__(self) -> None:
        check_trust_domain(self.trust_domain)
        _check_segment("namespace", self.namespace)
        _check_segment("service account", self.service_account)

    @classmethod
    def parse(cls, uri: str) -> Identity:
        """Parse `spiffe://<td>/ns/<ns>/sa/<sa>`; anything else raises InvalidIdentity."""
        if not isinstance(uri, str):
            raise InvalidIdentity(f"SPIFFE identity must be a string, got {type(uri).__name__}")
        if not uri.startswith(SCHEME):
            raise InvalidIdentity(f"{uri!r} is not a SPIFFE identity: expected {_SHAPE}")
        segments = uri[len(SCHEME) :].split("/")
        if len(segments) != 5 or segments[1] != "ns" or segments[3] != "sa":
            raise InvalidIdentity(f"{uri!r} is not a SPIFFE workload identity: expected {_SHAPE}")
        try:
            return cls(segments[0], segments[2], segments[4])
        except InvalidIdentity as exc:
            raise InvalidIdentity(f"{uri!r}: {exc}") from None

    @property
    def uri(self) -> str:
        return f"{SCHEME}{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    @property
    def principal(self) -> str:
        return f"{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    def __str__(self) -> str:
        return self.uri


def identities_from_certificate(cert: x509.Certificate) -> list[Identity]:
    """The SPIFFE identities among the certificate's URI SANs; other SANs are ignored."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    except ValueError:  # malformed extensions: no identity we could trust
        return []
    identities = []
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        try:
            identities.append(Identity.parse(uri))
        except InvalidIdentity:
            continue
    return identities
