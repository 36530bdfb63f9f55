"""`ambientctl check [--pre]` against a real kube-apiserver.

There is no kubelet or controller-manager, so the tests build a good install themselves:
Nodes, the istiod Deployment and ztunnel DaemonSet with their `status` patched as the
controllers would, the root CA Secret, a Waypoint whose status says Programmed. Then each
test breaks one piece and `check` must name it.

This module runs its own API server (started like the session's `kube_apiserver`, whose
binary and etcd it needs): `check` looks at cluster-wide state (every Node, every CRD, every
Waypoint), which the other tests on the shared server add to and leave behind, and one test
deletes a CRD. Each test checks a control-plane namespace of its own (`-i`).
"""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import kubernetes.client
import kubernetes.config
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from kubernetes.client.exceptions import ApiException

from ambientctl.check import REQUIRED_CRDS
from ambientctl.cli import main
from meshcore.testing.procs import ProcessError, free_port, start_process

REPO = Path(__file__).resolve().parents[2]
NODES = ("check-node-1", "check-node-2")
MERGE = "application/merge-patch+json"
CRD_KINDS = {
    "waypoints": "Waypoint", "authorizationpolicies": "AuthorizationPolicy", "peerauthentications": "PeerAuthentication",
    "virtualservices": "VirtualService", "destinationrules": "DestinationRule", "gateways": "Gateway",
    "httproutes": "HTTPRoute", "gatewayclasses": "GatewayClass",
}  # fmt: skip


@dataclass(frozen=True)
class Cluster:
    kubeconfig: Path
    api_client: kubernetes.client.ApiClient
    url: str
    ca_cert: Path


@pytest.fixture(scope="module")
def cluster(kube_apiserver, tmp_path_factory) -> Iterator[Cluster]:
    """A private API server with the mesh's CRDs and two Nodes."""
    state_dir = tmp_path_factory.mktemp("check-apiserver")
    port = free_port()
    process = start_process(
        "kube-apiserver.sh",
        [REPO / "scripts" / "kube-apiserver.sh", "run", state_dir, str(port), str(free_port()), str(free_port())],
        log_dir=state_dir,
    )
    with process:
        kubeconfig = state_dir / "kubeconfig"
        deadline = time.monotonic() + 90
        while not kubeconfig.exists():
            process.check_running()
            if time.monotonic() > deadline:
                raise ProcessError(f"kube-apiserver not ready in 90 s:\n{process.log_tail()}")
            time.sleep(0.1)
        with kubernetes.config.new_client_from_config(config_file=str(kubeconfig)) as api_client:
            for name in REQUIRED_CRDS:
                create_crd(api_client, name)
            core = kubernetes.client.CoreV1Api(api_client)
            for node in NODES:
                core.create_node({"metadata": {"name": node}})
            yield Cluster(kubeconfig, api_client, f"https://127.0.0.1:{port}", state_dir / "certs" / "apiserver.crt")


