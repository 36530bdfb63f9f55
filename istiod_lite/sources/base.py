"""What every configuration source emits, and the kinds it knows.

A source turns one place where configuration lives (a directory of YAML, the Kubernetes API)
into one stream of change events on a trio memory channel:

- `ObjectEvent("upsert", ...)` whenever an object appears or its content changes, carrying
  the whole object as a plain dict, camelCase, exactly as the API or the YAML spells it;
- `ObjectEvent("delete", ...)` when it disappears (`obj` is None: consumers key objects by
  kind, namespace and name);
- one `SyncComplete()` once the initial state of every kind has been sent, so a consumer
  can tell "nothing yet" from "really nothing" before it serves anything.

Both sources emit the same events for the same objects, so everything downstream is written
once. Objects of kinds not in `KINDS` are never emitted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Protocol, TypeAlias

import trio


class KindInfo(NamedTuple):
    """Where a kind lives in the Kubernetes API."""

    api_version: str  # "v1" (core group) or "<group>/<version>"
    plural: str  # the resource name in URLs
    namespaced: bool

    @property
    def group(self) -> str:
        """The API group; "" for the core group."""
        group, _, _ = self.api_version.rpartition("/")
        return group


KINDS: Mapping[str, KindInfo] = {
    "Namespace": KindInfo("v1", "namespaces", namespaced=False),
    "Pod": KindInfo("v1", "pods", namespaced=True),
    "Service": KindInfo("v1", "services", namespaced=True),
    "ServiceAccount": KindInfo("v1", "serviceaccounts", namespaced=True),
    "AuthorizationPolicy": KindInfo(
        "security.istio.io/v1", "authorizationpolicies", namespaced=True
    ),
    "PeerAuthentication": KindInfo("security.istio.io/v1", "peerauthentications", namespaced=True),
    "VirtualService": KindInfo("networking.istio.io/v1", "virtualservices", namespaced=True),
    "DestinationRule": KindInfo("networking.istio.io/v1", "destinationrules", namespaced=True),
    "HTTPRoute": KindInfo("gateway.networking.k8s.io/v1", "httproutes", namespaced=True),
    "Gateway": KindInfo("gateway.networking.k8s.io/v1", "gateways", namespaced=True),
    "Waypoint": KindInfo("istiodlite.io/v1alpha1", "waypoints", namespaced=True),
}

Action = Literal["upsert", "delete"]


@dataclass(frozen=True, slots=True)
class ObjectEvent:
    """An object of a known kind appeared, changed ("upsert") or disappeared ("delete")."""

    kind: str
    action: Action
    namespace: str  # "" for cluster-scoped kinds
    name: str
    obj: Mapping[str, Any] | None  # the whole object for upserts; None for deletes

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.kind, self.namespace, self.name)


@dataclass(frozen=True, slots=True)
class SyncComplete:
    """The initial state of every kind has been sent."""


SourceEvent: TypeAlias = ObjectEvent | SyncComplete


class Source(Protocol):
    """A configuration source.

    `run` reports started as soon as it is running (before the first event, so a caller
    that starts it before its consumer cannot deadlock on an unbuffered channel), then sends
    the initial state, `SyncComplete()`, and changes until cancelled. Failures to read the
    configuration are logged, counted and retried; they never end `run`.
    """

    async def run(
        self,
        send_channel: trio.MemorySendChannel[SourceEvent],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None: ...

