"""ztunnel/app: builds the node proxy's components and runs them in one nursery.

Task tree:
    run
    ├── signal handler (SIGTERM/SIGINT start the drain)
    ├── state feed (local file or delta xDS: the single writer of the StateStore)
    ├── certificate manager (renews local workloads' certificates at half life) and the
    │   tracker that fetches one for every local workload identity as workloads come and go
    ├── HBONE pool (client connections to peer ztunnels)
    ├── policy watcher (closes open connections a new policy denies)
    ├── metrics and flow events (/debug/flows) :15020, readiness :15021, admin :15000 (loopback)
    └── proxies, under the drain: outbound :15001, SOCKS5 :15080, plaintext inbound :15006,
        and HBONE inbound :15008 on every local workload IP (re-bound as workloads change)

Readiness waits for the state, the local workloads' certificates and the listeners.
Draining stops the listeners, sends GOAWAY on inbound HBONE connections, gives open
connections `drainSeconds` to finish, then cancels what is left and exits.
"""

from __future__ import annotations

import random
import socket
from typing import Any

import trio

from meshcore import netio
from meshcore.admin import Readiness, admin_routes, metrics_routes, readiness_routes, serve_http
from meshcore.drain import Drain, install_signal_handlers
from meshcore.flows import FlowBroadcaster, flows_routes
from meshcore.hbone.pool import HbonePool
from meshcore.identity.ca import CertificateAuthority
from meshcore.identity.caclient import RemoteCaProvider
from meshcore.identity.manager import CertificateManager, CertificateProvider, CertificateUnavailable, LocalCaProvider
from meshcore.log import get_logger
from meshcore.metrics import new_registry
from ztunnel.config import ConfigError, LocalSource, ZtunnelConfig
from ztunnel.feeds import LocalFileFeed, XdsFeed
from ztunnel.metrics import ZtunnelMetrics
from ztunnel.proxy.connections import ConnectionManager
from ztunnel.proxy.inbound import InboundHbone, InboundPlaintext
from ztunnel.proxy.inputs import ProxyInputs
from ztunnel.proxy.outbound import Outbound
from ztunnel.proxy.socks5 import Socks5
from ztunnel.proxy.sockets import SocketFactory
from ztunnel.inpod.manager import InPodProxies
from ztunnel.state.store import StateStore

_log = get_logger("ztunnel")


def load_ca(source: LocalSource) -> CertificateAuthority:
    try:
        cert_pem = source.ca_cert_path.read_bytes()
        key_pem = source.ca_key_path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"ca: cannot read {exc.filename}: {exc.strerror}") from exc
    try:
        return CertificateAuthority.load(cert_pem, key_pem)
    except ValueError as exc:
        raise ConfigError(f"ca: {source.ca_cert_path} / {source.ca_key_path}: {exc}") from exc


def usable_mark() -> int | None:
    """SO_MARK needs CAP_NET_ADMIN; without it capture rules cannot tell our sockets apart."""
    probe = socket.socket()
    try:
        netio.set_mark(probe, netio.MESH_MARK)
        return netio.MESH_MARK
    except PermissionError:
        _log.warning("cannot set SO_MARK (needs CAP_NET_ADMIN); traffic capture rules cannot skip ztunnel's own sockets")
        return None
    finally:
        probe.close()


