"""The waypoint model -> Envoy's own xDS resources (xds-protos), pure builders.

For every port of a service bound to a waypoint (names as Istio's):
- Listener `<hostname>:<port>` (address VIP:port, not bound: a waypoint finds it by the
  CONNECT authority): one filter chain, an HTTP connection manager whose routes come by RDS
  under the same name, with the HTTP filters RBAC DENY (if any DENY policy applies), RBAC ALLOW
  (if any ALLOW policy applies), fault (configured per route), router;
- RouteConfiguration `<hostname>:<port>`: one virtual host for any authority, routes in rule
  order;
- Cluster `outbound|<port>|<subset>|<hostname>` (EDS) per service port and DestinationRule
  subset, and for every destination the routes name;
- ClusterLoadAssignment named as its cluster: the pods behind it, `podIP:targetPort`, with the
  workload, SPIFFE identity and tunnel (hbone or tcp) in metadata `istio`.

Defaults follow Istio so that a real Envoy behaves like the Python waypoint: routes have no
timeout unless configured (Envoy's own default is 15 s); circuit-breaker limits that are not
configured are 2^32-1 (Envoy's own default is 1024); connect timeout 10 s; load balancer
LEAST_REQUEST; outlier detection, when configured, fills in Envoy's defaults explicitly
(5 consecutive 5xx, 10 s interval, 30 s ejection, 10 %) and disables panic routing (Istio's
`minHealthPercent` 0).
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass

from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2, outlier_detection_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.rbac.v3 import rbac_pb2 as rbac_config_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.common.fault.v3 import fault_pb2 as common_fault_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.matcher.v3 import regex_pb2, string_pb2
from envoy.type.v3 import percent_pb2
from google.protobuf import any_pb2, duration_pb2, struct_pb2, wrappers_pb2
from google.protobuf.message import Message

from istiod_lite.model.l7.authz import WaypointPolicy
from istiod_lite.model.l7.destinationrule import TrafficPolicy
from istiod_lite.model.l7.routes import (
    Destination,
    HeaderOps,
    MatchKind,
    RequestMatch,
    RouteRule,
    StringMatch,
)
from meshcore._gen import workload_pb2

HCM_FILTER = "envoy.filters.network.http_connection_manager"
RBAC_FILTER = "envoy.filters.http.rbac"
FAULT_FILTER = "envoy.filters.http.fault"
ROUTER_FILTER = "envoy.filters.http.router"
HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
ISTIO_METADATA = "istio"
DRY_RUN_STAT_PREFIX = {"ALLOW": "istio_dry_run_allow_", "DENY": "istio_dry_run_deny_"}
UNLIMITED = 2**32 - 1
DEFAULT_CONNECT_TIMEOUT = datetime.timedelta(seconds=10)
DEFAULT_LOAD_BALANCER = "LEAST_REQUEST"
DEFAULT_CONSECUTIVE_5XX = 5
DEFAULT_OUTLIER_INTERVAL = datetime.timedelta(seconds=10)
DEFAULT_BASE_EJECTION_TIME = datetime.timedelta(seconds=30)
DEFAULT_MAX_EJECTION_PERCENT = 10
TUNNEL_HBONE = "hbone"
TUNNEL_TCP = "tcp"
_ENFORCE_ALWAYS = 100
_MILLION = 1_000_000
_ADS = config_source_pb2.ConfigSource(
    ads=config_source_pb2.AggregatedConfigSource(),
    resource_api_version=config_source_pb2.ApiVersion.V3,
)
_HTTP2_PROTOCOLS = frozenset({workload_pb2.AppProtocol.HTTP2, workload_pb2.AppProtocol.GRPC})


@dataclass(frozen=True, slots=True, order=True)
class ClusterRef:
    """One upstream cluster: a service host, a port and a DestinationRule subset ("" for none)."""

    host: str
    port: int
    subset: str = ""

    @property
    def name(self) -> str:
        return f"outbound|{self.port}|{self.subset}|{self.host}"


def listener_name(host: str, port: int) -> str:
    return f"{host}:{port}"


# --- Listener ---


def build_listener(
    *,
    host: str,
    port: int,
    address: str,
    deny: Sequence[WaypointPolicy],
    allow: Sequence[WaypointPolicy],
) -> listener_pb2.Listener:
    name = listener_name(host, port)
    http_filters = [
        _rbac_filter("DENY", deny) if deny else None,
        _rbac_filter("ALLOW", allow) if allow else None,
        hcm_pb2.HttpFilter(name=FAULT_FILTER, typed_config=_any(fault_pb2.HTTPFault())),
        hcm_pb2.HttpFilter(name=ROUTER_FILTER, typed_config=_any(router_pb2.Router())),
    ]
    manager = hcm_pb2.HttpConnectionManager(
        stat_prefix=name,
        rds=hcm_pb2.Rds(route_config_name=name, config_source=_ADS),
        http_filters=[f for f in http_filters if f is not None],
    )
    return listener_pb2.Listener(
        name=name,
        address=address_pb2.Address(
            socket_address=address_pb2.SocketAddress(address=address, port_value=port)
        ),
        bind_to_port=wrappers_pb2.BoolValue(value=False),
        traffic_direction=base_pb2.TrafficDirection.INBOUND,
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[
                    listener_components_pb2.Filter(name=HCM_FILTER, typed_config=_any(manager))
                ]
            )
        ],
    )


def _rbac_filter(action: str, policies: Sequence[WaypointPolicy]) -> hcm_pb2.HttpFilter:
    """One RBAC filter for the policies of one action; dry-run ones only as shadow rules."""
    enforced = [p for p in policies if not p.dry_run]
    dry_run = [p for p in policies if p.dry_run]
    config = rbac_pb2.RBAC()
    if enforced:
        config.rules.CopyFrom(_rbac(action, enforced))
    if dry_run:
        config.shadow_rules.CopyFrom(_rbac(action, dry_run))
        config.shadow_rules_stat_prefix = DRY_RUN_STAT_PREFIX[action]
    return hcm_pb2.HttpFilter(name=RBAC_FILTER, typed_config=_any(config))


def _rbac(action: str, policies: Sequence[WaypointPolicy]) -> rbac_config_pb2.RBAC:
    rbac = rbac_config_pb2.RBAC(action=rbac_config_pb2.RBAC.Action.Value(action))
    for policy in policies:
        for name, rule in policy.rules:
            rbac.policies[name].CopyFrom(rule)
    return rbac


# --- RouteConfiguration ---


def build_route_configuration(
    host: str, port: int, routes: Sequence[route_components_pb2.Route]
) -> route_pb2.RouteConfiguration:
    name = listener_name(host, port)
    return route_pb2.RouteConfiguration(
        name=name,
        virtual_hosts=[route_components_pb2.VirtualHost(name=name, domains=["*"], routes=routes)],
    )


def default_route(cluster: ClusterRef) -> route_components_pb2.Route:
    """Where a service's requests go when no route is configured: all to its own port."""
    return route_components_pb2.Route(
        name="default",
        match=route_components_pb2.RouteMatch(prefix="/"),
        route=route_components_pb2.RouteAction(
            cluster=cluster.name, timeout=_duration(datetime.timedelta(0))
        ),
    )


