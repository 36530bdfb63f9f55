"""Conversion of Envoy's xDS resources into the waypoint's model, where resources arrive.

    listener_from_xds(any_or_listener)          -> ListenerConfig
    route_config_from_xds(any_or_route_config)  -> RouteConfig
    cluster_from_xds(any_or_cluster)            -> ClusterConfig
    endpoints_from_xds(any_or_cla)              -> ClusterEndpoints

Each accepts a `google.protobuf.Any` (as the xDS client delivers it; its type URL is
checked) or the message itself, and raises `XdsConversionError(resource, field, message)`
for anything it cannot honour, so the xDS handler NACKs that one resource and keeps the
last good version.

What is accepted is the shape istiod_lite emits (see the shared plan), with Envoy's
defaults for unset fields. Fields that decide where a request goes or whether it is
allowed (route matching and actions, RBAC, HTTP filters) are checked strictly: one this
waypoint does not implement is rejected, because ignoring it would silently route or
authorize differently from a real Envoy given the same resource. Fields that only tune
observability or buffering are ignored; so is everything in a Listener outside its HTTP
connection manager, and in a Cluster outside what `ClusterConfig` holds (of outlier
detection, only the consecutive-5xx and gateway-failure detectors).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from ipaddress import ip_address
from typing import Any, TypeVar

from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2, outlier_detection_pb2
from envoy.config.core.v3 import base_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.rbac.v3 import rbac_pb2 as rbac_config_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as rbac_filter_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.matcher.v3 import path_pb2, string_pb2
from envoy.type.v3 import percent_pb2
from google.protobuf import any_pb2, duration_pb2, struct_pb2
from google.protobuf.message import DecodeError, Message

from meshcore.identity.spiffe import Identity, InvalidIdentity
from waypoint.config.model import (
    DEFAULT_CIRCUIT_BREAKER_LIMIT,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_CONSECUTIVE_GATEWAY_FAILURE,
    DEFAULT_HEALTHY_PANIC_THRESHOLD,
    DEFAULT_MAX_EJECTION_TIME,
    DEFAULT_RETRY_BASE_INTERVAL,
    DEFAULT_ROUTE_TIMEOUT,
    AllOf,
    AnyOf,
    AnyRequest,
    AuthenticatedCondition,
    AuthzPolicy,
    ClusterConfig,
    ClusterEndpoints,
    Condition,
    DestinationPortCondition,
    Endpoint,
    Fault,
    FaultAbort,
    FaultDelay,
    HeaderAppendAction,
    HeaderCondition,
    HeaderMatch,
    HeaderToAdd,
    LbPolicy,
    Limits,
    ListenerConfig,
    Not,
    OutlierConfig,
    QueryParamMatch,
    Rbac,
    RbacAction,
    RbacPolicy,
    RegexRewrite,
    RetryBudget,
    RetryPolicy,
    Route,
    RouteAction,
    RouteConfig,
    RouteMatch,
    ServiceRef,
    StringMatch,
    StringMatchKind,
    Tunnel,
    UpstreamProtocol,
    UrlPathCondition,
    WeightedBackend,
)

M = TypeVar("M", bound=Message)

FAULT_FILTER_NAME = "envoy.filters.http.fault"
HTTP_PROTOCOL_OPTIONS_KEY = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
ISTIO_METADATA_KEY = "istio"
_MAX_PORT = 65535


def type_url(message_type: type[Message]) -> str:
    return f"type.googleapis.com/{message_type.DESCRIPTOR.full_name}"


_HCM_TYPE = type_url(hcm_pb2.HttpConnectionManager)
_RBAC_TYPE = type_url(rbac_filter_pb2.RBAC)
_FAULT_TYPE = type_url(fault_pb2.HTTPFault)
_ROUTER_TYPE = type_url(router_pb2.Router)


class XdsConversionError(ValueError):
    """An xDS resource the waypoint cannot use; names the resource and the field."""

    def __init__(self, resource: str, field: str, message: str) -> None:
        self.resource = resource
        self.field = field
        self.message = message
        where = f"{resource}: {field}" if field else resource
        super().__init__(f"{where}: {message}")


class _FieldError(Exception):
    """Raised below the public converters, which add the resource."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(field, message)
        self.field = field
        self.message = message


# --- Public API ---


def listener_from_xds(resource: any_pb2.Any | listener_pb2.Listener) -> ListenerConfig:
    """Convert a service port's Listener: its name, route name, RBAC and fault filters."""
    msg = _unpack(resource, listener_pb2.Listener)
    try:
        return _listener(msg)
    except _FieldError as e:
        raise XdsConversionError(f"Listener {msg.name}", e.field, e.message) from None


def route_config_from_xds(
    resource: any_pb2.Any | route_pb2.RouteConfiguration,
) -> RouteConfig:
    """Convert a RouteConfiguration: one virtual host with domain "*", routes in order."""
    msg = _unpack(resource, route_pb2.RouteConfiguration)
    try:
        return _route_config(msg)
    except _FieldError as e:
        raise XdsConversionError(f"RouteConfiguration {msg.name}", e.field, e.message) from None


def cluster_from_xds(resource: any_pb2.Any | cluster_pb2.Cluster) -> ClusterConfig:
    """Convert an EDS Cluster: LB policy, circuit breakers, outlier detection, service."""
    msg = _unpack(resource, cluster_pb2.Cluster)
    try:
        return _cluster(msg)
    except _FieldError as e:
        raise XdsConversionError(f"Cluster {msg.name}", e.field, e.message) from None


