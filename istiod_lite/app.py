"""istiod_lite/app: composes the controller and runs it in one nursery.

Task tree:
    run
    ├── source (files: a watched directory of YAML; kube: list+watch per kind)
    ├── controller: source events -> Translator (pure, incremental) -> XdsServer.apply,
    │   and the per-node identity snapshot the CA checks impersonation against
    ├── XdsServer (debounced pushes to every delta ADS stream)
    ├── kube source only: WaypointController (Deployment/Service/ServiceAccount per Waypoint
    │   or istio-waypoint Gateway, and their status) and StatusWriter (why translation
    │   rejected an object, on its status), both fed by the controller
    ├── gRPC on 15012 (TLS, serving cert from the mesh CA) and 15010 (plaintext, dev):
    │   AggregatedDiscoveryService + IstioCertificateService
    └── monitoring on 15014: /metrics, /ready (after the source's initial sync)

Threads: gRPC servicers run on grpc's pool. xDS streams cross into trio only through
meshcore/xds/grpc_bridge.py; the CA servicer stays on its grpc thread and reads
`_node_pods`, whose per-node mappings this controller replaces (never mutates).
"""

from __future__ import annotations

import gc
from collections.abc import Mapping

import grpc
import trio

from meshcore._gen import ca_pb2_grpc
from meshcore.admin import Readiness, Response, metrics_routes, serve_http
from meshcore.identity.ca import CertificateAuthority
from meshcore.identity.spiffe import Identity
from meshcore.log import get_logger
from meshcore.metrics import new_registry
from istiod_lite.ca.authn import Authenticator, NodeTokenAuthenticator, TokenReviewAuthenticator
from istiod_lite.ca.root import (
    issue_serving_certificate,
    load_or_create_root,
    load_or_create_root_secret,
    load_plugin_ca,
    publish_root_cert,
)
from istiod_lite.ca.server import CaService
from istiod_lite.ca.tokens import NodeTokens
from istiod_lite.config import IstiodConfig
from istiod_lite.grpcserver import GrpcServer
from istiod_lite.kube.status import StatusWriter
from istiod_lite.kube.waypoint_controller import WaypointController
from istiod_lite.kube.waypoints import DeploymentSettings
from istiod_lite.model import Translator
from istiod_lite.sources.base import KINDS, ObjectEvent, SourceEvent, SyncComplete
from istiod_lite.sources.files import FilesSource
from istiod_lite.xds.server import XdsServer

_log = get_logger("istiod")

ISTIOD_TLS_SERVICE_PORT = 15012  # the port of Service istiod that proxies dial
KUBE_WRITE_CONNECTIONS = 8  # waypoint and status writes, TokenReviews on grpc threads


def serving_dns_names(config: IstiodConfig) -> tuple[str, ...]:
    """The names proxies dial istiod by: its Service in its namespace (see `root_namespace`)."""
    service = f"istiod.{config.root_namespace}.svc"
    return (service, f"{service}.cluster.local", "localhost")


def load_ca(config: IstiodConfig, api_client=None) -> CertificateAuthority:
    """Plug-in CA if given; else the persisted self-signed root (a Secret with `api_client`)."""
    if config.ca_cert is not None and config.ca_key is not None:
        return load_plugin_ca(config.ca_cert, config.ca_key, config.ca_chain, trust_domain=config.trust_domain)
    if api_client is not None:
        return load_or_create_root_secret(api_client, config.root_namespace, config.trust_domain)
    return load_or_create_root(config.root_dir / "ca", config.trust_domain)