def envoy_routes(
    rule: RouteRule, clusters: Sequence[ClusterRef], listener_port: int
) -> list[route_components_pb2.Route]:
    """The Envoy routes of one rule on one listener (`clusters` in destination order); none if
    its matches all name another port."""
    matches = [m for m in rule.matches if m.port in (None, listener_port)]
    if rule.matches and not matches:
        return []
    action = _route_action(rule, clusters)
    per_filter = {}
    if rule.fault_delay is not None or rule.fault_abort is not None:
        per_filter[FAULT_FILTER] = _any(_fault(rule))
    routes = []
    for match in matches or [RequestMatch()]:
        route = route_components_pb2.Route(
            name=rule.name,
            match=_route_match(match),
            route=action,
            typed_per_filter_config=per_filter,
        )
        _add_header_ops(route, rule.headers)
        routes.append(route)
    return routes


def _route_action(
    rule: RouteRule, clusters: Sequence[ClusterRef]
) -> route_components_pb2.RouteAction:
    action = route_components_pb2.RouteAction(
        timeout=_duration(rule.timeout or datetime.timedelta(0))
    )
    destinations = rule.destinations
    if len(destinations) == 1 and destinations[0].headers == HeaderOps():
        action.cluster = clusters[0].name
    else:
        action.weighted_clusters.CopyFrom(
            route_components_pb2.WeightedCluster(
                clusters=[
                    _cluster_weight(d, c) for d, c in zip(destinations, clusters, strict=True)
                ]
            )
        )
    if rule.retries is not None:
        policy = route_components_pb2.RetryPolicy(
            retry_on=rule.retries.retry_on,
            num_retries=wrappers_pb2.UInt32Value(value=rule.retries.attempts),
            retriable_status_codes=rule.retries.retriable_status_codes,
        )
        if rule.retries.per_try_timeout is not None:
            policy.per_try_timeout.CopyFrom(_duration(rule.retries.per_try_timeout))
        action.retry_policy.CopyFrom(policy)
    rewrite = rule.rewrite
    if rewrite is not None:
        if rewrite.prefix is not None:
            action.prefix_rewrite = rewrite.prefix
        if rewrite.regex is not None:
            pattern, substitution = rewrite.regex
            action.regex_rewrite.CopyFrom(
                regex_pb2.RegexMatchAndSubstitute(
                    pattern=regex_pb2.RegexMatcher(regex=pattern), substitution=substitution
                )
            )
        if rewrite.authority is not None:
            action.host_rewrite_literal = rewrite.authority
    return action


