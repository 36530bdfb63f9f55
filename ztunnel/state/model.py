"""The ztunnel's view of the mesh: workloads, services and L4 authorization policies.

These mirror the xDS resources istiod pushes to ztunnels (`istio.workload.Address` and
`istio.security.Authorization`), so the xDS handler and the local config file both convert
into the same frozen values. Enum values are the proto enum numbers, so a converter can
write `TunnelProtocol(msg.tunnel_protocol)`.

Defaults are the ones ztunnel applies to empty proto fields: trust domain `cluster.local`,
service account `default`, cluster `Kubernetes`, capacity 1.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from meshcore.identity.spiffe import Identity

IpAddress = IPv4Address | IPv6Address
IpNetwork = IPv4Network | IPv6Network

DEFAULT_TRUST_DOMAIN = "cluster.local"
DEFAULT_SERVICE_ACCOUNT = "default"
DEFAULT_CLUSTER_ID = "Kubernetes"
HBONE_PORT = 15008


# --- Enums ---


class TunnelProtocol(enum.Enum):
    """How a workload accepts inbound traffic: plain TCP, or HBONE on port 15008."""

    NONE = 0
    HBONE = 1


class HealthStatus(enum.Enum):
    """Whether load balancing may pick the workload."""

    HEALTHY = 0
    UNHEALTHY = 1


class AppProtocol(enum.Enum):
    """The application protocol declared for a port."""

    UNKNOWN = 0
    HTTP11 = 1
    HTTP2 = 2
    GRPC = 3
    TCP = 4
    TLS = 5


class WorkloadType(enum.Enum):
    """The kind of controller that owns the workload (used in `baggage`)."""

    DEPLOYMENT = 0
    CRONJOB = 1
    POD = 2
    JOB = 3


class PolicyScope(enum.Enum):
    """Which workloads an authorization policy applies to."""

    GLOBAL = 0
    NAMESPACE = 1
    WORKLOAD_SELECTOR = 2


class PolicyAction(enum.Enum):
    """What a matching authorization policy does."""

    ALLOW = 0
    DENY = 1


class MatchKind(enum.StrEnum):
    """How a `StringMatch` compares; a str enum so plain "exact" etc. compare equal."""

    EXACT = "exact"
    PREFIX = "prefix"
    SUFFIX = "suffix"
    PRESENCE = "presence"


# --- Workloads and services ---


@dataclass(frozen=True, slots=True)
class Port:
    """A service port and the port the workload listens on (0 = a named port)."""

    service_port: int
    target_port: int
    app_protocol: AppProtocol = AppProtocol.UNKNOWN


@dataclass(frozen=True, slots=True)
class NamespacedHostname:
    """A service hostname qualified by its namespace, e.g. a waypoint's Service."""

    namespace: str
    hostname: str

    @property
    def key(self) -> str:
        """The service key, "ns/hostname"."""
        return f"{self.namespace}/{self.hostname}"


@dataclass(frozen=True, slots=True)
class GatewayAddress:
    """Where a waypoint is reached: an IP or a service hostname, plus its HBONE port."""

    address: IpAddress | None
    hostname: NamespacedHostname | None
    hbone_mtls_port: int = HBONE_PORT

    def __str__(self) -> str:
        target = self.hostname.key if self.hostname is not None else str(self.address)
        return f"{target}:{self.hbone_mtls_port}"


@dataclass(frozen=True, slots=True)
class Workload:
    """One pod (or VM) known to the mesh; its resource name is `uid`."""

    uid: str
    name: str
    namespace: str
    addresses: tuple[IpAddress, ...]
    node: str
    service_account: str = DEFAULT_SERVICE_ACCOUNT
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    tunnel_protocol: TunnelProtocol = TunnelProtocol.NONE
    network: str = ""
    canonical_name: str = ""
    canonical_revision: str = ""
    workload_name: str = ""
    workload_type: WorkloadType = WorkloadType.DEPLOYMENT
    cluster_id: str = DEFAULT_CLUSTER_ID
    status: HealthStatus = HealthStatus.HEALTHY
    # Load-balancing weight; 0 means never chosen.
    capacity: int = 1
    # ("ns/hostname", ports) for each service this workload is an endpoint of.
    services: tuple[tuple[str, tuple[Port, ...]], ...] = ()
    # "ns/name" of WORKLOAD_SELECTOR policies that select this workload.
    authorization_policies: tuple[str, ...] = ()
    waypoint: GatewayAddress | None = None

    @property
    def identity(self) -> Identity:
        """The SPIFFE identity the workload's certificate carries."""
        return Identity(
            trust_domain=self.trust_domain,
            namespace=self.namespace,
            service_account=self.service_account,
        )

    def ports_for(self, service_key: str) -> tuple[Port, ...]:
        """This workload's port mapping for the service "ns/hostname" (empty if none)."""
        for key, ports in self.services:
            if key == service_key:
                return ports
        return ()

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name} ({self.uid})"


