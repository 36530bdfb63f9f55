"""SPIFFE identity parsing: exactly ztunnel's shape, nothing looser."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given
from hypothesis import strategies as st

from meshcore.identity.spiffe import Identity, InvalidIdentity, identities_from_certificate


@pytest.mark.parametrize(
    ("uri", "fields"),
    [
        ("spiffe://cluster.local/ns/default/sa/client", ("cluster.local", "default", "client")),
        ("spiffe://td/ns/istio-system/sa/ztunnel", ("td", "istio-system", "ztunnel")),
        (
            "spiffe://my_td-1.example/ns/a.b/sa/Build_Bot-2",
            ("my_td-1.example", "a.b", "Build_Bot-2"),
        ),
        # Segment names equal to the keywords are still names.
        ("spiffe://cluster.local/ns/sa/sa/ns", ("cluster.local", "sa", "ns")),
    ],
)
def test_parses_workload_identities(uri: str, fields: tuple[str, str, str]) -> None:
    identity = Identity.parse(uri)
    assert (identity.trust_domain, identity.namespace, identity.service_account) == fields
    assert identity.uri == uri
    assert str(identity) == uri
    assert identity.principal == uri.removeprefix("spiffe://")


@pytest.mark.parametrize(
    "uri",
    [
        "",
        "spiffe://",
        "spiffe://cluster.local",
        "spiffe://cluster.local/",
        "cluster.local/ns/a/sa/b",
        "http://cluster.local/ns/a/sa/b",
        "SPIFFE://cluster.local/ns/a/sa/b",
        "spiffe:/cluster.local/ns/a/sa/b",
        " spiffe://cluster.local/ns/a/sa/b",
        "spiffe://cluster.local/ns/a/sa/b ",
        "spiffe://cluster.local/ns/a/sa/b\n",
        "spiffe://cluster.local/ns/a/sa",
        "spiffe://cluster.local/ns/a/sa/b/",
        "spiffe://cluster.local/ns/a/sa/b/extra",
        "spiffe://cluster.local/namespace/a/sa/b",
        "spiffe://cluster.local/ns/a/serviceaccount/b",
        "spiffe://cluster.local/sa/b/ns/a",
        "spiffe:///ns/a/sa/b",
        "spiffe://cluster.local/ns//sa/b",
        "spiffe://cluster.local/ns/a/sa/",
        "spiffe://cluster.local//ns/a/sa/b",
        "spiffe://Cluster.Local/ns/a/sa/b",
        "spiffe://cluster.local:15012/ns/a/sa/b",
        "spiffe://user@cluster.local/ns/a/sa/b",
        "spiffe://cluster.local/ns/a/sa/b?x=1",
        "spiffe://cluster.local/ns/a/sa/b#fragment",
        "spiffe://cluster.local/ns/a%2Fb/sa/c",
        "spiffe://cluster.local/ns/../sa/b",
        "spiffe://cluster.local/ns/a/sa/.",
        "spiffe://cluster.local/ns/a b/sa/c",
        "spiffe://cluster.local/ns/ä/sa/c",
    ],
)
def test_refuses_anything_else(uri: str) -> None:
    with pytest.raises(InvalidIdentity) as raised:
        Identity.parse(uri)
    assert repr(uri) in str(raised.value)


@pytest.mark.parametrize("value", [None, b"spiffe://cluster.local/ns/a/sa/b", 42])
def test_refuses_non_strings_without_crashing(value: object) -> None:
    with pytest.raises(InvalidIdentity, match="must be a string"):
        Identity.parse(value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fields", "complaint"),
    [
        (("cluster.local", "a/b", "c"), "namespace 'a/b'"),
        (("cluster.local", "a", ""), "service account ''"),
        (("cluster/local", "a", "b"), "trust domain 'cluster/local'"),
    ],
)
def test_constructing_directly_validates_the_same_way(
    fields: tuple[str, str, str], complaint: str
) -> None:
    with pytest.raises(InvalidIdentity, match=complaint):
        Identity(*fields)


_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABC0123456789.-_", min_size=1, max_size=30)


@given(
    trust_domain=st.text(
        alphabet="abcdefghijklmnopqrstuvwxyz0123456789.-_", min_size=1, max_size=30
    ),
    namespace=_names.filter(lambda n: n not in (".", "..")),
    service_account=_names.filter(lambda n: n not in (".", "..")),
)
def test_uri_round_trips(trust_domain: str, namespace: str, service_account: str) -> None:
    identity = Identity(trust_domain, namespace, service_account)
    assert Identity.parse(identity.uri) == identity


def _certificate_with_sans(sans: list[x509.GeneralName]) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(x509.Name([x509.NameAttribute(x509.NameOID.ORGANIZATION_NAME, "test")]))
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(hours=1))
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=True)
    return builder.sign(key, hashes.SHA256())


def test_identities_from_certificate_keeps_only_spiffe_uris() -> None:
    cert = _certificate_with_sans(
        [
            x509.DNSName("reviews.default.svc"),
            x509.UniformResourceIdentifier("spiffe://cluster.local/ns/default/sa/reviews"),
            x509.UniformResourceIdentifier("https://example.com/"),
            x509.UniformResourceIdentifier("spiffe://cluster.local/ns/default"),
            x509.UniformResourceIdentifier("spiffe://other.example/ns/prod/sa/api"),
        ]
    )
    assert identities_from_certificate(cert) == [
        Identity("cluster.local", "default", "reviews"),
        Identity("other.example", "prod", "api"),
    ]


def test_certificate_without_sans_has_no_identity() -> None:
    assert identities_from_certificate(_certificate_with_sans([])) == []