def _cluster_weight(
    destination: Destination, cluster: ClusterRef
) -> route_components_pb2.WeightedCluster.ClusterWeight:
    weighted = route_components_pb2.WeightedCluster.ClusterWeight(
        name=cluster.name, weight=wrappers_pb2.UInt32Value(value=destination.weight)
    )
    _add_header_ops(weighted, destination.headers)
    return weighted


def _add_header_ops(target: Message, ops: HeaderOps) -> None:
    """Header changes onto a Route or a ClusterWeight (both have the same four fields)."""
    for direction in ("request", "response"):
        additions = getattr(target, f"{direction}_headers_to_add")
        for operations, append_action in (
            (
                getattr(ops, f"{direction}_set"),
                base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
            ),
            (getattr(ops, f"{direction}_add"), base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD),
        ):
            for key, value in operations:
                additions.add(
                    header=base_pb2.HeaderValue(key=key, value=value), append_action=append_action
                )
        getattr(target, f"{direction}_headers_to_remove").extend(
            getattr(ops, f"{direction}_remove")
        )


def _route_match(match: RequestMatch) -> route_components_pb2.RouteMatch:
    result = route_components_pb2.RouteMatch()
    path = match.path
    if path is None:
        result.prefix = "/"
    elif path.kind is MatchKind.EXACT:
        result.path = path.value
    elif path.kind is MatchKind.PREFIX:
        result.prefix = path.value
    else:
        result.safe_regex.CopyFrom(regex_pb2.RegexMatcher(regex=path.value))
    if match.ignore_case:
        result.case_sensitive.CopyFrom(wrappers_pb2.BoolValue(value=False))
    for header in match.headers:
        matcher = route_components_pb2.HeaderMatcher(name=header.name, invert_match=header.invert)
        if header.match.kind is MatchKind.PRESENT:
            matcher.present_match = True
        else:
            matcher.string_match.CopyFrom(string_matcher(header.match))
        result.headers.append(matcher)
    for param in match.query_params:
        query = route_components_pb2.QueryParameterMatcher(name=param.name)
        if param.match.kind is MatchKind.PRESENT:
            query.present_match = True
        else:
            query.string_match.CopyFrom(string_matcher(param.match))
        result.query_parameters.append(query)
    return result


def string_matcher(match: StringMatch) -> string_pb2.StringMatcher:
    if match.kind is MatchKind.EXACT:
        return string_pb2.StringMatcher(exact=match.value)
    if match.kind is MatchKind.PREFIX:
        return string_pb2.StringMatcher(prefix=match.value)
    return string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=match.value))


