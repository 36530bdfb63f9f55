"""A real kube-apiserver -> istiod_lite (kube source, out of cluster with a kubeconfig) ->
delta xDS -> what a connected ztunnel holds in its state store."""

from __future__ import annotations

import functools
import ipaddress
import random

import kubernetes
import trio
from envoy.config.core.v3 import base_pb2

from istiod_lite.app import IstiodLite
from istiod_lite.config import IstiodConfig, Ports
from meshcore.xds.client import DeltaXdsClient
from meshcore.xds.types import ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL
from ztunnel.state.model import PolicyAction, TunnelProtocol
from ztunnel.state.store import StateStore
from ztunnel.state.xds import XdsStateHandler


async def call(fn, *args, **kwargs):
    return await trio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))


async def wait_for(predicate, timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.05)


async def test_pods_services_and_policies_reach_a_connected_ztunnel(kube_apiserver, kube_namespace, tmp_path, nursery):
    ns = kube_namespace
    core = kubernetes.client.CoreV1Api(kube_apiserver.api_client)
    objects = kubernetes.client.CustomObjectsApi(kube_apiserver.api_client)
    address = f"127.{random.randint(20, 250)}.{random.randint(0, 255)}.5"
    istiod = IstiodLite(IstiodConfig(
        source="kube", kubeconfig=kube_apiserver.kubeconfig, root_dir=tmp_path / "istiod",
        root_namespace=ns,  # istiod's namespace too: its CA Secret goes there
        listen_address=address, ports=Ports(xds_plaintext=15010, xds_tls=0, monitoring=0),
    ))
    await nursery.start(istiod.run)

    store = StateStore()
    client = DeltaXdsClient(
        f"{address}:15010",
        node=base_pb2.Node(id="ztunnel~127.0.0.1~ztunnel-a.istio-system~istio-system.svc.cluster.local"),
        type_urls=(ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL),
        handler=XdsStateHandler(store),
    )
    nursery.start_soon(client.run)
    with trio.fail_after(20):
        await client.wait_synced()

    # A pod as the API server has it once a kubelet reported it running.
    await call(core.create_namespaced_pod, ns, {
        "metadata": {"name": "web-1", "labels": {"app": "web"}},
        "spec": {"nodeName": "node-a", "serviceAccountName": "web",
                 "containers": [{"name": "web", "image": "web", "ports": [{"containerPort": 8080, "name": "http"}]}]},
    })
    await call(core.patch_namespaced_pod_status, "web-1", ns, {"status": {
        "phase": "Running", "podIP": "10.244.1.7", "podIPs": [{"ip": "10.244.1.7"}],
        "conditions": [{"type": "Ready", "status": "True"}],
    }})
    await call(core.create_namespaced_service, ns, {
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": "http"}]},
    })
    uid = f"Kubernetes//Pod/{ns}/web-1"
    host = f"web.{ns}.svc.cluster.local"
    await wait_for(lambda: (w := store.current.workload_by_uid(uid)) is not None and w.services)

    workload = store.current.workload_by_uid(uid)
    assert workload.addresses == (ipaddress.ip_address("10.244.1.7"),)
    assert workload.node == "node-a"
    assert workload.identity.uri == f"spiffe://cluster.local/ns/{ns}/sa/web"
    assert workload.tunnel_protocol is TunnelProtocol.HBONE  # the namespace is labelled ambient
    [(service_key, ports)] = workload.services
    assert service_key == f"{ns}/{host}" and ports[0].target_port == 8080  # named port resolved
    service = store.current.service_by_key(f"{ns}/{host}")
    assert service is not None and service.ports[0].service_port == 80

    await call(objects.create_namespaced_custom_object, "security.istio.io", "v1", ns, "authorizationpolicies", {
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny-others"},
        "spec": {"action": "DENY", "rules": [{"from": [{"source": {"notNamespaces": [ns]}}]}]},
    })
    # Only this namespace's: other tests share the API server and may leave policies behind.
    await wait_for(lambda: [p for p in store.current.policies if p.namespace == ns])
    [policy] = [p for p in store.current.policies if p.namespace == ns]
    assert (policy.name, policy.namespace, policy.action) == ("deny-others", ns, PolicyAction.DENY)

    # The pod goes away: the ztunnel loses the workload.
    await call(core.delete_namespaced_pod, "web-1", ns, grace_period_seconds=0)
    await wait_for(lambda: store.current.workload_by_uid(uid) is None)
