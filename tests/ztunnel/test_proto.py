"""The generated protos (wire shape, type URLs, freshness) and proto -> model conversion."""

from __future__ import annotations

import filecmp
import subprocess
from ipaddress import ip_address, ip_network
from pathlib import Path

import pytest
from google.protobuf import any_pb2, wrappers_pb2

from meshcore._gen import authorization_pb2, ca_pb2, ca_pb2_grpc, workload_pb2, zds_pb2
from meshcore.xds.types import ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL
from ztunnel.state.model import (
    AppProtocol,
    Authorization,
    Clause,
    GatewayAddress,
    HealthStatus,
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
    WorkloadType,
)
from ztunnel.state.proto import (
    ProtoConversionError,
    address_from_any,
    authorization_from_any,
    authorization_from_proto,
    service_from_proto,
    workload_from_proto,
)

REPO = Path(__file__).resolve().parents[2]

# --- Generated code ---


def test_type_urls_are_those_of_the_generated_messages() -> None:
    address, policy = any_pb2.Any(), any_pb2.Any()
    address.Pack(workload_pb2.Address())
    policy.Pack(authorization_pb2.Authorization())
    assert address.type_url == ADDRESS_TYPE_URL
    assert policy.type_url == AUTHORIZATION_TYPE_URL


def test_generated_code_is_up_to_date_with_the_proto_sources(tmp_path: Path) -> None:
    subprocess.run([REPO / "scripts" / "gen_protos.sh", tmp_path], check=True, capture_output=True)
    committed = REPO / "meshcore" / "_gen"
    names = sorted(p.name for p in tmp_path.iterdir())
    assert sorted(p.name for p in committed.iterdir() if p.is_file()) == names
    _, mismatch, errors = filecmp.cmpfiles(tmp_path, committed, names, shallow=False)
    assert (mismatch, errors) == ([], []), "run scripts/gen_protos.sh"


def test_wire_format_matches_istio_field_numbers() -> None:
    # Hand-encoded bytes as istiod sends them, in field-number order: tunnel_protocol (5),
    # uid (20), services map (22) and capacity (27, a UInt32Value wrapper).
    wire = (
        b"\x28\x01"  # field 5 = HBONE
        b"\xa2\x01\x03pod"  # field 20, length 3
        b"\xb2\x01\x0e"  # field 22, map entry of 14 bytes
        b"\x0a\x06ns/svc"  # key
        b"\x12\x04\x0a\x02\x08\x50"  # PortList{ports: [Port{service_port: 80}]}
        b"\xda\x01\x02\x08\x07"  # field 27 = UInt32Value{value: 7}
    )
    workload = workload_pb2.Workload.FromString(wire)
    assert workload.uid == "pod"
    assert workload.tunnel_protocol == workload_pb2.HBONE
    assert workload.services["ns/svc"].ports[0].service_port == 80
    assert workload.capacity.value == 7
    assert workload.SerializeToString(deterministic=True) == wire


def test_ca_service_method_path_is_istios() -> None:
    method = ca_pb2.DESCRIPTOR.services_by_name["IstioCertificateService"].methods_by_name[
        "CreateCertificate"
    ]
    assert f"/{method.containing_service.full_name}/{method.name}" == (
        "/istio.v1.auth.IstioCertificateService/CreateCertificate"
    )
    assert hasattr(ca_pb2_grpc, "IstioCertificateServiceStub")


def test_zds_request_payloads_are_a_oneof() -> None:
    request = zds_pb2.WorkloadRequest(
        add=zds_pb2.AddWorkload(uid="u1", workload_info=zds_pb2.WorkloadInfo(name="p"))
    )
    request.keep.uid = "u2"  # setting another member clears `add`
    assert request.WhichOneof("payload") == "keep"
    assert zds_pb2.WorkloadRequest.FromString(request.SerializeToString()) == request


# --- Model -> proto, for round trips (the ztunnel itself never needs this direction) ---


