"""The protocol state of one delta ADS stream, sans-IO: requests in, events and responses out.

Rules (Envoy docs "xDS REST and gRPC protocol", Incremental xDS; istiod pilot/pkg/xds/delta.go):

- The first request on a stream must carry `node.id` (istiod answers "missing node
  information"); every request must name its `type_url` (the stream is aggregated).
- The first request for a type starts that type's subscription: wildcard if it subscribes to
  "*", or (legacy) subscribes and unsubscribes nothing; otherwise the names it lists. Later
  requests add names (or "*") and remove them, and are honoured even when their nonce is stale.
- A subscribed resource is sent even if the client has it (it may have forgotten it), except
  on the first request, whose `initial_resource_versions` says what the client kept from an
  earlier stream: only resources whose version differs are sent, and names it has that no longer
  exist are sent as removals.
- A subscribed name that does not exist is sent in `removed_resources`, so the client need
  not wait for a timeout. Unsubscribing from a name that the wildcard still covers re-sends it
  (the spec's one exception); any other unsubscription is answered with nothing.
- The first request for a type is always answered, even with an empty response, so the
  client knows it is in sync.
- A type URL this server does not serve is answered the same way, with no resources, as
  istiod's fallback generator does: the stream and the client's other types keep working (an
  error status would end the whole aggregated stream). `Subscribed.served` reports it.

Flow control: at most one response per type is unacknowledged. Changes meanwhile only add
names to a pending set; when the ACK (or NACK) arrives they go out in one response carrying
each resource at its latest version. A slow client therefore receives fewer, larger responses
and never makes the server queue more than one set of names per type.

NACK: reported as an event; nothing is resent. The client keeps its last good state, and the
rejected version is not sent again unless that resource changes (or is subscribed again).

Visibility: a waypoint's stream names its waypoint ("<ns>/<name>") in the node metadata
`WAYPOINT` of its first request; that is the stream's `viewer`. It sees only resources whose
audience includes it (plus those visible to all); to every other stream a resource it may not
see does not exist: a wildcard never covers it and a subscription to its name is answered with
its removal.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Set
from dataclasses import dataclass, field

from envoy.service.discovery.v3 import discovery_pb2

from istiod_lite.xds.resources import ResourceStore, StoredResource, encode_response

WILDCARD = "*"
# The node metadata key by which a waypoint's stream says which waypoint it is ("<ns>/<name>").
WAYPOINT_METADATA_KEY = "WAYPOINT"


class XdsRequestError(Exception):
    """A request this server cannot serve; the stream ends with INVALID_ARGUMENT and this text."""


# --- Events (what a request meant) ---


@dataclass(frozen=True, slots=True)
class Subscribed:
    """The stream asked for a type for the first time; `served` is False for unknown types."""

    type_url: str
    served: bool


@dataclass(frozen=True, slots=True)
class Acked:
    """The client applied the response with `nonce`."""

    type_url: str
    nonce: str


@dataclass(frozen=True, slots=True)
class Nacked:
    """The client rejected (part of) the response with `nonce`; `message` is its error_detail."""

    type_url: str
    nonce: str
    message: str


@dataclass(frozen=True, slots=True)
class StaleNonce:
    """An ACK/NACK for a response that is not the one awaited (from an older stream, say)."""

    type_url: str
    nonce: str


SessionEvent = Subscribed | Acked | Nacked | StaleNonce


@dataclass(frozen=True, slots=True)
class OutgoingResponse:
    """A serialized DeltaDiscoveryResponse to send, with counts for logs and metrics."""

    type_url: str
    nonce: str
    payload: bytes
    resources: int
    removals: int


# --- Session ---


@dataclass(slots=True)
class _TypeState:
    wildcard: bool = False
    names: set[str] = field(default_factory=set)  # explicitly subscribed names
    pending: set[str] = field(default_factory=set)  # names whose current state must be sent
    must_respond: bool = True  # the first response is owed even when it is empty
    unacked_nonce: str | None = None


class DeltaSession:
    """One stream's subscriptions and outstanding responses (see the module docstring)."""

    def __init__(self, store: ResourceStore) -> None:
        self._store = store
        self._types: dict[str, _TypeState] = {}
        self._nonces = itertools.count(1)
        self.node_id = ""
        # The waypoint key this stream sees resources for; None for any other proxy.
        self.viewer: str | None = None

    def receive(self, request: discovery_pb2.DeltaDiscoveryRequest) -> list[SessionEvent]:
        """Apply one request; raises XdsRequestError (state unchanged) if it is malformed."""
        if not self.node_id and not request.node.id:
            raise XdsRequestError("the first request on a stream must carry node.id")
        if not request.type_url:
            raise XdsRequestError(
                "request has no type_url; every request on an ADS stream needs one"
            )
        if request.resource_locators_subscribe or request.resource_locators_unsubscribe:
            raise XdsRequestError(
                f"resource locators are not supported (type {request.type_url}); "
                "use resource_names_subscribe/unsubscribe"
            )
        if not self.node_id:
            self.node_id = request.node.id
            waypoint = request.node.metadata.fields.get(WAYPOINT_METADATA_KEY)
            if waypoint is not None and waypoint.string_value:
                self.viewer = waypoint.string_value

        events: list[SessionEvent] = []
        state = self._types.get(request.type_url)
        if state is None:
            state = self._types[request.type_url] = self._start(request)
            events.append(Subscribed(request.type_url, self._store.serves(request.type_url)))
        else:
            self._change(state, request)

        nonce = request.response_nonce
        if nonce:
            if nonce != state.unacked_nonce:
                events.append(StaleNonce(request.type_url, nonce))
            else:
                state.unacked_nonce = None
                if request.HasField("error_detail"):
                    events.append(Nacked(request.type_url, nonce, request.error_detail.message))
                else:
                    events.append(Acked(request.type_url, nonce))
        return events

    def resources_changed(self, type_url: str, names: Set[str]) -> bool:
        """Note that `names` of `type_url` changed; True if this stream now has more to send."""
        state = self._types.get(type_url)
        if state is None:
            return False
        before = len(state.pending)
        if state.wildcard:
            state.pending |= names
        else:
            smaller, larger = sorted((names, state.names), key=len)
            state.pending.update(name for name in smaller if name in larger)
        return len(state.pending) > before

    def next_response_size(self) -> int | None:
        """How many names the next response would carry; None if there is nothing to send."""
        ready = self._next_ready()
        return None if ready is None else len(ready[1].pending)

    def next_response(self) -> OutgoingResponse | None:
        """The next response to send, for a type with news and no unacknowledged response."""
        ready = self._next_ready()
        if ready is None:
            return None
        type_url, state = ready
        current = self._store.resources(type_url)
        entries: list[bytes] = []
        removed: list[str] = []
        for name in state.pending:
            resource = current.get(name)
            if resource is None or not resource.visible_to(self.viewer):
                removed.append(name)
            else:
                entries.append(resource.encoded)
        state.pending = set()
        state.must_respond = False
        nonce = state.unacked_nonce = str(next(self._nonces))
        return OutgoingResponse(
            type_url=type_url,
            nonce=nonce,
            payload=encode_response(type_url, nonce, entries, removed),
            resources=len(entries),
            removals=len(removed),
        )

    def _next_ready(self) -> tuple[str, _TypeState] | None:
        for type_url, state in self._types.items():
            if state.unacked_nonce is None and (state.pending or state.must_respond):
                return type_url, state
        return None

    def _start(self, request: discovery_pb2.DeltaDiscoveryRequest) -> _TypeState:
        subscribe = set(request.resource_names_subscribe)
        unsubscribe = set(request.resource_names_unsubscribe)
        state = _TypeState(
            wildcard=(WILDCARD in subscribe or not (subscribe or unsubscribe))
            and WILDCARD not in unsubscribe,
            names=subscribe - unsubscribe - {WILDCARD},
        )
        known = request.initial_resource_versions
        current = self._store.resources(request.type_url)
        if state.wildcard:
            state.pending.update(
                name
                for name, resource in current.items()
                if resource.visible_to(self.viewer) and known.get(name) != resource.version
            )
            state.pending.update(name for name in known if not self._visible(current, name))
        for name in state.names:
            if not self._visible(current, name) or known.get(name) != current[name].version:
                state.pending.add(name)
        return state

    def _visible(self, current: Mapping[str, StoredResource], name: str) -> bool:
        resource = current.get(name)
        return resource is not None and resource.visible_to(self.viewer)

    def _change(self, state: _TypeState, request: discovery_pb2.DeltaDiscoveryRequest) -> None:
        for name in request.resource_names_subscribe:
            if name == WILDCARD:
                state.wildcard = True
                state.pending.update(
                    visible
                    for visible, resource in self._store.resources(request.type_url).items()
                    if resource.visible_to(self.viewer)
                )
            else:
                state.names.add(name)
                state.pending.add(name)
        for name in request.resource_names_unsubscribe:
            if name == WILDCARD:
                state.wildcard = False
                state.pending &= state.names
            else:
                state.names.discard(name)
                if state.wildcard:
                    state.pending.add(name)
                else:
                    state.pending.discard(name)
