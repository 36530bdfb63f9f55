"""Pods and Namespaces -> `istio.workload.Workload` (ambient-facts §4, §6).

`parse_pod` / `parse_namespace` read the Kubernetes objects into frozen values holding only
what translation uses, and reject malformed ones with a `TranslationError`. `build_workload`
then makes the proto from a pod plus what the rest of the cluster contributes (its
namespace's enrolment label, the services selecting it, the policies attached to it).

Rules (Istio pilot/pkg/serviceregistry/ambient/workloads.go, pkg/kube/labels):
- a pod has a workload once it has an IP, until it terminates (deletionTimestamp) or reaches
  a terminal phase (Succeeded/Failed: its IP may already belong to another pod);
- enrolled (HBONE) when the node agent says so (`ambient.istio.io/redirection`), else by the
  node agents' own label rule (meshcore/enrolment.py: the pod's `istio.io/dataplane-mode`
  beats its namespace's), and never with a sidecar (`sidecar.istio.io/status`) or hostNetwork;
- HEALTHY only when Running and Ready;
- workload name/type come from the controlling owner: ReplicaSet `<deploy>-<hash>` is the
  Deployment `<deploy>`, a Job `<cronjob>-<schedule time>` its CronJob, a bare pod itself.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from istiod_lite.model.fields import (
    ObjectRef,
    boolean,
    mapping,
    port_number,
    sequence,
    string,
    string_map,
)
from meshcore.enrolment import DATAPLANE_MODE_LABEL, is_captured
from meshcore._gen import workload_pb2
from meshcore.identity.spiffe import Identity, InvalidIdentity

SIDECAR_STATUS_ANNOTATION = "sidecar.istio.io/status"
# Set by the node agent once the pod's traffic is really captured (Istio's CNI does the same).
REDIRECTION_ANNOTATION = "ambient.istio.io/redirection"
CLUSTER_ID = "Kubernetes"
DEFAULT_SERVICE_ACCOUNT = "default"

_CANONICAL_NAME_LABELS = ("service.istio.io/canonical-name", "app.kubernetes.io/name", "app")
_CANONICAL_REVISION_LABELS = (
    "service.istio.io/canonical-revision",
    "app.kubernetes.io/version",
    "version",
)
_DEFAULT_CANONICAL_REVISION = "latest"
_TERMINAL_PHASES = frozenset({"Succeeded", "Failed"})
# Jobs created by a CronJob are named `<cronjob>-<scheduled time in minutes>` (Istio's
# pkg/kube `cronJobNameRegexp`).
_CRONJOB_JOB_NAME = re.compile(r"(.+)-\d{8,10}")
# Any valid trust domain will do: parsing only checks namespace and service account.
_VALIDATION_TRUST_DOMAIN = "cluster.local"

PodKey = tuple[str, str]


@dataclass(frozen=True, slots=True)
class Namespace:
    """A namespace; only its labels matter to translation."""

    name: str
    labels: Mapping[str, str]

    @property
    def dataplane_mode(self) -> str:
        return self.labels.get(DATAPLANE_MODE_LABEL, "")


@dataclass(frozen=True, slots=True)
class Pod:
    """What translation needs of a pod."""

    namespace: str
    name: str
    labels: Mapping[str, str]
    # Packed 4- or 16-byte addresses, in the pod's order (status.podIPs).
    addresses: tuple[bytes, ...]
    node: str
    service_account: str
    host_network: bool
    has_sidecar: bool
    # The node agent's word on capture ("enabled" once captured), if a node agent runs.
    redirection: str | None
    healthy: bool
    # Being deleted: no workload any more, but still running (and so still has an identity).
    terminating: bool
    # Succeeded or Failed: stopped for good; its IP may already belong to another pod.
    finished: bool
    workload_name: str
    workload_type: int
    # Named container ports, for Services whose targetPort is a name.
    container_ports: Mapping[str, int]

    @property
    def key(self) -> PodKey:
        return (self.namespace, self.name)

    @property
    def uid(self) -> str:
        """The Workload's uid and xDS resource name."""
        return workload_uid(self.namespace, self.name)

    @property
    def has_workload(self) -> bool:
        return bool(self.addresses) and not self.terminating and not self.finished

    def identity(self, trust_domain: str) -> Identity:
        return Identity(trust_domain, self.namespace, self.service_account)


def workload_uid(namespace: str, name: str) -> str:
    return f"{CLUSTER_ID}//Pod/{namespace}/{name}"