def endpoints_from_xds(
    resource: any_pb2.Any | endpoint_pb2.ClusterLoadAssignment,
) -> ClusterEndpoints:
    """Convert a ClusterLoadAssignment: address, health, weight and istio metadata."""
    msg = _unpack(resource, endpoint_pb2.ClusterLoadAssignment)
    try:
        return _cluster_endpoints(msg)
    except _FieldError as e:
        resource_name = f"ClusterLoadAssignment {msg.cluster_name}"
        raise XdsConversionError(resource_name, e.field, e.message) from None


# --- Listener ---


def _listener(msg: listener_pb2.Listener) -> ListenerConfig:
    name = _required("name", msg.name)
    hostname, _, port_text = name.rpartition(":")
    if not hostname or not port_text.isdigit() or not 0 < int(port_text) <= _MAX_PORT:
        raise _FieldError("name", f"{name!r} is not '<service hostname>:<port>'")
    if len(msg.filter_chains) != 1:
        raise _FieldError(
            "filter_chains", f"expected exactly one filter chain, got {len(msg.filter_chains)}"
        )
    filters = msg.filter_chains[0].filters
    if len(filters) != 1 or filters[0].typed_config.type_url != _HCM_TYPE:
        raise _FieldError(
            "filter_chains[0].filters",
            "expected exactly one network filter, an HTTP connection manager "
            "(envoy.filters.network.http_connection_manager)",
        )
    path = "filter_chains[0].filters[0].typed_config"
    hcm = _unpack_field(path, filters[0].typed_config, hcm_pb2.HttpConnectionManager)
    if hcm.WhichOneof("route_specifier") != "rds":
        raise _FieldError(f"{path}.rds", "routes must come from RDS (rds.route_config_name)")
    route_config_name = _required(f"{path}.rds.route_config_name", hcm.rds.route_config_name)

    deny = allow = None
    fault_filter, default_fault, router_seen = False, None, False
    for i, http_filter in enumerate(hcm.http_filters):
        where = f"{path}.http_filters[{i}]"
        if router_seen:
            raise _FieldError(where, "the router must be the last HTTP filter")
        if http_filter.disabled:
            raise _FieldError(f"{where}.disabled", "disabled HTTP filters are not supported")
        if http_filter.WhichOneof("config_type") != "typed_config":
            raise _FieldError(where, "HTTP filters need a typed_config")
        config = http_filter.typed_config
        if config.type_url == _RBAC_TYPE:
            rbac = _rbac_filter(f"{where}.typed_config", config)
            if rbac is None:
                continue
            if rbac.action is RbacAction.DENY:
                if deny is not None:
                    raise _FieldError(where, "a second DENY RBAC filter")
                deny = rbac
            else:
                if allow is not None:
                    raise _FieldError(where, "a second ALLOW RBAC filter")
                allow = rbac
        elif config.type_url == _FAULT_TYPE:
            if http_filter.name != FAULT_FILTER_NAME:
                raise _FieldError(
                    f"{where}.name", f"the fault filter must be named {FAULT_FILTER_NAME}"
                )
            where = f"{where}.typed_config"
            fault = _fault(where, _unpack_field(where, config, fault_pb2.HTTPFault))
            fault_filter = True
            default_fault = fault if fault.delay or fault.abort else None
        elif config.type_url == _ROUTER_TYPE:
            router_seen = True
        elif not http_filter.is_optional:
            raise _FieldError(
                f"{where}.typed_config",
                f"HTTP filter {config.type_url} is not supported "
                "(supported: RBAC, fault, router; mark others is_optional)",
            )
    if not router_seen:
        raise _FieldError(f"{path}.http_filters", "the router filter must be the last filter")
    return ListenerConfig(
        name=name,
        hostname=hostname,
        port=int(port_text),
        route_config_name=route_config_name,
        authz=AuthzPolicy(deny=deny, allow=allow),
        fault_filter=fault_filter,
        default_fault=default_fault,
    )


def _rbac_filter(path: str, config: any_pb2.Any) -> Rbac | None:
    rbac_filter = _unpack_field(path, config, rbac_filter_pb2.RBAC)
    _only(
        rbac_filter,
        path,
        supported={"rules"},
        ignored={
            "rules_stat_prefix",
            "shadow_rules",
            "shadow_rules_stat_prefix",
            "track_per_rule_stats",
        },
    )
    if not rbac_filter.HasField("rules"):
        return None  # Envoy: no rules, no enforcement
    rules = rbac_filter.rules
    path = f"{path}.rules"
    _only(rules, path, supported={"action", "policies"})
    if rules.action == rbac_config_pb2.RBAC.ALLOW:
        action = RbacAction.ALLOW
    elif rules.action == rbac_config_pb2.RBAC.DENY:
        action = RbacAction.DENY
    else:
        raise _FieldError(f"{path}.action", "only ALLOW and DENY are supported")
    policies = tuple(
        _rbac_policy(f"{path}.policies[{name!r}]", name, rules.policies[name])
        for name in sorted(rules.policies)
    )
    return Rbac(action, policies)


