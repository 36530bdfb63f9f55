"""ztunnel's L4 metrics and access log: one `ConnectionRecorder` per proxied connection.

Mirrors ztunnel's `src/proxy/metrics.rs` (`ConnectionResult`), so Istio dashboards read our
numbers the same way:

- The `istio_tcp_*` families carry Istio's full label set (`meshcore.metrics.TCP_LABELS`);
  what is unknown about a connection is labelled "unknown".
- A connection counts as opened when the proxy knows enough to label it, i.e. even if it is
  then denied. Its close is counted with the response flag of the error that ended it
  ("-" for none, "DENY", "CONNECT", ...); any flag but "-" also counts it as failed.
- Bytes: the caller reports `sent`/`received` from the reporter's point of view. Istio's
  `istio_tcp_sent_bytes_total` is always the response direction (towards the client) and
  `istio_tcp_received_bytes_total` the request direction (istio/istio#32399), so for the
  source reporter the two are swapped into the counters; the access log keeps the reporter's
  own view.
- Every connection ends in exactly one access-log event (logger "access"), whether it
  finished, failed or was denied, and in one flow event (`meshcore.flows`) carrying the
  verdict and the policy that decided it (`allowed_by` for an allowed one, the error's
  decision for a denied one).

    recorder = metrics.connection(info)
    recorder.opened()
    try:
        sent, received = await relay(...)
    except ProxyError as exc:
        recorder.closed(sent=..., received=..., error=exc)
    else:
        recorder.closed(sent=sent, received=received, error=None)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import prometheus_client
import trio

from meshcore.flows import FlowBroadcaster, FlowEvent, FlowPeer, Verdict
from meshcore.log import get_logger
from meshcore.metrics import TCP_LABELS, UNKNOWN, register_build_info
from ztunnel.proxy.errors import AuthorizationRevoked, HboneRejected, PolicyDenied

if TYPE_CHECKING:
    from meshcore.identity.spiffe import Identity
    from ztunnel.state.model import Service, Workload

Reporter = Literal["source", "destination"]

NO_FLAG = "-"
# Flag for an error that does not say what went wrong (ztunnel's default for unknown errors).
CONNECT_FAILURE_FLAG = "CONNECT"

_access_log = get_logger("access")


@dataclass(frozen=True)
class ConnectionInfo:
    """What the proxy knows about one connection when it starts recording it."""

    reporter: Reporter
    src_addr: tuple[str, int]
    # The address actually dialled or accepted (for HBONE, the peer's :15008).
    dst_addr: tuple[str, int]
    # The CONNECT authority when the connection is tunnelled over HBONE.
    hbone_target: str | None
    source_workload: Workload | None
    # Only the identity proven by the peer's mTLS certificate (or our own, outbound).
    source_identity: Identity | None
    destination_workload: Workload | None
    destination_service: Service | None
    # Defaults to destination_workload's identity when None.
    destination_identity: Identity | None
    mtls: bool


class ZtunnelMetrics:
    """The ztunnel's metric families, registered in `registry`."""

    def __init__(self, registry: prometheus_client.CollectorRegistry, flows: FlowBroadcaster | None = None) -> None:
        self.flows = flows

        def counter(name: str, documentation: str) -> prometheus_client.Counter:
            # prometheus_client appends the "_total" suffix Istio's names carry.
            return prometheus_client.Counter(name, documentation, TCP_LABELS, registry=registry)

        self.connections_opened = counter(
            "istio_tcp_connections_opened", "The total number of TCP connections opened"
        )
        self.connections_closed = counter(
            "istio_tcp_connections_closed", "The total number of TCP connections closed"
        )
        self.connections_failed = counter(
            "istio_tcp_connections_failed",
            "The total number of TCP connections that failed to establish (unstable)",
        )
        self.sent_bytes = counter(
            "istio_tcp_sent_bytes",
            "The size of total bytes sent during response in case of a TCP connection",
        )
        self.received_bytes = counter(
            "istio_tcp_received_bytes",
            "The size of total bytes received during request in case of a TCP connection",
        )
        self.sockets_open = prometheus_client.Gauge(
            "istio_tcp_sockets_open",
            "The current number of open TCP sockets (unstable)",
            ("reporter",),
            registry=registry,
        )
        register_build_info(registry, "ztunnel")

    def connection(self, info: ConnectionInfo) -> ConnectionRecorder:
        """Start recording one connection (its duration counts from now)."""
        return ConnectionRecorder(self, info)


