"""The waypoint's configuration as frozen dataclasses, converted once from Envoy's xDS types.

One Listener + RouteConfiguration pair per bound service port (both named
`<hostname>:<port>`) becomes a `ServiceRoutes` in the `RouteTable`; one Cluster becomes a
`ClusterConfig`, its ClusterLoadAssignment a `ClusterEndpoints`. Defaults are Envoy's, so a
resource means the same here as in a real Envoy pointed at the same xDS server (route timeout
15 s, connect timeout 5 s, circuit-breaker limits 1024, 3 concurrent retries, outlier
detection 5 consecutive 5xx / 10 s interval / 30 s base ejection / 10 % max ejected,
panic routing below 50 % usable endpoints).

Value checks that do not need the proto live in `__post_init__` and raise ValueError;
`from_xds` turns them into errors naming the resource and field. The predicates here
(`StringMatch.matches`, `HeaderMatch.matches`) are the Envoy matcher semantics every core
shares.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

# Envoy's defaults (route_components.proto, cluster.proto, circuit_breaker.proto,
# outlier_detection.proto, source/common/router/retry_state_impl.cc).
DEFAULT_ROUTE_TIMEOUT = 15.0
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_CIRCUIT_BREAKER_LIMIT = 1024
DEFAULT_MAX_RETRIES = 3
DEFAULT_RETRY_BUDGET_PERCENT = 20.0
DEFAULT_MIN_RETRY_CONCURRENCY = 3
DEFAULT_RETRY_BASE_INTERVAL = 0.025
DEFAULT_CONSECUTIVE_5XX = 5
DEFAULT_CONSECUTIVE_GATEWAY_FAILURE = 5  # counted, but not enforced unless configured
DEFAULT_OUTLIER_INTERVAL = 10.0
DEFAULT_BASE_EJECTION_TIME = 30.0
DEFAULT_MAX_EJECTION_PERCENT = 10
DEFAULT_MAX_EJECTION_TIME = 300.0
DEFAULT_HEALTHY_PANIC_THRESHOLD = 50.0

# The retry_on conditions the waypoint implements (Envoy's names; see policy/retry.py).
RETRY_ON_VALUES = frozenset(
    {
        "5xx",
        "gateway-error",
        "reset",
        "connect-failure",
        "refused-stream",
        "retriable-4xx",
        "retriable-status-codes",
        # gRPC: the grpc-status of a trailers-only response
        "cancelled",
        "deadline-exceeded",
        "internal",
        "resource-exhausted",
        "unavailable",
    }
)


def listener_name(hostname: str, port: int) -> str:
    """The name of a service port's Listener and RouteConfiguration: `<hostname>:<port>`."""
    return f"{hostname}:{port}"


# --- Matchers ---


class StringMatchKind(enum.StrEnum):
    EXACT = "exact"
    PREFIX = "prefix"
    SUFFIX = "suffix"
    CONTAINS = "contains"
    REGEX = "regex"  # RE2 in Envoy, Python `re` here; always a full match


@dataclass(frozen=True, slots=True)
class StringMatch:
    """Envoy's StringMatcher. `ignore_case` has no effect on regexes (as in Envoy)."""

    kind: StringMatchKind
    value: str
    ignore_case: bool = False
    _regex: re.Pattern[str] | None = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        if self.kind is StringMatchKind.REGEX:
            try:
                object.__setattr__(self, "_regex", re.compile(self.value))
            except re.error as e:
                raise ValueError(f"invalid regex {self.value!r}: {e}") from None
        elif self.ignore_case:
            object.__setattr__(self, "value", self.value.lower())

    def matches(self, text: str) -> bool:
        if self._regex is not None:
            return self._regex.fullmatch(text) is not None
        if self.ignore_case:
            text = text.lower()
        match self.kind:
            case StringMatchKind.EXACT:
                return text == self.value
            case StringMatchKind.PREFIX:
                return text.startswith(self.value)
            case StringMatchKind.SUFFIX:
                return text.endswith(self.value)
            case _:
                return self.value in text


# A route's path match: EXACT (`path`), PREFIX (`prefix`) or REGEX (`safe_regex`), always
# against the path without its query; `ignore_case` is the route's `case_sensitive: false`.
PathMatch = StringMatch