def _rbac_policy(path: str, name: str, policy: rbac_config_pb2.Policy) -> RbacPolicy:
    _only(policy, path, supported={"permissions", "principals"})
    if not policy.permissions:
        raise _FieldError(f"{path}.permissions", "at least one permission is required")
    if not policy.principals:
        raise _FieldError(f"{path}.principals", "at least one principal is required")
    return RbacPolicy(
        name,
        tuple(_permission(f"{path}.permissions[{i}]", p) for i, p in enumerate(policy.permissions)),
        tuple(_principal(f"{path}.principals[{i}]", p) for i, p in enumerate(policy.principals)),
    )


def _permission(path: str, msg: rbac_config_pb2.Permission) -> Condition:
    kind = msg.WhichOneof("rule")
    match kind:
        case "any":
            return _any(path, msg.any)
        case "and_rules" | "or_rules":
            rules = getattr(msg, kind).rules
            conditions = tuple(
                _permission(f"{path}.{kind}.rules[{i}]", rule) for i, rule in enumerate(rules)
            )
            return _combined(f"{path}.{kind}", kind == "and_rules", conditions)
        case "not_rule":
            return Not(_permission(f"{path}.not_rule", msg.not_rule))
        case "header":
            return HeaderCondition(_header_match(f"{path}.header", msg.header))
        case "url_path":
            return UrlPathCondition(_path_matcher(f"{path}.url_path", msg.url_path))
        case "destination_port":
            return DestinationPortCondition(_port(f"{path}.destination_port", msg.destination_port))
    raise _unsupported_rule(
        path, kind, "any, and_rules, or_rules, not_rule, header, url_path, destination_port"
    )


def _principal(path: str, msg: rbac_config_pb2.Principal) -> Condition:
    kind = msg.WhichOneof("identifier")
    match kind:
        case "any":
            return _any(path, msg.any)
        case "and_ids" | "or_ids":
            ids = getattr(msg, kind).ids
            conditions = tuple(
                _principal(f"{path}.{kind}.ids[{i}]", principal) for i, principal in enumerate(ids)
            )
            return _combined(f"{path}.{kind}", kind == "and_ids", conditions)
        case "not_id":
            return Not(_principal(f"{path}.not_id", msg.not_id))
        case "authenticated":
            _only(msg.authenticated, f"{path}.authenticated", supported={"principal_name"})
            if not msg.authenticated.HasField("principal_name"):
                return AuthenticatedCondition(None)
            name = msg.authenticated.principal_name
            return AuthenticatedCondition(
                _string_match(f"{path}.authenticated.principal_name", name)
            )
        case "header":
            return HeaderCondition(_header_match(f"{path}.header", msg.header))
        case "url_path":
            return UrlPathCondition(_path_matcher(f"{path}.url_path", msg.url_path))
    raise _unsupported_rule(
        path, kind, "any, and_ids, or_ids, not_id, authenticated, header, url_path"
    )


def _any(path: str, value: bool) -> AnyRequest:
    if not value:
        raise _FieldError(f"{path}.any", "must be true when set")
    return AnyRequest()


def _combined(path: str, all_of: bool, conditions: tuple[Condition, ...]) -> Condition:
    if not conditions:
        raise _FieldError(path, "needs at least one entry")
    return AllOf(conditions) if all_of else AnyOf(conditions)


def _unsupported_rule(path: str, kind: str | None, supported: str) -> _FieldError:
    if kind is None:
        return _FieldError(path, f"no rule is set (supported: {supported})")
    return _FieldError(f"{path}.{kind}", f"not supported by the waypoint (supported: {supported})")


def _path_matcher(path: str, msg: path_pb2.PathMatcher) -> StringMatch:
    if msg.WhichOneof("rule") != "path":
        raise _FieldError(f"{path}.path", "required")
    return _string_match(f"{path}.path", msg.path)


# --- Routes ---


def _route_config(msg: route_pb2.RouteConfiguration) -> RouteConfig:
    name = _required("name", msg.name)
    _only(
        msg,
        "",
        supported={"name", "virtual_hosts"},
        ignored={
            "validate_clusters",
            "max_direct_response_body_size_bytes",
            "ignore_port_in_host_matching",
            "most_specific_header_mutations_wins",
            "metadata",
        },
    )
    if len(msg.virtual_hosts) != 1:
        raise _FieldError(
            "virtual_hosts",
            f"expected exactly one virtual host, got {len(msg.virtual_hosts)} "
            "(a waypoint route configuration serves one service port)",
        )
    vhost = msg.virtual_hosts[0]
    _only(
        vhost,
        "virtual_hosts[0]",
        supported={"name", "domains", "routes"},
        ignored={
            "metadata",
            "include_request_attempt_count",
            "include_attempt_count_in_response",
            "include_is_timeout_retry_header",
            "per_request_buffer_limit_bytes",
            "request_body_buffer_limit",
        },
    )
    if "*" not in vhost.domains:
        raise _FieldError("virtual_hosts[0].domains", 'must contain "*"')
    routes = tuple(
        _route(f"virtual_hosts[0].routes[{i}]", route) for i, route in enumerate(vhost.routes)
    )
    return RouteConfig(name, routes)


