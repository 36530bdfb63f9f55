"""The local object store: the one-machine stand-in for the Kubernetes API server.

A folder with one YAML file per object (`<group>_<Kind>_<namespace>_<name>.yaml`, group
`core` for the core API), each written to a temporary name and renamed into place, so a
reader - istiod_lite's files source polls this folder - never sees half an object.
`ambientctl apply/delete/label` and the runtime (scheduling, pod status) all write here;
each read-modify-write holds an exclusive lock on `<folder>/.lock`, so they never lose
each other's updates.

What the store does on the way in is what the API server and the controllers would do:
uid and creationTimestamp, the namespace made explicit, defaults (Service type, ClusterIP
from the VIP range, port protocol and targetPort; Pod serviceAccountName), a Deployment's
Pods created or removed to match its template and replicas, a Namespace's objects and a
Deployment's Pods deleted with it. Admission refuses an object whose namespace or service
account does not exist, a change to a Pod's spec or to a Service's ClusterIP, and a
ClusterIP that another Service has; all checks run before anything is written.
"""

from __future__ import annotations

import copy
import fcntl
import ipaddress
import os
import random
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from ambientctl.runtime.addressing import next_service_ip
from ambientctl.runtime.manifests import (
    DEFAULT_NAMESPACE,
    DEFAULT_SERVICE_ACCOUNT,
    Manifest,
    ManifestError,
    ManifestErrors,
    ObjectKey,
    deployment_pod,
    duplicate_errors,
    is_builtin,
    key_of,
    owning_replica_set,
    pod_template_hash,
    random_suffix,
    replica_set_name,
)
from meshcore.log import get_logger

log = get_logger("store")

_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


class StoreError(Exception):
    """A store operation was refused (object not found, label conflict); the message says why."""


@dataclass(frozen=True, kw_only=True)
class Change:
    """What an operation did to one object, printed like kubectl: `deployment.apps/x created`."""

    key: ObjectKey
    action: str  # created | configured | unchanged | deleted | labeled | unlabeled | not labeled

    def __str__(self) -> str:
        return f"{self.key} {self.action}"


def namespace_key(name: str) -> ObjectKey:
    return ObjectKey(group="", kind="Namespace", namespace="", name=name)


