"""The CA root: generated once and persisted 0600, reloaded, plug-in CAs, the serving cert."""

from __future__ import annotations

import ipaddress
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store

from istiod_lite.ca.root import (
    CA_CERT_FILE,
    CA_KEY_FILE,
    RootError,
    issue_serving_certificate,
    load_or_create_root,
    load_plugin_ca,
)
from meshcore.identity.ca import CertificateAuthority
from meshcore.identity.spiffe import Identity
from meshcore.testing.pki import make_intermediate_ca

REVIEWS = Identity("cluster.local", "default", "reviews")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- self-signed root persisted in root_dir ---


def test_first_start_generates_and_persists_a_root_with_a_private_key_file(
    tmp_path: Path,
) -> None:
    root_dir = tmp_path / "root"
    ca = load_or_create_root(root_dir, "cluster.local")
    assert (root_dir / CA_CERT_FILE).read_bytes() == ca.cert_pem
    assert (root_dir / CA_KEY_FILE).read_bytes() == ca.key_pem
    assert _mode(root_dir / CA_KEY_FILE) == 0o600
    assert _mode(root_dir) == 0o700
    assert sorted(p.name for p in root_dir.iterdir()) == [CA_CERT_FILE, CA_KEY_FILE]


def test_restart_reloads_the_same_root_and_old_certificates_still_verify(tmp_path: Path) -> None:
    issued_before_restart = load_or_create_root(tmp_path, "cluster.local").issue(REVIEWS)
    reloaded = load_or_create_root(tmp_path, "cluster.local")
    roots_after_restart = Store([x509.load_pem_x509_certificate(r) for r in reloaded.roots_pem])
    verifier = PolicyBuilder().store(roots_after_restart).build_client_verifier()
    for cert in (issued_before_restart, reloaded.issue(REVIEWS)):
        leaf, *intermediates = (x509.load_pem_x509_certificate(p) for p in cert.chain_pem)
        verifier.verify(leaf, intermediates)


def test_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    load_or_create_root(tmp_path, "cluster.local")
    os.chmod(tmp_path / CA_KEY_FILE, 0o640)
    with pytest.raises(RootError, match=r"mode 0640.*chmod 600"):
        load_or_create_root(tmp_path, "cluster.local")


def test_half_present_root_is_not_silently_replaced(tmp_path: Path) -> None:
    load_or_create_root(tmp_path, "cluster.local")
    (tmp_path / CA_CERT_FILE).unlink()
    with pytest.raises(RootError, match=f"holds {CA_KEY_FILE} but not {CA_CERT_FILE}"):
        load_or_create_root(tmp_path, "cluster.local")
    assert (tmp_path / CA_KEY_FILE).exists()


def test_corrupt_persisted_root_names_the_directory(tmp_path: Path) -> None:
    load_or_create_root(tmp_path, "cluster.local")
    (tmp_path / CA_CERT_FILE).write_bytes(b"garbage")
    with pytest.raises(RootError, match=f"persisted CA root in {tmp_path} is unusable"):
        load_or_create_root(tmp_path, "cluster.local")


# --- plug-in CA from operator files ---


def test_plugin_intermediate_ca_issues_chains_to_the_operator_root(tmp_path: Path) -> None:
    offline_root = CertificateAuthority.generate()
    intermediate = make_intermediate_ca(offline_root)
    (tmp_path / "ca-cert.pem").write_bytes(intermediate.cert_pem)
    (tmp_path / "ca-key.pem").write_bytes(intermediate.key_pem)
    (tmp_path / "root-cert.pem").write_bytes(offline_root.cert_pem)

    ca = load_plugin_ca(
        tmp_path / "ca-cert.pem", tmp_path / "ca-key.pem", tmp_path / "root-cert.pem"
    )
    cert = ca.issue(REVIEWS)
    assert cert.roots_pem == offline_root.roots_pem
    assert cert.chain_pem[1] == intermediate.cert_pem


def test_plugin_key_not_matching_the_cert_is_refused(tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_bytes(CertificateAuthority.generate().cert_pem)
    (tmp_path / "key.pem").write_bytes(CertificateAuthority.generate().key_pem)
    with pytest.raises(RootError, match="does not match the CA certificate"):
        load_plugin_ca(tmp_path / "cert.pem", tmp_path / "key.pem")


def test_missing_plugin_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(RootError, match=f"cannot read CA certificate {tmp_path}/absent.pem"):
        load_plugin_ca(tmp_path / "absent.pem", tmp_path / "key.pem")


# --- istiod_lite's own serving certificate ---


@pytest.mark.parametrize("signer", ["root", "intermediate"])
def test_serving_certificate_verifies_for_its_dns_name_and_ip(signer: str) -> None:
    root = CertificateAuthority.generate()
    ca = root if signer == "root" else make_intermediate_ca(root)
    serving = issue_serving_certificate(
        ca, dns_names=["istiod.istio-system.svc"], ip_addresses=["127.0.0.1"]
    )
    leaf, *intermediates = x509.load_pem_x509_certificates(serving.chain_pem)
    verifier = PolicyBuilder().store(Store([x509.load_pem_x509_certificate(root.cert_pem)]))
    for name in (
        x509.DNSName("istiod.istio-system.svc"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ):
        verifier.build_server_verifier(name).verify(leaf, intermediates)
    with pytest.raises(x509.verification.VerificationError):
        verifier.build_server_verifier(x509.DNSName("evil.example")).verify(leaf, intermediates)


def test_serving_certificate_rejects_a_bad_ip() -> None:
    with pytest.raises(ValueError, match="IP address '10.0.0.300' is invalid"):
        issue_serving_certificate(
            CertificateAuthority.generate(), dns_names=["x.svc"], ip_addresses=["10.0.0.300"]
        )