def _route(path: str, msg: route_components_pb2.Route) -> Route:
    _only(
        msg,
        path,
        supported={"name", "match", "route", "typed_per_filter_config", *_HEADER_CHANGE_FIELDS},
        ignored={
            "metadata",
            "decorator",
            "tracing",
            "stat_prefix",
            "per_request_buffer_limit_bytes",
            "request_body_buffer_limit",
        },
    )
    if msg.WhichOneof("action") != "route":
        raise _FieldError(f"{path}.route", "required (only route actions are supported)")
    fault = None
    for key in msg.typed_per_filter_config:
        where = f"{path}.typed_per_filter_config[{key!r}]"
        if key != FAULT_FILTER_NAME:
            raise _FieldError(where, f"only {FAULT_FILTER_NAME} may be configured per route")
        config = msg.typed_per_filter_config[key]
        fault = _fault(where, _unpack_field(where, config, fault_pb2.HTTPFault))
    action = _route_action(f"{path}.route", msg.route)
    try:
        action = replace(action, fault=fault, **_header_changes(path, msg))
    except ValueError as e:
        raise _FieldError(path, str(e)) from None
    return Route(_route_match(f"{path}.match", msg.match), action, msg.name)


def _route_match(path: str, msg: route_components_pb2.RouteMatch) -> RouteMatch:
    _only(
        msg,
        path,
        supported={"prefix", "path", "safe_regex", "case_sensitive", "headers", "query_parameters"},
    )
    ignore_case = msg.HasField("case_sensitive") and not msg.case_sensitive.value
    match msg.WhichOneof("path_specifier"):
        case "prefix":
            path_match = StringMatch(StringMatchKind.PREFIX, msg.prefix, ignore_case)
        case "path":
            path_match = StringMatch(StringMatchKind.EXACT, msg.path, ignore_case)
        case "safe_regex":
            path_match = _regex_match(f"{path}.safe_regex", msg.safe_regex.regex)
        case _:
            raise _FieldError(path, "one of prefix, path, safe_regex is required")
    method = None
    headers = []
    for i, header in enumerate(msg.headers):
        converted = _header_match(f"{path}.headers[{i}]", header)
        if (
            method is None
            and converted.name == ":method"
            and not converted.invert
            and converted.value is not None
            and converted.value.kind is StringMatchKind.EXACT
            and not converted.value.ignore_case
        ):
            method = converted.value.value
        else:
            headers.append(converted)
    params = tuple(
        _query_param_match(f"{path}.query_parameters[{i}]", param)
        for i, param in enumerate(msg.query_parameters)
    )
    return RouteMatch(path_match, tuple(headers), params, method)


def _query_param_match(
    path: str, msg: route_components_pb2.QueryParameterMatcher
) -> QueryParamMatch:
    _only(msg, path, supported={"name", "string_match", "present_match"})
    name = _required(f"{path}.name", msg.name)
    match msg.WhichOneof("query_parameter_match_specifier"):
        case "string_match":
            return QueryParamMatch(name, _string_match(f"{path}.string_match", msg.string_match))
        case "present_match" if msg.present_match:
            return QueryParamMatch(name)
    raise _FieldError(path, "one of string_match, present_match: true is required")


def _route_action(path: str, msg: route_components_pb2.RouteAction) -> RouteAction:
    _only(
        msg,
        path,
        supported={
            "cluster",
            "weighted_clusters",
            "timeout",
            "retry_policy",
            "prefix_rewrite",
            "regex_rewrite",
            "host_rewrite_literal",
        },
        # Tuning that does not change where a request goes (Istio sets some on every route).
        ignored={
            "max_stream_duration",
            "upgrade_configs",
            "hash_policy",
            "cluster_not_found_response_code",
            "idle_timeout",
            "max_grpc_timeout",
            "grpc_timeout_offset",
            "priority",
        },
    )
    match msg.WhichOneof("cluster_specifier"):
        case "cluster":
            backends: tuple[WeightedBackend, ...] = (WeightedBackend(msg.cluster),)
        case "weighted_clusters":
            backends = _weighted_clusters(f"{path}.weighted_clusters", msg.weighted_clusters)
        case _:
            raise _FieldError(path, "one of cluster, weighted_clusters is required")
    timeout: float | None = DEFAULT_ROUTE_TIMEOUT
    if msg.HasField("timeout"):
        timeout = _seconds(f"{path}.timeout", msg.timeout) or None
    retry = None
    if msg.HasField("retry_policy"):
        retry = _retry_policy(f"{path}.retry_policy", msg.retry_policy)
    regex_rewrite = None
    if msg.HasField("regex_rewrite"):
        where = f"{path}.regex_rewrite"
        try:
            regex_rewrite = RegexRewrite(
                msg.regex_rewrite.pattern.regex, msg.regex_rewrite.substitution
            )
        except ValueError as e:
            raise _FieldError(f"{where}.pattern.regex", str(e)) from None
    try:
        return RouteAction(
            backends=backends,
            timeout=timeout,
            retry=retry,
            prefix_rewrite=msg.prefix_rewrite or None,
            regex_rewrite=regex_rewrite,
            host_rewrite=msg.host_rewrite_literal or None,
        )
    except ValueError as e:
        raise _FieldError(path, str(e)) from None


