"""waypoint/app: builds the waypoint's components and runs them in one nursery.

Task tree:
    run
    ├── signal handler (SIGTERM/SIGINT start the drain)
    ├── config feed (delta xDS from istiod_lite, or a static feed: the store's single writer)
    ├── certificate manager (the waypoint's own workload certificate, renewed at half life)
    ├── upstreams (the HBONE pool to endpoints' ztunnels, HTTP/2 upstream connections)
    ├── OTLP span exporter (when tracing has an endpoint)
    ├── metrics and flow events (/debug/flows) :15020, readiness :15021, admin :15000 (loopback)
    └── HBONE listener :15008, under the drain (one task per connection, one per tunnel)

Readiness waits for the first full config and the certificate. Draining stops accepting,
sends GOAWAY on HBONE connections, gives open requests `drainSeconds`, then cancels the rest;
then the spans still queued get up to TRACE_FLUSH_SECONDS to be exported.
"""

from __future__ import annotations

import random
from typing import Any

import trio

from meshcore import netio
from meshcore.admin import Readiness, admin_routes, metrics_routes, readiness_routes, serve_http
from meshcore.drain import Drain, install_signal_handlers
from meshcore.flows import FlowBroadcaster, flows_routes
from meshcore.identity.caclient import RemoteCaProvider
from meshcore.identity.manager import CertificateManager, CertificateProvider, CertificateUnavailable
from meshcore.log import get_logger
from meshcore.metrics import new_registry
from waypoint.feeds import StaticFeed, WaypointStore, XdsFeed
from waypoint.listener import HboneListener
from waypoint.metrics import WaypointMetrics
from waypoint.otlp import OtlpExporter
from waypoint.pipeline import Pipeline
from waypoint.settings import ConfigError, WaypointSettings
from waypoint.tracing import Tracer
from waypoint.upstream import Upstreams

_log = get_logger("waypoint")

# How long to wait between attempts to get the waypoint's first certificate.
_CERTIFICATE_RETRY_SECONDS = 1.0
# After the drain, how long queued spans may take to reach the collector.
TRACE_FLUSH_SECONDS = 5.0


