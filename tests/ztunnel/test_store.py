"""ProxyState lookups and the StateStore writer: snapshots, xDS-style updates, notification."""

from __future__ import annotations

import json
from ipaddress import ip_address

import trio
import trio.testing

from ztunnel.state.localconfig import LocalConfig, parse_local_config
from ztunnel.state.model import (
    Authorization,
    Clause,
    GatewayAddress,
    Match,
    NamespacedHostname,
    PolicyAction,
    PolicyScope,
    Port,
    Rule,
    Service,
    ServiceAccountMatch,
    StringMatch,
    TunnelProtocol,
    Workload,
)
from ztunnel.state.store import ProxyState, StateStore

REVIEWS = Service(
    name="reviews",
    namespace="bookinfo",
    hostname="reviews.bookinfo.svc.cluster.local",
    vips=(("", ip_address("10.96.0.10")), ("net2", ip_address("10.96.0.10"))),
    ports=(Port(9080, 9080),),
)
# Same VIP as REVIEWS on the default network, but in the "shop" namespace.
SHOP_REVIEWS = Service(
    name="reviews",
    namespace="shop",
    hostname="reviews.shop.svc.cluster.local",
    vips=(("", ip_address("10.96.0.10")),),
    ports=(Port(9080, 9080),),
)


def pod(name: str, ip: str, *, node: str = "node-a", namespace: str = "bookinfo",
        **fields: object) -> Workload:
    return Workload(
        uid=f"Kubernetes//Pod/{namespace}/{name}",
        name=name,
        namespace=namespace,
        addresses=(ip_address(ip),),
        node=node,
        **fields,  # type: ignore[arg-type]
    )


def allow_all(name: str, namespace: str, scope: PolicyScope) -> Authorization:
    return Authorization(name, namespace, scope, PolicyAction.ALLOW, (Rule(),))


V1 = pod("reviews-v1", "10.0.0.1", services=((REVIEWS.key, ()),),
         authorization_policies=("bookinfo/selected", "bookinfo/not-yet-known"))
V2 = pod("reviews-v2", "10.0.0.2", node="node-b", services=((REVIEWS.key, ()),))
REMOTE = pod("remote", "10.0.0.1", node="node-r", network="net2")
NS_POLICY = allow_all("ns-wide", "bookinfo", PolicyScope.NAMESPACE)
OTHER_NS_POLICY = allow_all("ns-wide", "shop", PolicyScope.NAMESPACE)
GLOBAL_POLICY = allow_all("mesh-wide", "istio-system", PolicyScope.GLOBAL)
SELECTED = allow_all("selected", "bookinfo", PolicyScope.WORKLOAD_SELECTOR)
UNSELECTED = allow_all("unselected", "bookinfo", PolicyScope.WORKLOAD_SELECTOR)


def full_store() -> StateStore:
    store = StateStore()
    store.replace(
        LocalConfig(
            workloads=(V2, V1, REMOTE),
            services=(REVIEWS, SHOP_REVIEWS),
            policies=(NS_POLICY, OTHER_NS_POLICY, GLOBAL_POLICY, SELECTED, UNSELECTED),
        )
    )
    return store


# --- Lookups ---


def test_workload_lookups() -> None:
    state = full_store().current
    assert state.workload_by_uid(V1.uid) == V1
    assert state.workload_by_uid("Kubernetes//Pod/bookinfo/nope") is None
    assert state.workload_by_ip(ip_address("10.0.0.1")) == V1
    assert state.workload_by_ip(ip_address("10.0.0.1"), "net2") == REMOTE
    assert state.workload_by_ip(ip_address("10.0.0.9")) is None
    assert state.local_workloads("node-a") == (V1,)
    assert state.local_workloads("node-b") == (V2,)
    assert state.local_workloads("node-z") == ()


def test_service_lookups() -> None:
    state = full_store().current
    vip = ip_address("10.96.0.10")
    assert state.service_by_key(REVIEWS.key) == REVIEWS
    assert state.service_by_key("bookinfo/ratings") is None
    assert state.service_by_vip(vip, "net2") == REVIEWS
    assert state.service_by_vip(vip, "net3") is None
    # A VIP shared by two services resolves to the caller's namespace when possible.
    assert state.service_by_vip(vip, prefer_namespace="shop") == SHOP_REVIEWS
    assert state.service_by_vip(vip, prefer_namespace="bookinfo") == REVIEWS


def test_endpoints_are_the_workloads_naming_the_service() -> None:
    state = full_store().current
    assert state.endpoints(REVIEWS) == (V1, V2)
    assert state.endpoints(SHOP_REVIEWS) == ()


def test_policies_for_a_workload() -> None:
    state = full_store().current
    # Namespace ∪ global ∪ its selector policies; the unknown selector name is skipped.
    assert state.policies_for(V1) == (NS_POLICY, GLOBAL_POLICY, SELECTED)
    assert state.policies_for(V2) == (NS_POLICY, GLOBAL_POLICY)
    assert state.policies_for(pod("cart", "10.0.1.1", namespace="shop")) == (
        OTHER_NS_POLICY,
        GLOBAL_POLICY,
    )