# --- Parsing ---


def parse_namespace(name: str, obj: Mapping[str, Any]) -> Namespace:
    ref = ObjectRef("Namespace", "", name)
    meta = mapping(ref, obj.get("metadata"), "metadata")
    return Namespace(name=name, labels=string_map(ref, meta.get("labels"), "metadata.labels"))


def parse_pod(namespace: str, name: str, obj: Mapping[str, Any]) -> Pod:
    ref = ObjectRef("Pod", namespace, name)
    meta = mapping(ref, obj.get("metadata"), "metadata")
    spec = mapping(ref, obj.get("spec"), "spec")
    status = mapping(ref, obj.get("status"), "status")
    labels = string_map(ref, meta.get("labels"), "metadata.labels")
    annotations = string_map(ref, meta.get("annotations"), "metadata.annotations")

    service_account = _service_account(ref, namespace, spec)
    phase = string(ref, status.get("phase"), "status.phase")
    workload_name, workload_type = _workload_name_and_type(ref, meta, labels, name)
    return Pod(
        namespace=namespace,
        name=name,
        labels=labels,
        addresses=_addresses(ref, status),
        node=string(ref, spec.get("nodeName"), "spec.nodeName"),
        service_account=service_account,
        host_network=boolean(ref, spec.get("hostNetwork"), "spec.hostNetwork"),
        has_sidecar=SIDECAR_STATUS_ANNOTATION in annotations,
        redirection=annotations.get(REDIRECTION_ANNOTATION),
        healthy=phase == "Running" and _is_ready(ref, status),
        terminating=bool(meta.get("deletionTimestamp")),
        finished=phase in _TERMINAL_PHASES,
        workload_name=workload_name,
        workload_type=workload_type,
        container_ports=_named_container_ports(ref, spec),
    )


def _service_account(ref: ObjectRef, namespace: str, spec: Mapping[str, Any]) -> str:
    field = "spec.serviceAccountName"
    account = string(ref, spec.get("serviceAccountName"), field)
    if not account:  # the deprecated alias, still filled in by some tools
        field = "spec.serviceAccount"
        account = string(ref, spec.get("serviceAccount"), field) or DEFAULT_SERVICE_ACCOUNT
    try:
        Identity(_VALIDATION_TRUST_DOMAIN, namespace, DEFAULT_SERVICE_ACCOUNT)
    except InvalidIdentity as exc:
        raise ref.error("metadata.namespace", str(exc)) from None
    try:
        Identity(_VALIDATION_TRUST_DOMAIN, namespace, account)
    except InvalidIdentity as exc:
        raise ref.error(field, str(exc)) from None
    return account


def _addresses(ref: ObjectRef, status: Mapping[str, Any]) -> tuple[bytes, ...]:
    found: list[tuple[str, str]] = []
    for i, entry in enumerate(sequence(ref, status.get("podIPs"), "status.podIPs")):
        path = f"status.podIPs[{i}].ip"
        found.append(
            (path, string(ref, mapping(ref, entry, f"status.podIPs[{i}]").get("ip"), path))
        )
    if not found:
        found.append(("status.podIP", string(ref, status.get("podIP"), "status.podIP")))
    addresses: list[bytes] = []
    for path, text in found:
        if not text:
            continue
        try:
            packed = ipaddress.ip_address(text).packed
        except ValueError:
            raise ref.error(path, f"{text!r} is not an IP address") from None
        if packed not in addresses:
            addresses.append(packed)
    return tuple(addresses)


def _is_ready(ref: ObjectRef, status: Mapping[str, Any]) -> bool:
    for i, entry in enumerate(sequence(ref, status.get("conditions"), "status.conditions")):
        condition = mapping(ref, entry, f"status.conditions[{i}]")
        if condition.get("type") == "Ready":
            return condition.get("status") == "True"
    return False


def _named_container_ports(ref: ObjectRef, spec: Mapping[str, Any]) -> dict[str, int]:
    ports: dict[str, int] = {}
    for i, entry in enumerate(sequence(ref, spec.get("containers"), "spec.containers")):
        container = mapping(ref, entry, f"spec.containers[{i}]")
        base = f"spec.containers[{i}].ports"
        for j, port_entry in enumerate(sequence(ref, container.get("ports"), base)):
            port = mapping(ref, port_entry, f"{base}[{j}]")
            port_name = string(ref, port.get("name"), f"{base}[{j}].name")
            if port_name and port_name not in ports:
                ports[port_name] = port_number(
                    ref, port.get("containerPort"), f"{base}[{j}].containerPort"
                )
    return ports


