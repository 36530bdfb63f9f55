"""`ambientctl check`: the verdicts over objects and certificates, and what the command prints
when there is nothing to check (no mesh running, an API server that is down).

Cluster checks against a real API server: tests/istiod_lite/test_check_cluster.py; against a
running one-machine mesh: tests/e2e/test_check_local.py.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ambientctl.check import (
    REQUIRED_CRDS,
    Result,
    Section,
    certificate_result,
    crd_result,
    daemonset_result,
    deployment_result,
    enrolled_result,
    print_report,
    version_result,
    waypoints_result,
)
from ambientctl.cli import main
from meshcore.testing.procs import free_port

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def ca_pem(not_before: datetime, not_after: datetime) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cluster.local")])
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    return certificate.public_bytes(serialization.Encoding.PEM)


def test_version_below_the_minimum_fails_and_unparseable_versions_are_named():
    assert version_result("v1.20.2").ok
    assert version_result("v1.31.0+k3s1").ok
    old = version_result("v1.19.16")
    assert not old.ok and "v1.19.16" in old.detail
    assert "'banana'" in version_result("banana").detail


def test_crds_missing_or_not_established_are_named():
    established = {"status": {"conditions": [{"type": "Established", "status": "True"}]}}
    crds = {name: established for name in REQUIRED_CRDS}
    assert crd_result(crds, REQUIRED_CRDS).ok
    del crds["httproutes.gateway.networking.k8s.io"]
    crds["waypoints.istiodlite.io"] = {"status": {"conditions": [{"type": "Established", "status": "False"}]}}
    crds["gateways.gateway.networking.k8s.io"] = {"metadata": {"deletionTimestamp": "2026-11-26T10:00:00Z"}, **established}
    result = crd_result(crds, REQUIRED_CRDS)
    assert not result.ok
    assert "missing httproutes.gateway.networking.k8s.io" in result.detail
    assert "being deleted gateways.gateway.networking.k8s.io" in result.detail
    assert "not Established waypoints.istiodlite.io" in result.detail


def test_deployment_needs_an_available_replica_and_says_why_not():
    assert "not found" in deployment_result("istio-system", "istiod", None).detail
    unavailable = {
        "spec": {"replicas": 1},
        "status": {"conditions": [{"type": "Available", "status": "False", "message": "Deployment does not have minimum availability."}]},
    }
    result = deployment_result("istio-system", "istiod", unavailable)
    assert not result.ok and "0/1 replicas available" in result.detail and "minimum availability" in result.detail
    available = {"spec": {"replicas": 1}, "status": {"availableReplicas": 1, "conditions": [{"type": "Available", "status": "True"}]}}
    assert deployment_result("istio-system", "istiod", available).ok


@pytest.mark.parametrize(
    ("desired", "ready", "nodes", "expected"),
    [
        (3, 3, 3, None),
        (3, 2, 3, "ready on 2 of 3 nodes"),
        (2, 2, 3, "scheduled on 2 of 3 nodes"),
        (0, 0, 0, "no Nodes"),
    ],
)
def test_daemonset_must_be_ready_on_every_node(desired, ready, nodes, expected):
    daemonset = {"status": {"desiredNumberScheduled": desired, "numberReady": ready}}
    result = daemonset_result("istio-system", "ztunnel", daemonset, nodes)
    if expected is None:
        assert result.ok, result.detail
    else:
        assert not result.ok and expected in result.detail


def test_certificate_expiry_is_reported_with_its_date():
    fine = certificate_result("root", ca_pem(NOW - timedelta(days=1), NOW + timedelta(days=3650)), NOW, "ca-cert.pem")
    assert fine.ok and "expires 2036-11-23" in fine.detail
    near = certificate_result("root", ca_pem(NOW - timedelta(days=1), NOW + timedelta(days=10)), NOW, "ca-cert.pem")
    assert not near.ok and "expires at 2026-12-06 12:00 UTC, in 10 days" in near.detail
    expired = certificate_result("root", ca_pem(NOW - timedelta(days=10), NOW - timedelta(days=1)), NOW, "ca-cert.pem")
    assert not expired.ok and "expired at 2026-11-25" in expired.detail
    garbage = certificate_result("root", b"not a certificate", NOW, "ca-cert.pem")
    assert not garbage.ok and "no readable PEM certificate" in garbage.detail


def test_unprogrammed_waypoints_are_named_with_their_reason():
    programmed = {"metadata": {"namespace": "a", "name": "w"}, "status": {"conditions": [{"type": "Programmed", "status": "True"}]}}
    stuck = {
        "metadata": {"namespace": "b", "name": "w"},
        "status": {"conditions": [{"type": "Programmed", "status": "False", "reason": "Invalid", "message": "spec.trafficType: unknown"}]},
    }
    fresh = {"metadata": {"namespace": "c", "name": "w"}}
    assert waypoints_result([programmed]).ok
    result = waypoints_result([programmed, stuck, fresh])
    assert not result.ok
    assert "2 of 3 not programmed" in result.detail
    assert "b/w (Invalid: spec.trafficType: unknown)" in result.detail and "c/w (no Programmed condition yet)" in result.detail


def test_no_enrolled_namespace_is_a_warning_and_warnings_do_not_fail(capsys):
    warning = enrolled_result([], "label one")
    assert warning.ok and warning.warning
    assert print_report([Section("data plane"), warning]) == 0
    assert print_report([Section("data plane"), warning, Result(name="x", ok=False, detail="broken")]) == 1
    out = capsys.readouterr().out
    assert "‼ enrolled namespaces: none is labelled istio.io/dataplane-mode=ambient" in out
    assert "× x: broken" in out and out.rstrip().endswith("Status check results are ×")


def run(capsys, *args: str) -> tuple[int, str]:
    status = main(["check", *args])
    captured = capsys.readouterr()
    return status, captured.out + captured.err


def test_without_a_running_mesh_check_names_the_runtime(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.delenv("KUBECONFIG", raising=False)
    status, out = run(capsys, "--run-dir", str(tmp_path))
    assert status == 1
    assert f"× the one-machine mesh is up: no `ambientctl up` is running for {tmp_path}" in out


def test_pre_needs_a_cluster(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.delenv("KUBECONFIG", raising=False)
    status, out = run(capsys, "--pre", "--run-dir", str(tmp_path))
    assert status == 2 and "--pre checks a cluster" in out


def test_an_api_server_that_is_down_is_a_failed_line_not_a_traceback(tmp_path: Path, capsys, monkeypatch):
    port = free_port()  # nothing listens there
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(f"""\
apiVersion: v1
kind: Config
clusters: [{{name: c, cluster: {{server: "https://127.0.0.1:{port}", insecure-skip-tls-verify: true}}}}]
users: [{{name: u, user: {{token: t}}}}]
contexts: [{{name: x, context: {{cluster: c, user: u}}}}]
current-context: x
""")
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    status, out = run(capsys)
    assert status == 1
    assert "√ can initialize the client" in out
    assert f"× can query the Kubernetes API: cannot reach the API server at https://127.0.0.1:{port}" in out
    assert "Traceback" not in out
    status, out = run(capsys, "--kubeconfig", str(tmp_path / "missing"))
    assert status == 1 and "× can initialize the client: kubeconfig" in out
