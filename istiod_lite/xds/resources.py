"""The resources istiod_lite serves, each serialized once and shared by every stream.

A resource is stored as the bytes of its entry in a `DeltaDiscoveryResponse` (field
`resources`, a `Resource{name, version, resource: Any}`), built when the resource changes.
Protobuf decodes concatenated messages of one type as their merge (repeated fields append), so a
response for any stream is a small per-stream header (type URL, nonce, removed names) followed
by the stored entries, joined without parsing or copying messages: a full sync of 10,000
resources to 100 proxies costs 100 byte joins, not a million message builds.

Versions are a short hash of the deterministic serialization, so a resource that changes back
and forth keeps its versions stable across istiod_lite restarts and a reconnecting proxy's
`initial_resource_versions` can be compared directly.

Visibility: a resource may carry an audience, the waypoint keys ("<ns>/<name>") of the streams
allowed to see it (a waypoint sees only the config of the services bound to it). Resources
without one (every ztunnel resource) are visible to every stream. A change of audience alone is
a change: streams that lost sight of a resource are sent its removal, those that gained it the
resource.

Pure (no trio, no grpc): `stage` validates and encodes; `ResourceStore.commit` swaps staged
entries in and reports which names changed and for whom.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Set
from dataclasses import dataclass

from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message

TYPE_URL_PREFIX = "type.googleapis.com/"

# The waypoint keys ("<ns>/<name>") allowed to see a resource; None: every stream.
Audience = frozenset[str] | None

# What `XdsServer.apply` takes: type URL -> (upserts by name, names removed). It may also have
# an attribute `audiences` (type URL -> name -> Audience) for upserts not visible to everyone.
# istiod_lite.model's ResourceDelta (type URL -> TypeDelta(upserts, removals), with audiences)
# is one.
ResourceChanges = Mapping[str, tuple[Mapping[str, Message], Set[str]]]

# name -> the new entry, or None for a removal; per type URL.
StagedChanges = dict[str, dict[str, "StoredResource | None"]]


@dataclass(frozen=True, slots=True)
class StoredResource:
    """One resource version, ready to be appended to any DeltaDiscoveryResponse."""

    version: str
    encoded: bytes  # a serialized DeltaDiscoveryResponse holding just this resource
    audience: Audience = None

    def visible_to(self, viewer: str | None) -> bool:
        """Whether a stream of waypoint `viewer` (None: not a waypoint) may see this resource."""
        return self.audience is None or viewer in self.audience


def resource_version(serialized: bytes) -> str:
    """The version of a resource: 16 hex digits of a hash of its serialized message."""
    return hashlib.blake2b(serialized, digest_size=8).hexdigest()


def encode_resource(
    type_url: str, name: str, message: Message, audience: Audience = None
) -> StoredResource:
    """Wrap `message` into a Resource for `type_url`; ValueError if it is of another type."""
    message_type_url = TYPE_URL_PREFIX + message.DESCRIPTOR.full_name
    if message_type_url != type_url:
        raise ValueError(
            f"resource {name!r} is a {message.DESCRIPTOR.full_name} but was given as {type_url}"
        )
    serialized = message.SerializeToString(deterministic=True)
    version = resource_version(serialized)
    resource = discovery_pb2.Resource(
        name=name, version=version, resource=any_pb2.Any(type_url=type_url, value=serialized)
    )
    entry = discovery_pb2.DeltaDiscoveryResponse(resources=[resource])
    return StoredResource(version=version, encoded=entry.SerializeToString(), audience=audience)


def encode_response(
    type_url: str, nonce: str, entries: Iterable[bytes], removed: Iterable[str]
) -> bytes:
    """A serialized DeltaDiscoveryResponse: header fields, then the stored entries verbatim."""
    header = discovery_pb2.DeltaDiscoveryResponse(
        type_url=type_url, nonce=nonce, removed_resources=sorted(removed)
    ).SerializeToString()
    return b"".join((header, *entries))


def stage(changes: ResourceChanges, served_type_urls: Set[str], staged: StagedChanges) -> None:
    """Encode `changes` into `staged`, later changes to a name replacing earlier ones.

    Validates everything before touching `staged`: ValueError naming the type URL or resource
    if a type is not served or a message is not of its type.
    """
    encoded: StagedChanges = {}
    audiences: Mapping[str, Mapping[str, frozenset[str]]] = getattr(changes, "audiences", {})
    for type_url, (upserts, removals) in changes.items():
        if type_url not in served_type_urls:
            served = ", ".join(sorted(served_type_urls))
            raise ValueError(f"type URL {type_url} is not served (served: {served})")
        entries: dict[str, StoredResource | None] = dict.fromkeys(removals)
        scoped = audiences.get(type_url, {})
        for name, message in upserts.items():
            entries[name] = encode_resource(type_url, name, message, scoped.get(name))
        encoded[type_url] = entries
    for type_url, entries in encoded.items():
        staged.setdefault(type_url, {}).update(entries)


class ResourceStore:
    """The current resources of every served type URL."""

    def __init__(self, type_urls: Iterable[str]) -> None:
        self._resources: dict[str, dict[str, StoredResource]] = {url: {} for url in type_urls}

    @property
    def type_urls(self) -> frozenset[str]:
        return frozenset(self._resources)

    def serves(self, type_url: str) -> bool:
        return type_url in self._resources

    def resources(self, type_url: str) -> Mapping[str, StoredResource]:
        """Name -> resource for one type (empty for a type that is not served)."""
        return self._resources.get(type_url, {})

    def get(self, type_url: str, name: str) -> StoredResource | None:
        return self._resources.get(type_url, {}).get(name)

    def commit(self, staged: StagedChanges) -> dict[str, dict[str, Audience]]:
        """Apply staged changes; returns, per type URL, the names whose version or audience
        changed, each with the streams concerned: the old and new audiences together (None:
        every stream)."""
        changed: dict[str, dict[str, Audience]] = {}
        for type_url, entries in staged.items():
            current = self._resources[type_url]
            concerned: dict[str, Audience] = {}
            for name, entry in entries.items():
                previous = current.get(name)
                if entry is None:
                    if previous is not None:
                        del current[name]
                        concerned[name] = previous.audience
                elif (
                    previous is None
                    or previous.version != entry.version
                    or previous.audience != entry.audience
                ):
                    current[name] = entry
                    before = previous.audience if previous is not None else frozenset()
                    concerned[name] = _union(before, entry.audience)
            if concerned:
                changed[type_url] = concerned
        return changed


def _union(old: Audience, new: Audience) -> Audience:
    if old is None or new is None:
        return None
    return old | new