def _weighted_clusters(
    path: str, msg: route_components_pb2.WeightedCluster
) -> tuple[WeightedBackend, ...]:
    _only(msg, path, supported={"clusters", "total_weight"}, ignored={"runtime_key_prefix"})
    if not msg.clusters:
        raise _FieldError(f"{path}.clusters", "at least one cluster is required")
    backends = []
    for i, cluster in enumerate(msg.clusters):
        where = f"{path}.clusters[{i}]"
        _only(cluster, where, supported={"name", "weight", *_HEADER_CHANGE_FIELDS})
        name = _required(f"{where}.name", cluster.name)
        try:
            backends.append(
                WeightedBackend(name, cluster.weight.value, **_header_changes(where, cluster))
            )
        except ValueError as e:
            raise _FieldError(where, str(e)) from None
    total = sum(b.weight for b in backends)
    if total <= 0:
        raise _FieldError(f"{path}.clusters", "weights add up to 0: no cluster could be chosen")
    if msg.HasField("total_weight") and msg.total_weight.value != total:
        raise _FieldError(
            f"{path}.total_weight",
            f"{msg.total_weight.value} differs from the clusters' sum {total}",
        )
    return tuple(backends)


def _retry_policy(path: str, msg: route_components_pb2.RetryPolicy) -> RetryPolicy:
    _only(
        msg,
        path,
        supported={
            "retry_on",
            "num_retries",
            "per_try_timeout",
            "retriable_status_codes",
            "retry_back_off",
        },
        # Istio's "try another host" hints; the load balancer already spreads retries.
        ignored={"retry_host_predicate", "host_selection_retry_max_attempts"},
    )
    retry_on = frozenset(token.strip() for token in msg.retry_on.split(",") if token.strip())
    base_interval, max_interval = DEFAULT_RETRY_BASE_INTERVAL, None
    if msg.HasField("retry_back_off"):
        back_off = msg.retry_back_off
        if not back_off.HasField("base_interval"):
            raise _FieldError(f"{path}.retry_back_off.base_interval", "required")
        base_interval = _seconds(f"{path}.retry_back_off.base_interval", back_off.base_interval)
        if back_off.HasField("max_interval"):
            max_interval = _seconds(f"{path}.retry_back_off.max_interval", back_off.max_interval)
    per_try_timeout = None
    if msg.HasField("per_try_timeout"):
        per_try_timeout = _seconds(f"{path}.per_try_timeout", msg.per_try_timeout) or None
    try:
        return RetryPolicy(
            num_retries=msg.num_retries.value if msg.HasField("num_retries") else 1,
            per_try_timeout=per_try_timeout,
            retry_on=retry_on,
            retriable_status_codes=frozenset(msg.retriable_status_codes),
            base_interval=base_interval,
            max_interval=max_interval,
        )
    except ValueError as e:
        raise _FieldError(path, str(e)) from None


_HEADER_CHANGE_FIELDS = (
    "request_headers_to_add",
    "request_headers_to_remove",
    "response_headers_to_add",
    "response_headers_to_remove",
)


def _header_changes(path: str, msg: Any) -> dict[str, tuple[Any, ...]]:
    """The four header-change fields of a Route or a ClusterWeight, as model fields."""
    return {
        "request_headers_to_add": _headers_to_add(
            f"{path}.request_headers_to_add", msg.request_headers_to_add
        ),
        "request_headers_to_remove": tuple(h.lower() for h in msg.request_headers_to_remove),
        "response_headers_to_add": _headers_to_add(
            f"{path}.response_headers_to_add", msg.response_headers_to_add
        ),
        "response_headers_to_remove": tuple(h.lower() for h in msg.response_headers_to_remove),
    }


def _headers_to_add(
    path: str, options: Iterable[base_pb2.HeaderValueOption]
) -> tuple[HeaderToAdd, ...]:
    headers = []
    for i, option in enumerate(options):
        where = f"{path}[{i}]"
        _only(option, where, supported={"header", "append", "append_action"})
        _only(option.header, f"{where}.header", supported={"key", "value"})
        if option.HasField("append"):
            if option.append_action:
                raise _FieldError(where, "append and append_action are mutually exclusive")
            action = (
                HeaderAppendAction.APPEND_IF_EXISTS_OR_ADD
                if option.append.value
                else HeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD
            )
        else:
            action = HeaderAppendAction(option.append_action)
        try:
            headers.append(HeaderToAdd(option.header.key, option.header.value, action))
        except ValueError as e:
            raise _FieldError(f"{where}.header.key", str(e)) from None
    return tuple(headers)


def _fault(path: str, msg: fault_pb2.HTTPFault) -> Fault:
    _only(msg, path, supported={"delay", "abort"})
    delay = abort = None
    if msg.HasField("delay"):
        where = f"{path}.delay"
        _only(msg.delay, where, supported={"fixed_delay", "percentage"})
        if not msg.delay.HasField("fixed_delay"):
            raise _FieldError(f"{where}.fixed_delay", "required")
        delay = FaultDelay(
            _seconds(f"{where}.fixed_delay", msg.delay.fixed_delay),
            _percent(msg.delay.percentage),
        )
    if msg.HasField("abort"):
        where = f"{path}.abort"
        _only(msg.abort, where, supported={"http_status", "grpc_status", "percentage"})
        kind = msg.abort.WhichOneof("error_type")
        try:
            abort = FaultAbort(
                _percent(msg.abort.percentage),
                http_status=msg.abort.http_status if kind == "http_status" else None,
                grpc_status=msg.abort.grpc_status if kind == "grpc_status" else None,
            )
        except ValueError as e:
            raise _FieldError(where, str(e)) from None
    return Fault(delay, abort)