def create_crd(api_client: kubernetes.client.ApiClient, name: str) -> None:
    """A CRD with a permissive schema and a status subresource; returns once it is served."""
    plural, group = name.split(".", 1)
    kind = CRD_KINDS[plural]
    version = "v1alpha1" if group == "istiodlite.io" else "v1"
    schema = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    kubernetes.client.ApiextensionsV1Api(api_client).create_custom_resource_definition({
        # Groups under k8s.io are protected; Gateway API's own CRDs carry this annotation.
        "metadata": {"name": name, "annotations": {"api-approved.kubernetes.io": "https://github.com/kubernetes-sigs/gateway-api/pull/1538"}},
        "spec": {
            "group": group,
            "scope": "Cluster" if plural == "gatewayclasses" else "Namespaced",
            "names": {"kind": kind, "plural": plural},
            "versions": [{"name": version, "served": True, "storage": True, "schema": {"openAPIV3Schema": schema}, "subresources": {"status": {}}}],
        },
    })  # fmt: skip
    custom = kubernetes.client.CustomObjectsApi(api_client)
    deadline = time.monotonic() + 30
    while True:
        try:
            custom.list_cluster_custom_object(group, version, plural)
            return
        except ApiException as exc:
            if exc.status != 404 or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def ca_pem(valid_for: timedelta) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cluster.local")])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(hours=1)).not_valid_after(now + valid_for)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    return certificate.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class Install:
    """A good install in control-plane namespace `namespace`, with an app namespace `apps`."""

    cluster: Cluster
    namespace: str
    apps: str

    @property
    def core(self) -> kubernetes.client.CoreV1Api:
        return kubernetes.client.CoreV1Api(self.cluster.api_client)

    @property
    def apps_api(self) -> kubernetes.client.AppsV1Api:
        return kubernetes.client.AppsV1Api(self.cluster.api_client)

    @property
    def custom(self) -> kubernetes.client.CustomObjectsApi:
        return kubernetes.client.CustomObjectsApi(self.cluster.api_client)

    def put_ca_secret(self, valid_for: timedelta) -> None:
        pem = base64.b64encode(ca_pem(valid_for)).decode()
        body = {"metadata": {"name": "istio-ca-secret"}, "data": {"ca-cert.pem": pem, "root-cert.pem": pem}}
        try:
            self.core.replace_namespaced_secret("istio-ca-secret", self.namespace, body)
        except ApiException as exc:
            if exc.status != 404:
                raise
            self.core.create_namespaced_secret(self.namespace, body)

    def set_ztunnel_ready(self, ready: int) -> None:
        status = {"currentNumberScheduled": len(NODES), "desiredNumberScheduled": len(NODES), "numberMisscheduled": 0, "numberReady": ready}
        self.apps_api.patch_namespaced_daemon_set_status("ztunnel", self.namespace, {"status": status}, _content_type=MERGE)

    def set_istiod_available(self, available: bool) -> None:
        condition = {"type": "Available", "status": str(available), "reason": "MinimumReplicasAvailable" if available else "MinimumReplicasUnavailable",
                     "message": "Deployment has minimum availability." if available else "Deployment does not have minimum availability."}  # fmt: skip
        status = {"replicas": 1, "readyReplicas": int(available), "availableReplicas": int(available), "conditions": [condition]}
        self.apps_api.patch_namespaced_deployment_status("istiod", self.namespace, {"status": status}, _content_type=MERGE)


def _pod_template(app: str) -> dict:
    return {
        "selector": {"matchLabels": {"app": app}},
        "template": {"metadata": {"labels": {"app": app}}, "spec": {"containers": [{"name": app, "image": "ambient-mesh"}]}},
    }


@pytest.fixture
def install(cluster: Cluster) -> Iterator[Install]:
    suffix = uuid.uuid4().hex[:8]
    good = Install(cluster, f"cp-{suffix}", f"apps-{suffix}")
    good.core.create_namespace({"metadata": {"name": good.namespace}})
    good.core.create_namespace({"metadata": {"name": good.apps, "labels": {"istio.io/dataplane-mode": "ambient"}}})
    good.apps_api.create_namespaced_deployment(good.namespace, {"metadata": {"name": "istiod"}, "spec": {"replicas": 1, **_pod_template("istiod")}})
    good.set_istiod_available(True)
    good.apps_api.create_namespaced_daemon_set(good.namespace, {"metadata": {"name": "ztunnel"}, "spec": _pod_template("ztunnel")})
    good.set_ztunnel_ready(len(NODES))
    good.put_ca_secret(timedelta(days=3650))
    good.custom.create_namespaced_custom_object("istiodlite.io", "v1alpha1", good.apps, "waypoints", {
        "apiVersion": "istiodlite.io/v1alpha1", "kind": "Waypoint", "metadata": {"name": "waypoint"}, "spec": {"trafficType": "service"},
    })  # fmt: skip
    good.custom.patch_namespaced_custom_object_status("istiodlite.io", "v1alpha1", good.apps, "waypoints", "waypoint", {
        "status": {"conditions": [{"type": "Accepted", "status": "True"}, {"type": "Programmed", "status": "True"}]},
    })  # fmt: skip
    yield good
    # Namespaces stay Terminating without a controller-manager: delete their objects too,
    # so the next test's check sees only its own.
    good.custom.delete_namespaced_custom_object("istiodlite.io", "v1alpha1", good.apps, "waypoints", "waypoint")
    good.apps_api.delete_namespaced_deployment("istiod", good.namespace)
    good.apps_api.delete_namespaced_daemon_set("ztunnel", good.namespace)
    for namespace in (good.namespace, good.apps):
        good.core.delete_namespace(namespace)