def _fault(rule: RouteRule) -> fault_pb2.HTTPFault:
    fault = fault_pb2.HTTPFault()
    if rule.fault_delay is not None:
        fault.delay.CopyFrom(
            common_fault_pb2.FaultDelay(
                fixed_delay=_duration(rule.fault_delay.delay),
                percentage=_fraction(rule.fault_delay.percent),
            )
        )
    if rule.fault_abort is not None:
        fault.abort.CopyFrom(
            fault_pb2.FaultAbort(
                http_status=rule.fault_abort.http_status,
                percentage=_fraction(rule.fault_abort.percent),
            )
        )
    return fault


def _fraction(percent: float) -> percent_pb2.FractionalPercent:
    """A percentage as parts per million (Istio's conversion keeps 4 decimals)."""
    return percent_pb2.FractionalPercent(
        numerator=round(percent * _MILLION / 100),
        denominator=percent_pb2.FractionalPercent.DenominatorType.MILLION,
    )


# --- Cluster ---


def build_cluster(
    cluster: ClusterRef,
    *,
    policy: TrafficPolicy,
    app_protocol: int,
    service: tuple[str, str] | None,
) -> cluster_pb2.Cluster:
    """`service` is the (namespace, name) behind the host, if it is a Kubernetes Service."""
    pool = policy.connection_pool
    result = cluster_pb2.Cluster(
        name=cluster.name,
        type=cluster_pb2.Cluster.DiscoveryType.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(
            eds_config=_ADS, service_name=cluster.name
        ),
        connect_timeout=_duration(
            pool.connect_timeout if pool and pool.connect_timeout else DEFAULT_CONNECT_TIMEOUT
        ),
        lb_policy=cluster_pb2.Cluster.LbPolicy.Value(policy.load_balancer or DEFAULT_LOAD_BALANCER),
        circuit_breakers=circuit_breaker_pb2.CircuitBreakers(
            thresholds=[
                circuit_breaker_pb2.CircuitBreakers.Thresholds(
                    max_connections=_limit(pool.max_connections if pool else None),
                    max_pending_requests=_limit(pool.http1_max_pending_requests if pool else None),
                    max_requests=_limit(pool.http2_max_requests if pool else None),
                    max_retries=_limit(pool.max_retries if pool else None),
                )
            ]
        ),
        metadata=_istio_metadata({"services": [_service_metadata(cluster.host, service)]}),
    )
    result.typed_extension_protocol_options[HTTP_PROTOCOL_OPTIONS].CopyFrom(
        _any(_protocol_options(policy, app_protocol))
    )
    outlier = policy.outlier_detection
    if outlier is not None:
        consecutive_5xx = (
            outlier.consecutive_5xx_errors
            if outlier.consecutive_5xx_errors is not None
            else DEFAULT_CONSECUTIVE_5XX
        )
        detection = outlier_detection_pb2.OutlierDetection(
            consecutive_5xx=wrappers_pb2.UInt32Value(value=consecutive_5xx),
            enforcing_consecutive_5xx=wrappers_pb2.UInt32Value(
                value=_ENFORCE_ALWAYS if consecutive_5xx else 0
            ),
            enforcing_success_rate=wrappers_pb2.UInt32Value(value=0),
            interval=_duration(outlier.interval or DEFAULT_OUTLIER_INTERVAL),
            base_ejection_time=_duration(outlier.base_ejection_time or DEFAULT_BASE_EJECTION_TIME),
            max_ejection_percent=wrappers_pb2.UInt32Value(
                value=(
                    outlier.max_ejection_percent
                    if outlier.max_ejection_percent is not None
                    else DEFAULT_MAX_EJECTION_PERCENT
                )
            ),
        )
        if outlier.consecutive_gateway_errors is not None:
            detection.consecutive_gateway_failure.value = outlier.consecutive_gateway_errors
            detection.enforcing_consecutive_gateway_failure.value = (
                _ENFORCE_ALWAYS if outlier.consecutive_gateway_errors else 0
            )
        result.outlier_detection.CopyFrom(detection)
        result.common_lb_config.healthy_panic_threshold.value = 0
    return result