@dataclass(frozen=True, slots=True)
class HeaderMatch:
    """Envoy's HeaderMatcher on one header (lower-case name; `:method`, `:path`,
    `:authority` name the pseudo-headers).

    `value` None is a presence test (`present_match: present`). Repeated headers are matched
    as their values joined with ",". A missing header fails every value test, inverted or
    not; only presence tests can match it (Envoy's HeaderUtility::matchHeaders).
    """

    name: str
    value: StringMatch | None = None
    present: bool = True
    invert: bool = False

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("header name is empty")
        object.__setattr__(self, "name", self.name.lower())

    def matches(self, header: str | None) -> bool:
        """Whether the header's (joined) value `header`, None if absent, satisfies this."""
        if header is None:
            return self.value is None and self.present == self.invert
        matched = self.present if self.value is None else self.value.matches(header)
        return matched != self.invert


@dataclass(frozen=True, slots=True)
class QueryParamMatch:
    """A query parameter test on its first (decoded) value; `value` None tests presence."""

    name: str
    value: StringMatch | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("query parameter name is empty")


# --- Routes ---


@dataclass(frozen=True, slots=True)
class RouteMatch:
    """All populated conditions must hold. `path` None matches every path."""

    path: PathMatch | None = None
    headers: tuple[HeaderMatch, ...] = ()
    query_params: tuple[QueryParamMatch, ...] = ()
    method: str | None = None  # an exact `:method` header match, pulled out for speed


class HeaderAppendAction(enum.Enum):
    """Envoy's HeaderValueOption.HeaderAppendAction."""

    APPEND_IF_EXISTS_OR_ADD = 0
    ADD_IF_ABSENT = 1
    OVERWRITE_IF_EXISTS_OR_ADD = 2
    OVERWRITE_IF_EXISTS = 3


@dataclass(frozen=True, slots=True)
class HeaderToAdd:
    """A header a route or backend adds to requests or responses. Values are literal:
    Envoy's `%COMMAND%` substitutions are not interpreted."""

    name: str
    value: str
    action: HeaderAppendAction = HeaderAppendAction.APPEND_IF_EXISTS_OR_ADD

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", self.name.lower())
        object.__setattr__(self, "value", self.value.strip(" \t"))  # as h2 and h11 would send it
        _check_mutable_header(self.name)
        if _HEADER_NAME.fullmatch(self.name) is None:
            raise ValueError(f"header name {self.name!r} is not an HTTP token")
        if _FORBIDDEN_IN_VALUE.search(self.value) is not None:
            raise ValueError(f"header {self.name} value holds NUL, CR or LF")


# RFC 9110 field names, and what a field value may never hold (either would break framing).
_HEADER_NAME = re.compile(r"[-!#$%&'*+.^_`|~0-9a-z]+")
_FORBIDDEN_IN_VALUE = re.compile(r"[\x00\r\n]")


def _check_mutable_header(name: str) -> None:
    # Envoy refuses to add or remove pseudo-headers and Host through route config.
    if not name or name.startswith(":") or name == "host":
        raise ValueError(f"header {name!r} cannot be added or removed by a route")


