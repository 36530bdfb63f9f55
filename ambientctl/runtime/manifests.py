"""Kubernetes YAML in, validated objects out: what `ambientctl apply -f` and `up DIR` accept.

Built-in kinds (Namespace, ServiceAccount, Pod, Service, Deployment) are checked field by
field, because the runtime acts on them: a Pod becomes a network namespace and processes,
a Service a VIP with kube-proxy rules. Mesh configuration (the Istio, Gateway API and
istiodlite.io groups) passes through untouched for istiod_lite to judge. Any other kind is
an error, as is the same object twice. Every problem in every file is collected before
anything is applied, and each names its file, object and field:

    deploy/app.yaml (document 2): Deployment bookinfo/reviews: spec.template.spec.containers[0].command: required ...

There are no container images here, so a container must say which program to run
(`command`, plus `args`); a relative `workingDir` is taken relative to the manifest's folder.

Deployments expand into Pods the way Kubernetes' controllers name them:
`<deployment>-<pod-template-hash>-<5 random characters>`, labelled `pod-template-hash` and
owned by the ReplicaSet `<deployment>-<pod-template-hash>`.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import random
import re
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ambientctl.runtime.addressing import AddressError, check_service_ip

# Groups whose objects are istiod_lite's business: stored as given, never interpreted here.
MESH_CONFIG_GROUPS = frozenset(
    {"security.istio.io", "networking.istio.io", "gateway.networking.k8s.io", "istiodlite.io"}
)
MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")
DEFAULT_NAMESPACE = "default"
DEFAULT_SERVICE_ACCOUNT = "default"


@dataclass(frozen=True, kw_only=True)
class KindInfo:
    """A built-in kind the runtime understands."""

    api_version: str
    kind: str
    plural: str
    namespaced: bool

    @property
    def group(self) -> str:
        return self.api_version.rpartition("/")[0]


BUILTIN_KINDS: dict[str, KindInfo] = {
    info.kind: info
    for info in (
        KindInfo(api_version="v1", kind="Namespace", plural="namespaces", namespaced=False),
        KindInfo(api_version="v1", kind="ServiceAccount", plural="serviceaccounts", namespaced=True),
        KindInfo(api_version="v1", kind="Pod", plural="pods", namespaced=True),
        KindInfo(api_version="v1", kind="Service", plural="services", namespaced=True),
        KindInfo(api_version="apps/v1", kind="Deployment", plural="deployments", namespaced=True),
    )
}


@dataclass(frozen=True, order=True, kw_only=True)
class ObjectKey:
    """Identifies an object: its API group ("" for core), kind, namespace ("" if cluster-scoped) and name."""

    group: str
    kind: str
    namespace: str
    name: str

    @property
    def resource(self) -> str:
        """kubectl's spelling of the object's type: "deployment.apps", "pod"."""
        return self.kind.lower() + (f".{self.group}" if self.group else "")

    def __str__(self) -> str:
        return f"{self.resource}/{self.name}"

    def describe(self) -> str:
        """For messages: "Deployment bookinfo/reviews", "Namespace bookinfo"."""
        return f"{self.kind} {self.namespace}/{self.name}" if self.namespace else f"{self.kind} {self.name}"


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """One validated object from a file; `body` is the object as written (do not mutate)."""

    key: ObjectKey
    body: dict[str, Any]
    source: str  # "path" or "path (document N)"

    @property
    def is_mesh_config(self) -> bool:
        return self.key.group in MESH_CONFIG_GROUPS


class ManifestError(Exception):
    """One problem in one object, located by file, object and field."""

    def __init__(self, *, source: str, obj: str, field: str, problem: str) -> None:
        self.source, self.obj, self.field, self.problem = source, obj, field, problem
        where = ": ".join(part for part in (source, obj, field) if part)
        super().__init__(f"{where}: {problem}")


class ManifestErrors(Exception):
    """Everything wrong with a set of manifests; nothing of them was applied."""

    def __init__(self, errors: list[ManifestError]) -> None:
        self.errors = tuple(errors)
        super().__init__("\n".join(str(error) for error in errors))


def is_builtin(key: ObjectKey, kind: str) -> bool:
    """`key` is of the built-in `kind` (not a same-named kind of another API group)."""
    info = BUILTIN_KINDS[kind]
    return key.kind == kind and key.group == info.group


def key_of(body: Mapping[str, Any]) -> ObjectKey:
    """The key of a well-formed object (one that passed validation or came from the store)."""
    group = str(body["apiVersion"]).rpartition("/")[0]
    kind = body["kind"]
    metadata = body["metadata"]
    builtin = BUILTIN_KINDS.get(kind)
    namespaced = builtin.namespaced if builtin is not None and group == builtin.group else True
    namespace = (metadata.get("namespace") or DEFAULT_NAMESPACE) if namespaced else ""
    return ObjectKey(group=group, kind=kind, namespace=namespace, name=metadata["name"])


# --- loading ---


def load_manifests(path: Path) -> tuple[Manifest, ...]:
    """Read and validate a file or every manifest file in a folder (not recursive).

    Raises ManifestErrors listing every problem, including the same object twice.
    """
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in MANIFEST_SUFFIXES)
        if not files:
            raise ManifestErrors([_error(str(path), "", "", f"no {'/'.join(MANIFEST_SUFFIXES)} files in this folder")])
    elif path.is_file():
        files = [path]
    else:
        raise ManifestErrors([_error(str(path), "", "", "no such file or folder")])
    manifests: list[Manifest] = []
    errors: list[ManifestError] = []
    for file in files:
        for source, document in _documents(file, errors):
            manifest = _validate(source, document, file.parent, errors)
            if manifest is not None:
                manifests.append(manifest)
    errors.extend(duplicate_errors(manifests))
    if errors:
        raise ManifestErrors(errors)
    return tuple(manifests)


def duplicate_errors(manifests: list[Manifest]) -> list[ManifestError]:
    """One error for each object that appears more than once."""
    first_seen: dict[ObjectKey, Manifest] = {}
    errors = []
    for manifest in manifests:
        earlier = first_seen.setdefault(manifest.key, manifest)
        if earlier is not manifest:
            errors.append(
                _error(manifest.source, manifest.key.describe(), "metadata.name", f"name clash: also defined in {earlier.source}")
            )
    return errors


def _documents(file: Path, errors: list[ManifestError]) -> Iterator[tuple[str, Any]]:
    try:
        documents = [doc for doc in yaml.safe_load_all(file.read_text()) if doc is not None]
    except (OSError, UnicodeDecodeError) as exc:
        errors.append(_error(str(file), "", "", f"cannot read: {exc}"))
        return
    except yaml.YAMLError as exc:
        errors.append(_error(str(file), "", "", f"invalid YAML: {exc}"))
        return
    expanded: list[Any] = []
    for doc in documents:
        # `ambientctl get -o yaml` prints a v1 List; accept it back like kubectl does.
        if isinstance(doc, dict) and doc.get("kind") == "List" and isinstance(doc.get("items"), list):
            expanded.extend(doc["items"])
        else:
            expanded.append(doc)
    for index, doc in enumerate(expanded, start=1):
        yield (f"{file} (document {index})" if len(expanded) > 1 else str(file)), doc


# --- validation ---


_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_LABEL_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_PORT_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def is_dns_label(value: str) -> bool:
    return len(value) <= 63 and _DNS_LABEL.fullmatch(value) is not None


def is_dns_subdomain(value: str) -> bool:
    return len(value) <= 253 and all(is_dns_label(part) for part in value.split("."))


def label_key_problem(key: str) -> str | None:
    """Why `key` is not a valid label key, or None."""
    prefix, _, name = key.rpartition("/")
    if prefix and not is_dns_subdomain(prefix):
        return f"label key {key!r}: prefix must be a DNS subdomain"
    if not name or len(name) > 63 or not _LABEL_NAME.fullmatch(name):
        return f"label key {key!r}: name must be 1-63 letters, digits, '-', '_' or '.', starting and ending alphanumeric"
    return None


def label_value_problem(value: str) -> str | None:
    """Why `value` is not a valid label value, or None."""
    if value and (len(value) > 63 or not _LABEL_NAME.fullmatch(value)):
        return f"label value {value!r}: must be at most 63 letters, digits, '-', '_' or '.', starting and ending alphanumeric"
    return None


class _Checker:
    """Collects the problems of one object, each with its field path."""

    def __init__(self, source: str, obj: str, errors: list[ManifestError]) -> None:
        self.source, self.obj, self.errors = source, obj, errors
        self.failed = False

    def fail(self, field: str, problem: str) -> None:
        self.failed = True
        self.errors.append(_error(self.source, self.obj, field, problem))

    def mapping(self, value: Any, field: str, *, required: bool = False) -> dict[str, Any]:
        if value is None:
            if required:
                self.fail(field, "required")
            return {}
        if not isinstance(value, dict):
            self.fail(field, f"must be a mapping, got {_type_name(value)}")
            return {}
        return value

    def sequence(self, value: Any, field: str, *, required: bool = False) -> list[Any]:
        if value is None:
            if required:
                self.fail(field, "required")
            return []
        if not isinstance(value, list):
            self.fail(field, f"must be a list, got {_type_name(value)}")
            return []
        return value

    def non_empty_sequence(self, value: Any, field: str, *, missing: str) -> list[Any]:
        """A required list that must have items; `missing` says why it is needed."""
        if value is None:
            self.fail(field, missing)
            return []
        items = self.sequence(value, field)
        if isinstance(value, list) and not items:
            self.fail(field, f"must not be empty ({missing})")
        return items

    def string(self, value: Any, field: str, *, required: bool = False) -> str | None:
        if value is None:
            if required:
                self.fail(field, "required")
            return None
        if not isinstance(value, str):
            self.fail(field, f"must be a string, got {_type_name(value)}")
            return None
        return value

    def port(self, value: Any, field: str, *, required: bool = False) -> int | None:
        if value is None:
            if required:
                self.fail(field, "required")
            return None
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
            self.fail(field, f"must be a port number 1-65535, got {value!r}")
            return None
        return value

    def string_map(self, value: Any, field: str, *, labels: bool = False) -> dict[str, str]:
        mapping = self.mapping(value, field)
        for key, item in mapping.items():
            if not isinstance(key, str) or not isinstance(item, str):
                self.fail(f"{field}.{key}", f"keys and values must be strings, got {_type_name(item)} (quote it)")
                continue
            if labels:
                problem = label_key_problem(key) or label_value_problem(item)
                if problem:
                    self.fail(f"{field}.{key}", problem)
        return mapping

    def tcp(self, value: Any, field: str) -> None:
        if value is not None and value != "TCP":
            self.fail(field, f"only TCP is supported, got {value!r}")


def _validate(source: str, document: Any, folder: Path, errors: list[ManifestError]) -> Manifest | None:
    if not isinstance(document, dict):
        errors.append(_error(source, "", "", f"expected a Kubernetes object (a mapping), got {_type_name(document)}"))
        return None
    api_version, kind = document.get("apiVersion"), document.get("kind")
    metadata = document.get("metadata")
    name = metadata.get("name") if isinstance(metadata, dict) else None
    given_namespace = metadata.get("namespace") if isinstance(metadata, dict) else None
    if not isinstance(name, str):
        label = f"{kind or 'object'} (unnamed)"
    else:
        label = f"{kind} {given_namespace}/{name}" if isinstance(given_namespace, str) else f"{kind} {name}"
    check = _Checker(source, label, errors)
    if not isinstance(api_version, str) or not api_version:
        check.fail("apiVersion", "required")
    if not isinstance(kind, str) or not kind:
        check.fail("kind", "required")
    if check.failed:
        return None
    group = api_version.rpartition("/")[0]
    builtin = BUILTIN_KINDS.get(kind)
    if group in MESH_CONFIG_GROUPS:
        namespaced = True
    elif builtin is not None and builtin.api_version == api_version:
        namespaced = builtin.namespaced
    elif builtin is not None:
        check.fail("apiVersion", f"{kind} is {builtin.api_version}, got {api_version!r}")
        return None
    else:
        known = ", ".join(f"{info.api_version} {info.kind}" for info in BUILTIN_KINDS.values())
        check.fail(
            "kind",
            f"unknown kind {api_version} {kind}: the runtime knows {known}, and passes through "
            f"the mesh groups {', '.join(sorted(MESH_CONFIG_GROUPS))}",
        )
        return None
    metadata = check.mapping(metadata, "metadata", required=True)
    name = check.string(metadata.get("name"), "metadata.name", required=True)
    namespace = check.string(metadata.get("namespace"), "metadata.namespace") if namespaced else None
    if check.failed or name is None:
        return None
    namespace = (namespace or DEFAULT_NAMESPACE) if namespaced else ""
    check.obj = f"{kind} {namespace}/{name}" if namespaced else f"{kind} {name}"
    key = ObjectKey(group=group, kind=kind, namespace=namespace, name=name)
    if group in MESH_CONFIG_GROUPS:
        return Manifest(key=key, body=document, source=source)
    # Namespaces and Services become DNS labels in Kubernetes; Pods name network namespaces here.
    if kind in ("Namespace", "Service") and not is_dns_label(name):
        check.fail("metadata.name", f"{name!r} must be a DNS label (lowercase letters, digits, '-'; at most 63)")
    elif not is_dns_subdomain(name):
        check.fail("metadata.name", f"{name!r} must be a DNS subdomain (lowercase letters, digits, '-', '.')")
    if namespace and not is_dns_label(namespace):
        check.fail("metadata.namespace", f"{namespace!r} must be a DNS label")
    check.string_map(metadata.get("labels"), "metadata.labels", labels=True)
    check.string_map(metadata.get("annotations"), "metadata.annotations")
    body = copy.deepcopy(document)
    spec = document.get("spec")
    if kind == "Pod":
        _check_pod_spec(check, spec, "spec")
        _resolve_working_dirs(body.get("spec"), folder)
    elif kind == "Deployment":
        _check_deployment_spec(check, spec)
        _resolve_working_dirs(((body.get("spec") or {}).get("template") or {}).get("spec"), folder)
    elif kind == "Service":
        _check_service_spec(check, spec)
    if check.failed:
        return None
    return Manifest(key=key, body=body, source=source)


def _check_pod_spec(check: _Checker, spec: Any, at: str) -> None:
    spec = check.mapping(spec, at, required=True)
    account = check.string(spec.get("serviceAccountName"), f"{at}.serviceAccountName")
    if account is not None and not is_dns_subdomain(account):
        check.fail(f"{at}.serviceAccountName", f"{account!r} must be a DNS subdomain")
    check.string(spec.get("nodeName"), f"{at}.nodeName")
    containers = check.non_empty_sequence(spec.get("containers"), f"{at}.containers", missing="required")
    names: set[str] = set()
    for index, container in enumerate(containers):
        where = f"{at}.containers[{index}]"
        container = check.mapping(container, where, required=True)
        name = check.string(container.get("name"), f"{where}.name", required=True)
        if name is not None:
            if not is_dns_label(name):
                check.fail(f"{where}.name", f"{name!r} must be a DNS label")
            elif name in names:
                check.fail(f"{where}.name", f"duplicate container name {name!r}")
            names.add(name)
        command = check.non_empty_sequence(
            container.get("command"),
            f"{where}.command",
            missing="required: there are no container images on this runtime, so each container names the program to run",
        )
        for item_index, item in enumerate(command):
            check.string(item, f"{where}.command[{item_index}]")
        for item_index, item in enumerate(check.sequence(container.get("args"), f"{where}.args")):
            check.string(item, f"{where}.args[{item_index}]")
        check.string(container.get("workingDir"), f"{where}.workingDir")
        for env_index, entry in enumerate(check.sequence(container.get("env"), f"{where}.env")):
            entry_at = f"{where}.env[{env_index}]"
            entry = check.mapping(entry, entry_at, required=True)
            check.string(entry.get("name"), f"{entry_at}.name", required=True)
            if "valueFrom" in entry:
                check.fail(f"{entry_at}.valueFrom", "not supported here: give a literal `value`")
            check.string(entry.get("value"), f"{entry_at}.value")
        for port_index, port in enumerate(check.sequence(container.get("ports"), f"{where}.ports")):
            port_at = f"{where}.ports[{port_index}]"
            port = check.mapping(port, port_at, required=True)
            check.port(port.get("containerPort"), f"{port_at}.containerPort", required=True)
            port_name = check.string(port.get("name"), f"{port_at}.name")
            if port_name is not None and (len(port_name) > 15 or not _PORT_NAME.fullmatch(port_name)):
                check.fail(f"{port_at}.name", f"{port_name!r} must be at most 15 lowercase letters, digits or '-'")
            check.tcp(port.get("protocol"), f"{port_at}.protocol")


def _check_deployment_spec(check: _Checker, spec: Any) -> None:
    spec = check.mapping(spec, "spec", required=True)
    replicas = spec.get("replicas")
    if replicas is not None and (not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0):
        check.fail("spec.replicas", f"must be a whole number >= 0, got {replicas!r}")
    selector = check.mapping(spec.get("selector"), "spec.selector", required=True)
    if "matchExpressions" in selector:
        check.fail("spec.selector.matchExpressions", "not supported here: use matchLabels")
    match_labels = check.string_map(selector.get("matchLabels"), "spec.selector.matchLabels", labels=True)
    if "selector" in spec and not match_labels:
        check.fail("spec.selector.matchLabels", "required (a Deployment must select its pods)")
    template = check.mapping(spec.get("template"), "spec.template", required=True)
    template_metadata = check.mapping(template.get("metadata"), "spec.template.metadata")
    template_labels = check.string_map(template_metadata.get("labels"), "spec.template.metadata.labels", labels=True)
    if match_labels and any(template_labels.get(k) != v for k, v in match_labels.items()):
        check.fail("spec.template.metadata.labels", "must include every label of spec.selector.matchLabels")
    if "template" in spec:
        _check_pod_spec(check, template.get("spec"), "spec.template.spec")


def _check_service_spec(check: _Checker, spec: Any) -> None:
    spec = check.mapping(spec, "spec", required=True)
    service_type = spec.get("type")
    if service_type not in (None, "ClusterIP"):
        check.fail("spec.type", f"only ClusterIP services are supported, got {service_type!r}")
    cluster_ip = check.string(spec.get("clusterIP"), "spec.clusterIP")
    if cluster_ip == "None":
        check.fail("spec.clusterIP", "headless services are not supported (there is no DNS here)")
    elif cluster_ip:
        try:
            check_service_ip(ipaddress.IPv4Address(cluster_ip))
        except (ValueError, AddressError) as exc:
            check.fail("spec.clusterIP", str(exc))
    check.string_map(spec.get("selector"), "spec.selector", labels=True)
    ports = check.non_empty_sequence(spec.get("ports"), "spec.ports", missing="required")
    names: set[str] = set()
    for index, port in enumerate(ports):
        where = f"spec.ports[{index}]"
        port = check.mapping(port, where, required=True)
        check.port(port.get("port"), f"{where}.port", required=True)
        target = port.get("targetPort")
        if isinstance(target, str):
            if not _PORT_NAME.fullmatch(target):
                check.fail(f"{where}.targetPort", f"{target!r} is neither a port number nor a port name")
        else:
            check.port(target, f"{where}.targetPort")
        check.tcp(port.get("protocol"), f"{where}.protocol")
        name = check.string(port.get("name"), f"{where}.name", required=len(ports) > 1)
        if name is not None:
            if name in names:
                check.fail(f"{where}.name", f"duplicate port name {name!r}")
            names.add(name)


def _resolve_working_dirs(pod_spec: Any, folder: Path) -> None:
    if not isinstance(pod_spec, dict):
        return
    for container in pod_spec.get("containers") or ():
        if isinstance(container, dict) and isinstance(container.get("workingDir"), str):
            container["workingDir"] = str((folder / container["workingDir"]).resolve())


# --- Deployments -> Pods ---

# Kubernetes' rand.SafeEncodeString alphabet: no vowels (no words), no look-alike characters.
_SAFE_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"


def pod_template_hash(template: Mapping[str, Any]) -> str:
    """A stable short hash of a pod template, spelled like Kubernetes' pod-template-hash."""
    digest = 0x811C9DC5  # FNV-1a 32-bit, as Kubernetes' controller.ComputeHash
    for byte in json.dumps(template, sort_keys=True, separators=(",", ":")).encode():
        digest = ((digest ^ byte) * 0x01000193) & 0xFFFFFFFF
    return "".join(_SAFE_ALPHABET[int(digit)] for digit in str(digest))