def check(capsys, kubeconfig: Path, *args: str) -> tuple[int, str]:
    status = main(["check", "--kubeconfig", str(kubeconfig), *args])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    return status, captured.out


def failures(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("×")]


def test_a_good_install_passes(install: Install, capsys):
    status, out = check(capsys, install.cluster.kubeconfig, "-i", install.namespace)
    assert status == 0, out
    for line in (
        f"√ can query the Kubernetes API: {install.cluster.url}",
        "√ Kubernetes is at least v1.20: v1.20.2",
        f"√ the mesh's CRDs are installed and Established: {len(REQUIRED_CRDS)} CRDs",
        f"√ namespace {install.namespace} exists",
        "√ istiod Deployment is available: 1/1 replicas ready",
        f"√ ztunnel DaemonSet is ready on every node: {len(NODES)}/{len(NODES)} nodes",
        "√ root CA certificate is valid and not near expiry: expires ",
        "√ waypoints are programmed: 1 waypoints",
        "Status check results are √",
    ):
        assert line in out, out
    enrolled = next(line for line in out.splitlines() if "enrolled namespaces" in line)
    assert install.apps in enrolled and enrolled.startswith("√")


def test_ztunnel_short_of_a_node_is_named(install: Install, capsys):
    install.set_ztunnel_ready(len(NODES) - 1)
    status, out = check(capsys, install.cluster.kubeconfig, "-i", install.namespace)
    assert status == 1
    assert failures(out) == [
        f"× ztunnel DaemonSet is ready on every node: ready on {len(NODES) - 1} of {len(NODES)} nodes; "
        f"see `kubectl -n {install.namespace} get pods -l app=ztunnel -o wide`"
    ], out


def test_a_new_node_without_ztunnel_is_named(install: Install, capsys):
    core = install.core
    core.create_node({"metadata": {"name": "check-node-3"}})
    try:
        status, out = check(capsys, install.cluster.kubeconfig, "-i", install.namespace)
    finally:
        core.delete_node("check-node-3")
    assert status == 1
    assert [line.split(":")[0] for line in failures(out)] == ["× ztunnel DaemonSet is ready on every node"], out
    assert f"scheduled on {len(NODES)} of {len(NODES) + 1} nodes" in out


def test_missing_ca_secret_is_named(install: Install, capsys):
    install.core.delete_namespaced_secret("istio-ca-secret", install.namespace)
    status, out = check(capsys, install.cluster.kubeconfig, "-i", install.namespace)
    assert status == 1
    assert failures(out) == [
        f"× root CA certificate is valid and not near expiry: secret {install.namespace}/istio-ca-secret not found: "
        "istiod creates it on first start; check its logs"
    ], out


def test_ca_near_expiry_is_named_with_its_date(install: Install, capsys):
    install.put_ca_secret(timedelta(days=10))
    status, out = check(capsys, install.cluster.kubeconfig, "-i", install.namespace)
    assert status == 1
    [line] = failures(out)
    expires = (datetime.now(UTC) + timedelta(days=10)).strftime("%Y-%m-%d")
    assert line.startswith("× root CA certificate is valid and not near expiry: ")
    assert f"expires at {expires}" in line and "(under 30 days); rotate the root CA" in line


def test_istiod_not_available_is_named(install: Install, capsys):
    install.set_istiod_available(False)
    status, out = check(capsys, install.cluster.kubeconfig, "-i", install.namespace)
    assert status == 1
    [line] = failures(out)
    assert line.startswith("× istiod Deployment is available: 0/1 replicas available (Available=False: Deployment does not have minimum availability.)")


