"""waypoint/feeds: where the waypoint's configuration comes from - the single writer of its store.

istiod_lite sends this waypoint, over one delta ADS stream, Envoy's Listener /
RouteConfiguration / Cluster / ClusterLoadAssignment resources of the services bound to it,
plus every `istio.workload.Address` (to map a CONNECT's `VIP:port` to a service and to label
metrics with workloads). `XdsWaypointHandler` converts each resource once
(`waypoint.config.from_xds`, and `_address_from_any` here), NACKs the ones it cannot use
while the last good version keeps serving, and publishes a new immutable `WaypointSnapshot`
after every response; requests read the snapshot current when they start, so a route or
policy change reaches open connections on their next request.

`XdsFeed` runs the ADS client; `StaticFeed` hands resources to the same handler directly
(a waypoint without a control plane: tests, fixed setups).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import prometheus_client
import trio
from envoy.config.core.v3 import base_pb2
from google.protobuf import any_pb2, struct_pb2
from google.protobuf.message import DecodeError, Message

from meshcore._gen import workload_pb2
from meshcore.identity.spiffe import Identity, InvalidIdentity
from meshcore.log import get_logger
from meshcore.xds.client import control_plane_client
from meshcore.xds.types import ADDRESS_TYPE_URL, CLUSTER_TYPE_URL, ENDPOINT_TYPE_URL, LISTENER_TYPE_URL, ROUTE_TYPE_URL
from waypoint.config.from_xds import (
    XdsConversionError,
    cluster_from_xds,
    endpoints_from_xds,
    listener_from_xds,
    route_config_from_xds,
)
from waypoint.config.model import ClusterConfig, ClusterEndpoints, ListenerConfig, RouteConfig, RouteTable
from waypoint.settings import ControlPlane, WaypointSettings

_log = get_logger("feeds")

WAYPOINT_TYPE_URLS = (ADDRESS_TYPE_URL, LISTENER_TYPE_URL, ROUTE_TYPE_URL, CLUSTER_TYPE_URL, ENDPOINT_TYPE_URL)
_APP_PROTOCOLS = {
    workload_pb2.HTTP11: "http1",
    workload_pb2.HTTP2: "http2",
    workload_pb2.GRPC: "grpc",
    workload_pb2.TCP: "tcp",
    workload_pb2.TLS: "tls",
}


# --- The mesh's services and workloads (from Address resources) ---


@dataclass(frozen=True, slots=True)
class ServicePort:
    service_port: int
    target_port: int
    app_protocol: str | None  # "http1", "http2", "grpc", "tcp", "tls"; None: detect


@dataclass(frozen=True, slots=True)
class ServiceInfo:
    name: str
    namespace: str
    hostname: str
    vips: tuple[str, ...]
    ports: tuple[ServicePort, ...]

    def port(self, number: int) -> ServicePort | None:
        return next((p for p in self.ports if p.service_port == number), None)


@dataclass(frozen=True, slots=True)
class WorkloadInfo:
    uid: str
    name: str
    namespace: str
    addresses: tuple[str, ...]
    identity: Identity
    workload_name: str
    canonical_name: str
    canonical_revision: str
    cluster_id: str


@dataclass(frozen=True, slots=True)
class AddressIndex:
    """Services by VIP and workloads by IP, built once per snapshot."""

    services_by_vip: Mapping[str, ServiceInfo] = field(default_factory=lambda: MappingProxyType({}))
    workloads_by_ip: Mapping[str, WorkloadInfo] = field(default_factory=lambda: MappingProxyType({}))

    @classmethod
    def build(cls, addresses: Iterable[ServiceInfo | WorkloadInfo]) -> AddressIndex:
        services: dict[str, ServiceInfo] = {}
        workloads: dict[str, WorkloadInfo] = {}
        for address in addresses:
            if isinstance(address, ServiceInfo):
                services.update(dict.fromkeys(address.vips, address))
            else:
                workloads.update(dict.fromkeys(address.addresses, address))
        return cls(MappingProxyType(services), MappingProxyType(workloads))

    def service(self, vip: str, port: int) -> tuple[ServiceInfo, ServicePort] | None:
        """The service (and its port) a CONNECT to `vip:port` addresses."""
        service = self.services_by_vip.get(vip)
        service_port = service.port(port) if service is not None else None
        return (service, service_port) if service is not None and service_port is not None else None

    def workload(self, ip: str) -> WorkloadInfo | None:
        return self.workloads_by_ip.get(ip)


class AddressConversionError(ValueError):
    """An Address resource the waypoint cannot use."""


def _address_from_any(resource: any_pb2.Any) -> ServiceInfo | WorkloadInfo:
    address = workload_pb2.Address()
    if not resource.Unpack(address):
        raise AddressConversionError(f"expected an istio.workload.Address, got {resource.type_url}")
    kind = address.WhichOneof("type")
    if kind == "service":
        svc = address.service
        return ServiceInfo(
            name=svc.name,
            namespace=svc.namespace,
            hostname=svc.hostname,
            vips=tuple(_ip(a.address, "service.addresses") for a in svc.addresses),
            ports=tuple(ServicePort(p.service_port, p.target_port, _APP_PROTOCOLS.get(p.app_protocol)) for p in svc.ports),
        )
    if kind == "workload":
        wl = address.workload
        try:
            identity = Identity(wl.trust_domain or "cluster.local", wl.namespace, wl.service_account or "default")
        except InvalidIdentity as exc:
            raise AddressConversionError(f"workload {wl.uid}: {exc}") from None
        return WorkloadInfo(
            uid=wl.uid,
            name=wl.name,
            namespace=wl.namespace,
            addresses=tuple(_ip(a, "workload.addresses") for a in wl.addresses),
            identity=identity,
            workload_name=wl.workload_name,
            canonical_name=wl.canonical_name,
            canonical_revision=wl.canonical_revision,
            cluster_id=wl.cluster_id or "Kubernetes",
        )
    raise AddressConversionError("Address has neither a workload nor a service")


def _ip(raw: bytes, field_name: str) -> str:
    try:
        return str(ipaddress.ip_address(raw))
    except ValueError:
        raise AddressConversionError(f"{field_name}: {raw!r} is not a 4- or 16-byte IP address") from None


# --- The snapshot and its store ---


@dataclass(frozen=True, slots=True)
class WaypointSnapshot:
    """Everything a request reads, consistent at one moment; never mutated."""

    version: int = 0
    routes: RouteTable = field(default_factory=RouteTable)
    clusters: Mapping[str, ClusterConfig] = field(default_factory=lambda: MappingProxyType({}))
    endpoints: Mapping[str, ClusterEndpoints] = field(default_factory=lambda: MappingProxyType({}))
    addresses: AddressIndex = field(default_factory=AddressIndex)


class WaypointStore:
    """Holds the current snapshot; the feed's handler is its only writer."""

    def __init__(self) -> None:
        self.current = WaypointSnapshot()
        self._changed = trio.Event()

    def publish(self, snapshot: WaypointSnapshot) -> None:
        self.current = snapshot
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for_change(self, version: int) -> WaypointSnapshot:
        while self.current.version == version:
            await self._changed.wait()
        return self.current


