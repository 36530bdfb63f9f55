"""istiod_lite's gRPC server: one listening port, any number of services (xDS, CA).

    server = GrpcServer(
        ("0.0.0.0", 15012),
        servicers=[
            xds.add_to_server,
            functools.partial(ca_pb2_grpc.add_IstioCertificateServiceServicer_to_server, ca),
        ],
        credentials=grpc.ssl_server_credentials([(key_pem, chain_pem)]),
    )
    port = await nursery.start(server.run)

A servicer is anything that registers itself on a `grpc.Server`, which is the shape of both the
generated `add_*Servicer_to_server` functions and `XdsServer.add_to_server`. Run one
`GrpcServer` per port (plaintext 15010, TLS 15012); they can share servicers.

grpc serves each call on a thread of its pool, and a streaming call holds its thread for as
long as it is open, so the pool is sized for every proxy's xDS stream plus CA calls. Past
`max_concurrent_rpcs`, grpc refuses new calls with RESOURCE_EXHAUSTED instead of queueing them
behind streams that never end.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import grpc
import trio

from meshcore.log import get_logger
from meshcore.xds.grpc_bridge import serve_grpc_server

# Open xDS streams (one per proxy) plus CA calls in flight.
MAX_CONCURRENT_RPCS = 1000
# Requests are small, except a reconnecting proxy's initial_resource_versions (~60 bytes per
# resource it holds).
MAX_REQUEST_BYTES = 64 * 1024 * 1024

_OPTIONS: tuple[tuple[str, int], ...] = (
    # Fail loudly when the port is taken instead of silently sharing it with another process.
    ("grpc.so_reuseport", 0),
    ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
    # Find proxies that vanished without closing (their streams hold a thread each), and let
    # proxies ping us as often as every 15 s without being told to calm down (as istiod does).
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 15_000),
    ("grpc.keepalive_permit_without_calls", 1),
)

Servicer = Callable[[grpc.Server], None]

_log = get_logger("grpc")


class GrpcServer:
    """Serves `servicers` on `address` (plaintext, or TLS with `credentials`) while running."""

    def __init__(
        self,
        address: tuple[str, int],
        *,
        servicers: Sequence[Servicer],
        credentials: grpc.ServerCredentials | None = None,
        max_concurrent_rpcs: int = MAX_CONCURRENT_RPCS,
    ) -> None:
        self._address = address
        self._servicers = tuple(servicers)
        self._credentials = credentials
        self._max_concurrent_rpcs = max_concurrent_rpcs

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; reports the bound port (port 0 picks a free one)."""
        host, port = self._address
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        pool = ThreadPoolExecutor(max_workers=self._max_concurrent_rpcs, thread_name_prefix="grpc")
        try:
            server = grpc.server(
                pool, options=_OPTIONS, maximum_concurrent_rpcs=self._max_concurrent_rpcs
            )
            for add in self._servicers:
                add(server)
            try:
                if self._credentials is None:
                    bound = server.add_insecure_port(target)
                else:
                    bound = server.add_secure_port(target, self._credentials)
            except RuntimeError as exc:  # grpc raises when it cannot bind
                raise OSError(f"cannot listen on {target}: {exc}") from exc
            if bound == 0:
                raise OSError(f"cannot listen on {target}: address unavailable or in use")
            _log.info(
                "grpc server listening",
                address=target,
                port=bound,
                tls=self._credentials is not None,
            )
            async with trio.open_nursery() as nursery:
                await nursery.start(serve_grpc_server, server)
                task_status.started(bound)
        finally:
            pool.shutdown(wait=False)