def random_suffix(rng: random.Random) -> str:
    """The 5 characters Kubernetes appends to a generated name."""
    return "".join(rng.choice(_SAFE_ALPHABET) for _ in range(5))


def replica_set_name(deployment_name: str, template_hash: str) -> str:
    return f"{deployment_name}-{template_hash}"


def deployment_pod(deployment: Mapping[str, Any], *, template_hash: str, suffix: str) -> dict[str, Any]:
    """A Pod of `deployment` (a stored object, with uid) as its ReplicaSet would create it."""
    metadata = deployment["metadata"]
    template = deployment["spec"]["template"]
    template_metadata = template.get("metadata") or {}
    owner = replica_set_name(metadata["name"], template_hash)
    pod_metadata: dict[str, Any] = {
        "name": f"{owner}-{suffix}",
        "namespace": metadata["namespace"],
        "labels": {**(template_metadata.get("labels") or {}), "pod-template-hash": template_hash},
        "ownerReferences": [
            {
                "apiVersion": "apps/v1",
                "kind": "ReplicaSet",
                "name": owner,
                "uid": str(uuid.uuid5(uuid.UUID(metadata["uid"]), template_hash)),
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ],
    }
    if template_metadata.get("annotations"):
        pod_metadata["annotations"] = dict(template_metadata["annotations"])
    return {"apiVersion": "v1", "kind": "Pod", "metadata": pod_metadata, "spec": copy.deepcopy(template["spec"])}


def owning_replica_set(pod: Mapping[str, Any]) -> str | None:
    """The name of the ReplicaSet that controls `pod`, if any."""
    for owner in pod.get("metadata", {}).get("ownerReferences") or ():
        if owner.get("kind") == "ReplicaSet" and owner.get("controller"):
            return owner.get("name")
    return None


def _error(source: str, obj: str, field: str, problem: str) -> ManifestError:
    return ManifestError(source=source, obj=obj, field=field, problem=problem)


def _type_name(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", type(None): "nothing"}.get(
        type(value), type(value).__name__
    )