@dataclass(frozen=True, slots=True)
class WeightedBackend:
    """A cluster (`outbound|<port>|<subset>|<host>`) and its share of a split.

    Its header changes (a VirtualService destination's `headers`) apply before the route's,
    so the route's win where both set a header (Envoy's default order).
    """

    cluster: str
    weight: int = 1
    request_headers_to_add: tuple[HeaderToAdd, ...] = ()
    request_headers_to_remove: tuple[str, ...] = ()
    response_headers_to_add: tuple[HeaderToAdd, ...] = ()
    response_headers_to_remove: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.cluster:
            raise ValueError("backend cluster name is empty")
        if self.weight < 0:
            raise ValueError(f"backend {self.cluster}: weight {self.weight} is negative")
        for name in (*self.request_headers_to_remove, *self.response_headers_to_remove):
            _check_mutable_header(name)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Envoy's route RetryPolicy. `per_try_timeout` None means only the route timeout
    applies; backoff is fully jittered exponential from `base_interval`, capped at
    `max_interval` (default ten times the base)."""

    num_retries: int = 1
    per_try_timeout: float | None = None
    retry_on: frozenset[str] = frozenset()
    retriable_status_codes: frozenset[int] = frozenset()
    base_interval: float = DEFAULT_RETRY_BASE_INTERVAL
    max_interval: float | None = None

    def __post_init__(self) -> None:
        unknown = sorted(self.retry_on - RETRY_ON_VALUES)
        if unknown:
            raise ValueError(
                f"unsupported retry_on value(s) {', '.join(unknown)}; "
                f"supported: {', '.join(sorted(RETRY_ON_VALUES))}"
            )
        if self.num_retries < 0:
            raise ValueError(f"num_retries {self.num_retries} is negative")
        if self.base_interval <= 0:
            raise ValueError("retry base interval must be positive")
        if self.max_interval is not None and self.max_interval < self.base_interval:
            raise ValueError("retry max interval is shorter than the base interval")

    @property
    def backoff_cap(self) -> float:
        return self.max_interval if self.max_interval is not None else 10 * self.base_interval


@dataclass(frozen=True, slots=True)
class RegexRewrite:
    """Replace every match of `pattern` in the path (not the query) with `substitution`
    (`\\1` refers to a group)."""

    pattern: str
    substitution: str
    _regex: re.Pattern[str] | None = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "_regex", re.compile(self.pattern))
        except re.error as e:
            raise ValueError(f"invalid regex {self.pattern!r}: {e}") from None

    def apply(self, path: str) -> str:
        assert self._regex is not None
        return self._regex.sub(self.substitution, path)


@dataclass(frozen=True, slots=True)
class FaultDelay:
    """Delay `percent` % of requests by `duration` seconds."""

    duration: float
    percent: float


@dataclass(frozen=True, slots=True)
class FaultAbort:
    """Answer `percent` % of requests without forwarding: with `http_status`, or for gRPC
    with HTTP 200 and `grpc_status`."""

    percent: float
    http_status: int | None = None
    grpc_status: int | None = None

    def __post_init__(self) -> None:
        if (self.http_status is None) == (self.grpc_status is None):
            raise ValueError("a fault abort needs exactly one of http_status and grpc_status")
        if self.http_status is not None and not 200 <= self.http_status < 600:
            raise ValueError(f"fault abort status {self.http_status} is not in [200, 600)")


@dataclass(frozen=True, slots=True)
class Fault:
    """Envoy's HTTPFault (the delay is applied before the abort is considered)."""

    delay: FaultDelay | None = None
    abort: FaultAbort | None = None


@dataclass(frozen=True, slots=True)
class RouteAction:
    """Where a matched request goes and what happens on the way.

    `timeout` None disables the route timeout (Envoy's `0s`). `host_rewrite` replaces the
    authority sent upstream. Request header changes apply to the request sent upstream,
    response ones to the response sent back; removals happen before additions (Envoy's
    order).
    """

    backends: tuple[WeightedBackend, ...]
    timeout: float | None = DEFAULT_ROUTE_TIMEOUT
    retry: RetryPolicy | None = None
    prefix_rewrite: str | None = None
    regex_rewrite: RegexRewrite | None = None
    host_rewrite: str | None = None
    request_headers_to_add: tuple[HeaderToAdd, ...] = ()
    request_headers_to_remove: tuple[str, ...] = ()
    response_headers_to_add: tuple[HeaderToAdd, ...] = ()
    response_headers_to_remove: tuple[str, ...] = ()
    fault: Fault | None = None

    def __post_init__(self) -> None:
        if not self.backends:
            raise ValueError("a route needs at least one backend")
        if sum(b.weight for b in self.backends) <= 0:
            raise ValueError("backend weights add up to 0: no backend could ever be chosen")
        if self.prefix_rewrite is not None and self.regex_rewrite is not None:
            raise ValueError("prefix_rewrite and regex_rewrite are mutually exclusive")
        for name in (*self.request_headers_to_remove, *self.response_headers_to_remove):
            _check_mutable_header(name)


@dataclass(frozen=True, slots=True)
class Route:
    match: RouteMatch
    action: RouteAction
    name: str = ""


# --- L7 authorization (Envoy RBAC, the subset istiod_lite emits) ---


class RbacAction(enum.StrEnum):
    ALLOW = "ALLOW"
    DENY = "DENY"


@dataclass(frozen=True, slots=True)
class AnyRequest:
    """Always true (Envoy's `any: true`)."""


@dataclass(frozen=True, slots=True)
class HeaderCondition:
    """A header test, pseudo-headers included (Istio: methods, hosts, `when` headers)."""

    match: HeaderMatch


@dataclass(frozen=True, slots=True)
class UrlPathCondition:
    """A test on the request path without its query (Istio: paths)."""

    path: StringMatch


@dataclass(frozen=True, slots=True)
class DestinationPortCondition:
    """The service port the request was sent to (Istio: ports)."""

    port: int


