"""Fixtures shared by every test folder.

A real kube-apiserver (v1.20.2) with etcd on loopback, shared by the whole test session.

`kube_apiserver` builds the binary once per machine (scripts/kube-apiserver.sh build, about
5 minutes the first time, cached under /var/cache/ambient-mesh), starts etcd and the API
server with a static admin token and a service-account key pair, installs the mesh's CRDs
(deploy/crds, what `ambientctl install` prints), and yields an admin `ApiClient` plus the kubeconfig. It skips, saying why, when
the binary is missing and cannot be built (not root, no package mirror) or etcd is missing.

There is no scheduler, kubelet or controller-manager: tests create Pods with `spec.nodeName`
set and patch their status themselves, and deleted namespaces stay Terminating. So every
test works in namespaces of its own (`kube_namespace`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import kubernetes.client
import kubernetes.config
import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from meshcore.testing.procs import ProcessError, free_port, start_process

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "kube-apiserver.sh"
CACHED_BINARY = Path("/var/cache/ambient-mesh/kube-v1.20.2/bin/kube-apiserver")
BUILD_TIMEOUT = 20 * 60
START_TIMEOUT = 90

# The CRDs `ambientctl install` prints: every kube test runs on the real schemas.
CRD_DIR = REPO / "deploy" / "crds"


@dataclass(frozen=True)
class KubeApiServer:
    """A running kube-apiserver and how to reach it as admin."""

    api_client: kubernetes.client.ApiClient
    kubeconfig: Path  # static admin token, CA = the server's self-signed certificate
    url: str  # https://127.0.0.1:<port>
    admin_token: str  # a static token of group system:masters
    ca_cert: Path  # the server's self-signed certificate
    etcd_url: str  # http://127.0.0.1:<port>, e.g. to compact etcd
    state_dir: Path  # logs (kube-apiserver.log, etcd.log), sa.key/sa.pub, certs/

    def client(
        self, url: str | None = None, *, token: str | None = None
    ) -> kubernetes.client.ApiClient:
        """A new client for `url` (default: the server; e.g. a proxy in front of it) that
        authenticates with `token` (default: the admin token)."""
        # Not from the kubeconfig: its loader's auth refresh hook resets `host` to the
        # kubeconfig's server before every request.
        configuration = kubernetes.client.Configuration()
        configuration.host = url or self.url
        configuration.ssl_ca_cert = str(self.ca_cert)
        configuration.api_key = {"authorization": f"Bearer {token or self.admin_token}"}
        return kubernetes.client.ApiClient(configuration)


def _ensure_built() -> None:
    if CACHED_BINARY.exists():
        return
    if os.geteuid() != 0:
        pytest.skip(f"kube-apiserver is not built and building needs root: sudo {SCRIPT} build")
    try:
        built = subprocess.run(
            [SCRIPT, "build"], capture_output=True, text=True, timeout=BUILD_TIMEOUT
        )
    except subprocess.TimeoutExpired:
        pytest.skip(f"building kube-apiserver took over {BUILD_TIMEOUT} s ({SCRIPT} build)")
    if built.returncode != 0:
        tail = "\n".join((built.stdout + built.stderr).splitlines()[-15:])
        pytest.skip(f"kube-apiserver could not be built ({SCRIPT} build):\n{tail}")


@pytest.fixture(scope="session")
def kube_apiserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeApiServer]:
    _ensure_built()
    if shutil.which("etcd") is None:
        pytest.skip("etcd is not installed (Debian etcd-server; scripts/setup.sh installs it)")
    state_dir = tmp_path_factory.mktemp("kube-apiserver")
    port, etcd_port, peer_port = free_port(), free_port(), free_port()
    process = start_process(
        "kube-apiserver.sh",
        [SCRIPT, "run", state_dir, str(port), str(etcd_port), str(peer_port)],
        log_dir=state_dir,
    )
    with process:
        kubeconfig = state_dir / "kubeconfig"
        deadline = time.monotonic() + START_TIMEOUT
        while not kubeconfig.exists():
            process.check_running()
            if time.monotonic() > deadline:
                message = f"kube-apiserver not ready in {START_TIMEOUT} s:\n{process.log_tail()}"
                raise ProcessError(message)
            time.sleep(0.1)
        api_client = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
        with api_client:
            _install_crds(api_client)
            yield KubeApiServer(
                api_client=api_client,
                kubeconfig=kubeconfig,
                url=f"https://127.0.0.1:{port}",
                admin_token=(state_dir / "tokens.csv").read_text().split(",", 1)[0],
                ca_cert=state_dir / "certs" / "apiserver.crt",
                etcd_url=f"http://127.0.0.1:{etcd_port}",
                state_dir=state_dir,
            )


@pytest.fixture
def kube_namespace(kube_apiserver: KubeApiServer) -> str:
    """A fresh namespace for one test (enrolled in the mesh: istio.io/dataplane-mode=ambient)."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    body = {"metadata": {"name": name, "labels": {"istio.io/dataplane-mode": "ambient"}}}
    kubernetes.client.CoreV1Api(kube_apiserver.api_client).create_namespace(body)
    return name


def _install_crds(api_client: kubernetes.client.ApiClient) -> None:
    extensions = kubernetes.client.ApiextensionsV1Api(api_client)
    crds = [yaml.safe_load(path.read_text()) for path in sorted(CRD_DIR.glob("*.yaml"))]
    for crd in crds:
        extensions.create_custom_resource_definition(crd)
    # Established = the API server serves the new resources.
    custom = kubernetes.client.CustomObjectsApi(api_client)
    deadline = time.monotonic() + 30
    for crd in crds:
        storage = next(v["name"] for v in crd["spec"]["versions"] if v["storage"])
        while True:
            try:
                custom.list_cluster_custom_object(crd["spec"]["group"], storage, crd["spec"]["names"]["plural"])
                break
            except ApiException as exc:
                if exc.status != 404 or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