def _percent(msg: percent_pb2.FractionalPercent) -> float:
    denominator = {
        percent_pb2.FractionalPercent.HUNDRED: 100,
        percent_pb2.FractionalPercent.TEN_THOUSAND: 10_000,
        percent_pb2.FractionalPercent.MILLION: 1_000_000,
    }.get(msg.denominator, 100)
    # Envoy treats a numerator above the denominator as 100 %.
    return min(100.0, msg.numerator * 100.0 / denominator)


# --- Matchers ---


def _string_match(path: str, msg: string_pb2.StringMatcher) -> StringMatch:
    _only(
        msg,
        path,
        supported={"exact", "prefix", "suffix", "contains", "safe_regex", "ignore_case"},
    )
    kind = msg.WhichOneof("match_pattern")
    match kind:
        case "exact" | "prefix" | "suffix" | "contains":
            return StringMatch(StringMatchKind(kind), getattr(msg, kind), msg.ignore_case)
        case "safe_regex":
            return _regex_match(f"{path}.safe_regex", msg.safe_regex.regex)
    raise _FieldError(path, "one of exact, prefix, suffix, contains, safe_regex is required")


def _regex_match(path: str, regex: str) -> StringMatch:
    try:
        return StringMatch(StringMatchKind.REGEX, regex)
    except ValueError as e:
        raise _FieldError(f"{path}.regex", str(e)) from None


def _header_match(path: str, msg: route_components_pb2.HeaderMatcher) -> HeaderMatch:
    _only(msg, path, supported={"name", "string_match", "present_match", "invert_match"})
    name = _required(f"{path}.name", msg.name)
    match msg.WhichOneof("header_match_specifier"):
        case "string_match":
            value = _string_match(f"{path}.string_match", msg.string_match)
            return HeaderMatch(name, value, invert=msg.invert_match)
        case "present_match":
            return HeaderMatch(name, present=msg.present_match, invert=msg.invert_match)
    return HeaderMatch(name, invert=msg.invert_match)  # Envoy: nothing set = present


# --- Clusters ---


def _cluster(msg: cluster_pb2.Cluster) -> ClusterConfig:
    name = _required("name", msg.name)
    if msg.WhichOneof("cluster_discovery_type") != "type" or msg.type != cluster_pb2.Cluster.EDS:
        raise _FieldError("type", "only EDS clusters are supported")
    lb = {
        cluster_pb2.Cluster.ROUND_ROBIN: LbPolicy.ROUND_ROBIN,
        cluster_pb2.Cluster.LEAST_REQUEST: LbPolicy.LEAST_REQUEST,
        cluster_pb2.Cluster.RANDOM: LbPolicy.RANDOM,
    }.get(msg.lb_policy)
    if lb is None or msg.HasField("load_balancing_policy"):
        raise _FieldError("lb_policy", "only ROUND_ROBIN, LEAST_REQUEST and RANDOM are supported")
    if msg.WhichOneof("lb_config") == "least_request_lb_config":
        choice = msg.least_request_lb_config.choice_count
        if msg.least_request_lb_config.HasField("choice_count") and choice.value != 2:
            raise _FieldError(
                "least_request_lb_config.choice_count", "only 2 (power of two choices)"
            )
    connect_timeout = DEFAULT_CONNECT_TIMEOUT
    if msg.HasField("connect_timeout"):
        connect_timeout = _seconds("connect_timeout", msg.connect_timeout)
        if connect_timeout <= 0:
            raise _FieldError("connect_timeout", "must be positive")
    panic_threshold = DEFAULT_HEALTHY_PANIC_THRESHOLD
    if msg.common_lb_config.HasField("healthy_panic_threshold"):
        panic_threshold = msg.common_lb_config.healthy_panic_threshold.value
        if not 0 <= panic_threshold <= 100:
            raise _FieldError("common_lb_config.healthy_panic_threshold", "must be in [0, 100]")
    protocol_options = _http_protocol_options(msg)
    outlier = _outlier(msg.outlier_detection) if msg.HasField("outlier_detection") else None
    return ClusterConfig(
        name=name,
        lb=lb,
        limits=_limits(msg.circuit_breakers, protocol_options),
        outlier=outlier,
        connect_timeout=connect_timeout,
        service=_service_ref(msg.metadata),
        eds_service_name=msg.eds_cluster_config.service_name,
        upstream_protocol=_upstream_protocol(protocol_options),
        healthy_panic_threshold=panic_threshold,
    )


def _http_protocol_options(
    msg: cluster_pb2.Cluster,
) -> http_protocol_options_pb2.HttpProtocolOptions | None:
    if HTTP_PROTOCOL_OPTIONS_KEY not in msg.typed_extension_protocol_options:
        return None
    where = f"typed_extension_protocol_options[{HTTP_PROTOCOL_OPTIONS_KEY!r}]"
    return _unpack_field(
        where,
        msg.typed_extension_protocol_options[HTTP_PROTOCOL_OPTIONS_KEY],
        http_protocol_options_pb2.HttpProtocolOptions,
    )


def _upstream_protocol(
    options: http_protocol_options_pb2.HttpProtocolOptions | None,
) -> UpstreamProtocol | None:
    if options is None or options.WhichOneof("upstream_protocol_options") != "explicit_http_config":
        return None
    match options.explicit_http_config.WhichOneof("protocol_config"):
        case "http_protocol_options":
            return UpstreamProtocol.HTTP1
        case "http2_protocol_options":
            return UpstreamProtocol.HTTP2
    raise _FieldError(
        f"typed_extension_protocol_options[{HTTP_PROTOCOL_OPTIONS_KEY!r}].explicit_http_config",
        "only HTTP/1.1 and HTTP/2 upstreams are supported",
    )