class XdsWaypointHandler:
    """Converts and applies one xDS response at a time (the DeltaXdsClient's XdsHandler)."""

    _CONVERTERS = {
        LISTENER_TYPE_URL: listener_from_xds,
        ROUTE_TYPE_URL: route_config_from_xds,
        CLUSTER_TYPE_URL: cluster_from_xds,
        ENDPOINT_TYPE_URL: endpoints_from_xds,
        ADDRESS_TYPE_URL: _address_from_any,
    }

    def __init__(self, store: WaypointStore) -> None:
        self._store = store
        self._resources: dict[str, dict[str, object]] = {url: {} for url in self._CONVERTERS}

    def apply(self, type_url: str, upserts: list[tuple[str, str, any_pb2.Any]], removals: list[str]) -> dict[str, str]:
        """Apply one response; returns {resource name: error} for the rejected resources."""
        converter = self._CONVERTERS.get(type_url)
        if converter is None:
            message = f"type URL {type_url!r} is not handled by the waypoint"
            return {name: message for name, _, _ in upserts}
        resources = self._resources[type_url]
        errors: dict[str, str] = {}
        for name, _version, resource in upserts:
            try:
                converted = converter(resource)
            except (XdsConversionError, AddressConversionError, DecodeError) as exc:
                errors[name] = str(exc)
                _log.warning("xds resource rejected; the last good version keeps serving", type_url=type_url, resource=name, error=str(exc))
                continue
            named = _resource_name(converted)
            if named is not None and named != name:
                errors[name] = f"resource name does not match the name inside it, {named!r}"
                continue
            resources[name] = converted
        for name in removals:
            resources.pop(name, None)
        self._publish()
        return errors

    def _publish(self) -> None:
        listeners: Iterable[ListenerConfig] = self._resources[LISTENER_TYPE_URL].values()  # type: ignore[assignment]
        route_configs: dict[str, RouteConfig] = self._resources[ROUTE_TYPE_URL]  # type: ignore[assignment]
        clusters: dict[str, ClusterConfig] = self._resources[CLUSTER_TYPE_URL]  # type: ignore[assignment]
        endpoints: dict[str, ClusterEndpoints] = self._resources[ENDPOINT_TYPE_URL]  # type: ignore[assignment]
        self._store.publish(
            WaypointSnapshot(
                version=self._store.current.version + 1,
                routes=RouteTable.build(listeners, route_configs),
                clusters=MappingProxyType(dict(clusters)),
                endpoints=MappingProxyType(dict(endpoints)),
                addresses=AddressIndex.build(self._resources[ADDRESS_TYPE_URL].values()),  # type: ignore[arg-type]
            )
        )


