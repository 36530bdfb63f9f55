"""The waypoint deployment controller's pure core: what a Waypoint should run, as Istio's
deployment controller (pilot/pkg/config/kube/gateway/deploymentcontroller.go) does for an
`istio-waypoint` Gateway.

For a waypoint W in namespace NS (our `Waypoint`, or a Gateway of class istio-waypoint; the
Waypoint wins when both exist, as in translation) istiod_lite owns a ServiceAccount W, a
Service W (port 15008 `mesh`, appProtocol hbone) and a Deployment W whose pods run the
`waypoint` console script. All three carry `gateway.networking.k8s.io/gateway-name: W`,
`gateway.istio.io/managed: istiod-lite` and an ownerReference to the waypoint (controller,
blockOwnerDeletion). Only objects with both the label and such a reference are ever deleted:
another gateway controller (Istio's own) labels and owns its Deployments the same way.

The waypoint pod needs a config file with things only istiod_lite knows (its own address,
the trust domain, the root certificate) plus its pod IP, known only once it runs. istiod_lite's
RBAC has no ConfigMaps, so the config and the root go into pod-template annotations, which a
Downward API volume turns into files; the pod IP goes in as `--address $(POD_IP)`. A new
root (or config) changes the template and so rolls the pods, as it must.

`plan_waypoint` compares what exists with what should and returns the writes: server-side
applies (create or update in one call), deletes of owned objects whose owner is gone, and a
status patch. "Exists as it should" means every field we set has our value (fields the API
server defaults or others add are ignored), so our own writes coming back as watch events
plan nothing, while an edit of a field we set is planned back.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import yaml

from istiod_lite.kube.conditions import Condition, merge_conditions
from istiod_lite.model.errors import TranslationError
from istiod_lite.model.fields import ObjectRef, mapping, string
from istiod_lite.model.l7.waypoints import (
    GATEWAY_NAME_LABEL,
    HBONE_PORT,
    parse_gateway,
    parse_waypoint,
)

WAYPOINT_API_VERSION = "istiodlite.io/v1alpha1"
GATEWAY_API_VERSION = "gateway.networking.k8s.io/v1"
OWNER_KINDS = {"Waypoint": WAYPOINT_API_VERSION, "Gateway": GATEWAY_API_VERSION}
OWNER_PLURALS = {"Waypoint": "waypoints", "Gateway": "gateways"}
OWNED_KINDS = ("ServiceAccount", "Service", "Deployment")

DATAPLANE_MODE_LABEL = "istio.io/dataplane-mode"
MANAGED_LABEL = "gateway.istio.io/managed"  # Istio's key; its value names the controller
MANAGED_BY = "istiod-lite"
CONFIG_ANNOTATION = "istiodlite.io/waypoint-config"
ROOT_CERT_ANNOTATION = "istiodlite.io/root-cert"
CONFIG_DIR = "/etc/waypoint"
TOKEN_DIR = "/var/run/secrets/tokens"
TOKEN_AUDIENCE = "istio-ca"
TOKEN_SECONDS = 43200  # Istio's projected istio-token lifetime
METRICS_PORT = 15020
READINESS_PORT = 15021

# A Service name is a DNS-1035 label; Waypoint and Gateway names are looser subdomains.
_SERVICE_NAME = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_MAX_SERVICE_NAME = 63

WaypointKey = tuple[str, str]  # (namespace, name)


@dataclass(frozen=True, slots=True)
class DeploymentSettings:
    """What every waypoint Deployment gets from istiod_lite's own configuration."""

    image: str
    istiod_address: str  # HOST:PORT the waypoint dials for xDS and certificates (TLS)
    trust_domain: str
    root_cert_pem: str


