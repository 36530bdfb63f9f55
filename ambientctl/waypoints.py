"""ambientctl/waypoints: `ambientctl waypoint apply|list|delete`, like `istioctl waypoint`.

`apply` stores a `Waypoint` (istiodlite.io/v1alpha1, trafficType service) and, as istiod's
deployment controller does for Kubernetes, the objects that run it in its namespace: a
ServiceAccount, a Service (port 15008 `mesh`, appProtocol hbone) and a Deployment whose pods
carry `gateway.networking.k8s.io/gateway-name` and `istio.io/dataplane-mode: none`.

A waypoint pod needs its own IP (xDS node id, listen address) and its node's token (the CA
signs only identities of pods on the token's node), and the runtime knows both only once the
pod is scheduled; it gives pods no such environment. So the pod runs this module
(`python -m ambientctl.waypoints --run-dir R --namespace NS --name W`), which reads its own
Pod (HOSTNAME) from the object store - the runtime records nodeName and podIP before it starts
containers - writes the waypoint's config file and execs `python -m waypoint --config FILE`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ambientctl.runtime import RunDir
from ambientctl.runtime.addressing import ROUTER_LINK_ADDRESS
from ambientctl.runtime.manifests import Manifest, ObjectKey, is_builtin
from ambientctl.runtime.store import Change, ObjectStore, StoreError, namespace_key

WAYPOINT_GROUP = "istiodlite.io"
WAYPOINT_API_VERSION = f"{WAYPOINT_GROUP}/v1alpha1"
DEFAULT_WAYPOINT_NAME = "waypoint"
GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"
USE_WAYPOINT_LABEL = "istio.io/use-waypoint"
DATAPLANE_MODE_LABEL = "istio.io/dataplane-mode"
HBONE_PORT = 15008
ISTIOD_XDS_ADDRESS = f"{ROUTER_LINK_ADDRESS}:15012"  # where ambientctl/mesh.py runs istiod_lite
_SOURCE = "ambientctl waypoint apply"
_REPO = Path(__file__).resolve().parents[1]


class WaypointPodError(Exception):
    """The waypoint pod cannot find what it needs to start; the message names the object."""


@dataclass(frozen=True, slots=True)
class WaypointInfo:
    """One row of `waypoint list`."""

    namespace: str
    name: str
    traffic_type: str
    ready_pods: int
    pods: int


def waypoint_manifests(run_dir: RunDir, namespace: str, name: str) -> list[Manifest]:
    """The Waypoint and the ServiceAccount, Service and Deployment that run it."""
    pod_labels = {GATEWAY_NAME_LABEL: name, DATAPLANE_MODE_LABEL: "none"}
    bodies: list[dict[str, Any]] = [
        {
            "apiVersion": WAYPOINT_API_VERSION,
            "kind": "Waypoint",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"trafficType": "service"},
        },
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": namespace}},
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": namespace, "labels": {GATEWAY_NAME_LABEL: name}},
            "spec": {
                "selector": {GATEWAY_NAME_LABEL: name},
                "ports": [{"name": "mesh", "port": HBONE_PORT, "targetPort": HBONE_PORT, "appProtocol": "hbone"}],
            },
        },
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name, "namespace": namespace, "labels": {GATEWAY_NAME_LABEL: name}},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {GATEWAY_NAME_LABEL: name}},
                "template": {
                    "metadata": {"labels": pod_labels},
                    "spec": {
                        "serviceAccountName": name,
                        "containers": [{
                            "name": "waypoint",
                            "command": [
                                sys.executable, "-m", "ambientctl.waypoints",
                                "--run-dir", str(run_dir.root), "--namespace", namespace, "--name", name,
                            ],
                            "workingDir": str(_REPO),
                            "ports": [{"name": "mesh", "containerPort": HBONE_PORT}],
                        }],
                    },
                },
            },
        },
    ]
    return [Manifest(key=key, body=body, source=_SOURCE) for key, body in zip(waypoint_keys(namespace, name), bodies)]


def waypoint_keys(namespace: str, name: str) -> list[ObjectKey]:
    """The Waypoint, ServiceAccount, Service and Deployment, in `waypoint_manifests` order."""
    return [
        ObjectKey(group=group, kind=kind, namespace=namespace, name=name)
        for group, kind in ((WAYPOINT_GROUP, "Waypoint"), ("", "ServiceAccount"), ("", "Service"), ("apps", "Deployment"))
    ]


def apply_waypoint(store: ObjectStore, run_dir: RunDir, namespace: str, name: str, *, enroll_namespace: bool) -> list[Change]:
    """Create or update the waypoint; with `enroll_namespace`, bind the namespace's Services to it."""
    if store.get(namespace_key(namespace)) is None:
        raise StoreError(f'namespace "{namespace}" not found')
    changes = store.apply(waypoint_manifests(run_dir, namespace, name))
    if enroll_namespace:
        changes.append(store.label(namespace_key(namespace), set_labels={USE_WAYPOINT_LABEL: name}, remove=(), overwrite=True))
    return changes


