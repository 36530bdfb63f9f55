"""XdsStateHandler: delta xDS responses of real protos applied to the StateStore."""

from __future__ import annotations

from ipaddress import ip_address

from google.protobuf import any_pb2

from meshcore._gen import authorization_pb2, workload_pb2
from meshcore.xds.types import ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL
from ztunnel.state.model import PolicyAction
from ztunnel.state.store import StateStore
from ztunnel.state.xds import XdsStateHandler

SERVICE_KEY = "shop/cart.shop.svc.cluster.local"


def packed(
    message: workload_pb2.Workload | workload_pb2.Service | authorization_pb2.Authorization,
) -> any_pb2.Any:
    if isinstance(message, workload_pb2.Workload):
        message = workload_pb2.Address(workload=message)
    elif isinstance(message, workload_pb2.Service):
        message = workload_pb2.Address(service=message)
    resource = any_pb2.Any()
    resource.Pack(message)
    return resource


def pod(name: str, ip: bytes, **fields: object) -> workload_pb2.Workload:
    return workload_pb2.Workload(
        uid=f"Kubernetes//Pod/shop/{name}", name=name, namespace="shop", addresses=[ip], **fields
    )


def upsert(
    *messages: workload_pb2.Workload | workload_pb2.Service,
) -> list[tuple[str, str, any_pb2.Any]]:
    return [
        (
            m.uid if isinstance(m, workload_pb2.Workload) else f"{m.namespace}/{m.hostname}",
            "v1",
            packed(m),
        )
        for m in messages
    ]


CART_SERVICE = workload_pb2.Service(
    name="cart",
    namespace="shop",
    hostname="cart.shop.svc.cluster.local",
    addresses=[workload_pb2.NetworkAddress(address=bytes([10, 96, 0, 1]))],
    ports=[workload_pb2.Port(service_port=80, target_port=8080)],
)
CART_1 = pod(
    "cart-1",
    bytes([10, 0, 0, 1]),
    services={
        SERVICE_KEY: workload_pb2.PortList(
            ports=[workload_pb2.Port(service_port=80, target_port=8080)]
        )
    },
)


def policy(
    name: str, action: int = authorization_pb2.ALLOW, scope: int = authorization_pb2.NAMESPACE
) -> authorization_pb2.Authorization:
    return authorization_pb2.Authorization(
        name=name, namespace="shop", scope=scope, action=action, rules=[authorization_pb2.Rule()]
    )


def test_valid_resources_apply_in_one_snapshot_and_bad_ones_are_named() -> None:
    store = StateStore()
    handler = XdsStateHandler(store)
    broken = pod("broken", b"\x01\x02\x03")
    legacy = pod("legacy", bytes([10, 0, 0, 3]), tunnel_protocol=workload_pb2.LEGACY_ISTIO_MTLS)

    errors = handler.apply(ADDRESS_TYPE_URL, upsert(CART_SERVICE, CART_1, broken, legacy), [])

    assert set(errors) == {broken.uid, legacy.uid}
    assert "addresses[0]" in errors[broken.uid]
    assert "LEGACY_ISTIO_MTLS" in errors[legacy.uid]
    state = store.current
    assert state.version == 1  # one swap for the whole response
    service = state.service_by_vip(ip_address("10.96.0.1"))
    assert service is not None and service.key == SERVICE_KEY
    assert [w.uid for w in state.endpoints(service)] == [CART_1.uid]
    assert state.workload_by_uid(broken.uid) is None


def test_rejected_update_keeps_the_last_good_resource() -> None:
    store = StateStore()
    handler = XdsStateHandler(store)
    handler.apply(ADDRESS_TYPE_URL, upsert(CART_1), [])

    bad_update = pod("cart-1", bytes([10, 0, 0, 1]), status=9)
    errors = handler.apply(ADDRESS_TYPE_URL, upsert(bad_update), [])

    assert list(errors) == [CART_1.uid]
    assert "status: unknown value 9" in errors[CART_1.uid]
    workload = store.current.workload_by_uid(CART_1.uid)
    assert workload is not None and workload.addresses == (ip_address("10.0.0.1"),)


def test_resource_name_must_be_the_store_key() -> None:
    store = StateStore()
    handler = XdsStateHandler(store)
    errors = handler.apply(
        ADDRESS_TYPE_URL,
        [
            ("Kubernetes//Pod/shop/other", "v1", packed(CART_1)),
            ("shop/cart", "v1", packed(CART_SERVICE)),
        ],
        [],
    )
    assert (
        "does not match the workload uid 'Kubernetes//Pod/shop/cart-1'"
        in errors["Kubernetes//Pod/shop/other"]
    )
    assert f"does not match the service namespace/hostname {SERVICE_KEY!r}" in errors["shop/cart"]
    assert store.current.version == 0


def test_address_removals_try_workload_uid_then_service_key() -> None:
    store = StateStore()
    handler = XdsStateHandler(store)
    handler.apply(ADDRESS_TYPE_URL, upsert(CART_SERVICE, CART_1), [])

    assert handler.apply(ADDRESS_TYPE_URL, [], [CART_1.uid]) == {}
    assert store.current.workload_by_uid(CART_1.uid) is None
    assert store.current.service_by_key(SERVICE_KEY) is not None

    assert handler.apply(ADDRESS_TYPE_URL, [], [SERVICE_KEY, "shop/never-existed"]) == {}
    assert store.current.services == ()


def test_authorizations_apply_and_remove_by_name() -> None:
    store = StateStore()
    handler = XdsStateHandler(store)
    allow, deny = policy("allow"), policy("deny", action=authorization_pb2.DENY)
    bad = policy("bad", scope=7)

    errors = handler.apply(
        AUTHORIZATION_TYPE_URL,
        [
            ("shop/allow", "1", packed(allow)),
            ("shop/deny", "1", packed(deny)),
            ("shop/bad", "1", packed(bad)),
        ],
        [],
    )
    assert list(errors) == ["shop/bad"]
    assert "scope: unknown value 7" in errors["shop/bad"]
    assert [(p.key, p.action) for p in store.current.policies] == [
        ("shop/allow", PolicyAction.ALLOW),
        ("shop/deny", PolicyAction.DENY),
    ]

    assert handler.apply(AUTHORIZATION_TYPE_URL, [], ["shop/deny"]) == {}
    assert [p.key for p in store.current.policies] == ["shop/allow"]


def test_resource_of_the_other_type_is_rejected() -> None:
    store = StateStore()
    handler = XdsStateHandler(store)
    errors = handler.apply(ADDRESS_TYPE_URL, [("shop/allow", "1", packed(policy("allow")))], [])
    assert AUTHORIZATION_TYPE_URL in errors["shop/allow"]
    errors = handler.apply(AUTHORIZATION_TYPE_URL, upsert(CART_1), [])
    assert ADDRESS_TYPE_URL in errors[CART_1.uid]
    assert store.current.version == 0


def test_unknown_type_url_rejects_every_resource() -> None:
    store = StateStore()
    handler = XdsStateHandler(store)
    url = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
    errors = handler.apply(url, upsert(CART_1), ["x"])
    assert errors == {CART_1.uid: f"type URL {url!r} is not handled by ztunnel"}
    assert store.current.version == 0