def _protocol_options(
    policy: TrafficPolicy, app_protocol: int
) -> http_protocol_options_pb2.HttpProtocolOptions:
    """The HTTP version spoken to endpoints: the service port's, else the client's."""
    pool = policy.connection_pool
    options = http_protocol_options_pb2.HttpProtocolOptions()
    common = options.common_http_protocol_options
    if pool is not None and pool.max_requests_per_connection is not None:
        common.max_requests_per_connection.value = pool.max_requests_per_connection
    if pool is not None and pool.idle_timeout is not None:
        common.idle_timeout.CopyFrom(_duration(pool.idle_timeout))
    explicit = options.explicit_http_config  # set only by assigning into it
    if pool is not None and pool.use_client_protocol:
        options.use_downstream_protocol_config.http_protocol_options.SetInParent()
        options.use_downstream_protocol_config.http2_protocol_options.SetInParent()
    elif app_protocol in _HTTP2_PROTOCOLS or (pool is not None and pool.h2_upgrade):
        explicit.http2_protocol_options.SetInParent()
    elif app_protocol == workload_pb2.AppProtocol.HTTP11:
        explicit.http_protocol_options.SetInParent()
    else:
        options.use_downstream_protocol_config.http_protocol_options.SetInParent()
        options.use_downstream_protocol_config.http2_protocol_options.SetInParent()
    return options


def _limit(value: int | None) -> wrappers_pb2.UInt32Value:
    return wrappers_pb2.UInt32Value(value=UNLIMITED if value is None else value)


def _service_metadata(host: str, service: tuple[str, str] | None) -> dict[str, str]:
    if service is None:
        return {"host": host, "name": host.split(".", 1)[0], "namespace": ""}
    namespace, name = service
    return {"host": host, "name": name, "namespace": namespace}


# --- ClusterLoadAssignment ---


@dataclass(frozen=True, slots=True)
class UpstreamEndpoint:
    """One pod behind a cluster."""

    address: str
    port: int
    healthy: bool
    workload: str  # "<ns>/<pod name>"
    identity: str  # spiffe://...
    tunnel: str  # TUNNEL_HBONE (dial podIP:15008) or TUNNEL_TCP (dial address:port)


def build_load_assignment(
    cluster: ClusterRef, endpoints: Sequence[UpstreamEndpoint]
) -> endpoint_pb2.ClusterLoadAssignment:
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=cluster.name,
        endpoints=[
            endpoint_components_pb2.LocalityLbEndpoints(
                lb_endpoints=[_lb_endpoint(endpoint) for endpoint in endpoints]
            )
        ]
        if endpoints
        else [],
    )


def _lb_endpoint(endpoint: UpstreamEndpoint) -> endpoint_components_pb2.LbEndpoint:
    return endpoint_components_pb2.LbEndpoint(
        endpoint=endpoint_components_pb2.Endpoint(
            address=address_pb2.Address(
                socket_address=address_pb2.SocketAddress(
                    address=endpoint.address, port_value=endpoint.port
                )
            )
        ),
        health_status=health_check_pb2.HealthStatus.HEALTHY
        if endpoint.healthy
        else health_check_pb2.HealthStatus.UNHEALTHY,
        load_balancing_weight=wrappers_pb2.UInt32Value(value=1),
        metadata=_istio_metadata(
            {
                "workload": endpoint.workload,
                "identity": endpoint.identity,
                "tunnel": endpoint.tunnel,
            }
        ),
    )


# --- helpers ---


def _any(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message, deterministic=True)
    return packed


def _duration(value: datetime.timedelta) -> duration_pb2.Duration:
    result = duration_pb2.Duration()
    result.FromTimedelta(value)
    return result


def _istio_metadata(fields: dict[str, object]) -> base_pb2.Metadata:
    metadata = base_pb2.Metadata()
    struct = struct_pb2.Struct()
    struct.update(fields)
    metadata.filter_metadata[ISTIO_METADATA].CopyFrom(struct)
    return metadata