def gateway_to_proto(gateway: GatewayAddress) -> workload_pb2.GatewayAddress:
    msg = workload_pb2.GatewayAddress(hbone_mtls_port=gateway.hbone_mtls_port)
    if gateway.hostname is not None:
        msg.hostname.namespace = gateway.hostname.namespace
        msg.hostname.hostname = gateway.hostname.hostname
    else:
        assert gateway.address is not None
        msg.address.address = gateway.address.packed
    return msg


def ports_to_proto(ports: tuple[Port, ...]) -> list[workload_pb2.Port]:
    return [
        workload_pb2.Port(
            service_port=p.service_port,
            target_port=p.target_port,
            app_protocol=p.app_protocol.value,
        )
        for p in ports
    ]


def workload_to_proto(w: Workload) -> workload_pb2.Workload:
    msg = workload_pb2.Workload(
        uid=w.uid,
        name=w.name,
        namespace=w.namespace,
        addresses=[a.packed for a in w.addresses],
        node=w.node,
        service_account=w.service_account,
        trust_domain=w.trust_domain,
        tunnel_protocol=w.tunnel_protocol.value,
        network=w.network,
        canonical_name=w.canonical_name,
        canonical_revision=w.canonical_revision,
        workload_name=w.workload_name,
        workload_type=w.workload_type.value,
        cluster_id=w.cluster_id,
        status=w.status.value,
        capacity=wrappers_pb2.UInt32Value(value=w.capacity),
        authorization_policies=w.authorization_policies,
    )
    for key, ports in w.services:
        msg.services[key].ports.extend(ports_to_proto(ports))
    if w.waypoint is not None:
        msg.waypoint.CopyFrom(gateway_to_proto(w.waypoint))
    return msg


def service_to_proto(s: Service) -> workload_pb2.Service:
    msg = workload_pb2.Service(
        name=s.name,
        namespace=s.namespace,
        hostname=s.hostname,
        addresses=[
            workload_pb2.NetworkAddress(network=network, address=vip.packed)
            for network, vip in s.vips
        ],
        ports=ports_to_proto(s.ports),
        subject_alt_names=s.subject_alt_names,
    )
    if s.waypoint is not None:
        msg.waypoint.CopyFrom(gateway_to_proto(s.waypoint))
    return msg


def string_matches_to_proto(
    matches: tuple[StringMatch, ...],
) -> list[authorization_pb2.StringMatch]:
    out = []
    for m in matches:
        msg = authorization_pb2.StringMatch()
        if m.kind == "presence":
            msg.presence.SetInParent()
        else:
            setattr(msg, m.kind, m.value)
        out.append(msg)
    return out


def networks_to_proto(networks: tuple) -> list[authorization_pb2.Address]:
    return [
        authorization_pb2.Address(address=n.network_address.packed, length=n.prefixlen)
        for n in networks
    ]


def service_accounts_to_proto(
    accounts: tuple[ServiceAccountMatch, ...],
) -> list[authorization_pb2.ServiceAccountMatch]:
    return [
        authorization_pb2.ServiceAccountMatch(
            namespace=a.namespace, serviceAccount=a.service_account
        )
        for a in accounts
    ]


def match_to_proto(m: Match) -> authorization_pb2.Match:
    return authorization_pb2.Match(
        namespaces=string_matches_to_proto(m.namespaces),
        not_namespaces=string_matches_to_proto(m.not_namespaces),
        principals=string_matches_to_proto(m.principals),
        not_principals=string_matches_to_proto(m.not_principals),
        source_ips=networks_to_proto(m.source_ips),
        not_source_ips=networks_to_proto(m.not_source_ips),
        destination_ips=networks_to_proto(m.destination_ips),
        not_destination_ips=networks_to_proto(m.not_destination_ips),
        destination_ports=m.destination_ports,
        not_destination_ports=m.not_destination_ports,
        service_accounts=service_accounts_to_proto(m.service_accounts),
        not_service_accounts=service_accounts_to_proto(m.not_service_accounts),
    )


def authorization_to_proto(p: Authorization) -> authorization_pb2.Authorization:
    return authorization_pb2.Authorization(
        name=p.name,
        namespace=p.namespace,
        scope=p.scope.value,
        action=p.action.value,
        rules=[
            authorization_pb2.Rule(
                clauses=[
                    authorization_pb2.Clause(matches=[match_to_proto(m) for m in c.matches])
                    for c in r.clauses
                ]
            )
            for r in p.rules
        ],
        dry_run=p.dry_run,
    )