@dataclass(frozen=True, slots=True)
class AuthenticatedCondition:
    """The client's SPIFFE URI (`spiffe://td/ns/x/sa/y`) from the HBONE peer certificate.

    `principal` None matches any authenticated client; a request without a peer identity
    never matches. Istio expresses principals as exact URIs and namespaces as regexes
    `.*/ns/<ns>/.*` on this name.
    """

    principal: StringMatch | None = None


@dataclass(frozen=True, slots=True)
class AllOf:
    conditions: tuple[Condition, ...]


@dataclass(frozen=True, slots=True)
class AnyOf:
    conditions: tuple[Condition, ...]


@dataclass(frozen=True, slots=True)
class Not:
    condition: Condition


# Permissions and principals are both conditions on the request; Envoy's and_rules/and_ids
# become AllOf, or_rules/or_ids AnyOf, not_rule/not_id Not.
Condition = (
    AnyRequest
    | HeaderCondition
    | UrlPathCondition
    | DestinationPortCondition
    | AuthenticatedCondition
    | AllOf
    | AnyOf
    | Not
)


@dataclass(frozen=True, slots=True)
class RbacPolicy:
    """Matches when ANY permission and ANY principal match."""

    name: str
    permissions: tuple[Condition, ...]
    principals: tuple[Condition, ...]


@dataclass(frozen=True, slots=True)
class Rbac:
    """One RBAC filter: its action and its policies, sorted by name (Envoy keeps a sorted
    map, so the first matching name is the one reported)."""

    action: RbacAction
    policies: tuple[RbacPolicy, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "policies", tuple(sorted(self.policies, key=lambda p: p.name)))


@dataclass(frozen=True, slots=True)
class AuthzPolicy:
    """The RBAC filters of a listener, in Istio's order: DENY, then ALLOW. None = no filter."""

    deny: Rbac | None = None
    allow: Rbac | None = None


# --- Listeners and the route table ---


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    """What the waypoint takes from a service port's Listener.

    `fault_filter` says whether the HTTP filter chain has the fault filter at all (without
    it, per-route faults are inert, as in Envoy); `default_fault` is that filter's own
    config, which a route's fault replaces.
    """

    name: str
    hostname: str
    port: int
    route_config_name: str
    authz: AuthzPolicy = AuthzPolicy()
    fault_filter: bool = False
    default_fault: Fault | None = None


@dataclass(frozen=True, slots=True)
class RouteConfig:
    """A RouteConfiguration: its routes in order (the first match wins)."""

    name: str
    routes: tuple[Route, ...]


@dataclass(frozen=True, slots=True)
class ServiceRoutes:
    """Everything a request to one service port needs before load balancing."""

    hostname: str
    port: int
    routes: tuple[Route, ...]
    authz: AuthzPolicy


@dataclass(frozen=True, slots=True)
class RouteTable:
    """Listener name (`<hostname>:<port>`) -> ServiceRoutes; replaced whole on each update."""

    services: Mapping[str, ServiceRoutes] = field(default_factory=lambda: MappingProxyType({}))

    def get(self, hostname: str, port: int) -> ServiceRoutes | None:
        return self.services.get(listener_name(hostname, port))

    @classmethod
    def build(
        cls, listeners: Iterable[ListenerConfig], route_configs: Mapping[str, RouteConfig]
    ) -> RouteTable:
        """Pair each listener with its RouteConfiguration.

        A listener whose routes have not arrived yet is kept with no routes: its requests
        get "no route" (404 NR) after authorization, never a wrong route.
        """
        services = {}
        for listener in listeners:
            route_config = route_configs.get(listener.route_config_name)
            routes = route_config.routes if route_config is not None else ()
            services[listener.name] = ServiceRoutes(
                listener.hostname,
                listener.port,
                tuple(_with_effective_fault(route, listener) for route in routes),
                listener.authz,
            )
        return cls(MappingProxyType(services))


def _with_effective_fault(route: Route, listener: ListenerConfig) -> Route:
    fault = (route.action.fault or listener.default_fault) if listener.fault_filter else None
    if fault == route.action.fault:
        return route
    return replace(route, action=replace(route.action, fault=fault))


# --- Clusters and endpoints ---


class LbPolicy(enum.StrEnum):
    ROUND_ROBIN = "round_robin"
    LEAST_REQUEST = "least_request"
    RANDOM = "random"


