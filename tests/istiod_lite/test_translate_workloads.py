"""Pods, Namespaces and Services -> Workload and Service resources (ambient-facts §4, §6)."""

from __future__ import annotations

from typing import Any

import pytest

from istiod_lite.model import TranslationError, Translator
from istiod_lite.sources.base import ObjectEvent
from meshcore._gen import workload_pb2
from meshcore.xds.types import ADDRESS_TYPE_URL

W = workload_pb2

# --- Helpers ---


def pod_obj(
    *,
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    ip: str | None = "10.1.0.5",
    ips: list[str] | None = None,
    node: str = "node-a",
    service_account: str | None = None,
    phase: str = "Running",
    ready: bool = True,
    owners: list[dict[str, Any]] | None = None,
    host_network: bool = False,
    container_ports: dict[str, int] | None = None,
    deleting: bool = False,
) -> dict[str, Any]:
    meta: dict[str, Any] = {"labels": labels or {}, "annotations": annotations or {}}
    if owners is not None:
        meta["ownerReferences"] = owners
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    spec: dict[str, Any] = {
        "nodeName": node,
        "hostNetwork": host_network,
        "containers": [
            {
                "name": "app",
                "ports": [
                    {"name": n, "containerPort": p} for n, p in (container_ports or {}).items()
                ],
            }
        ],
    }
    if service_account is not None:
        spec["serviceAccountName"] = service_account
    status: dict[str, Any] = {
        "phase": phase,
        "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
    }
    if ip is not None:
        status["podIP"] = ip
    if ips is not None:
        status["podIPs"] = [{"ip": i} for i in ips]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec, "status": status}


def service_obj(
    selector: dict[str, str] | None, ports: list[dict[str, Any]], **spec: Any
) -> dict[str, Any]:
    return {"spec": {"selector": selector, "ports": ports, "clusterIP": "10.96.0.10", **spec}}


def upsert(t: Translator, kind: str, namespace: str, name: str, obj: dict[str, Any]) -> None:
    t.apply(ObjectEvent(kind, "upsert", namespace, name, obj))


def translator_with(*objects: tuple[str, str, str, dict[str, Any]], **kwargs: Any) -> Translator:
    t = Translator(**kwargs)
    for kind, namespace, name, obj in objects:
        upsert(t, kind, namespace, name, obj)
    return t


def ambient_namespace(name: str = "shop") -> tuple[str, str, str, dict[str, Any]]:
    return ("Namespace", "", name, {"metadata": {"labels": {"istio.io/dataplane-mode": "ambient"}}})


def workload(t: Translator, namespace: str = "shop", name: str = "web-0") -> W.Workload | None:
    address = t.resources()[ADDRESS_TYPE_URL].get(f"Kubernetes//Pod/{namespace}/{name}")
    return address.workload if address is not None else None


def service(t: Translator, namespace: str, name: str) -> W.Service | None:
    address = t.resources()[ADDRESS_TYPE_URL].get(
        f"{namespace}/{name}.{namespace}.svc.cluster.local"
    )
    return address.service if address is not None else None


# --- Workload fields ---


def test_workload_carries_pod_identity_and_placement() -> None:
    t = translator_with(
        ("Pod", "shop", "web-0", pod_obj(service_account="web", node="node-b")),
        trust_domain="example.org",
    )
    w = workload(t)
    assert w is not None
    assert (w.uid, w.name, w.namespace) == ("Kubernetes//Pod/shop/web-0", "web-0", "shop")
    assert (w.node, w.service_account, w.trust_domain, w.cluster_id) == (
        "node-b",
        "web",
        "example.org",
        "Kubernetes",
    )
    assert list(w.addresses) == [bytes([10, 1, 0, 5])]


def test_service_account_defaults_to_default() -> None:
    w = workload(translator_with(("Pod", "shop", "web-0", pod_obj())))
    assert w is not None and w.service_account == "default"


def test_dual_stack_pod_ips_become_both_addresses() -> None:
    w = workload(
        translator_with(
            ("Pod", "shop", "web-0", pod_obj(ip="10.1.0.5", ips=["10.1.0.5", "fd00::5"]))
        )
    )
    assert w is not None
    assert [len(a) for a in w.addresses] == [4, 16]