def pack(message: workload_pb2.Workload | workload_pb2.Service) -> any_pb2.Any:
    address = workload_pb2.Address()
    if isinstance(message, workload_pb2.Workload):
        address.workload.CopyFrom(message)
    else:
        address.service.CopyFrom(message)
    resource = any_pb2.Any()
    resource.Pack(address)
    return resource


# --- Round trips ---

WAYPOINT_BY_HOSTNAME = GatewayAddress(
    None, NamespacedHostname("bookinfo", "waypoint.bookinfo.svc.cluster.local"), 15008
)
WAYPOINT_BY_IP = GatewayAddress(ip_address("fd00::9"), None, 15009)

FULL_WORKLOAD = Workload(
    uid="cluster2//Pod/bookinfo/reviews-v2-abc",
    name="reviews-v2-abc",
    namespace="bookinfo",
    addresses=(ip_address("10.1.2.3"), ip_address("fd00::3")),
    node="node-b",
    service_account="bookinfo-reviews",
    trust_domain="example.org",
    tunnel_protocol=TunnelProtocol.HBONE,
    network="net1",
    canonical_name="reviews",
    canonical_revision="v2",
    workload_name="reviews-v2",
    workload_type=WorkloadType.JOB,
    cluster_id="cluster2",
    status=HealthStatus.UNHEALTHY,
    capacity=0,
    services=(
        ("bookinfo/ratings.bookinfo.svc.cluster.local", (Port(8080, 0, AppProtocol.TCP),)),
        (
            "bookinfo/reviews.bookinfo.svc.cluster.local",
            (Port(9080, 9081, AppProtocol.HTTP11), Port(9443, 9443, AppProtocol.TLS)),
        ),
    ),
    authorization_policies=("bookinfo/allow-productpage", "bookinfo/deny-9999"),
    waypoint=WAYPOINT_BY_HOSTNAME,
)

FULL_SERVICE = Service(
    name="reviews",
    namespace="bookinfo",
    hostname="reviews.bookinfo.svc.cluster.local",
    vips=(("", ip_address("10.96.0.10")), ("net1", ip_address("fd00:96::10"))),
    ports=(Port(9080, 9080, AppProtocol.HTTP2), Port(9090, 0, AppProtocol.GRPC)),
    subject_alt_names=("spiffe://cluster.local/ns/bookinfo/sa/reviews",),
    waypoint=WAYPOINT_BY_IP,
)

FULL_POLICY = Authorization(
    name="mixed",
    namespace="bookinfo",
    scope=PolicyScope.WORKLOAD_SELECTOR,
    action=PolicyAction.DENY,
    rules=(
        Rule(),
        Rule(
            (
                Clause(),
                Clause(
                    (
                        Match(
                            namespaces=(StringMatch("exact", "bookinfo"),),
                            not_namespaces=(StringMatch("prefix", "kube-"),),
                            principals=(StringMatch("suffix", "/sa/productpage"),),
                            not_principals=(StringMatch("presence"),),
                            source_ips=(ip_network("10.0.0.0/8"), ip_network("fd00::/64")),
                            not_source_ips=(ip_network("10.9.9.9/32"),),
                            destination_ips=(ip_network("0.0.0.0/0"),),
                            not_destination_ips=(ip_network("fd00::1/128"),),
                            destination_ports=(9080, 65535),
                            not_destination_ports=(0,),
                            service_accounts=(ServiceAccountMatch("bookinfo", "ratings"),),
                            not_service_accounts=(ServiceAccountMatch("default", "default"),),
                        ),
                        Match(destination_ports=(22,)),
                    )
                ),
            )
        ),
    ),
    dry_run=True,
)


def test_workload_round_trips() -> None:
    assert workload_from_proto(workload_to_proto(FULL_WORKLOAD)) == FULL_WORKLOAD


def test_service_round_trips() -> None:
    assert service_from_proto(service_to_proto(FULL_SERVICE)) == FULL_SERVICE


