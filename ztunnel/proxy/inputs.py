"""ztunnel/proxy/inputs: what every proxy listener needs, bundled once (ztunnel's ProxyInputs)."""

from __future__ import annotations

import random
from dataclasses import dataclass

from meshcore.drain import Drain
from meshcore.hbone.pool import HbonePool
from meshcore.identity.manager import CertificateManager
from ztunnel.config import ZtunnelConfig
from ztunnel.metrics import ZtunnelMetrics
from ztunnel.proxy.connections import ConnectionManager
from ztunnel.proxy.sockets import SocketFactory
from ztunnel.state.store import StateStore

CONNECT_TIMEOUT = 10.0  # facts §1: TCP connect timeout 10 s
HANDSHAKE_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class ProxyInputs:
    config: ZtunnelConfig
    state: StateStore
    certificates: CertificateManager
    metrics: ZtunnelMetrics
    pool: HbonePool
    connections: ConnectionManager
    drain: Drain
    rng: random.Random
    # SO_MARK for every socket we create (None when the process may not set marks).
    mark: int | None
    sockets: SocketFactory