@dataclass(frozen=True, slots=True)
class RetryBudget:
    """How many retries may be in flight for a cluster at once:
    max(`min_retry_concurrency`, `budget_percent` % of its active + pending requests).

    Envoy's `retry_budget` defaults to 20 % / 3; without one, Envoy's fixed `max_retries`
    (default 3) applies, which is `RetryBudget(0, max_retries)`.
    """

    budget_percent: float = DEFAULT_RETRY_BUDGET_PERCENT
    min_retry_concurrency: int = DEFAULT_MIN_RETRY_CONCURRENCY

    def __post_init__(self) -> None:
        if not 0 <= self.budget_percent <= 100:
            raise ValueError(f"retry budget percent {self.budget_percent} is not in [0, 100]")


@dataclass(frozen=True, slots=True)
class Limits:
    """A cluster's circuit breakers (Envoy thresholds at DEFAULT priority) and connection
    reuse limit (None: unlimited)."""

    max_connections: int = DEFAULT_CIRCUIT_BREAKER_LIMIT
    max_pending: int = DEFAULT_CIRCUIT_BREAKER_LIMIT
    max_requests: int = DEFAULT_CIRCUIT_BREAKER_LIMIT
    max_requests_per_connection: int | None = None
    retry_budget: RetryBudget = RetryBudget(0.0, DEFAULT_MAX_RETRIES)


@dataclass(frozen=True, slots=True)
class OutlierConfig:
    """Envoy's consecutive-5xx and consecutive-gateway-failure outlier detection.

    A threshold of 0 disables that detector (Envoy enforces gateway failures only when told
    to, so it is off by default). An ejected endpoint stays out for
    min(base_ejection_time * times ejected, max_ejection_time), checked every `interval`.
    """

    consecutive_5xx: int = DEFAULT_CONSECUTIVE_5XX
    interval: float = DEFAULT_OUTLIER_INTERVAL
    base_ejection_time: float = DEFAULT_BASE_EJECTION_TIME
    max_ejection_percent: int = DEFAULT_MAX_EJECTION_PERCENT
    max_ejection_time: float = DEFAULT_MAX_EJECTION_TIME
    consecutive_gateway_failure: int = 0

    def __post_init__(self) -> None:
        if self.interval <= 0:
            raise ValueError("outlier detection interval must be positive")
        if self.max_ejection_time < self.base_ejection_time:
            raise ValueError("max_ejection_time cannot be shorter than base_ejection_time")
        if not 0 <= self.max_ejection_percent <= 100:
            raise ValueError(f"max_ejection_percent {self.max_ejection_percent} > 100")


@dataclass(frozen=True, slots=True)
class ServiceRef:
    """The service a cluster belongs to (cluster metadata `istio.services[0]`), for metrics."""

    host: str
    name: str
    namespace: str


class UpstreamProtocol(enum.StrEnum):
    HTTP1 = "http1"
    HTTP2 = "http2"


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """A Cluster. `upstream_protocol` None: not pinned by the cluster, speak the request's
    own protocol upstream (Istio's `use_downstream_protocol_config`).
    `healthy_panic_threshold`: below this percentage of usable endpoints, requests go to
    all endpoints (Envoy's panic routing; 0 turns it off, as Istio does with outlier
    detection)."""

    name: str
    lb: LbPolicy = LbPolicy.ROUND_ROBIN
    limits: Limits = Limits()
    outlier: OutlierConfig | None = None
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    service: ServiceRef | None = None
    eds_service_name: str = ""  # the ClusterLoadAssignment to use; "" = the cluster's name
    upstream_protocol: UpstreamProtocol | None = None
    healthy_panic_threshold: float = DEFAULT_HEALTHY_PANIC_THRESHOLD

    @property
    def endpoints_name(self) -> str:
        return self.eds_service_name or self.name


class Tunnel(enum.StrEnum):
    HBONE = "hbone"  # CONNECT podIP:port through podIP:15008 with the waypoint's identity
    TCP = "tcp"  # plain TCP to podIP:port (the pod is not in the mesh)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One ready pod of a cluster: where to send requests and who must answer (`identity`,
    the SPIFFE URI expected from its ztunnel; None for plain TCP)."""

    address: str
    port: int
    identity: str | None = None
    tunnel: Tunnel = Tunnel.TCP
    healthy: bool = True
    weight: int = 1
    workload: str | None = None  # "<namespace>/<pod name>", for metrics and logs

    @property
    def key(self) -> tuple[str, int]:
        """What identifies the endpoint across updates (outlier and LB state are kept
        per key, so a health or weight change does not reset them)."""
        return (self.address, self.port)

    def __str__(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ClusterEndpoints:
    """A ClusterLoadAssignment."""

    cluster_name: str
    endpoints: tuple[Endpoint, ...]