def test_authorization_round_trips() -> None:
    assert authorization_from_proto(authorization_to_proto(FULL_POLICY)) == FULL_POLICY


def test_address_and_authorization_unpack_from_any() -> None:
    assert address_from_any(pack(workload_to_proto(FULL_WORKLOAD))) == FULL_WORKLOAD
    assert address_from_any(pack(service_to_proto(FULL_SERVICE))) == FULL_SERVICE
    policy = any_pb2.Any()
    policy.Pack(authorization_to_proto(FULL_POLICY))
    assert authorization_from_any(policy) == FULL_POLICY


def test_workload_with_every_proto_field_set() -> None:
    msg = workload_pb2.Workload(
        uid="Kubernetes//Pod/shop/cart-1",
        name="cart-1",
        namespace="shop",
        addresses=[bytes([10, 0, 0, 7])],
        hostname="cart-1.shop.example",
        network="west",
        tunnel_protocol=workload_pb2.HBONE,
        trust_domain="td.example",
        service_account="cart",
        waypoint=workload_pb2.GatewayAddress(
            address=workload_pb2.NetworkAddress(network="west", address=bytes([10, 0, 0, 9])),
            hbone_mtls_port=15008,
        ),
        network_gateway=workload_pb2.GatewayAddress(
            hostname=workload_pb2.NamespacedHostname(namespace="istio-system", hostname="ew"),
            hbone_mtls_port=15008,
        ),
        node="node-a",
        canonical_name="cart",
        canonical_revision="v1",
        workload_type=workload_pb2.POD,
        workload_name="cart-1",
        native_tunnel=True,
        application_tunnel=workload_pb2.ApplicationTunnel(
            protocol=workload_pb2.ApplicationTunnel.PROXY, port=15088
        ),
        services={
            "shop/cart.shop.svc.cluster.local": workload_pb2.PortList(
                ports=[workload_pb2.Port(service_port=80, target_port=8080, app_protocol=1)]
            )
        },
        authorization_policies=["shop/cart-only"],
        status=workload_pb2.HEALTHY,
        cluster_id="east",
        locality=workload_pb2.Locality(region="r", zone="z", subzone="s"),
        network_mode=workload_pb2.HOST_NETWORK,
        extensions=[workload_pb2.Extension(name="x", config=any_pb2.Any())],
        capacity=wrappers_pb2.UInt32Value(value=3),
    )
    assert workload_from_proto(msg) == Workload(
        uid="Kubernetes//Pod/shop/cart-1",
        name="cart-1",
        namespace="shop",
        addresses=(ip_address("10.0.0.7"),),
        node="node-a",
        service_account="cart",
        trust_domain="td.example",
        tunnel_protocol=TunnelProtocol.HBONE,
        network="west",
        canonical_name="cart",
        canonical_revision="v1",
        workload_name="cart-1",
        workload_type=WorkloadType.POD,
        cluster_id="east",
        status=HealthStatus.HEALTHY,
        capacity=3,
        services=(("shop/cart.shop.svc.cluster.local", (Port(80, 8080, AppProtocol.HTTP11),)),),
        authorization_policies=("shop/cart-only",),
        waypoint=GatewayAddress(ip_address("10.0.0.9"), None, 15008),
    )


def test_empty_fields_get_ztunnels_defaults() -> None:
    workload = workload_from_proto(
        workload_pb2.Workload(uid="Kubernetes//Pod/ns/p", name="p", namespace="ns")
    )
    assert workload.identity.uri == "spiffe://cluster.local/ns/ns/sa/default"
    assert (workload.cluster_id, workload.capacity) == ("Kubernetes", 1)
    assert workload.tunnel_protocol is TunnelProtocol.NONE
    assert workload.waypoint is None


def test_capacity_zero_is_kept_distinct_from_unset() -> None:
    msg = workload_pb2.Workload(uid="u", namespace="ns", capacity=wrappers_pb2.UInt32Value())
    assert workload_from_proto(msg).capacity == 0


def test_unset_waypoint_port_means_hbone_port() -> None:
    msg = workload_pb2.Service(namespace="ns", hostname="h")
    msg.waypoint.address.address = bytes([10, 0, 0, 1])
    assert service_from_proto(msg).waypoint == GatewayAddress(ip_address("10.0.0.1"), None, 15008)