@pytest.mark.parametrize(
    ("namespace_mode", "pod_labels", "annotations", "host_network", "expected"),
    [
        ("ambient", {}, {}, False, W.TunnelProtocol.HBONE),
        (None, {"istio.io/dataplane-mode": "ambient"}, {}, False, W.TunnelProtocol.HBONE),
        ("ambient", {"istio.io/dataplane-mode": "none"}, {}, False, W.TunnelProtocol.NONE),
        ("ambient", {}, {"sidecar.istio.io/status": "{}"}, False, W.TunnelProtocol.NONE),
        ("ambient", {}, {}, True, W.TunnelProtocol.NONE),
        (None, {}, {}, False, W.TunnelProtocol.NONE),
        ("none", {}, {}, False, W.TunnelProtocol.NONE),
    ],
    ids=[
        "ns-ambient",
        "pod-ambient",
        "pod-opts-out",
        "sidecar",
        "host-network",
        "not-enrolled",
        "ns-none",
    ],
)
def test_enrollment_decides_hbone(
    namespace_mode: str | None,
    pod_labels: dict[str, str],
    annotations: dict[str, str],
    host_network: bool,
    expected: int,
) -> None:
    objects = []
    if namespace_mode is not None:
        objects.append(
            (
                "Namespace",
                "",
                "shop",
                {"metadata": {"labels": {"istio.io/dataplane-mode": namespace_mode}}},
            )
        )
    objects.append(
        (
            "Pod",
            "shop",
            "web-0",
            pod_obj(labels=pod_labels, annotations=annotations, host_network=host_network),
        )
    )
    w = workload(translator_with(*objects))
    assert w is not None and w.tunnel_protocol == expected


def test_host_network_pod_is_marked_host_network() -> None:
    w = workload(translator_with(("Pod", "shop", "web-0", pod_obj(host_network=True))))
    assert w is not None and w.network_mode == W.NetworkMode.HOST_NETWORK


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        (
            {
                "service.istio.io/canonical-name": "a",
                "app.kubernetes.io/name": "b",
                "app": "c",
                "service.istio.io/canonical-revision": "r1",
                "app.kubernetes.io/version": "r2",
                "version": "r3",
            },
            ("a", "r1"),
        ),
        (
            {
                "app.kubernetes.io/name": "b",
                "app": "c",
                "app.kubernetes.io/version": "r2",
                "version": "r3",
            },
            ("b", "r2"),
        ),
        ({"app": "c", "version": "r3"}, ("c", "r3")),
        ({}, ("web-0", "latest")),
    ],
    ids=["istio-labels", "k8s-labels", "app-version", "fallback"],
)
def test_canonical_name_and_revision(labels: dict[str, str], expected: tuple[str, str]) -> None:
    w = workload(translator_with(("Pod", "shop", "web-0", pod_obj(labels=labels))))
    assert w is not None and (w.canonical_name, w.canonical_revision) == expected


def owner(kind: str, name: str, controller: bool = True) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": kind,
        "name": name,
        "uid": "x",
        "controller": controller,
    }


@pytest.mark.parametrize(
    ("owners", "labels", "expected"),
    [
        (
            [owner("ReplicaSet", "web-7d9f8c6b5")],
            {"pod-template-hash": "7d9f8c6b5"},
            ("web", W.WorkloadType.DEPLOYMENT),
        ),
        ([owner("ReplicaSet", "api-v2-5f6d")], {}, ("api-v2", W.WorkloadType.DEPLOYMENT)),
        ([owner("Job", "migrate")], {}, ("migrate", W.WorkloadType.JOB)),
        ([owner("Job", "backup-28391520")], {}, ("backup", W.WorkloadType.CRONJOB)),
        ([owner("StatefulSet", "db")], {}, ("db", W.WorkloadType.POD)),
        ([], {}, ("web-0", W.WorkloadType.POD)),
        (
            [owner("Node", "n1", controller=False), owner("Job", "migrate")],
            {},
            ("migrate", W.WorkloadType.JOB),
        ),
    ],
    ids=[
        "deployment",
        "deployment-no-hash-label",
        "job",
        "cronjob",
        "statefulset",
        "bare-pod",
        "controller-wins",
    ],
)
def test_workload_name_and_type_from_owner(
    owners: list[dict[str, Any]], labels: dict[str, str], expected: tuple[str, int]
) -> None:
    w = workload(translator_with(("Pod", "shop", "web-0", pod_obj(owners=owners, labels=labels))))
    assert w is not None and (w.workload_name, w.workload_type) == expected
    assert w.canonical_name == expected[0]  # the canonical name falls back to the workload name


