"""The waypoint controller against the real kube-apiserver: a Waypoint (or an istio-waypoint
Gateway) becomes an owned ServiceAccount, Service and Deployment with status; edits are
undone; the objects go with their owner; an invalid spec gets a condition, not retries.
Runs with the admin kubeconfig and with the least-privilege ServiceAccount (conftest.py)."""

from __future__ import annotations

import functools

import kubernetes
import trio
from kubernetes.client.exceptions import ApiException

WAYPOINTS = ("istiodlite.io", "v1alpha1", "waypoints")
GATEWAYS = ("gateway.networking.k8s.io", "v1", "gateways")


async def call(fn, *args, **kwargs):
    return await trio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))


async def eventually(read, check, timeout: float = 15.0):
    """Polls `read()` (blocking, in a thread) until `check(value)` holds; returns the value."""
    with trio.fail_after(timeout):
        while True:
            value = await call(read)
            if check(value):
                return value
            await trio.sleep(0.1)


def read_or_none(fn, *args):
    try:
        return fn(*args)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def conditions(obj) -> dict:
    return {c["type"]: c for c in (obj.get("status") or {}).get("conditions") or []}


def writes(istiod, verb: str, kind: str) -> float:
    value = istiod.registry.get_sample_value("istiod_lite_waypoint_writes_total", {"verb": verb, "kind": kind})
    return value or 0.0


async def test_a_waypoint_is_deployed_kept_in_sync_and_removed_with_it(istiod_factory, kube_apiserver, kube_namespace, nursery):
    ns = kube_namespace
    admin = kube_apiserver.api_client
    core, apps = kubernetes.client.CoreV1Api(admin), kubernetes.client.AppsV1Api(admin)
    custom = kubernetes.client.CustomObjectsApi(admin)
    istiod = istiod_factory(waypoint_image="registry.example/ambient-mesh:test")
    await nursery.start(istiod.run)

    waypoint = await call(custom.create_namespaced_custom_object, *WAYPOINTS[:2], ns, WAYPOINTS[2], {
        "apiVersion": "istiodlite.io/v1alpha1", "kind": "Waypoint",
        "metadata": {"name": "wp"}, "spec": {"trafficType": "service", "replicas": 2},
    })
    uid = waypoint["metadata"]["uid"]

    def read_waypoint():
        return custom.get_namespaced_custom_object(*WAYPOINTS[:2], ns, WAYPOINTS[2], "wp")

    programmed = await eventually(read_waypoint, lambda w: conditions(w).get("Programmed", {}).get("status") == "True")
    service = await call(core.read_namespaced_service, "wp", ns)
    deployment = await call(apps.read_namespaced_deployment, "wp", ns)
    account = await call(core.read_namespaced_service_account, "wp", ns)
    for obj in (service, deployment, account):
        [owner] = obj.metadata.owner_references
        assert (owner.kind, owner.name, owner.uid, owner.controller, owner.block_owner_deletion) == ("Waypoint", "wp", uid, True, True)
        assert obj.metadata.labels["gateway.networking.k8s.io/gateway-name"] == "wp"
    assert [(p.name, p.port, p.app_protocol) for p in service.spec.ports] == [("mesh", 15008, "hbone")]
    assert deployment.spec.replicas == 2
    assert deployment.spec.template.metadata.labels["istio.io/dataplane-mode"] == "none"
    assert deployment.spec.template.spec.containers[0].image == "registry.example/ambient-mesh:test"
    status = programmed["status"]
    assert status["addresses"] == [{"type": "IPAddress", "value": service.spec.cluster_ip}]
    assert conditions(programmed)["Accepted"]["status"] == "True"
    assert conditions(programmed)["Accepted"]["observedGeneration"] == programmed["metadata"]["generation"]

    # A spec change reaches the Deployment; someone's edit of it is undone.
    await call(custom.patch_namespaced_custom_object, *WAYPOINTS[:2], ns, WAYPOINTS[2], "wp", {"spec": {"replicas": 3}})
    await eventually(lambda: apps.read_namespaced_deployment("wp", ns), lambda d: d.spec.replicas == 3)
    await call(apps.patch_namespaced_deployment, "wp", ns, {"spec": {"replicas": 0, "template": {"spec": {"containers": [
        {"name": "waypoint", "image": "someone/else:latest"}]}}}}, _content_type="application/strategic-merge-patch+json")
    await eventually(
        lambda: apps.read_namespaced_deployment("wp", ns),
        lambda d: d.spec.replicas == 3 and d.spec.template.spec.containers[0].image == "registry.example/ambient-mesh:test",
    )
    # Deleted by someone: created again.
    await call(apps.delete_namespaced_deployment, "wp", ns)
    await eventually(lambda: read_or_none(apps.read_namespaced_deployment, "wp", ns), lambda d: d is not None)

    # Settled: events of our own writes plan no more writes.
    await trio.sleep(1.0)
    settled = {kind: writes(istiod, "apply", kind) for kind in ("Deployment", "Service", "ServiceAccount")}
    status_writes = writes(istiod, "status", "Waypoint")
    await call(core.patch_namespaced_service, "wp", ns, {"metadata": {"annotations": {"note": "touched"}}})
    await trio.sleep(1.0)
    assert {kind: writes(istiod, "apply", kind) for kind in settled} == settled
    assert writes(istiod, "status", "Waypoint") == status_writes

    # The owner goes: so do its objects (the test API server has no garbage collector).
    await call(custom.delete_namespaced_custom_object, *WAYPOINTS[:2], ns, WAYPOINTS[2], "wp")
    for read in (core.read_namespaced_service, core.read_namespaced_service_account, apps.read_namespaced_deployment):
        await eventually(functools.partial(read_or_none, read, "wp", ns), lambda obj: obj is None)


