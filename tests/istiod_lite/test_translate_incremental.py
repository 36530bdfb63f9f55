"""The translator as a stream processor: deltas hold exactly what changed, work stays
proportional to what an event can affect, rejected versions keep the previous good one, and
incremental results equal a fresh translation of the final objects."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from istiod_lite.model import Translator
from istiod_lite.model import translator as translator_module
from istiod_lite.sources.base import ObjectEvent
from meshcore.identity import Identity
from meshcore.xds.types import ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL

# --- Helpers ---


def pod_obj(
    labels: dict[str, str], ip: str | None = "10.1.0.1", node: str = "node-a", **spec: Any
) -> dict[str, Any]:
    status: dict[str, Any] = {
        "phase": "Running",
        "conditions": [{"type": "Ready", "status": "True"}],
    }
    if ip is not None:
        status["podIP"] = ip
    return {"metadata": {"labels": labels}, "spec": {"nodeName": node, **spec}, "status": status}


def upsert(kind: str, namespace: str, name: str, obj: Any) -> ObjectEvent:
    return ObjectEvent(kind, "upsert", namespace, name, obj)


def delete(kind: str, namespace: str, name: str) -> ObjectEvent:
    return ObjectEvent(kind, "delete", namespace, name, None)


def uid(namespace: str, name: str) -> str:
    return f"Kubernetes//Pod/{namespace}/{name}"


def changed_names(delta: dict[str, Any]) -> set[str]:
    return {name for upserts, removals in delta.values() for name in (*upserts, *removals)}


AMBIENT = {"metadata": {"labels": {"istio.io/dataplane-mode": "ambient"}}}
WEB_SERVICE = {
    "spec": {
        "selector": {"app": "web"},
        "clusterIP": "10.96.0.1",
        "ports": [{"port": 80, "targetPort": 8080}],
    }
}

# --- Deltas ---


def test_unchanged_content_emits_nothing() -> None:
    t = Translator()
    first = t.apply(upsert("Pod", "shop", "web-0", pod_obj({"app": "web"})))
    assert set(first[ADDRESS_TYPE_URL].upserts) == {uid("shop", "web-0")}
    assert t.apply(upsert("Pod", "shop", "web-0", pod_obj({"app": "web"}))) == {}
    # An annotation translation does not read changes nothing a ztunnel sees.
    touched = pod_obj({"app": "web"})
    touched["metadata"]["annotations"] = {"kubectl.kubernetes.io/restartedAt": "now"}
    assert t.apply(upsert("Pod", "shop", "web-0", touched)) == {}


def test_deletes_become_removals() -> None:
    t = Translator()
    for event in (
        upsert("Pod", "shop", "web-0", pod_obj({"app": "web"})),
        upsert("Service", "shop", "web", WEB_SERVICE),
    ):
        t.apply(event)
    delta = t.apply(delete("Service", "shop", "web"))
    assert delta[ADDRESS_TYPE_URL].removals == {"shop/web.shop.svc.cluster.local"}
    # The endpoint no longer lists the service.
    assert set(delta[ADDRESS_TYPE_URL].upserts) == {uid("shop", "web-0")}
    assert dict(delta[ADDRESS_TYPE_URL].upserts[uid("shop", "web-0")].workload.services) == {}  # type: ignore[attr-defined]
    assert t.apply(delete("Pod", "shop", "web-0"))[ADDRESS_TYPE_URL].removals == {
        uid("shop", "web-0")
    }
    assert t.apply(delete("Pod", "shop", "web-0")) == {}


def test_namespace_label_flips_only_its_own_pods() -> None:
    t = Translator()
    for namespace in ("shop", "bank"):
        for i in range(3):
            t.apply(
                upsert(
                    "Pod",
                    namespace,
                    f"p{i}",
                    pod_obj({"app": "web"}, ip=f"10.1.{len(namespace)}.{i}"),
                )
            )
    delta = t.apply(upsert("Namespace", "", "shop", AMBIENT))
    assert changed_names(delta) == {uid("shop", f"p{i}") for i in range(3)}
    assert all(a.workload.tunnel_protocol == 1 for a in delta[ADDRESS_TYPE_URL].upserts.values())  # type: ignore[attr-defined]
    assert t.apply(delete("Namespace", "", "shop")).keys() == {ADDRESS_TYPE_URL}


def test_kinds_that_do_not_shape_ztunnel_resources_are_ignored() -> None:
    t = Translator()
    assert t.apply(upsert("ServiceAccount", "shop", "web", {"metadata": {}})) == {}
    assert t.errors() == []


# --- Rejected versions ---


def test_rejected_update_keeps_previous_good_version_until_fixed() -> None:
    t = Translator()
    good = {
        "spec": {"action": "DENY", "rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.0/8"]}}]}]}
    }
    bad = {
        "spec": {"action": "DENY", "rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.0/88"]}}]}]}
    }
    t.apply(upsert("AuthorizationPolicy", "shop", "deny-net", good))
    before = t.resources()[AUTHORIZATION_TYPE_URL]["shop/deny-net"]

    assert t.apply(upsert("AuthorizationPolicy", "shop", "deny-net", bad)) == {}
    [error] = t.errors()
    assert (error.name, error.field) == ("deny-net", "spec.rules[0].from[0].source.ipBlocks[0]")
    assert t.resources()[AUTHORIZATION_TYPE_URL]["shop/deny-net"] == before

    fixed = {
        "spec": {"action": "DENY", "rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.0/16"]}}]}]}
    }
    assert set(
        t.apply(upsert("AuthorizationPolicy", "shop", "deny-net", fixed))[
            AUTHORIZATION_TYPE_URL
        ].upserts
    ) == {"shop/deny-net"}
    assert t.errors() == []


def test_rejected_first_version_emits_nothing_and_delete_clears_the_error() -> None:
    t = Translator()
    assert t.apply(upsert("Pod", "shop", "web-0", pod_obj({"app": "web"}, ip="not-an-ip"))) == {}
    assert len(t.errors()) == 1
    assert t.apply(delete("Pod", "shop", "web-0")) == {}
    assert t.errors() == []


def test_non_mapping_object_is_rejected() -> None:
    t = Translator()
    assert t.apply(upsert("Service", "shop", "web", ["not", "an", "object"])) == {}
    [error] = t.errors()
    assert "mapping" in error.message


def test_rejections_are_counted() -> None:
    import prometheus_client

    registry = prometheus_client.CollectorRegistry()
    t = Translator(registry=registry)
    t.apply(upsert("AuthorizationPolicy", "shop", "p", {"spec": {"action": "CUSTOM"}}))
    assert (
        registry.get_sample_value(
            "istiod_translation_errors_total", {"kind": "AuthorizationPolicy"}
        )
        == 1
    )


# --- Node views for the CA ---


def test_identities_and_pods_on_node() -> None:
    t = Translator(trust_domain="example.org")
    t.apply(upsert("Pod", "shop", "web-0", pod_obj({}, node="n1", serviceAccountName="web")))
    t.apply(
        upsert("Pod", "shop", "web-1", pod_obj({}, ip=None, node="n1", serviceAccountName="web"))
    )
    t.apply(upsert("Pod", "bank", "teller-0", pod_obj({}, node="n1")))
    t.apply(upsert("Pod", "bank", "other-0", pod_obj({}, node="n2", serviceAccountName="other")))
    done = pod_obj({}, node="n1", serviceAccountName="batch")
    done["status"]["phase"] = "Succeeded"
    t.apply(upsert("Pod", "shop", "job-0", done))
    assert t.identities_on_node("n1") == {
        Identity("example.org", "shop", "web"),
        Identity("example.org", "bank", "default"),
    }
    assert [p.key for p in t.pods_on_node("n1")] == [
        ("bank", "teller-0"),
        ("shop", "job-0"),
        ("shop", "web-0"),
        ("shop", "web-1"),
    ]
    # Moving a pod moves its identity.
    t.apply(upsert("Pod", "bank", "other-0", pod_obj({}, node="n1", serviceAccountName="other")))
    assert Identity("example.org", "bank", "other") in t.identities_on_node("n1")
    assert t.identities_on_node("n2") == set()


# --- Work proportional to what an event can affect ---


@pytest.fixture
def counted_builds(monkeypatch: pytest.MonkeyPatch) -> Callable[[], int]:
    calls = 0
    original = translator_module.build_workload

    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(translator_module, "build_workload", counting)

    def take() -> int:
        nonlocal calls
        count, calls = calls, 0
        return count

    return take


def test_each_event_rebuilds_only_the_workloads_it_can_affect(
    counted_builds: Callable[[], int],
) -> None:
    t = Translator()
    for n in range(20):
        for i in range(20):
            app = "web" if i < 5 else f"app-{i}"
            t.apply(
                upsert("Pod", f"ns-{n}", f"p{i}", pod_obj({"app": app}, ip=f"10.{n}.0.{i + 1}"))
            )
        t.apply(upsert("Service", f"ns-{n}", "web", WEB_SERVICE))
    counted_builds()

    t.apply(upsert("Pod", "ns-3", "p7", pod_obj({"app": "other"}, ip="10.3.0.8")))
    assert counted_builds() == 1
    t.apply(
        upsert(
            "Service", "ns-3", "web", {"spec": {**WEB_SERVICE["spec"], "clusterIP": "10.96.0.2"}}
        )
    )
    assert counted_builds() == 0  # only the Service resource: its selector and ports are unchanged
    t.apply(
        upsert("Service", "ns-3", "web", {"spec": {**WEB_SERVICE["spec"], "ports": [{"port": 81}]}})
    )
    assert counted_builds() == 5  # its selected pods
    t.apply(upsert("Namespace", "", "ns-3", AMBIENT))
    assert counted_builds() == 20
    t.apply(
        upsert(
            "AuthorizationPolicy",
            "ns-3",
            "p",
            {"spec": {"selector": {"matchLabels": {"app": "web"}}}},
        )
    )
    assert counted_builds() == 5
    t.apply(
        upsert(
            "AuthorizationPolicy",
            "ns-3",
            "p",
            {"spec": {"selector": {"matchLabels": {"app": "web"}}, "action": "DENY"}},
        )
    )
    assert counted_builds() == 0  # same attachment, only the Authorization changes
    t.apply(upsert("PeerAuthentication", "ns-3", "strict", {"spec": {"mtls": {"mode": "STRICT"}}}))
    assert counted_builds() == 20


# --- Incremental == full ---

NAMESPACES = ("istio-system", "a", "b")
LABELS = st.dictionaries(
    st.sampled_from(["app", "tier"]), st.sampled_from(["web", "api"]), max_size=2
)
SELECTORS = st.dictionaries(
    st.sampled_from(["app", "tier"]), st.sampled_from(["web", "api"]), min_size=1, max_size=2
)


def mostly(value: Any, *others: Any) -> st.SearchStrategy[Any]:
    """`value` four times out of five: rare variants stay rare, so objects interact."""
    return st.sampled_from([value] * 4 * len(others) + list(others))


@st.composite
def pods(draw: st.DrawFn, namespace: str, name: str) -> dict[str, Any]:
    labels = draw(LABELS)
    mode = draw(mostly(None, "ambient", "none"))
    if mode is not None:
        labels["istio.io/dataplane-mode"] = mode
    obj = pod_obj(
        labels,
        ip=draw(mostly(f"10.{NAMESPACES.index(namespace)}.0.{name[-1]}", None)),
        node=draw(st.sampled_from(["n1", "n2"])),
        hostNetwork=draw(mostly(False, True)),
        serviceAccountName=draw(st.sampled_from(["default", "sa1"])),
        containers=[
            {"ports": [{"name": "http", "containerPort": draw(st.sampled_from([8080, 8081]))}]}
        ],
    )
    obj["status"]["phase"] = draw(mostly("Running", "Pending", "Succeeded"))
    obj["status"]["conditions"][0]["status"] = draw(mostly("True", "False"))
    if draw(mostly(False, True)):
        obj["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return obj


@st.composite
def services(draw: st.DrawFn) -> dict[str, Any]:
    ports = draw(
        st.lists(
            st.sampled_from(
                [
                    {"port": 80, "targetPort": 8080},
                    {"port": 81, "targetPort": "http"},
                    {"port": 82, "targetPort": "missing"},
                    {"port": 83, "name": "grpc"},
                ]
            ),
            max_size=3,
            unique_by=lambda p: p["port"],
        )
    )
    spec = {
        "selector": draw(st.one_of(st.none(), SELECTORS)),
        "ports": ports,
        "clusterIP": draw(st.sampled_from(["10.96.0.1", "None"])),
    }
    if draw(st.integers(0, 5)) == 0:
        spec["type"] = "ExternalName"
    return {"spec": spec}


@st.composite
def authorization_policies(draw: st.DrawFn) -> dict[str, Any]:
    spec: dict[str, Any] = {"action": draw(st.sampled_from(["ALLOW", "DENY"]))}
    selector = draw(st.one_of(st.none(), SELECTORS))
    if selector is not None:
        spec["selector"] = {"matchLabels": selector}
    if draw(st.integers(0, 4)) == 0:
        spec["targetRefs"] = [{"kind": "Gateway", "name": "waypoint"}]
    spec["rules"] = draw(
        st.lists(
            st.sampled_from(
                [
                    {},
                    {"from": [{"source": {"namespaces": ["a"]}}]},
                    {"to": [{"operation": {"ports": ["80"], "methods": ["GET"]}}]},
                ]
            ),
            max_size=2,
        )
    )
    return {"spec": spec}


@st.composite
def peer_authentications(draw: st.DrawFn) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    mode = draw(st.sampled_from([None, "UNSET", "PERMISSIVE", "STRICT"]))
    if mode is not None:
        spec["mtls"] = {"mode": mode}
    selector = draw(st.one_of(st.none(), SELECTORS))
    if selector is not None:
        spec["selector"] = {"matchLabels": selector}
        spec["portLevelMtls"] = draw(
            st.dictionaries(
                st.sampled_from([8080, 9090]),
                st.builds(
                    lambda m: {"mode": m}, st.sampled_from(["PERMISSIVE", "STRICT", "UNSET"])
                ),
                max_size=2,
            )
        )
    created = draw(st.sampled_from(["2026-01-01T00:00:00Z", "2026-02-01T00:00:00Z"]))
    return {"metadata": {"creationTimestamp": created}, "spec": spec}


@st.composite
def events(draw: st.DrawFn) -> ObjectEvent:
    kind = draw(
        st.sampled_from(
            [
                "Namespace",
                "Pod",
                "Pod",
                "Pod",
                "Service",
                "AuthorizationPolicy",
                "PeerAuthentication",
            ]
        )
    )
    namespace = draw(st.sampled_from(NAMESPACES))
    if kind == "Namespace":
        if draw(st.booleans()):
            return delete(kind, "", namespace)
        mode = draw(
            st.sampled_from(
                [{}, {"istio.io/dataplane-mode": "ambient"}, {"istio.io/dataplane-mode": "none"}]
            )
        )
        return upsert(kind, "", namespace, {"metadata": {"labels": mode}})
    name = f"{kind.lower()}-{draw(st.integers(0, 2))}"
    if draw(st.integers(0, 4)) == 0:
        return delete(kind, namespace, name)
    strategy = {
        "Pod": pods(namespace, name),
        "Service": services(),
        "AuthorizationPolicy": authorization_policies(),
        "PeerAuthentication": peer_authentications(),
    }[kind]
    return upsert(kind, namespace, name, draw(strategy))


def serialized(resources: dict[str, dict[str, Any]]) -> dict[str, dict[str, bytes]]:
    return {
        t: {n: m.SerializeToString(deterministic=True) for n, m in by_name.items()}
        for t, by_name in resources.items()
    }


@settings(max_examples=200, deadline=None)
@given(history=st.lists(events(), min_size=15, max_size=60), data=st.data())
def test_incremental_translation_equals_fresh_translation_of_final_state(
    history: list[ObjectEvent], data: st.DataObject
) -> None:
    incremental = Translator()
    received: dict[str, dict[str, bytes]] = {ADDRESS_TYPE_URL: {}, AUTHORIZATION_TYPE_URL: {}}
    final: dict[tuple[str, str, str], ObjectEvent] = {}
    for event in history:
        delta = incremental.apply(event)
        for type_url, (upserts, removals) in delta.items():
            assert not upserts.keys() & removals
            for name in removals:
                del received[type_url][name]  # only what the client has is removed
            for name, message in upserts.items():
                content = message.SerializeToString(deterministic=True)
                assert received[type_url].get(name) != content  # only changed content is sent
                received[type_url][name] = content
        if event.action == "delete":
            final.pop(event.key, None)
        else:
            final[event.key] = event
    assert incremental.errors() == []

    fresh = Translator()
    for event in data.draw(st.permutations(list(final.values()))):
        fresh.apply(event)
    assert serialized(fresh.resources()) == received == serialized(incremental.resources())