@pytest.mark.parametrize(
    ("phase", "ready", "expected"),
    [
        ("Running", True, W.WorkloadStatus.HEALTHY),
        ("Running", False, W.WorkloadStatus.UNHEALTHY),
        ("Pending", False, W.WorkloadStatus.UNHEALTHY),
        ("Pending", True, W.WorkloadStatus.UNHEALTHY),
    ],
)
def test_status_healthy_only_when_running_and_ready(phase: str, ready: bool, expected: int) -> None:
    w = workload(translator_with(("Pod", "shop", "web-0", pod_obj(phase=phase, ready=ready))))
    assert w is not None and w.status == expected


@pytest.mark.parametrize(
    "pod",
    [
        pod_obj(ip=None),
        pod_obj(deleting=True),
        pod_obj(phase="Succeeded"),
        pod_obj(phase="Failed"),
    ],
    ids=["no-ip-yet", "terminating", "succeeded", "failed"],
)
def test_pods_without_a_usable_ip_have_no_workload(pod: dict[str, Any]) -> None:
    assert workload(translator_with(("Pod", "shop", "web-0", pod))) is None


def test_terminating_pod_workload_is_removed() -> None:
    t = translator_with(("Pod", "shop", "web-0", pod_obj()))
    delta = t.apply(ObjectEvent("Pod", "upsert", "shop", "web-0", pod_obj(deleting=True)))
    assert delta[ADDRESS_TYPE_URL].removals == {"Kubernetes//Pod/shop/web-0"}


# --- Services and the workloads' services map ---

WEB_PORTS = [
    {"name": "http", "port": 80, "targetPort": 8080},
    {"name": "grpc", "port": 9090, "targetPort": "grpc-port"},
    {"name": "admin", "port": 9901, "targetPort": "missing"},
    {"name": "tcp-raw", "port": 7000},
]


def test_selected_pod_lists_service_with_resolved_ports() -> None:
    t = translator_with(
        (
            "Pod",
            "shop",
            "web-0",
            pod_obj(labels={"app": "web", "tier": "front"}, container_ports={"grpc-port": 50051}),
        ),
        ("Service", "shop", "web", service_obj({"app": "web"}, WEB_PORTS)),
    )
    w = workload(t)
    assert w is not None and list(w.services) == ["shop/web.shop.svc.cluster.local"]
    ports = [
        (p.service_port, p.target_port) for p in w.services["shop/web.shop.svc.cluster.local"].ports
    ]
    # numeric target; named target resolved on this pod; unresolvable name left out;
    # no target = the port itself
    assert ports == [(80, 8080), (9090, 50051), (7000, 7000)]


@pytest.mark.parametrize(
    ("namespace", "selector", "spec"),
    [
        ("shop", {"app": "api"}, {}),
        ("other", {"app": "web"}, {}),
        ("shop", None, {}),
        ("shop", {"app": "web"}, {"type": "ExternalName", "externalName": "example.com"}),
    ],
    ids=["labels-differ", "other-namespace", "no-selector", "external-name"],
)
def test_services_not_selecting_the_pod_are_not_listed(
    namespace: str, selector: dict[str, str] | None, spec: dict[str, Any]
) -> None:
    t = translator_with(
        ("Pod", "shop", "web-0", pod_obj(labels={"app": "web"})),
        ("Service", namespace, "svc", service_obj(selector, WEB_PORTS, **spec)),
    )
    w = workload(t)
    assert w is not None and dict(w.services) == {}