class Waypoint:
    """The waypoint proxy.

    Without `settings.control_plane` the config comes from `self.feed` (a StaticFeed: call
    `feed.apply(resources)`), and `certificate_provider` must be given (tests pass a
    LocalCaProvider); with one, both come from istiod_lite.
    """

    def __init__(
        self,
        settings: WaypointSettings,
        *,
        certificate_provider: CertificateProvider | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.registry = new_registry()
        self.drain = Drain(grace=settings.drain_seconds)
        self.readiness = Readiness(pending=("config", "certificate", "listener"))
        self.store = WaypointStore()
        self.feed: XdsFeed | StaticFeed
        if settings.control_plane is None:
            if certificate_provider is None:
                raise ConfigError("without controlPlane the waypoint needs a certificate provider")
            self.feed = StaticFeed(self.store)
        else:
            self.feed = XdsFeed(settings, settings.control_plane, self.store, self.registry)
            if certificate_provider is None:
                root = settings.control_plane.root_cert_path
                certificate_provider = RemoteCaProvider(
                    settings.control_plane.address, root_pem=root.read_bytes() if root else None, token=settings.control_plane.token
                )
        self.certificates = CertificateManager(certificate_provider)
        self.metrics = WaypointMetrics(self.registry)
        self.upstreams = Upstreams(
            certificates=self.certificates, identity=settings.identity, max_header_bytes=settings.http.max_header_bytes
        )
        self.flows = FlowBroadcaster(settings.waypoint_key)
        endpoint = settings.tracing.otlp_endpoint
        self.exporter = (
            OtlpExporter(endpoint, service_name=settings.service_name, registry=self.registry) if endpoint is not None else None
        )
        tracer = Tracer(
            node_id=settings.node_id,
            sampling_percent=settings.tracing.sampling_percent,
            export=self.exporter.submit if self.exporter is not None else None,
        )
        self.pipeline = Pipeline(self.store, self.upstreams, self.metrics, settings.http, rng=rng, flows=self.flows, tracer=tracer)
        self.listener = HboneListener(
            identity=settings.identity,
            certificates=self.certificates,
            store=self.store,
            pipeline=self.pipeline,
            limits=settings.http,
            drain=self.drain,
        )
        self.hbone_address: tuple[str, int] | None = None  # bound address, once run() started

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        settings = self.settings
        listener = netio.listen((settings.address, settings.ports.hbone))
        self.hbone_address = listener.getsockname()[:2]
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(install_signal_handlers, self.drain)
                nursery.start_soon(self.feed.run)
                await nursery.start(self.certificates.run)
                await nursery.start(self.upstreams.run)
                if self.exporter is not None:
                    await nursery.start(self.exporter.run)
                for port, routes, host in (
                    (settings.ports.metrics, metrics_routes(self.registry) | flows_routes(self.flows), settings.address),
                    (settings.ports.readiness, readiness_routes(self.readiness), settings.address),
                    (settings.ports.admin, admin_routes(self.config_dump, self.drain), "127.0.0.1"),
                ):
                    if port:
                        await nursery.start(serve_http, (host, port), routes)
                nursery.start_soon(self._become_ready)
                _log.info("waypoint listening", hbone=f"{self.hbone_address[0]}:{self.hbone_address[1]}", waypoint=settings.waypoint_key)
                self.readiness.mark_ready("listener")
                task_status.started()

                async def accept_loop(connections: trio.Nursery) -> None:
                    try:
                        await self.listener.serve_listener(listener, connections)
                    finally:
                        netio.close(listener)  # draining: new connections are refused, not queued

                await self.drain.run_until_drained(accept_loop)
                if self.exporter is not None:
                    with trio.move_on_after(TRACE_FLUSH_SECONDS):
                        await self.exporter.aclose()
                nursery.cancel_scope.cancel()
        finally:
            netio.close(listener)
        _log.info("waypoint stopped")

    async def _become_ready(self) -> None:
        """Ready once the first config arrived and the waypoint holds its certificate."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._wait_config)
            while True:
                try:
                    await self.certificates.get(self.settings.identity)
                    break
                except CertificateUnavailable as exc:
                    _log.error("waypoint certificate unavailable; retrying", error=str(exc))
                    await trio.sleep(_CERTIFICATE_RETRY_SECONDS)
            self.readiness.mark_ready("certificate")

    async def _wait_config(self) -> None:
        await self.feed.wait_synced()
        self.readiness.mark_ready("config")

    def config_dump(self) -> dict[str, Any]:
        snapshot = self.store.current
        clusters = {}
        for name, config in snapshot.clusters.items():
            state = self.pipeline.cluster_state(name)
            assignment = snapshot.endpoints.get(config.endpoints_name)
            clusters[name] = {
                "lb": str(config.lb),
                "endpoints": [
                    {"address": str(e), "identity": e.identity, "tunnel": str(e.tunnel), "healthy": e.healthy}
                    for e in (assignment.endpoints if assignment else ())
                ],
                "limits": state.limits.statistics().__repr__() if state else None,
                "outlier": state.outlier.statistics().__repr__() if state and state.outlier else None,
            }
        cert = self.certificates.get_nowait(self.settings.identity)
        return {
            "waypoint": self.settings.waypoint_key,
            "identity": self.settings.identity.uri,
            "version": snapshot.version,
            "listeners": {
                name: {"routes": len(service.routes), "deny": service.authz.deny is not None, "allow": service.authz.allow is not None}
                for name, service in snapshot.routes.services.items()
            },
            "clusters": clusters,
            "certificate": {"notAfter": cert.not_after.isoformat()} if cert else None,
            "connections": {"upstream": self.upstreams.connection_count(), "hbone": self.upstreams.hbone.connection_count()},
        }