class ConnectionRecorder:
    """Metrics and the access-log event for one connection; see the module docstring."""

    def __init__(self, metrics: ZtunnelMetrics, info: ConnectionInfo) -> None:
        self._metrics = metrics
        self._info = info
        self._labels = connection_labels(info)
        self._start = time.monotonic()
        self._counted_open = False
        self._socket_open = False
        self._recorded = False
        self._policy: str | None = None
        # Resolved once: labelled-child lookup takes a lock and hashes 23 strings.
        self._opened_child = metrics.connections_opened.labels(**self._labels)
        self._sent_child = metrics.sent_bytes.labels(**self._labels)
        self._received_child = metrics.received_bytes.labels(**self._labels)
        self._sockets_child = metrics.sockets_open.labels(info.reporter)

    def opened(self) -> None:
        """The connection is established: count it and hold it in the open-sockets gauge."""
        if self._recorded or self._socket_open:
            return
        self._count_open()
        self._socket_open = True
        self._sockets_child.inc()

    def allowed_by(self, policy: str | None) -> None:
        """The "ns/name" of the ALLOW policy that let the connection in (None: no policy applied)."""
        self._policy = policy

    def closed(self, *, sent: int, received: int, error: BaseException | None) -> None:
        """The connection ended, cleanly (`error=None`) or not; only the first call counts."""
        if self._recorded:
            return
        self._recorded = True
        self._count_open()
        if self._socket_open:
            self._sockets_child.dec()
        flag = response_flag(error)
        final = {**self._labels, "response_flags": flag}
        self._metrics.connections_closed.labels(**final).inc()
        if flag != NO_FLAG:
            self._metrics.connections_failed.labels(**final).inc()
        request_bytes, response_bytes = (
            (sent, received) if self._info.reporter == "source" else (received, sent)
        )
        self._received_child.inc(request_bytes)
        self._sent_child.inc(response_bytes)
        self._log(sent=sent, received=received, error=error, flag=flag)
        flows = self._metrics.flows
        if flows is not None:
            flows.publish(self._flow(flows.proxy, request_bytes, response_bytes, error, flag))

    def failed(self, error: BaseException) -> None:
        """The connection was refused or failed before any byte was relayed (e.g. denied)."""
        self.closed(sent=0, received=0, error=error)

    def _count_open(self) -> None:
        if not self._counted_open:
            self._counted_open = True
            self._opened_child.inc()

    def _log(self, *, sent: int, received: int, error: BaseException | None, flag: str) -> None:
        info = self._info
        fields = {
            "src.addr": format_addr(info.src_addr),
            "src.workload": _workload_display_name(info.source_workload),
            "src.namespace": _known(self._labels["source_workload_namespace"]),
            "src.identity": _known(self._labels["source_principal"]) if info.mtls else None,
            "dst.addr": format_addr(info.dst_addr),
            "dst.hbone_addr": info.hbone_target,
            "dst.service": _known(self._labels["destination_service"]),
            "dst.workload": _workload_display_name(info.destination_workload),
            "dst.namespace": _known(self._labels["destination_workload_namespace"]),
            "dst.identity": _known(self._labels["destination_principal"]) if info.mtls else None,
            "direction": "outbound" if info.reporter == "source" else "inbound",
            "bytes_sent": sent,
            "bytes_recv": received,
            "duration_ms": round((time.monotonic() - self._start) * 1000, 3),
            "error": None if error is None else (str(error) or type(error).__name__),
            "response_flags": flag,
        }
        if error is None:
            _access_log.info("connection complete", **fields)
        else:
            _access_log.error("connection complete", **fields)

    def _flow(self, proxy: str, request_bytes: int, response_bytes: int, error: BaseException | None, flag: str) -> FlowEvent:
        info, labels = self._info, self._labels
        verdict: Verdict = "allowed"
        policy = self._policy
        if isinstance(error, PolicyDenied):
            verdict, policy = "denied", error.decision.policy
        elif isinstance(error, AuthorizationRevoked):
            verdict, policy = "denied", error.policy
        elif isinstance(error, HboneRejected) and error.status == 401:
            verdict, policy = "denied", None  # the destination decided; its flow names the policy
        src, dst = info.source_workload, info.destination_workload
        return FlowEvent(
            time=time.time(),
            proxy=proxy,
            reporter=info.reporter,
            source=FlowPeer(
                workload=src.name if src else None,
                namespace=_known(labels["source_workload_namespace"]),
                identity=_known(labels["source_principal"]) if info.mtls else None,
                address=format_addr(info.src_addr),
            ),
            destination=FlowPeer(
                workload=dst.name if dst else None,
                namespace=_known(labels["destination_workload_namespace"]),
                identity=_known(labels["destination_principal"]) if info.mtls else None,
                address=info.hbone_target or format_addr(info.dst_addr),
                service=_known(labels["destination_service"]),
            ),
            verdict=verdict,
            policy=policy,
            bytes_sent=request_bytes,
            bytes_received=response_bytes,
            duration_ms=round((time.monotonic() - self._start) * 1000, 3),
            flags=flag,
        )