def test_full_length_prefix_is_a_plain_vip() -> None:
    msg = workload_pb2.Service(
        namespace="ns",
        hostname="h",
        addresses=[workload_pb2.NetworkAddress(address=bytes([10, 0, 0, 1]), length=32)],
    )
    assert service_from_proto(msg).vips == (("", ip_address("10.0.0.1")),)


# --- Errors ---


def workload_msg(**fields: object) -> workload_pb2.Workload:
    defaults: dict[str, object] = {"uid": "Kubernetes//Pod/ns/p", "name": "p", "namespace": "ns"}
    return workload_pb2.Workload(**{**defaults, **fields})


def rejection(convert, msg) -> ProtoConversionError:  # type: ignore[no-untyped-def]
    with pytest.raises(ProtoConversionError) as caught:
        convert(msg)
    return caught.value


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({"uid": ""}, "uid", "required"),
        ({"addresses": [bytes(4), b"\x01\x02\x03"]}, "addresses[1]", "got 3"),
        ({"tunnel_protocol": 2}, "tunnel_protocol", "LEGACY_ISTIO_MTLS is not supported"),
        ({"tunnel_protocol": 9}, "tunnel_protocol", "unknown value 9; expected one of NONE, HBONE"),
        ({"status": 4}, "status", "unknown value 4"),
        ({"workload_type": 7}, "workload_type", "unknown value 7"),
        ({"trust_domain": "Bad TD"}, "trust_domain", "'Bad TD' is invalid"),
        ({"namespace": ""}, "namespace", "namespace '' is invalid"),
        ({"service_account": "a/b"}, "service_account", "'a/b' is invalid"),
        (
            {"services": {"no-slash": workload_pb2.PortList()}},
            "services['no-slash']",
            "namespace/hostname",
        ),
        (
            {
                "services": {
                    "ns/h": workload_pb2.PortList(ports=[workload_pb2.Port(target_port=70000)])
                }
            },
            "services['ns/h'].ports[0].target_port",
            "70000 is not a port number",
        ),
        (
            {
                "services": {
                    "ns/h": workload_pb2.PortList(ports=[workload_pb2.Port(app_protocol=42)])
                }
            },
            "services['ns/h'].ports[0].app_protocol",
            "unknown value 42",
        ),
        ({"waypoint": workload_pb2.GatewayAddress(hbone_mtls_port=15008)}, "waypoint", "neither"),
        (
            {
                "waypoint": workload_pb2.GatewayAddress(
                    address=workload_pb2.NetworkAddress(address=b"\x01")
                )
            },
            "waypoint.address.address",
            "got 1",
        ),
        (
            {
                "waypoint": workload_pb2.GatewayAddress(
                    hostname=workload_pb2.NamespacedHostname(hostname="w")
                )
            },
            "waypoint.hostname.namespace",
            "required",
        ),
    ],
)
def test_invalid_workload_is_rejected_naming_the_field(
    fields: dict[str, object], field: str, message: str
) -> None:
    msg = workload_msg(**fields)
    error = rejection(workload_from_proto, msg)
    assert error.resource == ("workload ns/p" if not msg.uid else f"workload {msg.uid}")
    assert error.field == field
    assert message in error.message
    assert str(error).startswith(f"{error.resource}: {field}: ")


