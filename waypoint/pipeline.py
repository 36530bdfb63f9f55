"""waypoint/pipeline: what happens to one request, from authorization to the access log.

In order, as an Envoy waypoint's HTTP filter chain and router do it:

  1. the service's routes and RBAC from the snapshot current when the request starts;
  2. authorization with the client's identity (the HBONE peer certificate): denied -> 403
     "RBAC: access denied" (response details `rbac_access_denied_matched_policy[...]`);
  3. route: the first match, else 404 (NR);
  4. fault injection: delay (DI), abort (FI);
  5. per attempt: weighted split -> cluster (503 NC if unknown) -> outlier-healthy
     endpoints -> load balancer (503 UH if none) -> circuit breakers (503 UO) -> upstream,
     under the per-try timeout; a retriable outcome is retried while the retry policy, the
     cluster's retry budget and the request body's replay buffer allow (URX when retries
     ran out); the route timeout bounds everything after the route was chosen (504 UT);
  6. response header changes, then the response streams back to the client;
  7. one metrics record, one access-log event and one flow event, whatever happened; and
     the request's span when tracing records it (waypoint.tracing: the upstream request
     carries the waypoint's `traceparent`).

The pure decisions live in waypoint.routing and waypoint.policy; this module only acts on
them. Per-cluster state that outlives a request (load balancer turns and active counts,
outlier ejections, circuit-breaker counts) is kept here per cluster name and follows config
updates without being reset.

A request to a gRPC service that the waypoint answers itself gets HTTP 200 with the
matching grpc-status (Envoy's local-reply mapping), so gRPC clients see a gRPC error.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import trio

from meshcore.flows import FlowBroadcaster
from meshcore.identity.spiffe import Identity
from meshcore.log import get_logger
from waypoint.config.model import ClusterConfig, Endpoint, Fault, RetryPolicy, RouteAction, UpstreamProtocol
from waypoint.feeds import ServiceInfo, WaypointSnapshot, WaypointStore
from waypoint.flows import request_flow
from waypoint.http1 import Respond
from waypoint.messages import Body, BodyError, BufferedBody, Headers, Request, Response, header_value, local_reply
from waypoint.metrics import NO_FLAG, PeerLabels, RequestRecord, WaypointMetrics, format_flags
from waypoint.policy.authz import Decision, RequestAttributes, evaluate
from waypoint.policy.lb import LoadBalancer, NoHealthyUpstream
from waypoint.policy.limits import ConnectionPoolLimits, Overflow
from waypoint.policy.outlier import OutlierDetector
from waypoint.policy.retry import Outcome, UpstreamFailure, backoff, is_retriable, should_retry
from waypoint.routing.match import RequestHead, apply_header_changes, find_route, rewritten_target
from waypoint.routing.split import choose_backend
from waypoint.settings import HttpLimits
from waypoint.tracing import TRACEPARENT, TRACESTATE, Hop, Tracer
from waypoint.upstream import UpstreamError, Upstreams

_log = get_logger("pipeline")

_RESET_BEFORE_HEADERS = "upstream connect error or disconnect/reset before headers. reset reason: "
# Client/endpoint pairs whose metric labels are kept between config changes.
_PEERS_CACHE_ENTRIES = 10_000
# Envoy's Grpc::Utility::httpToGrpcStatus, for replies the waypoint makes itself.
_GRPC_STATUS_FOR_HTTP = {400: 13, 401: 16, 403: 7, 404: 12, 429: 14, 502: 14, 503: 14, 504: 14}


@dataclass(frozen=True, slots=True)
class Downstream:
    """What the listener knows about the tunnel a request arrived on."""

    listener: str  # "<hostname>:<port>": the Listener / RouteConfiguration of the service port
    service: ServiceInfo
    port: int  # the service port the client addressed
    client_identity: Identity | None  # proven by the HBONE peer certificate
    client_address: tuple[str, int]  # the HBONE peer (the client pod, in-pod ztunnel mode)


class LocalReply(Exception):
    """The waypoint answers the request itself; carries status, flag and details.

    `grpc_status` is set only by a gRPC fault abort; other replies to gRPC requests map
    their HTTP status to a grpc-status as Envoy does.
    """

    def __init__(self, status: int, flag: str, details: str, text: str, *, grpc_status: int | None = None) -> None:
        super().__init__(text or details)
        self.status = status
        self.flag = flag
        self.details = details
        self.text = text
        self.grpc_status = grpc_status


def _upstream_failure_reply(error: UpstreamError) -> LocalReply:
    reason = "connection failure" if error.failure is UpstreamFailure.CONNECT_FAILURE else "connection termination"
    if error.failure is UpstreamFailure.REFUSED_STREAM:
        reason = "remote refused stream reset"
    return LocalReply(503, error.response_flag, f"upstream_reset_before_response_started{{{reason}}}", _RESET_BEFORE_HEADERS + reason)


def _timeout_reply() -> LocalReply:
    return LocalReply(504, "UT", "response_timeout", "upstream request timeout")


class _NoScope:
    """Stands in for a cancel scope whose deadline is infinite."""

    cancelled_caught = False

    def __enter__(self) -> _NoScope:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None


_NO_SCOPE = _NoScope()


def _scope_at(deadline: float) -> trio.CancelScope | _NoScope:
    """A cancel scope for a finite deadline. Without a timeout configured none is entered:
    entering and leaving trio's scopes was a tenth of a request's CPU."""
    return trio.CancelScope(deadline=deadline) if deadline != math.inf else _NO_SCOPE


# --- per-cluster state ---


class ClusterState:
    """What outlives a request for one cluster: LB, outlier detection, circuit breakers."""

    def __init__(self, config: ClusterConfig, endpoints: tuple[Endpoint, ...], *, rng: random.Random) -> None:
        self.config = config
        self.endpoints = endpoints
        self._rng = rng
        self.limits = ConnectionPoolLimits(config.name, config.limits)
        self.lb = self._load_balancer(config)
        self.outlier = OutlierDetector(config.outlier, endpoints, clock=trio.current_time) if config.outlier else None

    def _load_balancer(self, config: ClusterConfig) -> LoadBalancer:
        return LoadBalancer(config.name, config.lb, rng=self._rng, panic_threshold=config.healthy_panic_threshold)

    def update(self, config: ClusterConfig, endpoints: tuple[Endpoint, ...]) -> None:
        if (config.lb, config.healthy_panic_threshold) != (self.config.lb, self.config.healthy_panic_threshold):
            self.lb = self._load_balancer(config)
        if config.outlier != self.config.outlier:
            self.outlier = OutlierDetector(config.outlier, endpoints, clock=trio.current_time) if config.outlier else None
        elif self.outlier is not None and endpoints != self.endpoints:
            self.outlier.update_endpoints(endpoints)
        self.limits.reconfigure(config.limits)
        self.config = config
        self.endpoints = endpoints

    def choose_endpoint(self) -> Endpoint:
        """Raises NoHealthyUpstream."""
        if self.outlier is None:
            return self.lb.choose(self.endpoints, panic_from=self.endpoints)
        candidates = self.outlier.healthy(self.endpoints)
        return self.lb.choose(candidates, ejected=len(self.endpoints) - len(candidates), panic_from=self.endpoints)


# --- the request body, kept for retries ---


class _ReplayableBody:
    """The downstream request body, remembered (up to `limit` bytes) so that a retry can
    send it again. Only the newest attempt may read; an older one sees its body broken."""

    def __init__(self, source: Body, limit: int) -> None:
        self._source = source
        self._limit = limit
        self._chunks: list[bytes] = []
        self._kept = 0
        self._count = 0  # chunks read from the source so far
        self._overflowed = False
        self._reading = False
        self._generation = 0
        self.ended = False
        self.bytes_read = 0

    @property
    def replayable(self) -> bool:
        """Can a new attempt send the whole body again? Not once part of it was dropped, nor
        while an abandoned attempt is still waiting on the client for more."""
        return not self._overflowed and not self._reading

    @property
    def trailers(self) -> Headers:
        return self._source.trailers

    def attempt(self) -> Body:
        self._generation += 1
        return _AttemptBody(self, self._generation)

    async def _read(self, generation: int, position: int) -> bytes:
        if generation != self._generation:
            raise BodyError("request body taken over by a retry")
        if position < self._count:
            return self._chunks[position]
        if self.ended:
            return b""
        self._reading = True
        try:
            chunk = await self._source.read()
        finally:
            self._reading = False
        if not chunk:
            self.ended = True
            return b""
        self.bytes_read += len(chunk)
        self._count += 1
        self._kept += len(chunk)
        if self._kept > self._limit:
            self._overflowed = True
            self._chunks.clear()
        if not self._overflowed:
            self._chunks.append(chunk)
        return chunk


class _AttemptBody:
    def __init__(self, parent: _ReplayableBody, generation: int) -> None:
        self._parent = parent
        self._generation = generation
        self._position = 0

    async def read(self) -> bytes:
        chunk = await self._parent._read(self._generation, self._position)
        if chunk:
            self._position += 1
        return chunk

    @property
    def trailers(self) -> Headers:
        return self._parent.trailers

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


class _CountingBody:
    """A response body on its way to the client: counts bytes, notes gRPC trailers and
    whether it was read to its end."""

    def __init__(self, body: Body) -> None:
        self._body = body
        self.bytes = 0
        self.ended = False

    async def read(self) -> bytes:
        chunk = await self._body.read()
        self.bytes += len(chunk)
        self.ended = not chunk
        return chunk

    @property
    def trailers(self) -> Headers:
        return self._body.trailers

    async def aclose(self) -> None:
        await self._body.aclose()


# --- one request ---


@dataclass(frozen=True, slots=True)
class _Peers:
    """Both sides of requests between one client and one endpoint."""

    source: PeerLabels
    destination: PeerLabels
    pods: tuple[str | None, str | None]  # the client's and the endpoint's pod names


@dataclass(slots=True)
class _Exchange:
    """The running record of one request (becomes its RequestRecord)."""

    downstream: Downstream
    request: Request
    started: float
    hop: Hop
    grpc: bool
    flags: list[str] = field(default_factory=list)
    details: str = "via_upstream"
    status: int = 0
    grpc_status: str = ""
    cluster: ClusterState | None = None
    endpoint: Endpoint | None = None
    attempts: int = 0
    response_bytes: int = 0
    error: str | None = None
    authz: Decision | None = None  # None until authorization ran


@dataclass(slots=True)
class _Answer:
    """An upstream response and what it holds until it has been streamed back."""

    cluster: ClusterState
    endpoint: Endpoint
    response: Response | None = None
    streamed: _CountingBody | None = None  # the response body as it went to the client
    released: bool = False

    async def release(self) -> None:
        if self.released:
            return
        self.released = True
        try:
            # A body read to its end has given its connection back already.
            if self.response is not None and not (self.streamed is not None and self.streamed.ended):
                with trio.CancelScope(shield=True):
                    await self.response.body.aclose()
        finally:
            self.cluster.lb.request_finished(self.endpoint)
            self.cluster.limits.requests.release()


class Pipeline:
    """Serves requests for the listener: `await pipeline.handle(downstream, request, respond)`."""

    def __init__(
        self,
        store: WaypointStore,
        upstreams: Upstreams,
        metrics: WaypointMetrics,
        limits: HttpLimits,
        *,
        rng: random.Random | None = None,
        flows: FlowBroadcaster | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        self._store = store
        self._tracer = tracer or Tracer()
        self._flows = flows
        self._upstreams = upstreams
        self._metrics = metrics
        self._limits = limits
        self._rng = rng or random.Random()
        self._clusters: dict[str, ClusterState] = {}
        self._synced_version = -1
        self._peers_cache: dict[tuple[object, ...], _Peers] = {}

    def cluster_state(self, name: str) -> ClusterState | None:
        return self._clusters.get(name)

    async def handle(self, downstream: Downstream, request: Request, respond: Respond) -> None:
        snapshot = self._sync()
        exchange = _Exchange(
            downstream=downstream,
            request=request,
            started=trio.current_time(),
            hop=self._tracer.start(request.headers, now_unix_nano=time.time_ns()),
            grpc=(request.header("content-type") or "").startswith("application/grpc"),
        )
        replay = _ReplayableBody(request.body, self._limits.retry_buffer_bytes)
        try:
            await self._serve(exchange, snapshot, replay, respond)
        except LocalReply as reply:
            exchange.flags.append(reply.flag)
            exchange.details = reply.details
            exchange.error = str(reply) if reply.status >= 500 else None
            await self._reply(exchange, reply, respond)
        except trio.Cancelled:  # the client reset the stream, or shutdown cut the request short
            exchange.flags.append("DC")
            exchange.details = "downstream_remote_disconnect"
            raise
        finally:
            self._record(exchange, snapshot, replay)

    def _peers(self, snapshot: WaypointSnapshot, downstream: Downstream, endpoint: Endpoint | None) -> _Peers:
        """The metric labels and pod names of both sides; the same few pairs recur, so they
        are kept per snapshot (a request that began on an older snapshot computes its own)."""
        key = (downstream.client_address[0], downstream.client_identity, endpoint)
        current = snapshot.version == self._synced_version
        if current and (peers := self._peers_cache.get(key)) is not None:
            return peers
        addresses = snapshot.addresses
        client = addresses.workload(downstream.client_address[0])
        source = PeerLabels(
            workload=(client.workload_name or client.name) if client else None,
            namespace=client.namespace if client else (downstream.client_identity.namespace if downstream.client_identity else None),
            principal=downstream.client_identity.uri if downstream.client_identity else None,
            canonical_service=client.canonical_name if client else None,
            canonical_revision=client.canonical_revision if client else None,
            cluster=client.cluster_id if client else None,
        )
        destination = PeerLabels()
        workload = None
        if endpoint is not None:
            workload = addresses.workload(endpoint.address)
            namespace, _, name = (endpoint.workload or "").partition("/")
            destination = PeerLabels(
                workload=(workload.workload_name or workload.name) if workload else name or None,
                namespace=workload.namespace if workload else namespace or None,
                principal=endpoint.identity,
                canonical_service=workload.canonical_name if workload else None,
                canonical_revision=workload.canonical_revision if workload else None,
                cluster=workload.cluster_id if workload else None,
            )
        peers = _Peers(source, destination, (client.name if client else None, workload.name if workload else None))
        if current:
            if len(self._peers_cache) >= _PEERS_CACHE_ENTRIES:
                self._peers_cache.clear()  # a bound for huge meshes; the recurring pairs come back
            self._peers_cache[key] = peers
        return peers

    def _sync(self) -> WaypointSnapshot:
        """Bring per-cluster state up to the current snapshot (once per config change)."""
        snapshot = self._store.current
        if snapshot.version == self._synced_version:
            return snapshot
        states: dict[str, ClusterState] = {}
        for name, config in snapshot.clusters.items():
            assignment = snapshot.endpoints.get(config.endpoints_name)
            endpoints = assignment.endpoints if assignment is not None else ()
            state = self._clusters.get(name)
            if state is None:
                state = ClusterState(config, endpoints, rng=self._rng)
            else:
                state.update(config, endpoints)
            states[name] = state
        self._clusters = states
        self._synced_version = snapshot.version
        self._peers_cache.clear()
        return snapshot

    async def _serve(
        self, exchange: _Exchange, snapshot: WaypointSnapshot, replay: _ReplayableBody, respond: Respond
    ) -> None:
        downstream, request = exchange.downstream, exchange.request
        service = snapshot.routes.services.get(downstream.listener)
        if service is None:
            raise LocalReply(404, "NR", "route_not_found", "")
        head = RequestHead.from_target(request.method, request.target, request.headers, request.authority)
        principal = downstream.client_identity.uri if downstream.client_identity else None
        decision = evaluate(service.authz.deny, service.authz.allow, RequestAttributes(head, principal, downstream.port))
        exchange.authz = decision
        if not decision.allowed:
            raise LocalReply(403, NO_FLAG, f"rbac_access_denied_matched_policy[{decision.policy_name or 'none'}]", "RBAC: access denied")
        route = find_route(service.routes, head)
        if route is None:
            raise LocalReply(404, "NR", "route_not_found", "")
        action = route.action
        if action.fault is not None:
            await self._inject_fault(exchange, action.fault)
        headers = apply_header_changes(
            tuple((k, v) for k, v in request.headers if k not in (TRACEPARENT, TRACESTATE)) + exchange.hop.upstream_headers(),
            action.request_headers_to_add,
            action.request_headers_to_remove,
        )
        target = rewritten_target(route, head)

        authority = action.host_rewrite or request.authority

        def upstream_request(body: Body) -> Request:
            return Request(request.method, authority, target, headers, body, request.protocol, request.scheme)

        # Envoy's route timeout runs until the response has ended: one scope for both.
        deadline = exchange.started + action.timeout if action.timeout else math.inf
        answer: _Answer | None = None
        try:
            with _scope_at(deadline) as timeout:
                answer = await self._forward(exchange, action, replay, upstream_request)
                assert answer.response is not None
                upstream = answer.response
                exchange.status = upstream.status
                exchange.grpc_status = header_value(upstream.headers, "grpc-status") or ""
                body = answer.streamed = _CountingBody(upstream.body)
                response = Response(
                    upstream.status,
                    apply_header_changes(upstream.headers, action.response_headers_to_add, action.response_headers_to_remove),
                    body,
                )
                try:
                    await respond(response)
                except BodyError as exc:  # the upstream broke off mid-body
                    exchange.flags.append("UR")
                    exchange.details = "upstream_reset_after_response_started"
                    exchange.error = str(exc)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    exchange.flags.append("DC")
                    exchange.details = "downstream_remote_disconnect"
                    exchange.error = f"client went away: {exc}"
                finally:
                    exchange.response_bytes = body.bytes
                    exchange.grpc_status = exchange.grpc_status or header_value(body.trailers, "grpc-status") or ""
            if timeout.cancelled_caught:
                if answer is None or answer.streamed is None:
                    raise _timeout_reply()
                exchange.flags.append("UT")
                exchange.details = "response_timeout"
                exchange.error = "route timeout expired while the response was streaming"
        finally:
            if answer is not None:
                await answer.release()

    async def _inject_fault(self, exchange: _Exchange, fault: Fault) -> None:
        if fault.delay is not None and self._rng.random() * 100 < fault.delay.percent:
            exchange.flags.append("DI")
            await trio.sleep(fault.delay.duration)
        abort = fault.abort
        if abort is not None and self._rng.random() * 100 < abort.percent:
            if abort.grpc_status is not None:
                exchange.grpc = True  # the abort is a gRPC status whatever the request was
                raise LocalReply(200, "FI", "fault_filter_abort", "fault filter abort", grpc_status=abort.grpc_status)
            assert abort.http_status is not None
            raise LocalReply(abort.http_status, "FI", "fault_filter_abort", "fault filter abort")

    async def _forward(
        self, exchange: _Exchange, action: RouteAction, replay: _ReplayableBody, upstream_request: Callable[[Body], Request]
    ) -> _Answer:
        """Attempts until one gives the response to send back; raises LocalReply otherwise."""
        policy = action.retry
        retry_slot: ConnectionPoolLimits | None = None  # the budget the running retry holds
        try:
            while True:
                exchange.attempts += 1
                backend = choose_backend(action.backends, self._rng)
                state = self._clusters.get(backend.cluster)
                if state is None:
                    raise LocalReply(503, "NC", "cluster_not_found", f"no cluster {backend.cluster}")
                exchange.cluster = state
                try:
                    endpoint = state.choose_endpoint()
                    state.limits.requests.try_acquire()
                except NoHealthyUpstream as exc:
                    raise LocalReply(503, "UH", "no_healthy_upstream", "no healthy upstream") from exc
                except Overflow as exc:
                    raise LocalReply(503, "UO", "upstream_reset_before_response_started{overflow}", _RESET_BEFORE_HEADERS + "overflow") from exc
                exchange.endpoint = endpoint
                state.lb.request_started(endpoint)
                answer = _Answer(state, endpoint)
                outcome, failure = await self._attempt(exchange, answer, replay, upstream_request, policy)
                if retry_slot is not None:
                    retry_slot.retries.release()
                    retry_slot = None
                if state.outlier is not None:
                    state.outlier.record(endpoint, outcome.failure or outcome.status)  # type: ignore[arg-type]
                if policy is not None and is_retriable(policy, outcome):
                    if not should_retry(policy, exchange.attempts, outcome):
                        exchange.flags.append("URX")
                    elif not replay.replayable:
                        exchange.error = "not retried: the request body is larger than the retry buffer or still streaming"
                    elif not state.limits.retries.can_acquire():
                        exchange.flags.append("UO")
                    else:
                        await answer.release()
                        state.limits.retries.try_acquire()
                        retry_slot = state.limits
                        await trio.sleep(backoff(policy, exchange.attempts, self._rng))
                        continue
                if failure is not None:
                    await answer.release()
                    raise failure
                return answer
        finally:
            if retry_slot is not None:
                retry_slot.retries.release()

    async def _attempt(
        self,
        exchange: _Exchange,
        answer: _Answer,
        replay: _ReplayableBody,
        upstream_request: Callable[[Body], Request],
        policy: RetryPolicy | None,
    ) -> tuple[Outcome, LocalReply | None]:
        """One try at one endpoint: its outcome, and the reply owed if it is the last."""
        state, endpoint = answer.cluster, answer.endpoint
        http2 = (
            state.config.upstream_protocol is UpstreamProtocol.HTTP2
            if state.config.upstream_protocol is not None
            else exchange.request.protocol == "HTTP/2"
        )
        service = state.config.service.host if state.config.service else exchange.downstream.service.hostname
        per_try = policy.per_try_timeout if policy is not None and policy.per_try_timeout else math.inf
        try:
            with _scope_at(trio.current_time() + per_try) as try_scope:
                answer.response = await self._upstreams.send(
                    state.config,
                    state.limits,
                    endpoint,
                    upstream_request(replay.attempt()),
                    http2=http2,
                    tunnel_headers=(("forwarded", f"host={service}"),),
                )
        except UpstreamError as exc:
            _log.info("upstream attempt failed", cluster=state.config.name, endpoint=str(endpoint), error=str(exc))
            return Outcome(failure=exc.failure), _upstream_failure_reply(exc)
        except Overflow as exc:  # no room to wait for a connection
            await answer.release()
            raise LocalReply(503, "UO", "upstream_reset_before_response_started{overflow}", _RESET_BEFORE_HEADERS + "overflow") from exc
        except BodyError as exc:  # the client's request body broke (too large, malformed, reset)
            await answer.release()
            raise LocalReply(exc.status, "DPE", "downstream_protocol_error", str(exc)) from exc
        except BaseException:
            await answer.release()
            raise
        if try_scope.cancelled_caught:
            return Outcome(failure=UpstreamFailure.TIMEOUT), _timeout_reply()
        assert answer.response is not None
        grpc_status = header_value(answer.response.headers, "grpc-status")
        return Outcome(status=answer.response.status, grpc_status=int(grpc_status) if grpc_status and grpc_status.isdigit() else None), None

    async def _reply(self, exchange: _Exchange, reply: LocalReply, respond: Respond) -> None:
        if exchange.grpc:
            grpc_status = str(reply.grpc_status if reply.grpc_status is not None else _GRPC_STATUS_FOR_HTTP.get(reply.status, 2))
            response = Response(
                200,
                (("content-type", "application/grpc"),),
                BufferedBody(trailers=(("grpc-status", grpc_status), ("grpc-message", reply.text or reply.details))),
            )
            exchange.status, exchange.grpc_status = 200, grpc_status
        else:
            response = local_reply(reply.status, reply.text)
            exchange.status = reply.status
        try:
            await respond(response)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            exchange.flags.append("DC")

    def _record(self, exchange: _Exchange, snapshot: WaypointSnapshot, replay: _ReplayableBody) -> None:
        downstream, request = exchange.downstream, exchange.request
        endpoint = exchange.endpoint
        peers = self._peers(snapshot, downstream, endpoint)
        service_ref = exchange.cluster.config.service if exchange.cluster is not None else None
        service = downstream.service
        record = RequestRecord(
            source=peers.source,
            source_address=f"{downstream.client_address[0]}:{downstream.client_address[1]}",
            destination=peers.destination,
            destination_address=str(endpoint) if endpoint is not None else None,
            service_host=service_ref.host if service_ref else service.hostname,
            service_name=service_ref.name if service_ref else service.name,
            service_namespace=service_ref.namespace if service_ref else service.namespace,
            method=request.method,
            authority=request.authority,
            path=request.target,
            protocol="grpc" if exchange.grpc else "http",
            http_version=request.protocol,
            response_code=exchange.status,
            response_flags=format_flags(exchange.flags),
            response_code_details=exchange.details,
            grpc_status=exchange.grpc_status if exchange.grpc else "",
            duration_ms=(trio.current_time() - exchange.started) * 1000.0,
            request_bytes=replay.bytes_read,
            response_bytes=exchange.response_bytes,
            upstream_cluster=exchange.cluster.config.name if exchange.cluster is not None else None,
            attempts=exchange.attempts,
            trace_id=exchange.hop.trace_id,
            error=exchange.error,
        )
        self._metrics.record(record)
        self._tracer.finish(exchange.hop, record, operation=f"{downstream.listener}/*", now_unix_nano=time.time_ns())
        if self._flows is not None:
            self._flows.publish(partial(request_flow, self._flows.proxy, record, exchange.authz, peers.pods, time.time()))