class ObjectStore:
    """The folder of objects; every method is blocking (call it from a thread in async code)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    # --- reading ---

    def objects(self) -> dict[ObjectKey, dict[str, Any]]:
        """Every stored object by key. A file that does not parse is skipped with a warning."""
        found: dict[ObjectKey, dict[str, Any]] = {}
        if not self.directory.is_dir():
            return found
        for path in sorted(self.directory.glob("*.yaml")):
            try:
                body = yaml.load(path.read_text(), Loader=_LOADER)
                found[key_of(body)] = body
            except FileNotFoundError:
                continue  # deleted while we listed the folder
            except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError) as exc:
                log.warning("skipping unreadable store file", path=str(path), error=str(exc))
        return found

    def get(self, key: ObjectKey) -> dict[str, Any] | None:
        return self._read(key)

    # --- writing ---

    def initialize(self) -> None:
        """Create the folder and the `default` namespace, as every cluster has."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with self._locked():
            key = namespace_key(DEFAULT_NAMESPACE)
            if self._read(key) is None:
                self._write(key, _admit_namespace({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": DEFAULT_NAMESPACE}}, None))

    def apply(self, manifests: Sequence[Manifest], *, rng: random.Random | None = None) -> list[Change]:
        """Create or update every object; all-or-nothing (ManifestErrors names what is wrong)."""
        rng = rng or random.Random()
        self.initialize()
        with self._locked():
            current = self.objects()
            errors = duplicate_errors(list(manifests)) + _admission_errors(manifests, current)
            if errors:
                raise ManifestErrors(errors)
            writes: dict[ObjectKey, dict[str, Any]] = {}
            removals: set[ObjectKey] = set()
            changes = []
            used_ips = _service_ips(current.values()) | _explicit_ips(manifests)
            for manifest in manifests:
                old = current.get(manifest.key)
                new = _admit(manifest, old, used_ips)
                if new != old:
                    writes[manifest.key] = new
                changes.append(Change(key=manifest.key, action="created" if old is None else "configured" if new != old else "unchanged"))
                if is_builtin(manifest.key, "Deployment"):
                    pod_writes, pod_removals = _scale(new, current, rng)
                    writes.update(pod_writes)
                    removals |= pod_removals
            for key, body in writes.items():
                self._write(key, body)
            for key in removals:
                self._remove(key)
            return changes

    def delete(self, keys: Sequence[ObjectKey]) -> list[Change]:
        """Delete each object (a Namespace with its objects, a Deployment with its Pods).

        Objects that do not exist are reported as `not found`, the others are still deleted.
        """
        with self._locked():
            current = self.objects()
            changes = []
            for key in keys:
                if key not in current:
                    changes.append(Change(key=key, action="not found"))
                    continue
                doomed = {key} | _dependents(key, current)
                for victim in doomed:
                    self._remove(victim)
                    current.pop(victim, None)
                changes.append(Change(key=key, action="deleted"))
            return changes

    def label(self, key: ObjectKey, *, set_labels: Mapping[str, str], remove: Collection[str], overwrite: bool) -> Change:
        """`kubectl label`: set and remove labels on one object."""
        with self._locked():
            body = self._read(key)
            if body is None:
                raise StoreError(f'{key.resource} "{key.name}" not found')
            labels = dict(body["metadata"].get("labels") or {})
            for name, value in set_labels.items():
                if name in labels and labels[name] != value and not overwrite:
                    raise StoreError(f"{key}: '{name}' already has a value ({labels[name]}), and --overwrite is false")
            updated = {name: value for name, value in labels.items() if name not in remove}
            updated.update(set_labels)
            if updated == labels:
                return Change(key=key, action="not labeled")
            body["metadata"]["labels"] = updated
            self._write(key, body)
            return Change(key=key, action="labeled" if set_labels else "unlabeled")

    def update(self, key: ObjectKey, mutate: Callable[[dict[str, Any]], None]) -> dict[str, Any] | None:
        """Apply `mutate` to the stored object and write it back if it changed (None: it is gone)."""
        with self._locked():
            body = self._read(key)
            if body is None:
                return None
            updated = copy.deepcopy(body)
            mutate(updated)
            if updated != body:
                self._write(key, updated)
            return updated

    # --- files ---

    def path_of(self, key: ObjectKey) -> Path:
        return self.directory / f"{key.group or 'core'}_{key.kind}_{key.namespace}_{key.name}.yaml"

    def _read(self, key: ObjectKey) -> dict[str, Any] | None:
        try:
            return yaml.load(self.path_of(key).read_text(), Loader=_LOADER)
        except FileNotFoundError:
            return None

    def _write(self, key: ObjectKey, body: Mapping[str, Any]) -> None:
        path = self.path_of(key)
        temporary = path.with_name(f".{path.name}.tmp")  # not *.yaml: readers skip it
        temporary.write_text(yaml.dump(body, Dumper=_DUMPER, sort_keys=False))
        os.replace(temporary, path)

    def _remove(self, key: ObjectKey) -> None:
        self.path_of(key).unlink(missing_ok=True)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield


# --- admission: checks across objects ---


def _admission_errors(manifests: Sequence[Manifest], current: Mapping[ObjectKey, dict[str, Any]]) -> list[ManifestError]:
    namespaces = {key.name for key in current if is_builtin(key, "Namespace")} | {
        m.key.name for m in manifests if is_builtin(m.key, "Namespace")
    }
    accounts = {(key.namespace, key.name) for key in current if is_builtin(key, "ServiceAccount")} | {
        (m.key.namespace, m.key.name) for m in manifests if is_builtin(m.key, "ServiceAccount")
    }
    ip_owners = {ip: key for key, body in current.items() if is_builtin(key, "Service") for ip in [_cluster_ip(body)] if ip}
    errors = []
    for manifest in manifests:
        key, body = manifest.key, manifest.body
        fail = _refusals(manifest, errors)
        if key.namespace and key.namespace not in namespaces:
            fail("metadata.namespace", f"namespace {key.namespace!r} does not exist (apply a Namespace {key.namespace!r} first or with it)")
        if manifest.is_mesh_config:
            continue
        pod_spec = body["spec"]["template"]["spec"] if is_builtin(key, "Deployment") else body.get("spec")
        if is_builtin(key, "Pod") or is_builtin(key, "Deployment"):
            account = pod_spec.get("serviceAccountName") or DEFAULT_SERVICE_ACCOUNT
            if account != DEFAULT_SERVICE_ACCOUNT and (key.namespace, account) not in accounts:
                field = "spec.template.spec.serviceAccountName" if key.kind == "Deployment" else "spec.serviceAccountName"
                fail(field, f"service account {account!r} does not exist in namespace {key.namespace!r}")
        old = current.get(key)
        if is_builtin(key, "Pod") and old is not None and _comparable_pod_spec(body["spec"], old["spec"]) != old["spec"]:
            fail("spec", "a Pod's spec cannot change once created; delete the Pod and apply it again")
        if is_builtin(key, "Service"):
            given = body["spec"].get("clusterIP")
            existing = _cluster_ip(old) if old is not None else None
            if given and existing and given != existing:
                fail("spec.clusterIP", f"field is immutable (it is {existing})")
            owner = ip_owners.get(given) if given else None
            if owner is not None and owner != key:
                fail("spec.clusterIP", f"{given} is already the ClusterIP of {owner.describe()}")
            if given:
                ip_owners.setdefault(given, key)
    return errors


def _refusals(manifest: Manifest, errors: list[ManifestError]) -> Callable[[str, str], None]:
    """A function that records a refusal of `manifest` at a field."""

    def fail(field: str, problem: str) -> None:
        errors.append(ManifestError(source=manifest.source, obj=manifest.key.describe(), field=field, problem=problem))

    return fail


def _comparable_pod_spec(given: Mapping[str, Any], stored: Mapping[str, Any]) -> dict[str, Any]:
    """`given` with what admission and the scheduler add, to compare with the stored spec."""
    spec = copy.deepcopy(dict(given))
    spec.setdefault("serviceAccountName", DEFAULT_SERVICE_ACCOUNT)
    if "nodeName" not in spec and "nodeName" in stored:
        spec["nodeName"] = stored["nodeName"]
    return spec


def _dependents(key: ObjectKey, current: Mapping[ObjectKey, dict[str, Any]]) -> set[ObjectKey]:
    if is_builtin(key, "Namespace"):
        return {other for other in current if other.namespace == key.name}
    if is_builtin(key, "Deployment"):
        return set(_deployment_pods(key, current))
    return set()


# --- admission: defaults ---


def _admit(manifest: Manifest, old: dict[str, Any] | None, used_ips: set[str]) -> dict[str, Any]:
    if manifest.is_mesh_config:
        return manifest.body
    body = copy.deepcopy(manifest.body)
    body.pop("status", None)
    metadata = body["metadata"]
    for server_field in ("uid", "creationTimestamp", "resourceVersion", "generation", "managedFields"):
        metadata.pop(server_field, None)
    if manifest.key.namespace:
        metadata["namespace"] = manifest.key.namespace
    _stamp(metadata, old)
    kind = manifest.key.kind
    if kind == "Namespace":
        return _admit_namespace(body, old)
    if kind == "Pod":
        return _admit_pod(body, old)
    if kind == "Service":
        spec = body["spec"]
        spec.setdefault("type", "ClusterIP")
        ip = spec.get("clusterIP") or (_cluster_ip(old) if old is not None else None)
        if not ip:
            ip = str(next_service_ip({ipaddress.IPv4Address(used) for used in used_ips}))
            used_ips.add(ip)
        spec["clusterIP"], spec["clusterIPs"] = ip, [ip]
        for port in spec["ports"]:
            port.setdefault("protocol", "TCP")
            port.setdefault("targetPort", port["port"])
    elif kind == "Deployment":
        body["spec"].setdefault("replicas", 1)
    return body


def _admit_namespace(body: dict[str, Any], old: dict[str, Any] | None) -> dict[str, Any]:
    _stamp(body["metadata"], old)
    body["status"] = {"phase": "Active"}
    return body


def _admit_pod(body: dict[str, Any], old: dict[str, Any] | None) -> dict[str, Any]:
    spec = body["spec"]
    spec.setdefault("serviceAccountName", DEFAULT_SERVICE_ACCOUNT)
    if old is not None:
        # The scheduler's choice and the kubelet's reports survive a re-apply.
        if "nodeName" in old["spec"]:
            spec.setdefault("nodeName", old["spec"]["nodeName"])
        body["status"] = old.get("status", {"phase": "Pending"})
    else:
        body["status"] = {"phase": "Pending"}
    return body


def _stamp(metadata: dict[str, Any], old: dict[str, Any] | None) -> None:
    old_metadata = old["metadata"] if old is not None else {}
    metadata["uid"] = old_metadata.get("uid") or str(uuid.uuid4())
    metadata["creationTimestamp"] = old_metadata.get("creationTimestamp") or now_rfc3339()


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- the Deployment controller ---


def _scale(
    deployment: dict[str, Any], current: Mapping[ObjectKey, dict[str, Any]], rng: random.Random
) -> tuple[dict[ObjectKey, dict[str, Any]], set[ObjectKey]]:
    """Pods to create and to delete so that `deployment` has `replicas` Pods of its current template."""
    key = key_of(deployment)
    template_hash = pod_template_hash(deployment["spec"]["template"])
    owned = _deployment_pods(key, current)
    current_pods = sorted(k for k, pod in owned.items() if pod["metadata"]["labels"].get("pod-template-hash") == template_hash)
    replicas = deployment["spec"]["replicas"]
    removals = {k for k in owned if k not in current_pods} | set(current_pods[replicas:])
    writes = {}
    taken = {k.name for k in current if k.namespace == key.namespace and k.kind == "Pod"}
    for _ in range(replicas - len(current_pods)):
        while True:
            pod = deployment_pod(deployment, template_hash=template_hash, suffix=random_suffix(rng))
            if pod["metadata"]["name"] not in taken:
                break
        taken.add(pod["metadata"]["name"])
        _stamp(pod["metadata"], None)
        writes[key_of(pod)] = _admit_pod(pod, None)
    return writes, removals


def _deployment_pods(deployment: ObjectKey, current: Mapping[ObjectKey, dict[str, Any]]) -> dict[ObjectKey, dict[str, Any]]:
    owned = {}
    for key, body in current.items():
        if not is_builtin(key, "Pod") or key.namespace != deployment.namespace:
            continue
        template_hash = (body["metadata"].get("labels") or {}).get("pod-template-hash")
        if template_hash and owning_replica_set(body) == replica_set_name(deployment.name, template_hash):
            owned[key] = body
    return owned


# --- helpers ---


def _cluster_ip(service: Mapping[str, Any]) -> str | None:
    return (service.get("spec") or {}).get("clusterIP") or None


def _service_ips(bodies: Collection[dict[str, Any]]) -> set[str]:
    return {ip for body in bodies if is_builtin(key_of(body), "Service") for ip in [_cluster_ip(body)] if ip}


def _explicit_ips(manifests: Sequence[Manifest]) -> set[str]:
    return {ip for m in manifests if is_builtin(m.key, "Service") for ip in [_cluster_ip(m.body)] if ip}
