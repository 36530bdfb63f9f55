"""Services without the mesh: kube-proxy's endpoint choice and the kubelet's service variables."""

from __future__ import annotations

from ambientctl.runtime import service_environment
from ambientctl.runtime.kubeproxy import service_rules


def pod(name: str, ip: str, *, namespace: str = "shop", labels=None, ready: bool = True, port_name: str = "http", port: int = 8080) -> dict:
    return {
        "metadata": {"name": name, "namespace": namespace, "labels": labels or {"app": "web"}},
        "spec": {"containers": [{"name": "c", "command": ["x"], "ports": [{"name": port_name, "containerPort": port}]}]},
        "status": {
            "phase": "Running" if ready else "Pending",
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def service(name: str = "web", *, vip: str = "198.19.128.1", selector=None, ports=None) -> dict:
    return {
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {
            "clusterIP": vip,
            "selector": {"app": "web"} if selector is None else selector,
            "ports": ports or [{"name": "http", "port": 80, "targetPort": "http"}],
        },
    }


def test_only_ready_matching_pods_of_the_namespace_are_endpoints():
    pods = [
        pod("a", "198.18.1.2"),
        pod("b", "198.18.2.2", port=9090),  # the named port resolves per pod
        pod("c", "198.18.1.3", ready=False),
        pod("d", "198.18.1.4", labels={"app": "other"}),
        pod("e", "198.18.1.5", namespace="elsewhere"),
        pod("f", "198.18.1.6", port_name="metrics"),  # no port named http
    ]
    [rule] = service_rules([service()], pods)
    assert (rule.vip, rule.port, rule.service) == ("198.19.128.1", 80, "shop/web")
    assert rule.endpoints == (("198.18.1.2", 8080), ("198.18.2.2", 9090))


def test_services_without_ready_pods_or_selector_have_no_endpoints():
    rules = service_rules(
        [service(), service("manual", vip="198.19.128.2", selector={}), service("multi", vip="198.19.128.3", ports=[{"name": "a", "port": 1, "targetPort": 81}, {"name": "b", "port": 2, "targetPort": 82}])],
        [pod("a", "198.18.1.2", ready=False)],
    )
    assert [(r.service, r.port, r.endpoints) for r in rules] == [
        ("shop/web", 80, ()),
        ("shop/manual", 80, ()),
        ("shop/multi", 1, ()),
        ("shop/multi", 2, ()),
    ]


def test_pods_find_services_of_their_namespace_through_environment_variables():
    env = service_environment(
        [service("details-api", ports=[{"name": "http", "port": 9080}, {"name": "grpc-web", "port": 9081}]), service("web")],
        "shop",
    )
    assert env == {
        "DETAILS_API_SERVICE_HOST": "198.19.128.1",
        "DETAILS_API_SERVICE_PORT": "9080",
        "DETAILS_API_SERVICE_PORT_HTTP": "9080",
        "DETAILS_API_SERVICE_PORT_GRPC_WEB": "9081",
        "WEB_SERVICE_HOST": "198.19.128.1",
        "WEB_SERVICE_PORT": "80",
        "WEB_SERVICE_PORT_HTTP": "80",
    }
    assert service_environment([service()], "other") == {}