@dataclass(frozen=True, slots=True)
class Service:
    """A Kubernetes Service; its endpoints are the workloads that list its key."""

    name: str
    namespace: str
    hostname: str
    # (network, VIP) pairs; empty for headless services.
    vips: tuple[tuple[str, IpAddress], ...]
    ports: tuple[Port, ...]
    # Extra SPIFFE URIs a server of this service may present.
    subject_alt_names: tuple[str, ...] = ()
    waypoint: GatewayAddress | None = None

    @property
    def key(self) -> str:
        """The resource name, "ns/hostname"."""
        return f"{self.namespace}/{self.hostname}"

    def port(self, service_port: int) -> Port | None:
        """The declared port for `service_port`, if the service has it."""
        for port in self.ports:
            if port.service_port == service_port:
                return port
        return None

    def __str__(self) -> str:
        return self.key


# --- Authorization ---


@dataclass(frozen=True, slots=True)
class StringMatch:
    """One string comparison (exact, prefix, suffix, or presence = any non-empty value)."""

    kind: MatchKind
    value: str = ""

    def __post_init__(self) -> None:
        # Accept the plain strings "exact" etc. but store the enum, so equality and the
        # config dump see one spelling.
        object.__setattr__(self, "kind", MatchKind(self.kind))

    def matches(self, candidate: str) -> bool:
        """Whether `candidate` satisfies this match."""
        match self.kind:
            case MatchKind.EXACT:
                return candidate == self.value
            case MatchKind.PREFIX:
                return candidate.startswith(self.value)
            case MatchKind.SUFFIX:
                return candidate.endswith(self.value)
            case MatchKind.PRESENCE:
                return candidate != ""


@dataclass(frozen=True, slots=True)
class ServiceAccountMatch:
    """A service account, matched against the peer identity's namespace and account."""

    namespace: str
    service_account: str


@dataclass(frozen=True, slots=True)
class Match:
    """A set of conditions that must all hold (each family: any positive, no negative)."""

    namespaces: tuple[StringMatch, ...] = ()
    not_namespaces: tuple[StringMatch, ...] = ()
    principals: tuple[StringMatch, ...] = ()
    not_principals: tuple[StringMatch, ...] = ()
    source_ips: tuple[IpNetwork, ...] = ()
    not_source_ips: tuple[IpNetwork, ...] = ()
    destination_ips: tuple[IpNetwork, ...] = ()
    not_destination_ips: tuple[IpNetwork, ...] = ()
    destination_ports: tuple[int, ...] = ()
    not_destination_ports: tuple[int, ...] = ()
    service_accounts: tuple[ServiceAccountMatch, ...] = ()
    not_service_accounts: tuple[ServiceAccountMatch, ...] = ()

    def is_empty(self) -> bool:
        """True when no field is set; such a Match is ignored, never matches."""
        return not any(
            (
                self.namespaces,
                self.not_namespaces,
                self.principals,
                self.not_principals,
                self.source_ips,
                self.not_source_ips,
                self.destination_ips,
                self.not_destination_ips,
                self.destination_ports,
                self.not_destination_ports,
                self.service_accounts,
                self.not_service_accounts,
            )
        )


@dataclass(frozen=True, slots=True)
class Clause:
    """Matches if any of its Matches matches (no Matches at all: always)."""

    matches: tuple[Match, ...] = ()


@dataclass(frozen=True, slots=True)
class Rule:
    """Matches if all of its clauses match (no clauses: always)."""

    clauses: tuple[Clause, ...] = ()


@dataclass(frozen=True, slots=True)
class Authorization:
    """An L4 authorization policy; matches if any rule matches (no rules: never)."""

    name: str
    namespace: str
    scope: PolicyScope
    action: PolicyAction
    rules: tuple[Rule, ...]
    dry_run: bool = False

    @property
    def key(self) -> str:
        """The resource name, "ns/name"."""
        return f"{self.namespace}/{self.name}"

    def __str__(self) -> str:
        return self.key