def _workload_name_and_type(
    ref: ObjectRef, meta: Mapping[str, Any], labels: Mapping[str, str], pod_name: str
) -> tuple[str, int]:
    owners = [
        mapping(ref, entry, f"metadata.ownerReferences[{i}]")
        for i, entry in enumerate(
            sequence(ref, meta.get("ownerReferences"), "metadata.ownerReferences")
        )
    ]
    if not owners:
        return pod_name, workload_pb2.WorkloadType.POD
    # The controller owns the pod; hand-written objects may omit the flag, so fall back.
    index, owner = next(
        ((i, o) for i, o in enumerate(owners) if o.get("controller") is True), (0, owners[0])
    )
    path = f"metadata.ownerReferences[{index}]"
    kind = string(ref, owner.get("kind"), f"{path}.kind")
    owner_name = string(ref, owner.get("name"), f"{path}.name") or pod_name
    if kind == "ReplicaSet":
        template_hash = labels.get("pod-template-hash", "")
        if template_hash and owner_name.endswith(f"-{template_hash}"):
            return owner_name[: -len(template_hash) - 1], workload_pb2.WorkloadType.DEPLOYMENT
        base, dash, _ = owner_name.rpartition("-")
        return (base if dash and base else owner_name), workload_pb2.WorkloadType.DEPLOYMENT
    if kind == "Job":
        cron = _CRONJOB_JOB_NAME.fullmatch(owner_name)
        if cron:
            return cron.group(1), workload_pb2.WorkloadType.CRONJOB
        return owner_name, workload_pb2.WorkloadType.JOB
    # StatefulSet, DaemonSet, ...: the proto has no type for them; Istio reports POD.
    return owner_name, workload_pb2.WorkloadType.POD


# --- Building ---


def is_enrolled(pod: Pod, namespace_dataplane_mode: str) -> bool:
    """Whether ztunnel captures the pod (and so reaches it with HBONE)."""
    if pod.has_sidecar or pod.host_network:
        return False
    if pod.redirection is not None:
        # A node agent reports capture: peers switch to HBONE only once the pod's ztunnel
        # really listens (and back before it stops), so no connection falls in between.
        return pod.redirection == "enabled"
    return is_captured(pod.labels, {DATAPLANE_MODE_LABEL: namespace_dataplane_mode})


def canonical_service(labels: Mapping[str, str], workload_name: str) -> tuple[str, str]:
    """(canonical name, canonical revision), as Istio's `kubelabels.CanonicalService`."""
    name = next((labels[k] for k in _CANONICAL_NAME_LABELS if labels.get(k)), workload_name)
    revision = next(
        (labels[k] for k in _CANONICAL_REVISION_LABELS if labels.get(k)),
        _DEFAULT_CANONICAL_REVISION,
    )
    return name, revision


def build_workload(
    pod: Pod,
    *,
    namespace_dataplane_mode: str,
    services: Mapping[str, workload_pb2.PortList],
    authorization_policies: Sequence[str],
    trust_domain: str,
) -> workload_pb2.Workload:
    """The Workload for a pod that `has_workload`."""
    canonical_name, canonical_revision = canonical_service(pod.labels, pod.workload_name)
    workload = workload_pb2.Workload(
        uid=pod.uid,
        name=pod.name,
        namespace=pod.namespace,
        addresses=pod.addresses,
        tunnel_protocol=(
            workload_pb2.TunnelProtocol.HBONE
            if is_enrolled(pod, namespace_dataplane_mode)
            else workload_pb2.TunnelProtocol.NONE
        ),
        trust_domain=trust_domain,
        service_account=pod.service_account,
        node=pod.node,
        canonical_name=canonical_name,
        canonical_revision=canonical_revision,
        workload_type=pod.workload_type,
        workload_name=pod.workload_name,
        authorization_policies=authorization_policies,
        status=workload_pb2.WorkloadStatus.HEALTHY
        if pod.healthy
        else workload_pb2.WorkloadStatus.UNHEALTHY,
        cluster_id=CLUSTER_ID,
        network_mode=(
            workload_pb2.NetworkMode.HOST_NETWORK
            if pod.host_network
            else workload_pb2.NetworkMode.STANDARD
        ),
    )
    for key, ports in services.items():
        workload.services[key].CopyFrom(ports)
    return workload