def _limits(
    breakers: circuit_breaker_pb2.CircuitBreakers,
    options: http_protocol_options_pb2.HttpProtocolOptions | None,
) -> Limits:
    per_connection = None
    if options is not None and options.common_http_protocol_options.HasField(
        "max_requests_per_connection"
    ):
        per_connection = options.common_http_protocol_options.max_requests_per_connection.value
    thresholds = next(
        (t for t in breakers.thresholds if t.priority == base_pb2.RoutingPriority.DEFAULT), None
    )
    if thresholds is None:
        return Limits(max_requests_per_connection=per_connection or None)

    def limit(field: str) -> int:
        return (
            getattr(thresholds, field).value
            if thresholds.HasField(field)
            else DEFAULT_CIRCUIT_BREAKER_LIMIT
        )

    # A retry budget replaces the fixed max_retries when both are set (as in Envoy).
    budget = Limits().retry_budget
    if thresholds.HasField("retry_budget"):
        configured, defaults = thresholds.retry_budget, RetryBudget()
        try:
            budget = RetryBudget(
                configured.budget_percent.value
                if configured.HasField("budget_percent")
                else defaults.budget_percent,
                configured.min_retry_concurrency.value
                if configured.HasField("min_retry_concurrency")
                else defaults.min_retry_concurrency,
            )
        except ValueError as e:
            raise _FieldError("circuit_breakers.thresholds.retry_budget", str(e)) from None
    elif thresholds.HasField("max_retries"):
        budget = RetryBudget(0.0, thresholds.max_retries.value)
    return Limits(
        max_connections=limit("max_connections"),
        max_pending=limit("max_pending_requests"),
        max_requests=limit("max_requests"),
        max_requests_per_connection=per_connection or None,
        retry_budget=budget,
    )


def _outlier(msg: outlier_detection_pb2.OutlierDetection) -> OutlierConfig:
    path = "outlier_detection"
    if msg.split_external_local_origin_errors:
        raise _FieldError(f"{path}.split_external_local_origin_errors", "not supported")
    if msg.monitors:
        raise _FieldError(f"{path}.monitors", "not supported")
    if msg.always_eject_one_host.value:
        raise _FieldError(f"{path}.always_eject_one_host", "not supported")
    defaults = OutlierConfig()

    def seconds(field: str, default: float) -> float:
        return _seconds(f"{path}.{field}", getattr(msg, field)) if msg.HasField(field) else default

    def count(field: str, default: int) -> int:
        return getattr(msg, field).value if msg.HasField(field) else default

    def enforced(field: str, default: int) -> bool:
        # Envoy enforces a detector on that percentage of detections; we do all or none.
        percent = count(field, default)
        if percent not in (0, 100):
            raise _FieldError(f"{path}.{field}", "only 0 or 100 is supported")
        return percent == 100

    base = seconds("base_ejection_time", defaults.base_ejection_time)
    consecutive_5xx = count("consecutive_5xx", defaults.consecutive_5xx)
    gateway = count("consecutive_gateway_failure", DEFAULT_CONSECUTIVE_GATEWAY_FAILURE)
    try:
        return OutlierConfig(
            consecutive_5xx=consecutive_5xx if enforced("enforcing_consecutive_5xx", 100) else 0,
            interval=seconds("interval", defaults.interval),
            base_ejection_time=base,
            max_ejection_percent=count("max_ejection_percent", defaults.max_ejection_percent),
            # Envoy: unset means the default or the base ejection time, whichever is longer.
            max_ejection_time=seconds("max_ejection_time", max(DEFAULT_MAX_EJECTION_TIME, base)),
            consecutive_gateway_failure=gateway
            if enforced("enforcing_consecutive_gateway_failure", 0)
            else 0,
        )
    except ValueError as e:
        raise _FieldError(path, str(e)) from None


def _service_ref(metadata: base_pb2.Metadata) -> ServiceRef | None:
    if ISTIO_METADATA_KEY not in metadata.filter_metadata:
        return None
    path = f"metadata.filter_metadata[{ISTIO_METADATA_KEY!r}].services"
    istio = metadata.filter_metadata[ISTIO_METADATA_KEY]
    services = istio.fields.get("services")
    if services is None:
        return None
    if services.WhichOneof("kind") != "list_value" or not services.list_value.values:
        raise _FieldError(path, "expected a non-empty list of {host, name, namespace}")
    first = services.list_value.values[0]
    if first.WhichOneof("kind") != "struct_value":
        raise _FieldError(f"{path}[0]", "expected a struct {host, name, namespace}")
    return ServiceRef(
        host=_struct_string(f"{path}[0]", first.struct_value, "host", required=True) or "",
        name=_struct_string(f"{path}[0]", first.struct_value, "name") or "",
        namespace=_struct_string(f"{path}[0]", first.struct_value, "namespace") or "",
    )


# --- Endpoints ---


def _cluster_endpoints(msg: endpoint_pb2.ClusterLoadAssignment) -> ClusterEndpoints:
    name = _required("cluster_name", msg.cluster_name)
    endpoints = []
    for li, locality in enumerate(msg.endpoints):
        if locality.priority:
            raise _FieldError(f"endpoints[{li}].priority", "only priority 0 is supported")
        for ei, lb_endpoint in enumerate(locality.lb_endpoints):
            endpoints.append(_endpoint(f"endpoints[{li}].lb_endpoints[{ei}]", lb_endpoint))
    return ClusterEndpoints(name, tuple(endpoints))


