"""ClusterState: the accepted (translated-once) objects, with the indexes that keep
incremental translation proportional to what a change can affect.

Indexes
- pods by namespace, by node, and by (namespace, label key, label value): "which pods does
  this selector pick" costs the smallest matching label bucket, not a namespace scan;
- Services and selector AuthorizationPolicies in a `SelectorIndex`: each selector is filed
  under one of its (namespace, key, value) pairs, so "which selectors pick this pod" looks
  only at the buckets of the pod's own labels;
- PeerAuthentications by namespace (there are few; picking the oldest scans them).

Only the translator mutates a ClusterState; every put/remove returns the previous value so
the caller can tell what changed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Generic, TypeVar

from istiod_lite.model.policies import AuthorizationPolicy, PeerAuthentication, oldest
from istiod_lite.model.services import KubeService
from istiod_lite.model.workloads import Namespace, Pod, PodKey

ObjectKey = tuple[str, str]  # (namespace, name)
K = TypeVar("K")
V = TypeVar("V")
LabelPair = tuple[str, str, str]  # (namespace, key, value)


def selector_matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """matchLabels semantics: every selector label is present with the same value."""
    return all(labels.get(key) == value for key, value in selector.items())


def _add(index: dict[K, set[V]], key: K, value: V) -> None:
    index.setdefault(key, set()).add(value)


def _discard(index: dict[K, set[V]], key: K, value: V) -> None:
    bucket = index.get(key)
    if bucket is not None:
        bucket.discard(value)
        if not bucket:
            del index[key]


class SelectorIndex(Generic[K]):
    """Label selectors by key, findable from a set of labels."""

    def __init__(self) -> None:
        self._buckets: dict[LabelPair, set[K]] = {}
        self._filed_under: dict[K, LabelPair] = {}
        self._selectors: dict[K, Mapping[str, str]] = {}

    def put(self, key: K, namespace: str, selector: Mapping[str, str]) -> None:
        """File a non-empty selector, replacing any previous one for `key`."""
        self.remove(key)
        # Under the emptiest of its pairs, so no bucket grows needlessly large.
        pair = min(
            ((namespace, k, v) for k, v in selector.items()),
            key=lambda p: len(self._buckets.get(p, ())),
        )
        _add(self._buckets, pair, key)
        self._filed_under[key] = pair
        self._selectors[key] = selector

    def remove(self, key: K) -> None:
        pair = self._filed_under.pop(key, None)
        if pair is not None:
            _discard(self._buckets, pair, key)
            del self._selectors[key]

    def selecting(self, namespace: str, labels: Mapping[str, str]) -> Iterator[K]:
        """Keys of the selectors in `namespace` that pick an object with `labels`."""
        for k, v in labels.items():
            for key in self._buckets.get((namespace, k, v), ()):
                if selector_matches(self._selectors[key], labels):
                    yield key


class ClusterState:
    """Namespaces, pods, services and policies as last accepted, plus indexes."""

    def __init__(self, *, root_namespace: str) -> None:
        self.root_namespace = root_namespace
        self.namespaces: dict[str, Namespace] = {}
        self.pods: dict[PodKey, Pod] = {}
        self.services: dict[ObjectKey, KubeService] = {}
        self.authorization_policies: dict[ObjectKey, AuthorizationPolicy] = {}
        self.peer_authentications: dict[ObjectKey, PeerAuthentication] = {}
        self._pods_by_namespace: dict[str, set[str]] = {}
        self._pods_by_node: dict[str, set[PodKey]] = {}
        self._pods_by_label: dict[LabelPair, set[str]] = {}
        self._services_by_selector: SelectorIndex[ObjectKey] = SelectorIndex()
        self._policies_by_selector: SelectorIndex[ObjectKey] = SelectorIndex()
        self._peer_authentications_by_namespace: dict[str, dict[str, PeerAuthentication]] = {}

    # --- Namespaces ---

    def put_namespace(self, namespace: Namespace) -> Namespace | None:
        old = self.namespaces.get(namespace.name)
        self.namespaces[namespace.name] = namespace
        return old

    def remove_namespace(self, name: str) -> Namespace | None:
        return self.namespaces.pop(name, None)

    def namespace_dataplane_mode(self, name: str) -> str:
        namespace = self.namespaces.get(name)
        return namespace.dataplane_mode if namespace is not None else ""

    # --- Pods ---

    def put_pod(self, pod: Pod) -> Pod | None:
        old = self.remove_pod(pod.key)
        self.pods[pod.key] = pod
        _add(self._pods_by_namespace, pod.namespace, pod.name)
        if pod.node:
            _add(self._pods_by_node, pod.node, pod.key)
        for k, v in pod.labels.items():
            _add(self._pods_by_label, (pod.namespace, k, v), pod.name)
        return old

    def remove_pod(self, key: PodKey) -> Pod | None:
        old = self.pods.pop(key, None)
        if old is not None:
            _discard(self._pods_by_namespace, old.namespace, old.name)
            if old.node:
                _discard(self._pods_by_node, old.node, old.key)
            for k, v in old.labels.items():
                _discard(self._pods_by_label, (old.namespace, k, v), old.name)
        return old

    def pods_in_namespace(self, namespace: str) -> list[PodKey]:
        return [(namespace, name) for name in self._pods_by_namespace.get(namespace, ())]

    def pods_on_node(self, node: str) -> list[Pod]:
        return sorted(
            (self.pods[key] for key in self._pods_by_node.get(node, ())), key=lambda p: p.key
        )

    def pods_selected(self, namespace: str | None, selector: Mapping[str, str]) -> set[PodKey]:
        """Pods whose labels match a non-empty selector; namespace None means every namespace."""
        namespaces: Iterable[str] = self._pods_by_namespace if namespace is None else (namespace,)
        selected: set[PodKey] = set()
        for ns in namespaces:
            buckets = [self._pods_by_label.get((ns, k, v), set()) for k, v in selector.items()]
            smallest = min(buckets, key=len)
            selected.update(
                (ns, name)
                for name in smallest
                if selector_matches(selector, self.pods[(ns, name)].labels)
            )
        return selected

    # --- Services ---

    def put_service(self, service: KubeService) -> KubeService | None:
        key = (service.namespace, service.name)
        old = self.services.get(key)
        self.services[key] = service
        if service.selects_pods:
            self._services_by_selector.put(key, service.namespace, service.selector)
        else:
            self._services_by_selector.remove(key)
        return old

    def remove_service(self, key: ObjectKey) -> KubeService | None:
        self._services_by_selector.remove(key)
        return self.services.pop(key, None)

    def services_selecting(self, pod: Pod) -> list[KubeService]:
        return [
            self.services[key]
            for key in self._services_by_selector.selecting(pod.namespace, pod.labels)
        ]

    # --- AuthorizationPolicies ---

    def put_authorization_policy(self, policy: AuthorizationPolicy) -> AuthorizationPolicy | None:
        key = (policy.namespace, policy.name)
        old = self.authorization_policies.get(key)
        self.authorization_policies[key] = policy
        if policy.attaches_by_selector and policy.selector is not None:
            self._policies_by_selector.put(key, policy.namespace, policy.selector)
        else:
            self._policies_by_selector.remove(key)
        return old

    def remove_authorization_policy(self, key: ObjectKey) -> AuthorizationPolicy | None:
        self._policies_by_selector.remove(key)
        return self.authorization_policies.pop(key, None)

    def policies_selecting(self, pod: Pod) -> list[AuthorizationPolicy]:
        """Selector policies attached to the pod: from its namespace and the root namespace."""
        keys = set(self._policies_by_selector.selecting(pod.namespace, pod.labels))
        if pod.namespace != self.root_namespace:
            keys.update(self._policies_by_selector.selecting(self.root_namespace, pod.labels))
        return [self.authorization_policies[key] for key in keys]

    # --- PeerAuthentications ---

    def put_peer_authentication(self, policy: PeerAuthentication) -> PeerAuthentication | None:
        old = self.peer_authentications.get((policy.namespace, policy.name))
        self.peer_authentications[(policy.namespace, policy.name)] = policy
        self._peer_authentications_by_namespace.setdefault(policy.namespace, {})[policy.name] = (
            policy
        )
        return old

    def remove_peer_authentication(self, key: ObjectKey) -> PeerAuthentication | None:
        old = self.peer_authentications.pop(key, None)
        if old is not None:
            in_namespace = self._peer_authentications_by_namespace[old.namespace]
            del in_namespace[old.name]
            if not in_namespace:
                del self._peer_authentications_by_namespace[old.namespace]
        return old

    def peer_authentications_in(self, namespace: str) -> list[PeerAuthentication]:
        return list(self._peer_authentications_by_namespace.get(namespace, {}).values())

    def namespace_wide_peer_authentication(self, namespace: str) -> PeerAuthentication | None:
        """The oldest selector-less one in `namespace` (mesh-wide when it is the root)."""
        return oldest(p for p in self.peer_authentications_in(namespace) if p.selector is None)

    def workload_peer_authentication(self, pod: Pod) -> PeerAuthentication | None:
        """The oldest selector PeerAuthentication picking the pod (root-namespace ones never do)."""
        if pod.namespace == self.root_namespace:
            return None
        return oldest(
            p
            for p in self.peer_authentications_in(pod.namespace)
            if p.selector is not None and selector_matches(p.selector, pod.labels)
        )