class IstiodLite:
    def __init__(self, config: IstiodConfig) -> None:
        self.config = config
        self.registry = new_registry()
        self._api_client = _kube_client(config) if config.source == "kube" else None
        self.ca = load_ca(config, self._api_client)
        self.root_pem = self.ca.roots_pem[0]
        if self._api_client is not None:
            publish_root_cert(self._api_client, config.root_namespace, self.root_pem)
        self.tokens = NodeTokens(config.root_dir / "node-tokens")
        self.translator = Translator(
            trust_domain=config.trust_domain, root_namespace=config.root_namespace, registry=self.registry
        )
        self.xds = XdsServer(registry=self.registry)
        self.readiness = Readiness(pending=("config",))
        # node -> {(namespace, pod): identity}; read by the CA on grpc threads (see below).
        self._node_pods: dict[str, Mapping[tuple[str, str], Identity]] = {}
        self._pod_nodes: dict[tuple[str, str], str] = {}
        # (kind, namespace, name) of a custom object -> (generation, labels, annotations) last translated
        self._custom_configs: dict[tuple[str, str, str], tuple[object, ...]] = {}
        # Kube source only: they write what istiod_lite decides back to the API server.
        self._kube_writers: tuple[WaypointController | StatusWriter, ...] = ()
        if self._api_client is not None:
            # ztunnel runs in istiod's namespace (istio-system), as Istio installs it.
            authenticator: Authenticator = TokenReviewAuthenticator(
                self._api_client, trusted_accounts={f"{config.root_namespace}/ztunnel"}
            )
            waypoints = WaypointController(
                self._api_client,
                DeploymentSettings(
                    image=config.waypoint_image,
                    istiod_address=f"istiod.{config.root_namespace}.svc:{ISTIOD_TLS_SERVICE_PORT}",
                    trust_domain=config.trust_domain,
                    root_cert_pem=self.root_pem.decode(),
                ),
                registry=self.registry,
            )
            status = StatusWriter(self._api_client, self.translator, registry=self.registry)
            self._kube_writers = (waypoints, status)
        else:
            authenticator = NodeTokenAuthenticator(self.tokens)
        self.ca_service = CaService(self.ca, authenticator, self._identities_on_node, registry=self.registry)
        self._scope = trio.CancelScope()
        self.stopped = trio.Event()

    def node_token(self, node: str) -> str:
        """The bearer token a node's ztunnel presents (files source: minted once, kept 0600)."""
        return self.tokens.token_for(node)

    def stop(self) -> None:
        self._scope.cancel()

    def _identities_on_node(self, node: str) -> frozenset[Identity]:
        return frozenset(self._node_pods.get(node, {}).values())

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        config = self.config
        try:
            with self._scope:
                send, receive = trio.open_memory_channel[SourceEvent](1024)
                async with trio.open_nursery() as nursery:
                    await nursery.start(self.xds.run)
                    nursery.start_soon(self._controller, receive)
                    for writer in self._kube_writers:
                        await nursery.start(writer.run)
                    await nursery.start(self._source().run, send)
                    serving = issue_serving_certificate(
                        self.ca, dns_names=serving_dns_names(config), ip_addresses=(config.listen_address,)
                    )
                    servicers = [self.xds.add_to_server, self._add_ca]
                    tls = grpc.ssl_server_credentials([(serving.key_pem, serving.chain_pem)])
                    if config.ports.xds_tls:
                        await nursery.start(
                            GrpcServer((config.listen_address, config.ports.xds_tls), servicers=servicers, credentials=tls).run
                        )
                    if config.ports.xds_plaintext:
                        await nursery.start(GrpcServer((config.listen_address, config.ports.xds_plaintext), servicers=servicers).run)
                    if config.ports.monitoring:
                        routes = {**metrics_routes(self.registry), "/ready": self._ready}
                        await nursery.start(serve_http, (config.listen_address, config.ports.monitoring), routes)
                    _log.info("istiod_lite started", source=config.source, address=config.listen_address)
                    task_status.started()
        finally:
            self.stopped.set()

    def _add_ca(self, server: grpc.Server) -> None:
        ca_pb2_grpc.add_IstioCertificateServiceServicer_to_server(self.ca_service, server)

    def _source(self):
        if self.config.source == "files":
            assert self.config.directory is not None
            return FilesSource(self.config.directory, registry=self.registry, poll_interval=self.config.poll_interval)
        from istiod_lite.sources.kube import KubeSource

        return KubeSource(self._api_client, registry=self.registry)

    async def _ready(self, request) -> Response:
        if self.readiness.ready:
            return Response(200, b"ready\n")
        return Response(503, f"not ready, pending: {', '.join(self.readiness.pending)}\n".encode())

    async def _controller(self, receive: trio.MemoryReceiveChannel[SourceEvent]) -> None:
        async for event in receive:
            if isinstance(event, SyncComplete):
                for writer in self._kube_writers:
                    writer.source_synced()
                if not self.readiness.ready:
                    self.xds.mark_ready()
                    self.readiness.mark_ready("config")
                    _log.info("initial configuration synced", resources=sum(len(r) for r in self.translator.resources().values()))
                    # The model built so far lives long: keep the collector from walking it on
                    # every later change (it cost 100-150 ms pauses at 10k workloads).
                    gc.collect()
                    gc.freeze()
                continue
            if self._changes_config(event):
                self.xds.apply(self.translator.apply(event))
            for writer in self._kube_writers:
                writer.observe(event)
            if event.kind == "Pod":
                self._refresh_node_identities(event)

    def _changes_config(self, event: ObjectEvent) -> bool:
        """False for an update of a custom kind that left its generation (bumped by every spec
        change), labels and annotations alone: our own status write coming back, which the
        translator would only reject (and log) a second time."""
        if not KINDS[event.kind].group:
            return True
        if event.action == "delete" or event.obj is None:
            self._custom_configs.pop(event.key, None)
            return True
        metadata = event.obj.get("metadata") or {}
        config = (metadata.get("generation"), metadata.get("labels"), metadata.get("annotations"))
        if config[0] is None:  # nothing to go by (files source): always translate
            return True
        previous = self._custom_configs.get(event.key)
        self._custom_configs[event.key] = config
        return previous != config

    def _refresh_node_identities(self, event: ObjectEvent) -> None:
        """Keep, per node, the identities of its pods for the CA's impersonation check.

        Each node's mapping is replaced, never mutated, because grpc threads read it; the
        cost per event is one copy of that node's pods, not a rescan of the cluster.
        """
        key = (event.namespace, event.name)
        old_node = self._pod_nodes.pop(key, None)
        if old_node is not None:
            pods = dict(self._node_pods.get(old_node, {}))
            pods.pop(key, None)
            self._node_pods[old_node] = pods
        obj = event.obj if event.action != "delete" else None
        if obj is None:
            return
        node = (obj.get("spec") or {}).get("nodeName")
        phase = (obj.get("status") or {}).get("phase")
        if not node or phase in ("Succeeded", "Failed"):
            return
        account = (obj.get("spec") or {}).get("serviceAccountName") or "default"
        try:
            identity = Identity(self.config.trust_domain, event.namespace, account)
        except ValueError:
            return  # the translator rejects and reports this pod
        self._pod_nodes[key] = node
        self._node_pods[node] = {**self._node_pods.get(node, {}), key: identity}


def _kube_client(config: IstiodConfig):
    """A client for --kubeconfig, else in-cluster, else ~/.kube/config; its pool holds a
    connection per long watch (every source kind, waypoint Deployments) plus the writes."""
    import kubernetes

    configuration = kubernetes.client.Configuration()
    configuration.connection_pool_maxsize = len(KINDS) + 1 + KUBE_WRITE_CONNECTIONS
    if config.kubeconfig is not None:
        kubernetes.config.load_kube_config(str(config.kubeconfig), client_configuration=configuration)
    else:
        try:
            kubernetes.config.load_incluster_config(client_configuration=configuration)
        except kubernetes.config.ConfigException:
            kubernetes.config.load_kube_config(client_configuration=configuration)
    return kubernetes.client.ApiClient(configuration)