@pytest.mark.parametrize(
    ("address", "field", "message"),
    [
        (workload_pb2.NetworkAddress(address=bytes(5)), "addresses[0].address", "got 5"),
        (
            workload_pb2.NetworkAddress(address=bytes(4), length=33),
            "addresses[0].length",
            "prefix length 33 is longer than 32",
        ),
        (
            workload_pb2.NetworkAddress(address=bytes(16), length=129),
            "addresses[0].length",
            "prefix length 129 is longer than 128",
        ),
        (
            workload_pb2.NetworkAddress(address=bytes([10, 1, 0, 0]), length=16),
            "addresses[0].length",
            "CIDR VIPs (10.1.0.0/16) are not supported",
        ),
    ],
)
def test_invalid_service_vip_is_rejected(
    address: workload_pb2.NetworkAddress, field: str, message: str
) -> None:
    msg = workload_pb2.Service(namespace="ns", hostname="h.ns", addresses=[address])
    error = rejection(service_from_proto, msg)
    assert (error.resource, error.field) == ("service ns/h.ns", field)
    assert message in error.message


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({"hostname": ""}, "hostname", "required"),
        ({"namespace": ""}, "namespace", "required"),
        (
            {"subject_alt_names": ["spiffe://td/ns/a/sa/b", "dns:x"]},
            "subject_alt_names[1]",
            "not a SPIFFE",
        ),
        ({"ports": [workload_pb2.Port(service_port=65536)]}, "ports[0].service_port", "65536"),
    ],
)
def test_invalid_service_is_rejected_naming_the_field(
    fields: dict[str, object], field: str, message: str
) -> None:
    msg = workload_pb2.Service(**{"name": "h", "namespace": "ns", "hostname": "h.ns", **fields})
    error = rejection(service_from_proto, msg)
    assert error.field == field
    assert message in error.message


def policy_with_match(**match: object) -> authorization_pb2.Authorization:
    return authorization_pb2.Authorization(
        name="p",
        namespace="ns",
        rules=[
            authorization_pb2.Rule(),
            authorization_pb2.Rule(
                clauses=[authorization_pb2.Clause(matches=[authorization_pb2.Match(**match)])]
            ),
        ],
    )


@pytest.mark.parametrize(
    ("msg", "field", "message"),
    [
        (authorization_pb2.Authorization(namespace="ns"), "name", "required"),
        (authorization_pb2.Authorization(name="p"), "namespace", "required"),
        (
            authorization_pb2.Authorization(name="p", namespace="ns", scope=3),
            "scope",
            "unknown value 3",
        ),
        (
            authorization_pb2.Authorization(name="p", namespace="ns", action=2),
            "action",
            "unknown value 2",
        ),
        (
            policy_with_match(source_ips=[authorization_pb2.Address(address=bytes(4), length=33)]),
            "rules[1].clauses[0].matches[0].source_ips[0].length",
            "prefix length 33 is longer than 32",
        ),
        (
            policy_with_match(not_destination_ips=[authorization_pb2.Address(address=bytes(3))]),
            "rules[1].clauses[0].matches[0].not_destination_ips[0].address",
            "got 3",
        ),
        (
            policy_with_match(principals=[authorization_pb2.StringMatch()]),
            "rules[1].clauses[0].matches[0].principals[0]",
            "no match type set",
        ),
        (
            policy_with_match(not_destination_ports=[80, 65536]),
            "rules[1].clauses[0].matches[0].not_destination_ports[1]",
            "65536 is not a port number",
        ),
    ],
)
def test_invalid_authorization_is_rejected_naming_the_field(
    msg: authorization_pb2.Authorization, field: str, message: str
) -> None:
    error = rejection(authorization_from_proto, msg)
    assert error.resource == f"authorization {msg.namespace}/{msg.name}"
    assert error.field == field
    assert message in error.message


def test_address_of_the_wrong_type_is_rejected() -> None:
    policy = any_pb2.Any()
    policy.Pack(authorization_pb2.Authorization(name="p", namespace="ns"))
    error = rejection(address_from_any, policy)
    assert error.field == "type_url"
    assert AUTHORIZATION_TYPE_URL in error.message


def test_undecodable_address_is_rejected() -> None:
    garbage = any_pb2.Any(type_url=ADDRESS_TYPE_URL, value=b"\x0a\x05\x01")
    assert rejection(address_from_any, garbage).field == "value"


def test_address_with_neither_workload_nor_service_is_rejected() -> None:
    empty = any_pb2.Any()
    empty.Pack(workload_pb2.Address())
    assert "neither workload nor service" in str(rejection(address_from_any, empty))


def test_undecodable_authorization_is_rejected() -> None:
    garbage = any_pb2.Any(type_url=AUTHORIZATION_TYPE_URL, value=b"\xff")
    assert rejection(authorization_from_any, garbage).resource == "authorization"