def connection_labels(info: ConnectionInfo) -> dict[str, str]:
    """Istio's TCP label values for `info`, with response_flags "-" (set at close)."""
    src, dst, svc = info.source_workload, info.destination_workload, info.destination_service
    dst_identity = info.destination_identity
    if dst_identity is None and dst is not None:
        dst_identity = dst.identity
    labels = {
        "reporter": info.reporter,
        "source_principal": _or_unknown(info.source_identity and info.source_identity.uri),
        "destination_principal": _or_unknown(dst_identity and dst_identity.uri),
        "destination_service": _or_unknown(svc and svc.hostname),
        "destination_service_namespace": _or_unknown(svc and svc.namespace),
        "destination_service_name": _or_unknown(svc and svc.name),
        "request_protocol": "tcp",
        "response_flags": NO_FLAG,
        "connection_security_policy": "mutual_tls" if info.mtls else UNKNOWN,
    }
    for side, workload in (("source", src), ("destination", dst)):
        labels |= {
            f"{side}_workload": _or_unknown(workload and (workload.workload_name or workload.name)),
            f"{side}_canonical_service": _or_unknown(workload and workload.canonical_name),
            f"{side}_canonical_revision": _or_unknown(workload and workload.canonical_revision),
            f"{side}_workload_namespace": _or_unknown(workload and workload.namespace),
            f"{side}_app": _or_unknown(workload and workload.canonical_name),
            f"{side}_version": _or_unknown(workload and workload.canonical_revision),
            f"{side}_cluster": _or_unknown(workload and workload.cluster_id),
        }
    return {name: labels[name] for name in TCP_LABELS}


def response_flag(error: BaseException | None) -> str:
    """The response_flags label for a connection that ended with `error`."""
    if error is None:
        return NO_FLAG
    if isinstance(error, trio.Cancelled):
        # Cut short by shutdown, like ztunnel's ClosedFromDrain: not a failure.
        return NO_FLAG
    return getattr(error, "response_flag", CONNECT_FAILURE_FLAG)


def format_addr(addr: tuple[str, int]) -> str:
    """"ip:port", with IPv6 addresses bracketed."""
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _workload_display_name(workload: Workload | None) -> str | None:
    # The pod name identifies one replica in a log line; fall back to the canonical service.
    if workload is None:
        return None
    return workload.name or workload.canonical_name or None


def _or_unknown(value: object) -> str:
    return str(value) if value else UNKNOWN


def _known(label_value: str) -> str | None:
    return None if label_value == UNKNOWN else label_value