_HEALTHY_STATUSES = frozenset(
    {health_check_pb2.UNKNOWN, health_check_pb2.HEALTHY, health_check_pb2.DEGRADED}
)


def _endpoint(path: str, msg: endpoint_pb2.LbEndpoint) -> Endpoint:
    if msg.WhichOneof("host_identifier") != "endpoint":
        raise _FieldError(f"{path}.endpoint", "required")
    address = msg.endpoint.address
    if address.WhichOneof("address") != "socket_address":
        raise _FieldError(f"{path}.endpoint.address.socket_address", "required")
    socket = address.socket_address
    where = f"{path}.endpoint.address.socket_address"
    try:
        ip = str(ip_address(socket.address))
    except ValueError:
        raise _FieldError(f"{where}.address", f"{socket.address!r} is not an IP address") from None
    if socket.WhichOneof("port_specifier") != "port_value":
        raise _FieldError(f"{where}.port_value", "required")
    port = _port(f"{where}.port_value", socket.port_value)
    if port == 0:
        raise _FieldError(f"{where}.port_value", "0 is not a port to connect to")
    weight = 1
    if msg.HasField("load_balancing_weight"):
        weight = msg.load_balancing_weight.value
        if weight < 1:
            raise _FieldError(f"{path}.load_balancing_weight", "must be at least 1")
    identity = workload = None
    tunnel = Tunnel.TCP
    if ISTIO_METADATA_KEY in msg.metadata.filter_metadata:
        istio = msg.metadata.filter_metadata[ISTIO_METADATA_KEY]
        md_path = f"{path}.metadata.filter_metadata[{ISTIO_METADATA_KEY!r}]"
        workload = _struct_string(md_path, istio, "workload")
        raw_identity = _struct_string(md_path, istio, "identity")
        if raw_identity is not None:
            try:
                identity = Identity.parse(raw_identity).uri
            except InvalidIdentity as e:
                raise _FieldError(f"{md_path}.identity", str(e)) from None
        raw_tunnel = _struct_string(md_path, istio, "tunnel")
        if raw_tunnel is not None:
            try:
                tunnel = Tunnel(raw_tunnel)
            except ValueError:
                raise _FieldError(
                    f"{md_path}.tunnel", f"{raw_tunnel!r} is not 'hbone' or 'tcp'"
                ) from None
    if tunnel is Tunnel.HBONE and identity is None:
        raise _FieldError(
            f"{path}.metadata", "an HBONE endpoint needs the identity its ztunnel presents"
        )
    return Endpoint(
        address=ip,
        port=port,
        identity=identity,
        tunnel=tunnel,
        healthy=msg.health_status in _HEALTHY_STATUSES,
        weight=weight,
        workload=workload,
    )


# --- Helpers ---


def _unpack(resource: any_pb2.Any | M, message_type: type[M]) -> M:
    what = message_type.DESCRIPTOR.name
    if isinstance(resource, message_type):
        return resource
    if not isinstance(resource, any_pb2.Any):
        raise XdsConversionError(what, "", f"expected {what} or Any, got {type(resource).__name__}")
    try:
        return _unpack_field("", resource, message_type)
    except _FieldError as e:
        raise XdsConversionError(what, e.field, e.message) from None


def _unpack_field(path: str, resource: any_pb2.Any, message_type: type[M]) -> M:
    expected = type_url(message_type)
    if resource.type_url != expected:
        raise _FieldError(
            f"{path}.type_url" if path else "type_url",
            f"expected {expected!r}, got {resource.type_url!r}",
        )
    message = message_type()
    try:
        resource.Unpack(message)
    except DecodeError as e:
        raise _FieldError(path or "value", f"not a valid {expected}: {e}") from None
    return message


def _only(
    msg: Message,
    path: str,
    *,
    supported: set[str],
    ignored: frozenset[str] | set[str] = frozenset(),
) -> None:
    """Reject any set field of `msg` that is neither supported nor known to be harmless."""
    for descriptor, _ in msg.ListFields():
        if descriptor.name not in supported and descriptor.name not in ignored:
            where = f"{path}.{descriptor.name}" if path else descriptor.name
            raise _FieldError(
                where,
                f"not supported by the waypoint (supported here: {', '.join(sorted(supported))})",
            )


def _required(path: str, value: str) -> str:
    if not value:
        raise _FieldError(path, "required, but empty")
    return value


def _seconds(path: str, duration: duration_pb2.Duration) -> float:
    seconds = duration.seconds + duration.nanos / 1e9
    if seconds < 0:
        raise _FieldError(path, "must not be negative")
    return seconds


def _port(path: str, value: int) -> int:
    if value > _MAX_PORT:
        raise _FieldError(path, f"{value} is not a port number (0-{_MAX_PORT})")
    return value


def _struct_string(
    path: str, struct: struct_pb2.Struct, key: str, *, required: bool = False
) -> str | None:
    value = struct.fields.get(key)
    if value is None:
        if required:
            raise _FieldError(f"{path}.{key}", "required")
        return None
    if value.WhichOneof("kind") != "string_value":
        raise _FieldError(f"{path}.{key}", "expected a string")
    return value.string_value