def delete_waypoint(store: ObjectStore, namespace: str, name: str) -> list[Change]:
    """Delete the waypoint and what runs it; a namespace bound to it is unbound."""
    keys = waypoint_keys(namespace, name)
    if store.get(keys[0]) is None:
        raise StoreError(f'waypoint "{name}" not found in namespace "{namespace}"')
    changes = store.delete(keys)
    namespace_body = store.get(namespace_key(namespace)) or {}
    if (namespace_body.get("metadata", {}).get("labels") or {}).get(USE_WAYPOINT_LABEL) == name:
        changes.append(store.label(namespace_key(namespace), set_labels={}, remove=(USE_WAYPOINT_LABEL,), overwrite=False))
    return changes


def list_waypoints(store: ObjectStore, namespace: str | None = None) -> list[WaypointInfo]:
    """Every stored Waypoint (in `namespace`, or all), with its pods' readiness."""
    objects = store.objects()
    rows = []
    for key, body in sorted(objects.items()):
        if (key.group, key.kind) != (WAYPOINT_GROUP, "Waypoint") or (namespace is not None and key.namespace != namespace):
            continue
        pods = [
            pod for pod_key, pod in objects.items()
            if is_builtin(pod_key, "Pod") and pod_key.namespace == key.namespace
            and (pod["metadata"].get("labels") or {}).get(GATEWAY_NAME_LABEL) == key.name
        ]
        ready = sum(
            1 for pod in pods
            if any(c.get("type") == "Ready" and c.get("status") == "True" for c in (pod.get("status") or {}).get("conditions") or ())
        )
        traffic = (body.get("spec") or {}).get("trafficType", "service")
        rows.append(WaypointInfo(namespace=key.namespace, name=key.name, traffic_type=traffic, ready_pods=ready, pods=len(pods)))
    return rows


# --- inside the waypoint pod ---


def waypoint_config(run_dir: RunDir, pod: dict[str, Any], name: str) -> dict[str, Any]:
    """The waypoint's settings (waypoint/settings.py) for this scheduled pod."""
    metadata, spec, status = pod["metadata"], pod.get("spec") or {}, pod.get("status") or {}
    where = f"Pod {metadata.get('namespace')}/{metadata.get('name')}"
    node, address = spec.get("nodeName"), status.get("podIP")
    if not node or not address:
        raise WaypointPodError(f"{where}: not scheduled yet (nodeName {node!r}, podIP {address!r})")
    istiod = run_dir.root / "istiod"
    return {
        "name": name,
        "namespace": metadata["namespace"],
        "address": address,
        "controlPlane": {
            "address": ISTIOD_XDS_ADDRESS,
            "tokenFile": str(istiod / "node-tokens" / f"{node}.token"),
            "rootCert": str(istiod / "ca" / "ca-cert.pem"),
        },
    }


def pod_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the waypoint pod's container: write the config, become the waypoint."""
    parser = argparse.ArgumentParser(prog="ambientctl.waypoints", description="Start a waypoint inside its pod.")
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--name", required=True)
    args = parser.parse_args(argv)
    run_dir = RunDir(args.run_dir)
    pod_name = os.environ.get("HOSTNAME", "")
    pod = ObjectStore(run_dir.store).get(ObjectKey(group="", kind="Pod", namespace=args.namespace, name=pod_name))
    try:
        if pod is None:
            raise WaypointPodError(f"Pod {args.namespace}/{pod_name!r} (from $HOSTNAME) is not in the object store {run_dir.store}")
        config = waypoint_config(run_dir, pod, args.name)
    except WaypointPodError as exc:
        print(f"waypoint pod: {exc}", file=sys.stderr)
        return 1
    path = run_dir.root / "waypoints" / args.namespace / f"{pod_name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    os.execv(sys.executable, [sys.executable, "-m", "waypoint", "--config", str(path)])


if __name__ == "__main__":
    sys.exit(pod_main())