@dataclass(frozen=True, slots=True)
class Owner:
    """A valid Waypoint or istio-waypoint Gateway, as far as deploying it needs."""

    kind: str
    namespace: str
    name: str
    uid: str
    generation: int | None
    replicas: int

    @property
    def reference(self) -> dict[str, Any]:
        return {
            "apiVersion": OWNER_KINDS[self.kind],
            "kind": self.kind,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


@dataclass(frozen=True, slots=True)
class StatusPatch:
    """A merge patch of the owner's status subresource."""

    kind: str
    namespace: str
    name: str
    body: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Plan:
    applies: tuple[dict[str, Any], ...] = ()  # whole objects, for server-side apply
    deletes: tuple[tuple[str, str], ...] = ()  # (kind, uid precondition) of owned objects named W
    status: StatusPatch | None = None


def read_owner(kind: str, obj: Mapping[str, Any]) -> Owner | None:
    """The owner a Waypoint or Gateway object describes; None for a Gateway of another class.

    Raises TranslationError naming the field, the same errors translation reports.
    """
    ref = ObjectRef(kind, *_namespace_name(obj))
    metadata = mapping(ref, obj.get("metadata"), "metadata")
    if kind == "Waypoint":
        parse_waypoint(ref.namespace, ref.name, obj)
        replicas = mapping(ref, obj.get("spec"), "spec").get("replicas")
        replicas = 1 if replicas is None else replicas
    elif parse_gateway(ref.namespace, ref.name, obj) is not None:
        replicas = 1
    else:
        return None
    if len(ref.name) > _MAX_SERVICE_NAME or not _SERVICE_NAME.fullmatch(ref.name):
        raise ref.error(
            "metadata.name",
            f"{ref.name!r} cannot name the waypoint's Service: use at most {_MAX_SERVICE_NAME} "
            "lower-case letters, digits and '-', starting with a letter",
        )
    uid = string(ref, metadata.get("uid"), "metadata.uid")
    if not uid:
        raise ref.error("metadata.uid", "required to own the waypoint's objects")
    generation = metadata.get("generation")
    return Owner(
        kind=kind,
        namespace=ref.namespace,
        name=ref.name,
        uid=uid,
        generation=generation if isinstance(generation, int) else None,
        replicas=replicas,
    )


def desired_objects(owner: Owner, settings: DeploymentSettings) -> dict[str, dict[str, Any]]:
    """kind -> the ServiceAccount, Service and Deployment that run the waypoint."""
    name, namespace = owner.name, owner.namespace
    selector = {GATEWAY_NAME_LABEL: name}

    def metadata() -> dict[str, Any]:
        return {
            "name": name,
            "namespace": namespace,
            "labels": {**selector, MANAGED_LABEL: MANAGED_BY},
            "ownerReferences": [owner.reference],
        }

    config = {
        "name": name,
        "namespace": namespace,
        "trustDomain": settings.trust_domain,
        "controlPlane": {
            "address": settings.istiod_address,
            "tokenFile": f"{TOKEN_DIR}/istio-token",
            "rootCert": "root-cert.pem",  # relative to the config file: the same volume
        },
    }
    container = {
        "name": "waypoint",
        "image": settings.image,
        "command": ["waypoint"],
        "args": ["--config", f"{CONFIG_DIR}/config.yaml", "--address", "$(POD_IP)"],
        "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
        "ports": [
            {"name": "mesh", "containerPort": HBONE_PORT, "protocol": "TCP"},
            {"name": "http-metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
            {"name": "status-port", "containerPort": READINESS_PORT, "protocol": "TCP"},
        ],
        "readinessProbe": {"httpGet": {"path": "/healthz/ready", "port": READINESS_PORT}},
        "volumeMounts": [
            {"name": "waypoint-config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "istio-token", "mountPath": TOKEN_DIR, "readOnly": True},
        ],
    }
    volumes = [
        {
            "name": "waypoint-config",
            "downwardAPI": {
                "items": [
                    {"path": "config.yaml", "fieldRef": {"fieldPath": _annotation(CONFIG_ANNOTATION)}},
                    {"path": "root-cert.pem", "fieldRef": {"fieldPath": _annotation(ROOT_CERT_ANNOTATION)}},
                ]
            },
        },
        {
            "name": "istio-token",
            "projected": {
                "sources": [
                    {
                        "serviceAccountToken": {
                            "audience": TOKEN_AUDIENCE,
                            "expirationSeconds": TOKEN_SECONDS,
                            "path": "istio-token",
                        }
                    }
                ]
            },
        },
    ]
    return {
        "ServiceAccount": {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": metadata()},
        "Service": {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": metadata(),
            "spec": {
                "selector": dict(selector),
                "ports": [
                    {
                        "name": "mesh",
                        "port": HBONE_PORT,
                        "targetPort": HBONE_PORT,
                        "protocol": "TCP",
                        "appProtocol": "hbone",
                    }
                ],
            },
        },
        "Deployment": {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": metadata(),
            "spec": {
                "replicas": owner.replicas,
                "selector": {"matchLabels": dict(selector)},
                "template": {
                    "metadata": {
                        "labels": {**selector, DATAPLANE_MODE_LABEL: "none"},
                        "annotations": {
                            "prometheus.io/scrape": "true",
                            "prometheus.io/port": str(METRICS_PORT),
                            "prometheus.io/path": "/metrics",
                            CONFIG_ANNOTATION: yaml.safe_dump(config, sort_keys=False),
                            ROOT_CERT_ANNOTATION: settings.root_cert_pem,
                        },
                    },
                    "spec": {
                        "serviceAccountName": name,
                        "containers": [container],
                        "volumes": volumes,
                    },
                },
            },
        },
    }


def covers(actual: Any, desired: Any) -> bool:
    """Whether `actual` has every field of `desired` with the same value (lists elementwise,
    of the same length); fields only in `actual` (server defaults, others' additions) pass."""
    if isinstance(desired, Mapping):
        return isinstance(actual, Mapping) and all(
            key in actual and covers(actual[key], value) for key, value in desired.items()
        )
    if isinstance(desired, list):
        return (
            isinstance(actual, list)
            and len(actual) == len(desired)
            and all(covers(a, d) for a, d in zip(actual, desired))
        )
    return actual == desired


def is_owned(obj: Mapping[str, Any] | None) -> bool:
    """Whether we made `obj` for a waypoint (of either kind): only those are ever deleted."""
    if obj is None:
        return False
    metadata = obj.get("metadata") or {}
    if (metadata.get("labels") or {}).get(MANAGED_LABEL) != MANAGED_BY:
        return False
    references = metadata.get("ownerReferences") or []
    return any(
        isinstance(ref, Mapping)
        and ref.get("controller") is True
        and OWNER_KINDS.get(ref.get("kind", "")) == ref.get("apiVersion")
        for ref in references
    )


def plan_waypoint(
    *,
    waypoint: Mapping[str, Any] | None,
    gateway: Mapping[str, Any] | None,
    observed: Mapping[str, Mapping[str, Any]],
    settings: DeploymentSettings,
    now: datetime,
) -> Plan:
    """The writes that bring one waypoint name's objects and status to what they should be.

    `waypoint`/`gateway`: the objects of that namespace/name, if any; `observed`: kind ->
    the ServiceAccount/Service/Deployment of that name that exist.
    """
    chosen_kind, chosen = ("Waypoint", waypoint) if waypoint is not None else ("Gateway", gateway)
    owner: Owner | None = None
    error: TranslationError | None = None
    if chosen is not None:
        try:
            owner = read_owner(chosen_kind, chosen)
        except TranslationError as exc:
            error = exc
    if chosen is None or (owner is None and error is None):  # gone, or not a waypoint Gateway
        return Plan(
            deletes=tuple(
                (kind, obj["metadata"]["uid"])
                for kind, obj in observed.items()
                if is_owned(obj) and (obj.get("metadata") or {}).get("uid")
            )
        )
    assert chosen is not None
    if error is not None:
        return Plan(status=_invalid_status(chosen_kind, chosen, error, observed, now))
    assert owner is not None
    desired = desired_objects(owner, settings)
    applies = tuple(
        desired[kind] for kind in OWNED_KINDS if not covers(observed.get(kind), desired[kind])
    )
    return Plan(applies=applies, status=_deployed_status(owner, chosen, observed.get("Service"), now))


def _deployed_status(
    owner: Owner, obj: Mapping[str, Any], service: Mapping[str, Any] | None, now: datetime
) -> StatusPatch | None:
    cluster_ip = ((service or {}).get("spec") or {}).get("clusterIP")
    address = cluster_ip if is_owned(service) and cluster_ip and cluster_ip != "None" else None
    generation = owner.generation
    accepted = Condition(
        "Accepted", True, "Accepted", "istiod-lite runs the waypoint's ServiceAccount, Service and Deployment", generation
    )
    programmed = (
        Condition("Programmed", True, "Programmed", f"Service {owner.name} has address {address}", generation)
        if address
        else Condition("Programmed", False, "Pending", f"waiting for Service {owner.name} to get a cluster IP", generation)
    )
    addresses = [{"type": "IPAddress", "value": address}] if address else []
    return _status_patch(owner.kind, obj, [accepted, programmed], now, addresses=addresses)


def _invalid_status(
    kind: str,
    obj: Mapping[str, Any],
    error: TranslationError,
    observed: Mapping[str, Mapping[str, Any]],
    now: datetime,
) -> StatusPatch | None:
    generation = (obj.get("metadata") or {}).get("generation")
    generation = generation if isinstance(generation, int) else None
    message = f"{error.field}: {error.message}" if error.field else error.message
    deployed = is_owned(observed.get("Deployment"))
    kept = "the last valid spec stays deployed" if deployed else "nothing is deployed"
    conditions = [
        Condition("Accepted", False, "Invalid", message, generation),
        Condition("Programmed", False, "Invalid", f"the spec is invalid; {kept}", generation),
    ]
    return _status_patch(kind, obj, conditions, now, addresses=None)


def _status_patch(
    kind: str,
    obj: Mapping[str, Any],
    conditions: list[Condition],
    now: datetime,
    *,
    addresses: list[dict[str, str]] | None,
) -> StatusPatch | None:
    """The patch that sets `conditions` (and `addresses` unless None); None if already so."""
    status = obj.get("status") if isinstance(obj.get("status"), Mapping) else {}
    merged, changed = merge_conditions(status.get("conditions"), conditions, now)
    body: dict[str, Any] = {"conditions": merged}
    if addresses is not None:
        changed = changed or status.get("addresses") != addresses
        body["addresses"] = addresses
    if not changed:
        return None
    namespace, name = _namespace_name(obj)
    return StatusPatch(kind=kind, namespace=namespace, name=name, body={"status": body})


def _namespace_name(obj: Mapping[str, Any]) -> tuple[str, str]:
    metadata = obj.get("metadata") if isinstance(obj.get("metadata"), Mapping) else {}
    return str(metadata.get("namespace", "")), str(metadata.get("name", ""))


def _annotation(key: str) -> str:
    return f"metadata.annotations['{key}']"