def _resource_name(converted: object) -> str | None:
    """The name a converted resource carries, to check against the xDS resource name."""
    if isinstance(converted, (ListenerConfig, RouteConfig, ClusterConfig)):
        return converted.name
    if isinstance(converted, ClusterEndpoints):
        return converted.cluster_name
    return None  # Address names ("ns/hostname", workload uid) are istiod_lite's business


# --- Feeds ---


class XdsFeed:
    """The waypoint's resources from istiod_lite over delta ADS (node metadata WAYPOINT=ns/name)."""

    def __init__(
        self,
        settings: WaypointSettings,
        control_plane: ControlPlane,
        store: WaypointStore,
        registry: prometheus_client.CollectorRegistry,
    ) -> None:
        metadata = struct_pb2.Struct()
        metadata.update(
            {
                "NAME": settings.name,
                "NAMESPACE": settings.namespace,
                "INSTANCE_IPS": settings.address,
                "WAYPOINT": settings.waypoint_key,
            }
        )
        self.handler = XdsWaypointHandler(store)
        self._client = control_plane_client(
            control_plane,
            node=base_pb2.Node(
                id=settings.node_id,
                metadata=metadata,
            ),
            type_urls=WAYPOINT_TYPE_URLS,
            handler=self.handler,
            registry=registry,
        )

    async def wait_synced(self) -> None:
        await self._client.wait_synced()

    async def run(self) -> None:
        await self._client.run()


class StaticFeed:
    """Resources handed over in-process, through the same conversion as xDS."""

    def __init__(self, store: WaypointStore) -> None:
        self.handler = XdsWaypointHandler(store)
        self._synced = trio.Event()

    def apply(self, resources: Iterable[Message] = (), *, removals: Mapping[str, Iterable[str]] | None = None) -> dict[str, str]:
        """Upsert Envoy / Address messages (named by their own name) and remove
        {type URL: names}; returns the rejected resources as {name: error}."""
        upserts: dict[str, list[tuple[str, str, any_pb2.Any]]] = {url: [] for url in WAYPOINT_TYPE_URLS}
        for message in resources:
            packed = any_pb2.Any()
            packed.Pack(message)
            upserts.setdefault(packed.type_url, []).append((_message_name(message), "static", packed))
        errors: dict[str, str] = {}
        for type_url, items in upserts.items():
            gone = list((removals or {}).get(type_url, ()))
            if items or gone:
                errors |= self.handler.apply(type_url, items, gone)
        self._synced.set()
        return errors

    async def wait_synced(self) -> None:
        await self._synced.wait()

    async def run(self) -> None:
        await trio.sleep_forever()


def _message_name(message: Message) -> str:
    if isinstance(message, workload_pb2.Address):
        if message.WhichOneof("type") == "service":
            return f"{message.service.namespace}/{message.service.hostname}"
        return message.workload.uid
    return getattr(message, "name", "") or getattr(message, "cluster_name", "")