# --- Updates ---


def test_apply_upserts_and_removes_by_resource_name() -> None:
    store = full_store()
    before = store.current
    moved = pod("reviews-v1", "10.0.0.7", services=((REVIEWS.key, ()),))
    after = store.apply(
        upsert_workloads=[moved],
        remove_workloads=[V2.uid],
        remove_services=[SHOP_REVIEWS.key],
        remove_policies=[GLOBAL_POLICY.key],
    )
    assert after is store.current
    assert after.version == before.version + 1
    assert after.workload_by_ip(ip_address("10.0.0.7")) == moved
    assert after.workload_by_ip(ip_address("10.0.0.1")) is None
    assert after.endpoints(REVIEWS) == (moved,)
    assert after.service_by_key(SHOP_REVIEWS.key) is None
    assert after.policies_for(moved) == (NS_POLICY,)
    # Readers holding the old snapshot still see the old world.
    assert before.workload_by_ip(ip_address("10.0.0.1")) == V1
    assert before.endpoints(REVIEWS) == (V1, V2)


def test_workload_may_arrive_before_its_service() -> None:
    store = StateStore()
    store.apply(upsert_workloads=[V1])
    assert store.current.endpoints(REVIEWS) == (V1,)
    store.apply(upsert_services=[REVIEWS])
    assert store.current.service_by_vip(ip_address("10.96.0.10")) == REVIEWS
    assert store.current.endpoints(REVIEWS) == (V1,)


def test_changing_a_policy_scope_moves_it() -> None:
    store = full_store()
    narrowed = allow_all("ns-wide", "bookinfo", PolicyScope.WORKLOAD_SELECTOR)
    store.apply(upsert_policies=[narrowed])
    assert store.current.policies_for(V2) == (GLOBAL_POLICY,)


def test_unchanged_or_unknown_updates_do_not_make_a_new_version() -> None:
    store = full_store()
    before = store.current
    assert store.apply(upsert_workloads=[V1], remove_workloads=["no/such/uid"]) is before
    assert store.apply() is before


def test_replace_drops_everything_not_in_the_new_config() -> None:
    store = full_store()
    state = store.replace(LocalConfig(workloads=(V2,)))
    assert state.workloads == (V2,)
    assert state.services == ()
    assert state.policies == ()


# --- Change notification ---


async def test_wait_for_change_wakes_on_a_real_change_only() -> None:
    store = StateStore()
    seen: list[ProxyState] = []

    async def watcher() -> None:
        seen.append(await store.wait_for_change(store.current.version))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watcher)
        await trio.testing.wait_all_tasks_blocked()
        store.apply()
        await trio.testing.wait_all_tasks_blocked()
        assert seen == []
        store.apply(upsert_workloads=[V1])
    assert [state.version for state in seen] == [1]


async def test_wait_for_change_returns_at_once_when_already_newer() -> None:
    store = full_store()
    with trio.fail_after(1):
        assert await store.wait_for_change(0) is store.current


# --- Config dump ---


def test_config_dump_round_trips_through_the_local_config_format() -> None:
    waypoint_by_host = GatewayAddress(None, NamespacedHostname("bookinfo", "waypoint.svc"), 15008)
    rich_policy = Authorization(
        "rich", "bookinfo", PolicyScope.WORKLOAD_SELECTOR, PolicyAction.DENY,
        (
            Rule((
                Clause((
                    Match(
                        namespaces=(StringMatch("exact", "a"),),
                        not_principals=(StringMatch("presence"),),
                        principals=(StringMatch("prefix", "td/"), StringMatch("suffix", "/x")),
                        service_accounts=(ServiceAccountMatch("a", "b"),),
                        destination_ports=(80,),
                    ),
                    Match(),
                )),
                Clause(),
            )),
        ),
        dry_run=True,
    )
    config = LocalConfig(
        workloads=(
            pod("wp", "10.0.0.5", tunnel_protocol=TunnelProtocol.HBONE, capacity=0,
                waypoint=GatewayAddress(ip_address("fd00::5"), None, 15009)),
            V1,
        ),
        services=(Service("s", "bookinfo", "s.local", (("", ip_address("10.96.0.1")),),
                          (Port(80, 0),), ("spiffe://cluster.local/ns/bookinfo/sa/s",),
                          waypoint_by_host),),
        policies=(rich_policy, GLOBAL_POLICY),
    )
    store = StateStore()
    store.replace(config)
    dump = json.loads(json.dumps(store.current.to_json()))
    assert dump["version"] == 1
    del dump["version"]
    reloaded = StateStore()
    reloaded.replace(parse_local_config(json.dumps(dump), source="config_dump.json"))
    assert reloaded.current.to_json() == store.current.to_json()
    assert reloaded.current.workloads == store.current.workloads
    assert reloaded.current.services == store.current.services
    assert reloaded.current.policies == store.current.policies
