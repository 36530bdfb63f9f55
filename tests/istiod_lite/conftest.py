"""istiod_lite against the real kube-apiserver, with either credential it runs with.

`istiod_factory` makes IstiodLite instances (kube source, root namespace = the test's
namespace, no listening ports unless asked) that authenticate either

- "kubeconfig": out of cluster, with the fixture's admin kubeconfig, or
- "serviceaccount": in-cluster style: ServiceAccount `istiod` of the test namespace bound to
  the ClusterRole `istiod-lite` and the Role `istiod-lite` exactly as deploy/install has them,
  its token minted with TokenRequest and found where a pod has it (the in-cluster loader's
  token and CA files, KUBERNETES_SERVICE_HOST/PORT), so least privilege is what is tested.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import kubernetes
import pytest
import yaml
from kubernetes.client.exceptions import ApiException
from kubernetes.config import incluster_config

from istiod_lite.app import IstiodLite
from istiod_lite.config import IstiodConfig, Ports

ISTIOD_MANIFESTS = Path(__file__).resolve().parents[2] / "deploy" / "install" / "20-istiod.yaml"


def istiod_rbac() -> tuple[dict, dict]:
    """The ClusterRole and the Role `istiod-lite` that `ambientctl install` ships."""
    documents = [d for d in yaml.safe_load_all(ISTIOD_MANIFESTS.read_text()) if d]
    cluster_role = next(d for d in documents if d["kind"] == "ClusterRole" and d["metadata"]["name"] == "istiod-lite")
    role = next(d for d in documents if d["kind"] == "Role" and d["metadata"]["name"] == "istiod-lite")
    return cluster_role, role


@pytest.fixture(params=["kubeconfig", "serviceaccount"])
def istiod_factory(
    request, kube_apiserver, kube_namespace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., IstiodLite]]:
    ns = kube_namespace
    cleanups: list[Callable[[], object]] = []
    base = dict(source="kube", root_dir=tmp_path / "istiod", root_namespace=ns, ports=Ports(0, 0, 0))
    if request.param == "kubeconfig":
        base["kubeconfig"] = kube_apiserver.kubeconfig
    else:
        _in_cluster_credentials(kube_apiserver, ns, tmp_path, monkeypatch, cleanups)

    def make(**overrides) -> IstiodLite:
        return IstiodLite(IstiodConfig(**{**base, **overrides}))

    try:
        yield make
    finally:
        for cleanup in reversed(cleanups):
            cleanup()


def _in_cluster_credentials(kube_apiserver, ns: str, tmp_path: Path, monkeypatch, cleanups: list) -> None:
    api = kube_apiserver.api_client
    core = kubernetes.client.CoreV1Api(api)
    rbac = kubernetes.client.RbacAuthorizationV1Api(api)
    cluster_role, role = istiod_rbac()
    try:
        rbac.create_cluster_role(cluster_role)
        cleanups.append(lambda: rbac.delete_cluster_role("istiod-lite"))
    except ApiException as exc:
        if exc.status != 409:
            raise
        rbac.replace_cluster_role("istiod-lite", _with_version(cluster_role, rbac.read_cluster_role("istiod-lite")))
    binding_name = f"istiod-lite-{ns}"
    subject = [{"kind": "ServiceAccount", "name": "istiod", "namespace": ns}]
    rbac.create_cluster_role_binding({
        "metadata": {"name": binding_name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "istiod-lite"},
        "subjects": subject,
    })
    cleanups.append(lambda: rbac.delete_cluster_role_binding(binding_name))
    namespaced_role = copy.deepcopy(role)
    namespaced_role["metadata"]["namespace"] = ns
    rbac.create_namespaced_role(ns, namespaced_role)
    rbac.create_namespaced_role_binding(ns, {
        "metadata": {"name": "istiod-lite"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "istiod-lite"},
        "subjects": subject,
    })
    core.create_namespaced_service_account(ns, {"metadata": {"name": "istiod"}})
    token = core.create_namespaced_service_account_token(
        "istiod", ns, {"spec": {"expirationSeconds": 3600}}
    ).status.token
    # Where a pod finds its ServiceAccount token, and the variables the kubelet sets.
    token_file = tmp_path / "serviceaccount" / "token"
    token_file.parent.mkdir()
    token_file.write_text(token)
    monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(token_file))
    monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(kube_apiserver.ca_cert))
    url = urlsplit(kube_apiserver.url)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", url.hostname)
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(url.port))


def _with_version(body: dict, current) -> dict:
    return {**body, "metadata": {**body["metadata"], "resourceVersion": current.metadata.resource_version}}