class Ztunnel:
    def __init__(self, config: ZtunnelConfig) -> None:
        self.config = config
        self.registry = new_registry()
        self.drain = Drain(grace=config.drain_seconds)
        self.readiness = Readiness(pending=("state", "certificates", "proxy"))
        self.state = StateStore()
        self.flows = FlowBroadcaster(config.node)
        if isinstance(config.source, LocalSource):
            provider: CertificateProvider = LocalCaProvider(load_ca(config.source))
            self.feed: LocalFileFeed | XdsFeed = LocalFileFeed(config.source.state_path, self.state, self.registry)
        else:
            self.feed = XdsFeed(config.source, node=config.node, address=config.address, store=self.state, registry=self.registry)
            root = config.source.root_cert_path
            provider = RemoteCaProvider(
                config.source.address, root_pem=root.read_bytes() if root else None, token=config.source.token
            )
        self.certificates = CertificateManager(provider)
        outbound_dial = None
        self.inputs = ProxyInputs(
            config=config,
            state=self.state,
            certificates=self.certificates,
            metrics=ZtunnelMetrics(self.registry, self.flows),
            pool=HbonePool(lambda key: outbound_dial(key)),
            connections=ConnectionManager(self.state),
            drain=self.drain,
            rng=random.Random(),
            mark=(mark := usable_mark()),
            sockets=SocketFactory(mark),
        )
        self.outbound = Outbound(self.inputs)
        outbound_dial = self.outbound.dial
        self.inbound = InboundHbone(self.inputs)
        self.plaintext = InboundPlaintext(self.inputs)
        self.socks5 = Socks5(self.outbound)
        self.inpod: InPodProxies | None = None
        if config.inpod_socket is not None:
            self.readiness = Readiness(pending=("state", "certificates", "proxy", "inpod snapshot"))
            self.inpod = InPodProxies(
                config.inpod_socket,
                state=self.state,
                sockets=self.inputs.sockets,
                servers={
                    port: server
                    for port, server in (
                        (config.ports.outbound, self.outbound),
                        (config.ports.inbound_plaintext, self.plaintext),
                        (config.ports.inbound, self.inbound),
                    )
                    if port
                },
                mark=mark,
                on_snapshot=lambda: self.readiness.mark_ready("inpod snapshot"),
            )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        config = self.config
        async with trio.open_nursery() as nursery:
            nursery.start_soon(install_signal_handlers, self.drain)
            nursery.start_soon(self.feed.run)
            await nursery.start(self.certificates.run)
            await nursery.start(self.inputs.pool.run)
            nursery.start_soon(self.inputs.connections.watch_policies)
            for port, routes, host in (
                (config.ports.metrics, metrics_routes(self.registry) | flows_routes(self.flows), config.address),
                (config.ports.readiness, readiness_routes(self.readiness), config.address),
                (config.ports.admin, admin_routes(self.config_dump, self.drain), config.address),
            ):
                if port:
                    await nursery.start(serve_http, (host, port), routes)
            nursery.start_soon(self._track_local_certificates)
            await nursery.start(self._run_proxies)
            self.readiness.mark_ready("proxy")
            _log.info("ztunnel started", node=config.node, address=config.address)
            task_status.started()
            await self._proxies_done.wait()
            nursery.cancel_scope.cancel()
        _log.info("ztunnel stopped")

    async def _run_proxies(self, *, task_status: trio.TaskStatus[None]) -> None:
        self._proxies_done = trio.Event()
        config, mark = self.config, self.inputs.mark
        listeners: list[tuple[Any, socket.socket]] = []
        try:
            node_level = [(config.ports.socks5, self.socks5)]
            if self.inpod is None:  # in-pod mode binds these inside each pod instead
                node_level += [(config.ports.outbound, self.outbound), (config.ports.inbound_plaintext, self.plaintext)]
            for port, server in node_level:
                if port:
                    listeners.append((server, netio.listen((config.address, port), mark=mark)))

            async def accept_loops(connections: trio.Nursery) -> None:
                async with trio.open_nursery() as loops:
                    for server, listener in listeners:
                        loops.start_soon(server.serve_listener, listener, connections)
                    if self.inpod is not None:
                        await loops.start(self.inpod.run, connections)
                    elif config.ports.inbound:
                        await loops.start(self._inbound_listeners, connections)
                    task_status.started()

            await self.drain.run_until_drained(accept_loops)
        finally:
            for _, listener in listeners:
                netio.close(listener)
            self._proxies_done.set()

    async def _inbound_listeners(self, connections: trio.Nursery, *, task_status: trio.TaskStatus[None]) -> None:
        """Keep one HBONE listener on each local workload IP, following state changes."""
        config = self.config
        bound: dict[str, trio.CancelScope] = {}
        async with trio.open_nursery() as nursery:
            state = self.state.current
            while True:
                wanted = {str(a) for w in state.local_workloads(config.node) for a in w.addresses}
                for ip in sorted(wanted - bound.keys()):
                    try:
                        listener = netio.listen((ip, config.ports.inbound), mark=self.inputs.mark)
                    except OSError as exc:
                        _log.error("cannot listen for HBONE", address=f"{ip}:{config.ports.inbound}", error=str(exc))
                        continue
                    bound[ip] = trio.CancelScope()
                    nursery.start_soon(self._serve_inbound, listener, bound[ip], connections)
                for ip in bound.keys() - wanted:
                    bound.pop(ip).cancel()
                task_status.started()
                task_status = trio.TASK_STATUS_IGNORED
                state = await self.state.wait_for_change(state.version)

    async def _serve_inbound(self, listener: socket.socket, scope: trio.CancelScope, connections: trio.Nursery) -> None:
        try:
            with scope:
                await self.inbound.serve_listener(listener, connections)
        finally:
            netio.close(listener)

    async def _track_local_certificates(self) -> None:
        """Hold a certificate for every local workload's identity (ztunnel's warm-up fetch);
        drop those no workload on this node uses any more. Readiness waits for the first
        full state and its certificates."""
        await self.feed.wait_synced()
        self.readiness.mark_ready("state")
        held: set = set()
        state = self.state.current
        while True:
            wanted = {w.identity for w in state.local_workloads(self.config.node)}
            async with trio.open_nursery() as nursery:
                for identity in wanted - held:
                    nursery.start_soon(self._fetch_quietly, identity)
            for identity in held - wanted:
                self.certificates.forget(identity)
            held = wanted
            self.readiness.mark_ready("certificates")
            state = await self.state.wait_for_change(state.version)

    async def _fetch_quietly(self, identity) -> None:
        try:
            await self.certificates.get(identity)
        except CertificateUnavailable as exc:
            # Connections for it will retry the fetch; the manager logs and backs off.
            _log.error("certificate prefetch failed", identity=identity.uri, error=str(exc))

    def config_dump(self) -> dict[str, Any]:
        dump = self.state.current.to_json()
        dump["certificates"] = [
            {
                "identity": cert.identity.uri,
                "notBefore": cert.not_before.isoformat(),
                "notAfter": cert.not_after.isoformat(),
                "refreshAt": cert.refresh_at.isoformat(),
            }
            for cert in sorted(
                filter(None, map(self.certificates.get_nowait, {w.identity for w in self.state.current.local_workloads(self.config.node)})),
                key=lambda c: c.identity.uri,
            )
        ]
        dump["config"] = {
            "node": self.config.node,
            "address": self.config.address,
            "trustDomain": self.config.trust_domain,
            "ports": {
                "outbound": self.config.ports.outbound,
                "inboundPlaintext": self.config.ports.inbound_plaintext,
                "inbound": self.config.ports.inbound,
                "socks5": self.config.ports.socks5,
            },
        }
        dump["connections"] = {"inbound": len(self.inputs.connections), "pooled": self.inputs.pool.connection_count()}
        return dump
