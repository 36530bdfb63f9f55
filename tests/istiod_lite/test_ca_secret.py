"""With the kube source the CA root lives in Secret istio-ca-secret of istiod's namespace:
created on first start, reused by the next, published in ConfigMap istio-ca-root-cert; a
plug-in CA still wins. Against the real kube-apiserver, with both credentials (conftest.py)."""

from __future__ import annotations

import base64

import kubernetes
import pytest
from kubernetes.client.exceptions import ApiException

from istiod_lite.ca.root import RootError, load_or_create_root_secret
from meshcore.identity.ca import CertificateAuthority


def secret_data(core, ns: str) -> dict[str, bytes]:
    secret = core.read_namespaced_secret("istio-ca-secret", ns)
    assert secret.type == "istio.io/ca-root"
    return {key: base64.b64decode(value) for key, value in secret.data.items()}


def test_the_first_start_creates_the_root_and_a_restart_keeps_it(istiod_factory, kube_apiserver, kube_namespace):
    core = kubernetes.client.CoreV1Api(kube_apiserver.api_client)
    first = istiod_factory()
    data = secret_data(core, kube_namespace)
    assert set(data) == {"ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem"}
    assert data["ca-cert.pem"] == data["root-cert.pem"] == first.root_pem
    assert data["ca-key.pem"] == first.ca.key_pem
    published = core.read_namespaced_config_map("istio-ca-root-cert", kube_namespace)
    assert published.data == {"root-cert.pem": first.root_pem.decode()}

    restarted = istiod_factory()
    assert restarted.root_pem == first.root_pem
    assert restarted.ca.key_pem == first.ca.key_pem
    assert secret_data(core, kube_namespace) == data


def test_a_plugin_ca_wins_over_the_secret(istiod_factory, kube_apiserver, kube_namespace, tmp_path):
    plugged = CertificateAuthority.generate("cluster.local")
    (tmp_path / "ca-cert.pem").write_bytes(plugged.cert_pem)
    (tmp_path / "ca-key.pem").write_bytes(plugged.key_pem)
    istiod = istiod_factory(ca_cert=tmp_path / "ca-cert.pem", ca_key=tmp_path / "ca-key.pem")
    assert istiod.root_pem == plugged.cert_pem
    core = kubernetes.client.CoreV1Api(kube_apiserver.api_client)
    assert [s.metadata.name for s in core.list_namespaced_secret(kube_namespace).items if s.type == "istio.io/ca-root"] == []
    assert core.read_namespaced_config_map("istio-ca-root-cert", kube_namespace).data["root-cert.pem"] == plugged.cert_pem.decode()


def test_an_unusable_secret_is_an_error_naming_it(kube_apiserver, kube_namespace):
    core = kubernetes.client.CoreV1Api(kube_apiserver.api_client)
    other = CertificateAuthority.generate("cluster.local")
    core.create_namespaced_secret(kube_namespace, {
        "metadata": {"name": "istio-ca-secret"}, "type": "istio.io/ca-root",
        "data": {"ca-cert.pem": base64.b64encode(other.cert_pem).decode()},
    })
    with pytest.raises(RootError, match=f"Secret {kube_namespace}/istio-ca-secret has no ca-key.pem"):
        load_or_create_root_secret(kube_apiserver.api_client, kube_namespace)
    # Not replaced by a new root: every proxy trusts the old one.
    assert set(core.read_namespaced_secret("istio-ca-secret", kube_namespace).data) == {"ca-cert.pem"}


def test_a_missing_namespace_is_an_error_naming_the_secret(kube_apiserver):
    with pytest.raises(RootError, match="cannot create Secret no-such-ns-h2/istio-ca-secret: 404"):
        load_or_create_root_secret(kube_apiserver.api_client, "no-such-ns-h2")


def test_losing_the_creation_race_loads_the_winners_root(kube_apiserver, kube_namespace, monkeypatch):
    winner = load_or_create_root_secret(kube_apiserver.api_client, kube_namespace)
    # This replica read before the winner created the Secret: its first read finds nothing.
    read = kubernetes.client.CoreV1Api.read_namespaced_secret
    missed = []

    def read_after_the_race(self, *args, **kwargs):
        if not missed:
            missed.append(True)
            raise ApiException(status=404, reason="Not Found")
        return read(self, *args, **kwargs)

    monkeypatch.setattr(kubernetes.client.CoreV1Api, "read_namespaced_secret", read_after_the_race)
    loser = load_or_create_root_secret(kube_apiserver.api_client, kube_namespace)
    assert missed and loser.cert_pem == winner.cert_pem and loser.key_pem == winner.key_pem
