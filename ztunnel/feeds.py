"""ztunnel/feeds: where the ztunnel's state comes from - the single writer of its StateStore.

`LocalFileFeed` reads ztunnel's local-config YAML (no control plane) and re-reads it when it
changes; `XdsFeed` subscribes to istiod_lite over delta xDS. Either way a bad update is
rejected with a log line and a metric while the last good state keeps serving, and
`wait_synced()` returns once the first full state has been applied (readiness waits on it).
"""

from __future__ import annotations

from pathlib import Path

import prometheus_client
import trio
from envoy.config.core.v3 import base_pb2
from google.protobuf import struct_pb2

from meshcore.log import get_logger
from meshcore.xds.client import control_plane_client
from meshcore.xds.types import ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL
from ztunnel.config import ConfigError, ControlPlane
from ztunnel.state.localconfig import LocalConfigError, load_local_config
from ztunnel.state.store import StateStore
from ztunnel.state.xds import XdsStateHandler

_log = get_logger("feeds")

STATE_POLL_INTERVAL = 1.0


class LocalFileFeed:
    def __init__(self, path: Path, store: StateStore, registry: prometheus_client.CollectorRegistry) -> None:
        self._path = path
        self._store = store
        self._mtime: float | None = None
        self._rejections = prometheus_client.Counter(
            "ztunnel_local_config_rejections",
            "Times the local state file was rejected (the last good state keeps serving)",
            registry=registry,
        )
        # The first load happens at construction: a broken file stops start-up with its reason.
        try:
            self._load()
        except (OSError, LocalConfigError) as exc:
            raise ConfigError(str(exc)) from exc

    async def wait_synced(self) -> None:
        await trio.lowlevel.checkpoint()

    async def run(self) -> None:
        while True:
            await trio.sleep(STATE_POLL_INTERVAL)
            try:
                self._load()
            except (OSError, LocalConfigError) as exc:
                self._rejections.inc()
                _log.error("state file rejected; the last good state keeps serving", path=str(self._path), error=str(exc))

    def _load(self) -> None:
        mtime = self._path.stat().st_mtime
        if mtime == self._mtime:
            return
        config = load_local_config(self._path)
        self._mtime = mtime
        self._store.replace(config)
        _log.info("state loaded", path=str(self._path), version=self._store.current.version)


class XdsFeed:
    """Workloads, services and policies from istiod_lite (type URLs of facts §4)."""

    def __init__(
        self,
        control_plane: ControlPlane,
        *,
        node: str,
        address: str,
        store: StateStore,
        registry: prometheus_client.CollectorRegistry,
    ) -> None:
        metadata = struct_pb2.Struct()
        metadata.update({"NAME": f"ztunnel-{node}", "NAMESPACE": "istio-system", "INSTANCE_IPS": address, "NODE_NAME": node})
        self._client = control_plane_client(
            control_plane,
            node=base_pb2.Node(
                id=f"ztunnel~{address}~ztunnel-{node}.istio-system~istio-system.svc.cluster.local",
                metadata=metadata,
            ),
            type_urls=(ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL),
            handler=XdsStateHandler(store),
            registry=registry,
        )

    async def wait_synced(self) -> None:
        await self._client.wait_synced()

    async def run(self) -> None:
        await self._client.run()