async def test_an_invalid_waypoint_gets_a_condition_naming_the_field_once(istiod_factory, kube_apiserver, kube_namespace, nursery):
    ns = kube_namespace
    admin = kube_apiserver.api_client
    apps = kubernetes.client.AppsV1Api(admin)
    custom = kubernetes.client.CustomObjectsApi(admin)
    istiod = istiod_factory()
    await nursery.start(istiod.run)
    # The CRD's schema lets this name through; a Service cannot have it.
    await call(custom.create_namespaced_custom_object, *WAYPOINTS[:2], ns, WAYPOINTS[2], {
        "apiVersion": "istiodlite.io/v1alpha1", "kind": "Waypoint", "metadata": {"name": "1st-waypoint"}, "spec": {},
    })
    rejected = await eventually(
        lambda: custom.get_namespaced_custom_object(*WAYPOINTS[:2], ns, WAYPOINTS[2], "1st-waypoint"),
        lambda w: "Accepted" in conditions(w),
    )
    accepted = conditions(rejected)["Accepted"]
    assert (accepted["status"], accepted["reason"]) == ("False", "Invalid")
    assert accepted["message"].startswith("metadata.name: '1st-waypoint' cannot name the waypoint's Service")
    assert conditions(rejected)["Programmed"]["status"] == "False"
    # No crash loop, no retry storm: one status write, nothing deployed, nothing failing.
    await trio.sleep(1.5)
    assert writes(istiod, "status", "Waypoint") == 1
    assert (istiod.registry.get_sample_value("istiod_lite_waypoint_reconcile_errors_total") or 0) == 0
    assert await call(read_or_none, apps.read_namespaced_deployment, "1st-waypoint", ns) is None
    await call(custom.delete_namespaced_custom_object, *WAYPOINTS[:2], ns, WAYPOINTS[2], "1st-waypoint")


async def test_an_istio_waypoint_gateway_is_deployed_too(istiod_factory, kube_apiserver, kube_namespace, nursery):
    ns = kube_namespace
    admin = kube_apiserver.api_client
    core = kubernetes.client.CoreV1Api(admin)
    custom = kubernetes.client.CustomObjectsApi(admin)
    istiod = istiod_factory()
    await nursery.start(istiod.run)
    await call(custom.create_namespaced_custom_object, *GATEWAYS[:2], ns, GATEWAYS[2], {
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "metadata": {"name": "waypoint", "labels": {"istio.io/waypoint-for": "service"}},
        "spec": {"gatewayClassName": "istio-waypoint", "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]},
    })
    gateway = await eventually(
        lambda: custom.get_namespaced_custom_object(*GATEWAYS[:2], ns, GATEWAYS[2], "waypoint"),
        lambda g: conditions(g).get("Programmed", {}).get("status") == "True",
    )
    service = await call(core.read_namespaced_service, "waypoint", ns)
    assert service.metadata.owner_references[0].kind == "Gateway"
    assert gateway["status"]["addresses"] == [{"type": "IPAddress", "value": service.spec.cluster_ip}]

    await call(custom.delete_namespaced_custom_object, *GATEWAYS[:2], ns, GATEWAYS[2], "waypoint")
    await eventually(functools.partial(read_or_none, core.read_namespaced_service, "waypoint", ns), lambda obj: obj is None)