def test_service_resource_fields() -> None:
    t = translator_with(("Service", "shop", "web", service_obj({"app": "web"}, WEB_PORTS)))
    s = service(t, "shop", "web")
    assert s is not None
    assert (s.name, s.namespace, s.hostname) == ("web", "shop", "web.shop.svc.cluster.local")
    assert [(a.network, a.address) for a in s.addresses] == [("", bytes([10, 96, 0, 10]))]
    assert [(p.service_port, p.target_port) for p in s.ports] == [
        (80, 8080),
        (9090, 0),
        (9901, 0),
        (7000, 7000),
    ]


def test_dual_stack_and_headless_service_addresses() -> None:
    t = translator_with(
        (
            "Service",
            "shop",
            "dual",
            service_obj({"app": "web"}, WEB_PORTS, clusterIPs=["10.96.0.11", "fd00::11"]),
        ),
        ("Service", "shop", "headless", service_obj({"app": "web"}, WEB_PORTS, clusterIP="None")),
    )
    dual, headless = service(t, "shop", "dual"), service(t, "shop", "headless")
    assert dual is not None and [len(a.address) for a in dual.addresses] == [4, 16]
    assert headless is not None and list(headless.addresses) == []


def test_external_name_service_has_no_resource() -> None:
    t = translator_with(
        ("Service", "shop", "ext", service_obj(None, WEB_PORTS, type="ExternalName"))
    )
    assert service(t, "shop", "ext") is None


@pytest.mark.parametrize(
    ("port", "expected"),
    [
        ({"name": "http", "port": 80}, W.AppProtocol.HTTP11),
        ({"name": "http-web", "port": 80}, W.AppProtocol.HTTP11),
        ({"name": "http2", "port": 80}, W.AppProtocol.HTTP2),
        ({"name": "grpc-api", "port": 80}, W.AppProtocol.GRPC),
        ({"name": "tcp-db", "port": 80}, W.AppProtocol.TCP),
        ({"name": "tls", "port": 80}, W.AppProtocol.TLS),
        ({"name": "web", "port": 80}, W.AppProtocol.UNKNOWN),
        ({"name": "web", "port": 80, "appProtocol": "grpc"}, W.AppProtocol.GRPC),
        ({"name": "tcp", "port": 80, "appProtocol": "HTTP"}, W.AppProtocol.HTTP11),
        ({"name": "web", "port": 80, "appProtocol": "kubernetes.io/h2c"}, W.AppProtocol.HTTP2),
        ({"name": "grpc", "port": 80, "appProtocol": "example.com/custom"}, W.AppProtocol.GRPC),
    ],
)
def test_app_protocol_from_app_protocol_or_port_name(port: dict[str, Any], expected: int) -> None:
    s = service(
        translator_with(("Service", "shop", "web", service_obj({"app": "web"}, [port]))),
        "shop",
        "web",
    )
    assert s is not None and s.ports[0].app_protocol == expected


# --- Rejected objects ---


@pytest.mark.parametrize(
    ("kind", "obj", "field"),
    [
        ("Pod", pod_obj(ip="10.1.0.500"), "status.podIP"),
        ("Pod", pod_obj(ip=None, ips=["10.1.0.5", "bogus"]), "status.podIPs[1].ip"),
        ("Pod", {**pod_obj(), "metadata": {"labels": {"version": 2}}}, "metadata.labels.version"),
        ("Pod", pod_obj(service_account="bad/name"), "spec.serviceAccountName"),
        ("Pod", {"spec": "not a mapping"}, "spec"),
        ("Service", service_obj({"app": "web"}, WEB_PORTS, clusterIP="10.96.0"), "spec.clusterIP"),
        ("Service", service_obj({"app": "web"}, [{"port": 70000}]), "spec.ports[0].port"),
        (
            "Service",
            service_obj({"app": "web"}, [{"port": 80, "targetPort": 0}]),
            "spec.ports[0].targetPort",
        ),
    ],
)
def test_malformed_objects_are_rejected_naming_the_field(
    kind: str, obj: dict[str, Any], field: str
) -> None:
    t = translator_with((kind, "shop", "web-0", obj))
    [error] = t.errors()
    assert isinstance(error, TranslationError)
    assert (error.kind, error.namespace, error.name, error.field) == (kind, "shop", "web-0", field)
    assert field in str(error)
    assert t.resources()[ADDRESS_TYPE_URL] == {}
