"""TokenReview-based CA authorization against the real kube-apiserver: a real CSR over gRPC
(TLS, port 15012) to istiod_lite's CA, authenticated by projected ServiceAccount tokens.

ztunnel's token (audience istio-ca, bound to its pod) gets certificates for the pods on its
node; a token for another audience, another ServiceAccount's token, garbage, or an identity
of a pod on another node are refused with a clear gRPC status. Runs with istiod_lite's admin
kubeconfig and with its least-privilege in-cluster ServiceAccount (conftest.py)."""

from __future__ import annotations

import functools
import random

import grpc
import kubernetes
import pytest
import trio

from istiod_lite.config import Ports
from meshcore.identity.caclient import CaRequestError, RemoteCaProvider
from meshcore.identity.spiffe import Identity


async def call(fn, *args, **kwargs):
    return await trio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))


def create_pod(core, ns: str, name: str, account: str, node: str):
    return core.create_namespaced_pod(ns, {
        "metadata": {"name": name},
        "spec": {"nodeName": node, "serviceAccountName": account, "containers": [{"name": "app", "image": "app"}]},
    })


def pod_token(core, ns: str, account: str, pod, audience: str = "istio-ca") -> str:
    """A projected token as the kubelet mounts it: for `audience`, bound to `pod`."""
    return core.create_namespaced_service_account_token(account, ns, {"spec": {
        "audiences": [audience],
        "expirationSeconds": 3600,
        "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": pod.metadata.name, "uid": pod.metadata.uid},
    }}).status.token


@pytest.fixture
async def cluster(istiod_factory, kube_apiserver, kube_namespace, nursery):
    """istiod_lite serving the CA on 15012; ztunnel's pod on node-a; pods web (node-a), db (node-b)."""
    ns = kube_namespace
    core = kubernetes.client.CoreV1Api(kube_apiserver.api_client)
    for account in ("ztunnel", "web", "db"):
        await call(core.create_namespaced_service_account, ns, {"metadata": {"name": account}})
    pods = {
        name: await call(create_pod, core, ns, name, account, node)
        for name, account, node in (("ztunnel-a", "ztunnel", "node-a"), ("web-1", "web", "node-a"), ("db-1", "db", "node-b"))
    }
    address = f"127.{random.randint(20, 250)}.{random.randint(0, 255)}.12"
    istiod = istiod_factory(listen_address=address, ports=Ports(xds_plaintext=0, xds_tls=15012, monitoring=0))
    await nursery.start(istiod.run)
    providers = []

    def ca(token: str) -> RemoteCaProvider:
        provider = RemoteCaProvider(f"{address}:15012", root_pem=istiod.root_pem, token=lambda: token)
        providers.append(provider)
        return provider

    yield ns, core, pods, ca
    for provider in providers:
        provider.close()
    for name in pods:
        await call(core.delete_namespaced_pod, name, ns, grace_period_seconds=0)


async def test_ztunnel_token_gets_certificates_for_pods_on_its_node(cluster):
    ns, core, pods, ca = cluster
    token = await call(pod_token, core, ns, "ztunnel", pods["ztunnel-a"])
    web = Identity("cluster.local", ns, "web")
    with trio.fail_after(15):
        while True:  # until istiod_lite has seen web-1 scheduled on node-a
            try:
                certificate = await ca(token).fetch(web)
                break
            except CaRequestError as exc:
                assert exc.code is grpc.StatusCode.PERMISSION_DENIED, exc
                await trio.sleep(0.1)
    assert certificate.identity == web
    # Not for a pod on another node.
    with pytest.raises(CaRequestError) as refused:
        await ca(token).fetch(Identity("cluster.local", ns, "db"))
    assert refused.value.code is grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize(
    ("make_token", "code", "says"),
    [
        (lambda core, ns, pods: pod_token(core, ns, "ztunnel", pods["ztunnel-a"], audience="some-api"),
         grpc.StatusCode.UNAUTHENTICATED, "TokenReview rejected the token"),
        (lambda core, ns, pods: pod_token(core, ns, "db", pods["db-1"]),
         grpc.StatusCode.PERMISSION_DENIED, "may only obtain a certificate for its own identity"),
        (lambda core, ns, pods: "not-a-token", grpc.StatusCode.UNAUTHENTICATED, "TokenReview rejected the token"),
    ],
    ids=["wrong-audience", "another-serviceaccount", "garbage"],
)
async def test_other_tokens_are_refused(cluster, make_token, code, says):
    ns, core, pods, ca = cluster
    token = await call(make_token, core, ns, pods)
    with pytest.raises(CaRequestError) as refused:
        await ca(token).fetch(Identity("cluster.local", ns, "web"))
    assert refused.value.code is code
    assert says in refused.value.details


async def test_a_workload_token_gets_a_certificate_for_its_own_identity_only(cluster):
    """A waypoint (or any pod) asks for itself with its own ServiceAccount token, as in Istio."""
    ns, core, pods, ca = cluster
    token = await call(pod_token, core, ns, "web", pods["web-1"])
    web = Identity("cluster.local", ns, "web")
    certificate = await ca(token).fetch(web)
    assert certificate.identity == web
    with pytest.raises(CaRequestError) as refused:
        await ca(token).fetch(Identity("cluster.local", ns, "db"))
    assert refused.value.code is grpc.StatusCode.PERMISSION_DENIED
