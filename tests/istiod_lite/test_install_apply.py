"""What `ambientctl install` prints, applied to a real kube-apiserver (the shared fixture).

The API server is shared by the test session and has no controller-manager, so a deleted
namespace stays Terminating and deleted CRDs would pull the kinds from under other tests:
uninstall deletes everything else for real and asks the server to dry-run the deletion of
the namespace and the CRDs. Custom objects go into this test's own namespace.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes.client
import pytest
import yaml
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import NotFoundError, UnprocessibleEntityError

from ambientctl import cli
from ambientctl.cli import main

REPO = Path(__file__).resolve().parents[2]
FIELD_MANAGER = "ambientctl-install-test"
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_Dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)

# The Istio examples of a service-mesh guide users copy from (shared/seed), verbatim: the
# kinds we install CRDs for (its Linkerd and Cilium kinds are not ours).
GUIDE_EXAMPLES = """
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts:
  - reviews
  http:
  - match:
    - headers:
        end-user:
          exact: jason
    route:
    - destination:
        host: reviews
        subset: v2
  - route:
    - destination:
        host: reviews
        subset: v1
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata:
  name: reviews-destination
spec:
  host: reviews
  trafficPolicy:
    connectionPool:
      tcp:
        maxConnections: 100
      http:
        h2UpgradePolicy: UPGRADE
        http1MaxPendingRequests: 100
        http2MaxRequests: 1000
    loadBalancer:
      simple: LEAST_REQUEST
    outlierDetection:
      consecutive5xxErrors: 5
      interval: 30s
      baseEjectionTime: 30s
  subsets:
  - name: v1
    labels:
      version: v1
  - name: v2
    labels:
      version: v2
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata:
  name: api-canary
spec:
  hosts:
  - api
  http:
  - route:
    - destination:
        host: api
        subset: stable
      weight: 90
    - destination:
        host: api
        subset: canary
      weight: 10
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata:
  name: api-circuit-breaker
spec:
  host: api
  trafficPolicy:
    connectionPool:
      tcp:
        maxConnections: 100
    outlierDetection:
      consecutive5xxErrors: 5
      interval: 10s
      baseEjectionTime: 30s
      maxEjectionPercent: 50
---
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata:
  name: default
spec:
  mtls:
    mode: STRICT
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata:
  name: frontend-ingress
spec:
  selector:
    matchLabels:
      app: frontend
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/ingress-gateway"]
  - to:
    - operation:
        ports: ["8080"]
"""

# The Gateway API and Waypoint kinds, as istiod_lite reads them (istiod_lite/model/l7).
MESH_EXAMPLES = """
apiVersion: istiodlite.io/v1alpha1
kind: Waypoint
metadata:
  name: waypoint
spec:
  trafficType: all
  replicas: 2
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: gateway-waypoint
  labels:
    istio.io/waypoint-for: service
spec:
  gatewayClassName: istio-waypoint
  listeners:
  - name: mesh
    port: 15008
    protocol: HBONE
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: reviews
spec:
  parentRefs:
  - name: gateway-waypoint
  rules:
  - matches:
    - path:
        type: PathPrefix
        value: /api
      headers:
      - name: end-user
        value: jason
      method: GET
    backendRefs:
    - name: reviews-v2
      port: 9080
      weight: 90
    - name: reviews-v1
      port: 9080
      weight: 10
    timeouts:
      request: 2s
---
apiVersion: gateway.networking.k8s.io/v1beta1
kind: HTTPRoute
metadata:
  name: ratings-v1beta1
spec:
  parentRefs:
  - name: gateway-waypoint
  rules:
  - backendRefs:
    - name: ratings
      port: 9080
