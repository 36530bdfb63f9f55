"""Run our Python waypoint with a fixed config, no control plane: the process l7_bench measures.

    python perf/waypoint_static.py --ca-cert ca.pem --ca-key ca-key.pem --address 127.0.0.4 \
        --vip 127.10.0.1:80 --backend 127.0.0.2:8080

One service `bench.default.svc.cluster.local` (VIP:port as given) bound to the waypoint
`default/waypoint`: one route `/` -> one cluster -> one endpoint `--backend`, reached over
plain TCP with HTTP/1.1 (the same hop the Envoy waypoint in the benchmark makes); clients
may speak HTTP/1.1 or HTTP/2 (detected from the preface). The protos are the ones
istiod_lite would send, applied through `StaticFeed`; the certificate comes from the CA files
in-process. Readiness on `--address`:15021; access logs are off (log level warning), as in
the Envoy it is compared with.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import trio

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from envoy.config.cluster.v3 import cluster_pb2  # noqa: E402
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2  # noqa: E402
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2  # noqa: E402
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2  # noqa: E402
from envoy.config.route.v3 import route_components_pb2, route_pb2  # noqa: E402
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: E402
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: E402
from envoy.extensions.filters.network.http_connection_manager.v3 import (  # noqa: E402
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import any_pb2, duration_pb2, wrappers_pb2  # noqa: E402
from google.protobuf.message import Message  # noqa: E402

from meshcore._gen import workload_pb2  # noqa: E402
from meshcore.identity import CertificateAuthority  # noqa: E402
from meshcore.identity.manager import LocalCaProvider  # noqa: E402
from meshcore.log import configure_logging  # noqa: E402
from meshcore.process import prepare_for_serving  # noqa: E402
from waypoint.settings import Ports, WaypointSettings  # noqa: E402

NAMESPACE = "default"
SERVICE = "bench"
HOSTNAME = f"{SERVICE}.{NAMESPACE}.svc.cluster.local"
WAYPOINT_NAME = "waypoint"
BACKEND_IDENTITY = "spiffe://cluster.local/ns/default/sa/server"


def _any(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def bench_resources(vip: tuple[str, int], backend: tuple[str, int]) -> list[Message]:
    """Address + Listener + RouteConfiguration + Cluster + CLA for one service with one route."""
    name = f"{HOSTNAME}:{vip[1]}"
    cluster_name = f"outbound|{vip[1]}||{HOSTNAME}"
    service = workload_pb2.Address(
        service=workload_pb2.Service(
            name=SERVICE,
            namespace=NAMESPACE,
            hostname=HOSTNAME,
            addresses=[workload_pb2.NetworkAddress(address=bytes(map(int, vip[0].split("."))))],
            ports=[workload_pb2.Port(service_port=vip[1], target_port=backend[1])],
        )
    )
    hcm = hcm_pb2.HttpConnectionManager(
        stat_prefix=name,
        rds=hcm_pb2.Rds(
            route_config_name=name,
            config_source=config_source_pb2.ConfigSource(ads=config_source_pb2.AggregatedConfigSource()),
        ),
        http_filters=[hcm_pb2.HttpFilter(name="envoy.filters.http.router", typed_config=_any(router_pb2.Router()))],
    )
    listener = listener_pb2.Listener(
        name=name,
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[
                    listener_components_pb2.Filter(
                        name="envoy.filters.network.http_connection_manager", typed_config=_any(hcm)
                    )
                ]
            )
        ],
    )
    routes = route_pb2.RouteConfiguration(
        name=name,
        virtual_hosts=[
            route_components_pb2.VirtualHost(
                name=name,
                domains=["*"],
                routes=[
                    route_components_pb2.Route(
                        match=route_components_pb2.RouteMatch(prefix="/"),
                        # timeout 0s: no route timeout, as istiod_lite sends for a
                        # VirtualService without one (Envoy's own default is 15 s).
                        route=route_components_pb2.RouteAction(cluster=cluster_name, timeout=duration_pb2.Duration()),
                    )
                ],
            )
        ],
    )
    cluster = cluster_pb2.Cluster(
        name=cluster_name, type=cluster_pb2.Cluster.EDS, lb_policy=cluster_pb2.Cluster.ROUND_ROBIN
    )
    cluster.eds_cluster_config.service_name = cluster_name
    # Clients may speak HTTP/1.1 or HTTP/2 (no app_protocol: detected); nginx speaks HTTP/1.1.
    options = http_protocol_options_pb2.HttpProtocolOptions()
    options.explicit_http_config.http_protocol_options.SetInParent()
    cluster.typed_extension_protocol_options[
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ].CopyFrom(_any(options))
    cluster.metadata.filter_metadata["istio"].update(
        {"services": [{"host": HOSTNAME, "name": SERVICE, "namespace": NAMESPACE}]}
    )
    metadata = base_pb2.Metadata()
    metadata.filter_metadata["istio"].update(
        {"workload": f"{NAMESPACE}/server", "identity": BACKEND_IDENTITY, "tunnel": "tcp"}
    )
    assignment = endpoint_pb2.ClusterLoadAssignment(
        cluster_name=cluster_name,
        endpoints=[
            endpoint_components_pb2.LocalityLbEndpoints(
                lb_endpoints=[
                    endpoint_components_pb2.LbEndpoint(
                        endpoint=endpoint_components_pb2.Endpoint(
                            address=address_pb2.Address(
                                socket_address=address_pb2.SocketAddress(address=backend[0], port_value=backend[1])
                            )
                        ),
                        load_balancing_weight=wrappers_pb2.UInt32Value(value=1),
                        metadata=metadata,
                    )
                ]
            )
        ],
    )
    return [service, listener, routes, cluster, assignment]


def _host_port(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host, int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ca-cert", type=Path, required=True)
    parser.add_argument("--ca-key", type=Path, required=True)
    parser.add_argument("--address", required=True, help="the waypoint's pod IP (HBONE on :15008)")
    parser.add_argument("--vip", type=_host_port, required=True, help="the service VIP:port")
    parser.add_argument("--backend", type=_host_port, required=True, help="the one endpoint ip:port")
    args = parser.parse_args(argv)
    configure_logging("warning")
    from waypoint.app import Waypoint  # after logging is set up, as waypoint/__main__ does

    ca = CertificateAuthority.load(args.ca_cert.read_bytes(), args.ca_key.read_bytes())
    settings = WaypointSettings(
        name=WAYPOINT_NAME,
        namespace=NAMESPACE,
        address=args.address,
        control_plane=None,
        ports=Ports(hbone=15008, metrics=0, readiness=15021, admin=0),
    )
    waypoint = Waypoint(settings, certificate_provider=LocalCaProvider(ca))
    errors = waypoint.feed.apply(bench_resources(args.vip, args.backend))
    if errors:
        print(f"waypoint_static: config rejected: {errors}", file=sys.stderr)
        return 2
    prepare_for_serving()  # as the `waypoint` command does
    trio.run(waypoint.run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