def test_a_missing_crd_is_named(install: Install, capsys):
    name = "httproutes.gateway.networking.k8s.io"
    kubernetes.client.ApiextensionsV1Api(install.cluster.api_client).delete_custom_resource_definition(name)
    try:
        status, out = check(capsys, install.cluster.kubeconfig, "-i", install.namespace)
    finally:
        _wait_crd_gone(install.cluster.api_client, name)
        create_crd(install.cluster.api_client, name)
    assert status == 1
    assert failures(out) == [
        f"× the mesh's CRDs are installed and Established: missing {name}; install with `ambientctl install | kubectl apply -f -`"
    ], out


def _wait_crd_gone(api_client: kubernetes.client.ApiClient, name: str) -> None:
    extensions = kubernetes.client.ApiextensionsV1Api(api_client)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            extensions.read_custom_resource_definition(name)
        except ApiException as exc:
            if exc.status == 404:
                return
            raise
        time.sleep(0.1)
    raise AssertionError(f"CRD {name} was not deleted within 30 s")


def test_an_unprogrammed_waypoint_is_named(install: Install, capsys):
    install.custom.patch_namespaced_custom_object_status("istiodlite.io", "v1alpha1", install.apps, "waypoints", "waypoint", {
        "status": {"conditions": [{"type": "Programmed", "status": "False", "reason": "Invalid", "message": "spec.trafficType: unknown value"}]},
    })  # fmt: skip
    status, out = check(capsys, install.cluster.kubeconfig, "-i", install.namespace)
    assert status == 1
    assert failures(out) == [
        f"× waypoints are programmed: 1 of 1 not programmed: {install.apps}/waypoint (Invalid: spec.trafficType: unknown value)"
    ], out


def test_a_namespace_that_is_not_there_fails_without_a_traceback(cluster: Cluster, capsys):
    status, out = check(capsys, cluster.kubeconfig, "-i", "not-installed")
    assert status == 1
    assert "× namespace not-installed exists: not found; install with `ambientctl install | kubectl apply -f -` (or pass -i NAMESPACE)" in out


def test_pre_passes_on_a_fresh_namespace_and_names_an_existing_install(install: Install, capsys):
    status, out = check(capsys, install.cluster.kubeconfig, "--pre", "-i", f"fresh-{uuid.uuid4().hex[:6]}")
    assert status == 0, out
    for line in ("√ can create CustomResourceDefinitions", "√ can create ClusterRoles", "√ can create ClusterRoleBindings"):
        assert line in out
    status, out = check(capsys, install.cluster.kubeconfig, "--pre", "-i", install.namespace)
    assert status == 1
    assert failures(out) == [
        f"× namespace {install.namespace} holds none of the mesh's objects: it has deployment istiod, daemonset ztunnel, "
        "secret istio-ca-secret: the mesh is already installed; run `ambientctl check` instead, or uninstall first"
    ], out


def test_a_user_without_permissions_gets_failed_lines(install: Install, tmp_path: Path, capsys):
    """--pre says the user may not install; the full check says what it may not read."""
    core = install.core
    core.create_namespaced_service_account(install.apps, {"metadata": {"name": "nobody"}})
    token = core.create_namespaced_service_account_token("nobody", install.apps, {"spec": {"expirationSeconds": 600}}).status.token
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(f"""\
apiVersion: v1
kind: Config
clusters: [{{name: c, cluster: {{server: "{install.cluster.url}", certificate-authority: "{install.cluster.ca_cert}"}}}}]
users: [{{name: nobody, user: {{token: "{token}"}}}}]
contexts: [{{name: nobody, context: {{cluster: c, user: nobody}}}}]
current-context: nobody
""")
    status, out = check(capsys, kubeconfig, "--pre", "-i", install.namespace)
    assert status == 1
    assert "× can create CustomResourceDefinitions: " in out and "install needs a cluster admin" in out
    status, out = check(capsys, kubeconfig, "-i", install.namespace)
    assert status == 1
    assert "× the mesh's CRDs are installed and Established: forbidden: " in out
    assert f"× namespace {install.namespace} exists: forbidden: " in out