"""


@pytest.fixture
def dynamic(kube_apiserver, tmp_path: Path) -> DynamicClient:
    # Its discovery cache goes to tmp_path, not to /tmp.
    return DynamicClient(kube_apiserver.api_client, cache_file=str(tmp_path / "discovery.json"))


@pytest.fixture
def ambientctl(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "configure_logging", lambda level: None)

    def run(*args: str) -> list[dict[str, Any]]:
        status = main([*args, "--run-dir", str(tmp_path / "run")])
        captured = capsys.readouterr()
        assert status == 0, captured.err
        return [doc for doc in yaml.load_all(captured.out, Loader=_Loader) if doc]

    return run


def _resource(dynamic: DynamicClient, obj: dict[str, Any]):
    return dynamic.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])


def _apply(dynamic: DynamicClient, obj: dict[str, Any]) -> Any:
    return dynamic.server_side_apply(_resource(dynamic, obj), body=obj, field_manager=FIELD_MANAGER, force_conflicts=True)


def _content(stored: Any) -> dict[str, Any]:
    """What a stored object says, without the bookkeeping: 1.20 rewrites managedFields'
    timestamps (and so the resourceVersion) even on an apply that changes nothing."""
    body = stored.to_dict()
    metadata = body.pop("metadata")
    return {**body, "labels": metadata.get("labels"), "annotations": metadata.get("annotations")}


def _key(obj: dict[str, Any]) -> str:
    return f"{obj['kind']} {obj['metadata'].get('namespace', '')}/{obj['metadata']['name']}"


def _assert_kept(sent: Any, stored: Any, path: str = "spec") -> None:
    """Everything sent is stored as sent (the server may add defaults, never drop or change)."""
    if isinstance(sent, dict):
        assert isinstance(stored, dict), path
        for key, value in sent.items():
            assert key in stored, f"{path}.{key} was pruned"
            _assert_kept(value, stored[key], f"{path}.{key}")
    elif isinstance(sent, list):
        assert isinstance(stored, list) and len(stored) == len(sent), path
        for index, (a, b) in enumerate(zip(sent, stored)):
            _assert_kept(a, b, f"{path}[{index}]")
    else:
        assert stored == sent, f"{path}: sent {sent!r}, stored {stored!r}"


def test_install_applies_idempotently_and_uninstall_removes_it(kube_apiserver, dynamic, ambientctl):
    objects = ambientctl("install", "--set", "image=registry.example/ambient-mesh:1.0", "--set", "istiod.replicas=2")
    first = {_key(obj): _content(_apply(dynamic, obj)) for obj in objects}
    # A second `install | kubectl apply` changes nothing.
    assert {_key(obj): _content(_apply(dynamic, obj)) for obj in objects} == first
    istiod = kubernetes.client.AppsV1Api(kube_apiserver.api_client).read_namespaced_deployment("istiod", "istio-system")
    assert istiod.spec.replicas == 2
    assert istiod.spec.template.spec.containers[0].image == "registry.example/ambient-mesh:1.0"
    daemonset = kubernetes.client.AppsV1Api(kube_apiserver.api_client).read_namespaced_daemon_set("ztunnel", "istio-system")
    assert [c.name for c in daemonset.spec.template.spec.containers] == ["ztunnel", "node-agent"]

    removals = ambientctl("uninstall")
    assert sorted(map(_key, removals)) == sorted(first)
    deleted = []
    for stub in removals:
        resource = _resource(dynamic, stub)
        name, namespace = stub["metadata"]["name"], stub["metadata"].get("namespace")
        if stub["kind"] in ("Namespace", "CustomResourceDefinition"):
            dynamic.delete(resource, name=name, namespace=namespace, dry_run="All")
        else:
            dynamic.delete(resource, name=name, namespace=namespace)
            deleted.append((resource, name, namespace))
    for resource, name, namespace in deleted:
        with pytest.raises(NotFoundError):
            dynamic.get(resource, name=name, namespace=namespace)


def _has_empty_string(value: Any) -> bool:
    if isinstance(value, dict):
        return any(_has_empty_string(item) for item in value.values())
    if isinstance(value, list):
        return any(_has_empty_string(item) for item in value)
    return value == ""


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed (Debian kubernetes-client)")
def test_kubectl_apply_takes_the_install_output_as_printed(kube_apiserver, dynamic, ambientctl, tmp_path):
    objects = ambientctl("install")
    # Server-side dry run: kubectl builds its last-applied annotations and the server checks
    # everything (sizes, schemas) without keeping anything. Only the namespace is real, so
    # the namespaced objects have somewhere to be checked.
    _apply(dynamic, next(obj for obj in objects if obj["kind"] == "Namespace"))
    applied = subprocess.run(
        ["kubectl", "--kubeconfig", str(kube_apiserver.kubeconfig), "apply", "--dry-run=server", "-f", "-"],
        input=yaml.dump_all(objects, Dumper=_Dumper, sort_keys=False),
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HOME": str(tmp_path)},  # kubectl's discovery cache stays in tmp_path
    )
    assert applied.returncode == 0, applied.stderr
    assert len(applied.stdout.splitlines()) == len(objects)


def _custom_examples() -> list[dict[str, Any]]:
    documents = [*yaml.safe_load_all(GUIDE_EXAMPLES), *yaml.safe_load_all(MESH_EXAMPLES)]
    # The policies and routes the end-to-end tests run the mesh with.
    for path in sorted((REPO / "tests" / "e2e" / "manifests").rglob("*.yaml")):
        documents += yaml.safe_load_all(path.read_text())
    for path in sorted((REPO / "deploy" / "examples").rglob("*.yaml")):
        documents += yaml.safe_load_all(path.read_text())
    # The 1.20 test server reads "" as null and refuses it where a string is required, e.g.
    # `group: ""` (the core group) in targetRefs: such objects are left out here.
    return [doc for doc in documents if doc and "." in doc["apiVersion"].split("/")[0] and not _has_empty_string(doc)]


def test_custom_objects_users_write_are_accepted_whole_and_served_in_every_version(kube_apiserver, dynamic, kube_namespace):
    examples = _custom_examples()
    assert {doc["kind"] for doc in examples} >= {
        "VirtualService", "DestinationRule", "AuthorizationPolicy", "PeerAuthentication", "Waypoint", "Gateway", "HTTPRoute",
    }
    extensions = kubernetes.client.ApiextensionsV1Api(kube_apiserver.api_client)
    created: dict[tuple[str, str], Any] = {}
    try:
        for doc in examples:
            body = copy.deepcopy(doc)
            body["metadata"]["namespace"] = kube_namespace
            key = (body["kind"], body["metadata"]["name"])
            if key in created:  # the e2e manifests reuse names across files
                continue
            resource = _resource(dynamic, body)
            stored = dynamic.create(resource, body=body, namespace=kube_namespace).to_dict()
            created[key] = resource
            _assert_kept(doc.get("spec"), stored.get("spec"))
            crd = extensions.read_custom_resource_definition(f"{resource.name}.{resource.group}")
            for version in crd.spec.versions:
                other = dynamic.resources.get(api_version=f"{resource.group}/{version.name}", kind=body["kind"])
                assert dynamic.get(other, name=body["metadata"]["name"], namespace=kube_namespace).spec is not None
    finally:
        # Other tests on this server count the policies istiod_lite sees cluster-wide.
        for (_, name), resource in created.items():
            dynamic.delete(resource, name=name, namespace=kube_namespace)


def test_waypoint_schema_fills_defaults_and_rejects_invalid_specs_with_422(dynamic, kube_namespace):
    waypoints = dynamic.resources.get(api_version="istiodlite.io/v1alpha1", kind="Waypoint")

    def create(name: str, spec: dict[str, Any] | None) -> Any:
        body = {"apiVersion": "istiodlite.io/v1alpha1", "kind": "Waypoint", "metadata": {"name": name}}
        if spec is not None:
            body["spec"] = spec
        return dynamic.create(waypoints, body=body, namespace=kube_namespace)

    assert create("plain", None).spec.to_dict() == {"trafficType": "service", "replicas": 1}
    dynamic.delete(waypoints, name="plain", namespace=kube_namespace)
    for name, spec, field in (
        ("bogus-traffic", {"trafficType": "bogus"}, "spec.trafficType"),
        ("negative-replicas", {"replicas": -1}, "spec.replicas"),
        ("text-replicas", {"replicas": "two"}, "spec.replicas"),
    ):
        with pytest.raises(UnprocessibleEntityError) as raised:
            create(name, spec)
        assert raised.value.status == 422
        assert field in raised.value.body


@pytest.fixture
def rbac_applied(dynamic, ambientctl):
    """The namespace, ServiceAccounts and RBAC `install` prints, applied; removed afterwards."""
    rbac = [
        obj
        for obj in ambientctl("install")
        if obj["kind"] in ("Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")
    ]
    for obj in rbac:
        _apply(dynamic, obj)
    yield
    for obj in rbac:
        if obj["kind"] != "Namespace":  # it would stay Terminating (see the module docstring)
            dynamic.delete(_resource(dynamic, obj), name=obj["metadata"]["name"], namespace=obj["metadata"].get("namespace"))


def test_rbac_grants_istiod_and_the_node_agent_what_they_use_and_no_more(kube_apiserver, rbac_applied):
    authorization = kubernetes.client.AuthorizationV1Api(kube_apiserver.api_client)

    def allowed(service_account: str, verb: str, resource: str, group: str = "", namespace: str = "demo", name: str = "", subresource: str = "") -> bool:
        review = {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SubjectAccessReview",
            "spec": {
                "user": f"system:serviceaccount:istio-system:{service_account}",
                "groups": ["system:serviceaccounts", "system:serviceaccounts:istio-system", "system:authenticated"],
                "resourceAttributes": {
                    "verb": verb, "group": group, "resource": resource, "namespace": namespace, "name": name, "subresource": subresource,
                },
            },
        }
        return authorization.create_subject_access_review(review).status.allowed

    assert allowed("istiod", "watch", "waypoints", "istiodlite.io")
    assert allowed("istiod", "patch", "httproutes", "gateway.networking.k8s.io", subresource="status")
    assert allowed("istiod", "create", "tokenreviews", "authentication.k8s.io", namespace="")
    assert allowed("istiod", "create", "deployments", "apps")
    assert allowed("istiod", "get", "secrets", namespace="istio-system", name="istio-ca-secret")
    assert not allowed("istiod", "get", "secrets", namespace="istio-system", name="someone-elses")
    assert not allowed("istiod", "get", "secrets", namespace="demo", name="istio-ca-secret")
    assert not allowed("istiod", "update", "waypoints", "istiodlite.io")  # status only
    assert not allowed("istiod", "delete", "pods")
    assert allowed("ztunnel", "patch", "pods")
    assert allowed("ztunnel", "watch", "namespaces", namespace="")
    assert not allowed("ztunnel", "delete", "pods")
    assert not allowed("ztunnel", "get", "secrets", namespace="istio-system", name="istio-ca-secret")
