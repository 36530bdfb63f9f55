"""The certificate authority and WorkloadCertificate validation."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store

from meshcore.identity.ca import CertificateAuthority, CsrError, generate_key_and_csr
from meshcore.identity.certs import CertificateError, WorkloadCertificate
from meshcore.identity.spiffe import Identity
from meshcore.testing.pki import make_intermediate_ca

CLIENT = Identity("cluster.local", "default", "client")


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.generate()


def _load(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def _verify_as_client_cert(cert: WorkloadCertificate) -> list[x509.Certificate]:
    """Independent check with cryptography's WebPKI verifier; returns the built chain."""
    verifier = (
        PolicyBuilder().store(Store([_load(r) for r in cert.roots_pem])).build_client_verifier()
    )
    leaf, *intermediates = (_load(p) for p in cert.chain_pem)
    return verifier.verify(leaf, intermediates).chain


# --- signing ---


def test_issued_chain_verifies_to_the_root(ca: CertificateAuthority) -> None:
    cert = ca.issue(CLIENT)
    chain = _verify_as_client_cert(cert)
    assert chain[-1] == _load(ca.cert_pem)
    assert cert.roots_pem == ca.roots_pem


def test_leaf_carries_exactly_the_identity(ca: CertificateAuthority) -> None:
    leaf = _load(ca.issue(CLIENT).chain_pem[0])
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [CLIENT.uri]
    assert len(list(san.value)) == 1
    assert san.critical  # the subject is empty, so RFC 5280 wants it critical
    assert leaf.subject == x509.Name([])
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_encipherment and not usage.key_cert_sign
    assert isinstance(leaf.public_key(), ec.EllipticCurvePublicKey)
    assert isinstance(leaf.signature_hash_algorithm, hashes.SHA256)


def test_sign_csr_returns_leaf_then_root(ca: CertificateAuthority) -> None:
    key_pem, csr_pem = generate_key_and_csr(CLIENT)
    chain = ca.sign_csr(csr_pem, CLIENT)
    assert len(chain) == 2
    assert chain[1] == ca.cert_pem
    csr_key = x509.load_pem_x509_csr(csr_pem).public_key()
    assert _load(chain[0]).public_key() == csr_key
    assert WorkloadCertificate.from_pem(key_pem, chain, ()).roots_pem == ca.roots_pem


def test_default_validity_is_24_hours_starting_now(ca: CertificateAuthority) -> None:
    before = datetime.now(UTC)
    cert = ca.issue(CLIENT)
    assert before - timedelta(minutes=2) < cert.not_before <= before
    assert cert.not_after - before == pytest.approx(timedelta(hours=24), abs=timedelta(seconds=5))
    assert cert.refresh_at == cert.not_before + (cert.not_after - cert.not_before) / 2


def test_not_before_in_the_past_makes_an_expired_certificate(ca: CertificateAuthority) -> None:
    start = (datetime.now(UTC) - timedelta(hours=2)).replace(microsecond=0)
    cert = ca.issue(CLIENT, not_before=start, ttl=timedelta(hours=1))
    assert (cert.not_before, cert.not_after) == (start, start + timedelta(hours=1))
    assert cert.expired(datetime.now(UTC))
    assert not cert.expired(start + timedelta(minutes=30))


def test_leaf_never_outlives_the_ca() -> None:
    short_lived = CertificateAuthority.generate(ttl=timedelta(hours=1))
    cert = short_lived.issue(CLIENT, ttl=timedelta(hours=24))
    assert cert.not_after == _load(short_lived.cert_pem).not_valid_after_utc


def test_the_ca_ignores_what_the_csr_asks_for(ca: CertificateAuthority) -> None:
    # Like istiod: the identity comes from the authenticated request, never from the CSR.
    _, csr_pem = generate_key_and_csr(Identity("cluster.local", "kube-system", "admin"))
    leaf = _load(ca.sign_csr(csr_pem, CLIENT)[0])
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [CLIENT.uri]


def test_identity_of_another_trust_domain_is_refused(ca: CertificateAuthority) -> None:
    stranger = Identity("other.example", "default", "client")
    _, csr_pem = generate_key_and_csr(stranger)
    with pytest.raises(
        CsrError, match=r"spiffe://other.example/ns/default/sa/client is outside .* 'cluster.local'"
    ):
        ca.sign_csr(csr_pem, stranger)


