"""Endpoint choice for service-addressed connections, as ztunnel does it.

ztunnel (src/state.rs `load_balance`, `find_upstream_from_service`) has no round robin or
least-request: it keeps the healthy endpoints that can serve the port and picks one at
random, weighted by `Workload.capacity`. The port is resolved per endpoint: the workload's
own mapping for the service first (it knows named ports), else the Service's target port,
where 0 means "named port" and only a workload mapping can resolve it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ztunnel.proxy.errors import NoHealthyUpstream
from ztunnel.state.model import HealthStatus, IpAddress, Port, Service, Workload
from ztunnel.state.store import ProxyState


@dataclass(frozen=True, slots=True)
class Endpoint:
    """The chosen workload, the address to reach it on, and the port it listens on."""

    workload: Workload
    address: IpAddress
    target_port: int


def target_port(workload: Workload, service: Service, service_port: int) -> int | None:
    """The port `workload` serves `service_port` of `service` on, or None if it does not."""
    for port in workload.ports_for(service.key):
        if port.service_port == service_port and port.target_port:
            return port.target_port
    declared: Port | None = service.port(service_port)
    if declared is not None and declared.target_port:
        return declared.target_port
    return None


def choose_endpoint(
    state: ProxyState, service: Service, service_port: int, rng: random.Random
) -> Endpoint:
    """Pick an endpoint of `service` for a connection to `service_port`."""
    if service.port(service_port) is None:
        declared = ", ".join(str(p.service_port) for p in service.ports) or "none"
        raise NoHealthyUpstream(
            f"service {service.key} has no port {service_port} (declared ports: {declared})"
        )
    candidates: list[Endpoint] = []
    unhealthy = without_port = 0
    for workload in state.endpoints(service):
        # Capacity 0 drains a workload: it stays an endpoint but is never chosen.
        if workload.status is not HealthStatus.HEALTHY or workload.capacity <= 0:
            unhealthy += 1
            continue
        port = target_port(workload, service, service_port)
        if port is None or not workload.addresses:
            without_port += 1
            continue
        candidates.append(Endpoint(workload, workload.addresses[0], port))
    if not candidates:
        raise NoHealthyUpstream(
            f"service {service.key} port {service_port} has no usable endpoint "
            f"({len(state.endpoints(service))} known, {unhealthy} unhealthy or drained, "
            f"{without_port} without an address for the port)"
        )
    weights = [endpoint.workload.capacity for endpoint in candidates]
    return rng.choices(candidates, weights=weights)[0]