def _csr_with_corrupt_signature() -> bytes:
    _, csr_pem = generate_key_and_csr(CLIENT)
    der = bytearray(x509.load_pem_x509_csr(csr_pem).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # last byte of the ECDSA signature's s value: still well-formed DER
    body = base64.encodebytes(bytes(der)).decode()
    return (
        f"-----BEGIN CERTIFICATE REQUEST-----\n{body}-----END CERTIFICATE REQUEST-----\n".encode()
    )


def _certificate_instead_of_csr(ca: CertificateAuthority) -> bytes:
    return ca.cert_pem


@pytest.mark.parametrize(
    ("make_csr", "complaint"),
    [
        (lambda ca: b"", "not a PEM certificate signing request"),
        (lambda ca: b"garbage", "not a PEM certificate signing request"),
        (lambda ca: generate_key_and_csr(CLIENT)[1][:200], "not a PEM certificate signing request"),
        (_certificate_instead_of_csr, "not a PEM certificate signing request"),
        (lambda ca: _csr_with_corrupt_signature(), "invalid signature"),
    ],
    ids=["empty", "garbage", "truncated", "certificate", "bad-signature"],
)
def test_bad_csrs_are_refused(ca: CertificateAuthority, make_csr, complaint: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(CsrError, match=complaint) as raised:
        ca.sign_csr(make_csr(ca), CLIENT)
    assert CLIENT.uri in str(raised.value)


def _rsa_csr(bits: int) -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def test_rsa_keys_get_key_encipherment_and_weak_ones_are_refused(ca: CertificateAuthority) -> None:
    leaf = _load(ca.sign_csr(_rsa_csr(2048), CLIENT)[0])
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and usage.key_encipherment
    with pytest.raises(CsrError, match="1024-bit RSA key"):
        ca.sign_csr(_rsa_csr(1024), CLIENT)


def test_non_positive_ttl_is_refused(ca: CertificateAuthority) -> None:
    _, csr_pem = generate_key_and_csr(CLIENT)
    with pytest.raises(CsrError, match="must be positive"):
        ca.sign_csr(csr_pem, CLIENT, ttl=timedelta(0))


# --- plug-in CAs ---


def test_plug_in_intermediate_ca_issues_full_chains(ca: CertificateAuthority) -> None:
    intermediate = make_intermediate_ca(ca)
    cert_pem = intermediate.cert_pem
    assert intermediate.roots_pem == ca.roots_pem

    _, csr_pem = generate_key_and_csr(CLIENT)
    assert intermediate.sign_csr(csr_pem, CLIENT)[1:] == [cert_pem, ca.cert_pem]

    cert = intermediate.issue(CLIENT)
    assert cert.chain_pem[1] == cert_pem
    assert cert.roots_pem == ca.roots_pem
    assert [c.subject for c in _verify_as_client_cert(cert)][1:] == [
        _load(cert_pem).subject,
        _load(ca.cert_pem).subject,
    ]


def test_loading_a_self_signed_root_round_trips(ca: CertificateAuthority) -> None:
    loaded = CertificateAuthority.load(ca.cert_pem, ca.key_pem)
    assert loaded.roots_pem == ca.roots_pem
    assert _verify_as_client_cert(loaded.issue(CLIENT))


@pytest.mark.parametrize(
    ("case", "complaint"),
    [
        ("wrong-key", "private key does not match"),
        ("leaf-as-ca", "not a CA certificate"),
        ("no-root", "does not reach a self-signed root"),
        ("garbage-key", "not an unencrypted PEM private key"),
        ("garbage-cert", "not PEM certificate data"),
    ],
)
def test_unusable_plug_in_material_is_refused(
    ca: CertificateAuthority, case: str, complaint: str
) -> None:
    intermediate = make_intermediate_ca(ca)
    cert_pem, key_pem = intermediate.cert_pem, intermediate.key_pem
    leaf = ca.issue(CLIENT)
    arguments = {
        "wrong-key": (ca.cert_pem, generate_key_and_csr(CLIENT)[0], b""),
        "leaf-as-ca": (leaf.chain_pem[0], leaf.key_pem, ca.cert_pem),
        "no-root": (cert_pem, key_pem, b""),
        "garbage-key": (ca.cert_pem, b"nope", b""),
        "garbage-cert": (b"nope", ca.key_pem, b""),
    }[case]
    with pytest.raises(CertificateError, match=complaint):
        CertificateAuthority.load(arguments[0], arguments[1], chain_pem=arguments[2])


# --- WorkloadCertificate.from_pem ---


def test_from_pem_moves_a_trailing_root_and_splits_bundles(ca: CertificateAuthority) -> None:
    key_pem, csr_pem = generate_key_and_csr(CLIENT)
    leaf_pem, root_pem = ca.sign_csr(csr_pem, CLIENT)
    from_list = WorkloadCertificate.from_pem(key_pem, [leaf_pem, root_pem], [root_pem])
    from_bundle = WorkloadCertificate.from_pem(key_pem, [leaf_pem + root_pem], [])
    assert from_list == from_bundle
    assert from_list.chain_pem == (leaf_pem,)
    assert from_list.roots_pem == (root_pem,)
    assert from_list.identity == CLIENT


def test_from_pem_refuses_unusable_material(ca: CertificateAuthority) -> None:
    other_ca = CertificateAuthority.generate()
    key_pem, csr_pem = generate_key_and_csr(CLIENT)
    leaf_pem, _ = ca.sign_csr(csr_pem, CLIENT)
    other_key, _ = generate_key_and_csr(CLIENT)
    cases = [
        ((other_key, [leaf_pem], ca.roots_pem), "private key does not match"),
        ((key_pem, [leaf_pem], other_ca.roots_pem), "does not lead to any trust root"),
        ((key_pem, [leaf_pem], ()), "no trust roots"),
        ((key_pem, [], ca.roots_pem), "chain is empty"),
        ((key_pem, [b"junk"], ca.roots_pem), r"chain\[0\] is not PEM"),
        ((b"junk", [leaf_pem], ca.roots_pem), "not an unencrypted PEM private key"),
        ((key_pem, [ca.cert_pem], ca.roots_pem), "leaf certificate URI SAN"),
    ]
    for arguments, complaint in cases:
        with pytest.raises(CertificateError, match=complaint):
            WorkloadCertificate.from_pem(*arguments)
