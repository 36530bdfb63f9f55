"""ambientctl/check: `ambientctl check [--pre]`, like `linkerd check`.

    ambientctl check [--pre] [--kubeconfig FILE] [--context NAME] [-i NAMESPACE]

Against a cluster when `--kubeconfig` is given or $KUBECONFIG is set; otherwise against the
one-machine mesh of `--run-dir`. One line per check, grouped in sections:

    √ name                                   passed (some add what they saw)
    ‼ name: what is odd and a hint           a warning; does not fail the run
    × name: what is wrong and a hint         failed

Exit status 0 when nothing failed, 1 otherwise. Every way a cluster can be half there (API
down, no permission, namespace or CRDs missing, objects without status) is a failed line,
never a traceback. `-i/--namespace` names the control plane's namespace (default
istio-system), like linkerd's `-L`.

`--pre` checks a cluster before `ambientctl install`: the API answers and is at least
v1.20 (MINIMUM_KUBERNETES: the oldest version the tests run against, scripts/kube-apiserver.sh;
nothing the mesh uses is newer: it derives endpoints from Pods, not EndpointSlices), the
user may create what install creates (CRDs, ClusterRoles, ClusterRoleBindings), and the
namespace holds none of the mesh's objects yet.

The verdicts are pure functions over the objects as the API server sends them (camelCase
JSON) or over files; the rest fetches them.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import kubernetes.client
import kubernetes.config
import urllib3
import yaml
from cryptography import x509
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from ambientctl.runtime import RunDir, running_supervisor
from ambientctl.runtime.manifests import is_builtin
from ambientctl.runtime.netns import NetworkError, RunState, node_netns
from ambientctl.runtime.store import ObjectStore
from ambientctl.waypoints import WaypointInfo, list_waypoints
from meshcore.enrolment import DATAPLANE_MODE_AMBIENT, DATAPLANE_MODE_LABEL
from meshcore.log import get_logger

_log = get_logger("ambientctl.check")

DEFAULT_NAMESPACE = "istio-system"
MINIMUM_KUBERNETES = (1, 20)
EXPIRY_WARNING = timedelta(days=30)
ISTIOD = "istiod"
ZTUNNEL = "ztunnel"
CA_SECRET = "istio-ca-secret"
REQUIRED_CRDS: tuple[str, ...] = (
    "waypoints.istiodlite.io",
    "authorizationpolicies.security.istio.io",
    "peerauthentications.security.istio.io",
    "virtualservices.networking.istio.io",
    "destinationrules.networking.istio.io",
    "gateways.gateway.networking.k8s.io",
    "httproutes.gateway.networking.k8s.io",
    "gatewayclasses.gateway.networking.k8s.io",
)
WAYPOINT_API = ("istiodlite.io", "v1alpha1", "waypoints")
INSTALL_HINT = "install with `ambientctl install | kubectl apply -f -`"
# Per API call: a server that accepts and never answers must not hang `check`.
_REQUEST_TIMEOUT = (5, 15)
_HTTP_TIMEOUT = 2.0
_LISTED_NAMES = 8


@dataclass(frozen=True, kw_only=True)
class Result:
    """One check's line."""

    name: str
    ok: bool
    detail: str = ""  # what was seen (passes) or what is wrong and a hint (failures)
    warning: bool = False  # ok but worth a look: printed with ‼

    def line(self) -> str:
        mark = "×" if not self.ok else "‼" if self.warning else "√"
        return f"{mark} {self.name}{': ' + self.detail if self.detail else ''}"


def passed(name: str, detail: str = "") -> Result:
    return Result(name=name, ok=True, detail=detail)


def failed(name: str, detail: str) -> Result:
    return Result(name=name, ok=False, detail=detail)


@dataclass(frozen=True)
class Section:
    """A heading; the results after it belong to it."""

    title: str


Report = Iterator[Section | Result]


# --- pure verdicts ---


def version_result(git_version: str, minimum: tuple[int, int] = MINIMUM_KUBERNETES) -> Result:
    name = f"Kubernetes is at least v{minimum[0]}.{minimum[1]}"
    match = re.match(r"v?(\d+)\.(\d+)", git_version)
    if not match:
        return failed(name, f"the API server reports version {git_version!r}, which is not vMAJOR.MINOR")
    if (int(match.group(1)), int(match.group(2))) < minimum:
        return failed(name, f"the API server is {git_version}; upgrade the cluster")
    return passed(name, git_version)


def crd_result(crds: Mapping[str, Mapping[str, Any]], required: Sequence[str]) -> Result:
    """`crds`: the cluster's CustomResourceDefinitions by name."""
    name = "the mesh's CRDs are installed and Established"
    missing = [crd for crd in required if crd not in crds]
    # A CRD being deleted still answers, Established, until its objects are gone.
    deleting = [crd for crd in required if crd in crds and (crds[crd].get("metadata") or {}).get("deletionTimestamp")]
    pending = [
        crd for crd in required
        if crd in crds and crd not in deleting and not _condition_true(crds[crd], "Established")
    ]
    if missing or deleting or pending:
        problems = (
            ([f"missing {', '.join(missing)}"] if missing else [])
            + ([f"being deleted {', '.join(deleting)}"] if deleting else [])
            + ([f"not Established {', '.join(pending)}"] if pending else [])
        )
        return failed(name, f"{'; '.join(problems)}; {INSTALL_HINT}")
    return passed(name, f"{len(required)} CRDs")


def deployment_result(namespace: str, name: str, deployment: Mapping[str, Any] | None) -> Result:
    title = f"{name} Deployment is available"
    if deployment is None:
        return failed(title, f"deployment {namespace}/{name} not found; {INSTALL_HINT}")
    spec, status = deployment.get("spec") or {}, deployment.get("status") or {}
    wanted = spec.get("replicas", 1)
    available = status.get("availableReplicas") or 0
    condition = _condition(deployment, "Available")
    if available >= 1 and condition is not None and condition.get("status") == "True":
        return passed(title, f"{available}/{wanted} replicas ready")
    why = f" (Available={condition.get('status')}: {condition.get('message') or condition.get('reason')})" if condition else ""
    return failed(title, f"{available}/{wanted} replicas available{why}; see `kubectl -n {namespace} describe deployment {name}` and its pods' logs")


def daemonset_result(namespace: str, name: str, daemonset: Mapping[str, Any] | None, nodes: int) -> Result:
    title = f"{name} DaemonSet is ready on every node"
    if daemonset is None:
        return failed(title, f"daemonset {namespace}/{name} not found; {INSTALL_HINT}")
    status = daemonset.get("status") or {}
    desired, ready = status.get("desiredNumberScheduled") or 0, status.get("numberReady") or 0
    if nodes == 0:
        return failed(title, "the cluster has no Nodes")
    if ready == desired == nodes:
        return passed(title, f"{ready}/{nodes} nodes")
    hint = f"see `kubectl -n {namespace} get pods -l app={name} -o wide`"
    if desired < nodes:
        return failed(title, f"scheduled on {desired} of {nodes} nodes ({ready} ready): check its tolerations and node selector; {hint}")
    return failed(title, f"ready on {ready} of {nodes} nodes; {hint}")


def certificate_result(name: str, pem: bytes, now: datetime, where: str) -> Result:
    """The first certificate of `pem` (from `where`) is valid now and beyond EXPIRY_WARNING."""
    try:
        certificate = x509.load_pem_x509_certificates(pem)[0]
    except ValueError as exc:
        return failed(name, f"{where} holds no readable PEM certificate ({exc})")
    not_before, not_after = certificate.not_valid_before_utc, certificate.not_valid_after_utc
    expires = f"{not_after:%Y-%m-%d %H:%M} UTC"
    if now < not_before:
        return failed(name, f"{where} is not valid before {not_before:%Y-%m-%d %H:%M} UTC; check the clocks")
    if now >= not_after:
        return failed(name, f"{where} expired at {expires}; rotate the root CA")
    left = not_after - now
    if left < EXPIRY_WARNING:
        return failed(name, f"{where} expires at {expires}, in {_days(left)} (under {EXPIRY_WARNING.days} days); rotate the root CA")
    return passed(name, f"expires {expires} (in {_days(left)})")


def enrolled_result(namespaces: Sequence[str], hint: str) -> Result:
    title = "enrolled namespaces"
    if not namespaces:
        return Result(name=title, ok=True, warning=True, detail=f"none is labelled {DATAPLANE_MODE_LABEL}={DATAPLANE_MODE_AMBIENT}; {hint}")
    names = sorted(namespaces)
    listed = ", ".join(names[:_LISTED_NAMES]) + (f" and {len(names) - _LISTED_NAMES} more" if len(names) > _LISTED_NAMES else "")
    return passed(title, f"{len(names)}: {listed}")


def waypoints_result(waypoints: Sequence[Mapping[str, Any]]) -> Result:
    """Every Waypoint has status condition Programmed=True."""
    title = "waypoints are programmed"
    waiting = []
    for waypoint in waypoints:
        condition = _condition(waypoint, "Programmed")
        if condition is None or condition.get("status") != "True":
            metadata = waypoint.get("metadata") or {}
            why = f"{condition.get('reason')}: {condition.get('message')}" if condition else "no Programmed condition yet"
            waiting.append(f"{metadata.get('namespace')}/{metadata.get('name')} ({why})")
    if waiting:
        return failed(title, f"{len(waiting)} of {len(waypoints)} not programmed: {'; '.join(waiting)}")
    return passed(title, f"{len(waypoints)} waypoints" if waypoints else "none defined")


def local_waypoints_result(waypoints: Sequence[WaypointInfo]) -> Result:
    title = "waypoints are ready"
    waiting = [f"{w.namespace}/{w.name} ({w.ready_pods}/{w.pods} pods ready)" for w in waypoints if w.ready_pods < 1]
    if waiting:
        return failed(title, f"{'; '.join(waiting)}; see `ambientctl get pods -n NAMESPACE`")
    return passed(title, f"{len(waypoints)} waypoints" if waypoints else "none defined")


def _condition(obj: Mapping[str, Any], kind: str) -> Mapping[str, Any] | None:
    for condition in (obj.get("status") or {}).get("conditions") or ():
        if isinstance(condition, dict) and condition.get("type") == kind:
            return condition
    return None


def _condition_true(obj: Mapping[str, Any], kind: str) -> bool:
    condition = _condition(obj, kind)
    return condition is not None and condition.get("status") == "True"


def _days(delta: timedelta) -> str:
    return f"{delta.days} days" if delta.days >= 2 else f"{delta.total_seconds() / 3600:.0f} hours"


# --- against a cluster ---


class _Unavailable(Exception):
    """An API call failed; the message says how, for the check's line."""


class _Cluster:
    """The API calls `check` makes, each answering the JSON the server sent or raising _Unavailable."""

    def __init__(self, api_client: kubernetes.client.ApiClient) -> None:
        self.url = api_client.configuration.host
        self.core = kubernetes.client.CoreV1Api(api_client)
        self.apps = kubernetes.client.AppsV1Api(api_client)
        self.extensions = kubernetes.client.ApiextensionsV1Api(api_client)
        self.custom = kubernetes.client.CustomObjectsApi(api_client)
        self.authorization = kubernetes.client.AuthorizationV1Api(api_client)
        self.version = kubernetes.client.VersionApi(api_client)

    def call(self, fn: Callable[..., Any], *args: Any, missing_ok: bool = False, **kwargs: Any) -> Any:
        """`fn(*args)` as JSON; None for 404 when `missing_ok`."""
        try:
            response = fn(*args, **kwargs, _preload_content=False, _request_timeout=_REQUEST_TIMEOUT)
            try:
                return json.loads(response.data)
            finally:
                response.release_conn()
        except ApiException as exc:
            if exc.status == 404 and missing_ok:
                return None
            raise _Unavailable(_api_problem(exc)) from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise _Unavailable(f"cannot reach the API server at {self.url}: {_root_cause(exc)}") from exc
        except ValueError as exc:
            raise _Unavailable(f"{self.url} answered something that is not JSON: is it a Kubernetes API server? ({exc})") from exc


def _api_problem(exc: ApiException) -> str:
    try:
        message = json.loads(exc.body or b"").get("message") or exc.reason
    except (ValueError, AttributeError):
        message = exc.reason
    if exc.status == 401:
        return f"unauthorized: {message}; the kubeconfig's credentials were refused (expired token?)"
    if exc.status == 403:
        return f"forbidden: {message}; the kubeconfig's user needs read access to it"
    return f"{exc.status} {message}"


def _root_cause(exc: BaseException) -> str:
    # urllib3 wraps the socket error in MaxRetryError(reason=NewConnectionError(...)).
    reason = getattr(exc, "reason", None)
    return str(reason) if isinstance(reason, BaseException) else str(exc)


def _guarded(name: str, verdict: Callable[[], Result]) -> Result:
    """`verdict()`, or a failed line when an API call inside it failed or answered oddly."""
    try:
        return verdict()
    except _Unavailable as exc:
        return failed(name, str(exc))
    except (KeyError, TypeError, AttributeError) as exc:
        _log.warning("unexpected answer from the API server", check=name, error=repr(exc))
        return failed(name, f"the API server's answer lacks what this check reads ({exc!r})")


def cluster_checks(kubeconfig: Path, context: str | None, namespace: str, *, pre: bool, now: datetime) -> Report:
    yield Section("kubernetes-api")
    where = f"{kubeconfig}{f' context {context}' if context else ''}"
    try:
        configuration = kubernetes.client.Configuration()
        configuration.retries = 0  # a check reports a refused connection at once, it does not retry
        api_client = kubernetes.config.new_client_from_config(
            config_file=str(kubeconfig), context=context, persist_config=False, client_configuration=configuration
        )
    except (ConfigException, OSError, yaml.YAMLError, TypeError, KeyError) as exc:
        yield failed("can initialize the client", f"kubeconfig {where}: {exc}")
        return
    with api_client:
        yield passed("can initialize the client", where)
        cluster = _Cluster(api_client)
        try:
            version = cluster.call(cluster.version.get_code)
        except _Unavailable as exc:
            yield failed("can query the Kubernetes API", str(exc))
            return  # nothing else can be checked
        yield passed("can query the Kubernetes API", cluster.url)
        yield Section("kubernetes-version")
        yield version_result(str(version.get("gitVersion", "") if isinstance(version, dict) else version))
        yield from _pre_checks(cluster, namespace) if pre else _install_checks(cluster, namespace, now)


def _pre_checks(cluster: _Cluster, namespace: str) -> Report:
    yield Section("pre-install")
    for group, resource, what in (
        ("apiextensions.k8s.io", "customresourcedefinitions", "CustomResourceDefinitions"),
        ("rbac.authorization.k8s.io", "clusterroles", "ClusterRoles"),
        ("rbac.authorization.k8s.io", "clusterrolebindings", "ClusterRoleBindings"),
    ):
        yield _guarded(f"can create {what}", lambda group=group, resource=resource, what=what: _may_create(cluster, group, resource, what))
    name = f"namespace {namespace} holds none of the mesh's objects"
    yield _guarded(name, lambda: _leftovers(cluster, namespace, name))


def _may_create(cluster: _Cluster, group: str, resource: str, what: str) -> Result:
    review = {"spec": {"resourceAttributes": {"group": group, "resource": resource, "verb": "create"}}}
    answer = cluster.call(cluster.authorization.create_self_subject_access_review, review)
    status = answer.get("status") or {}
    if status.get("allowed"):
        return passed(f"can create {what}")
    why = status.get("reason") or status.get("evaluationError") or "not allowed"
    return failed(f"can create {what}", f"{why}; install needs a cluster admin (e.g. group system:masters)")


def _leftovers(cluster: _Cluster, namespace: str, name: str) -> Result:
    if cluster.call(cluster.core.read_namespace, namespace, missing_ok=True) is None:
        return passed(name, "it does not exist yet")
    found = [
        what
        for what, read in (
            (f"deployment {ISTIOD}", lambda: cluster.call(cluster.apps.read_namespaced_deployment, ISTIOD, namespace, missing_ok=True)),
            (f"daemonset {ZTUNNEL}", lambda: cluster.call(cluster.apps.read_namespaced_daemon_set, ZTUNNEL, namespace, missing_ok=True)),
            (f"secret {CA_SECRET}", lambda: cluster.call(cluster.core.read_namespaced_secret, CA_SECRET, namespace, missing_ok=True)),
        )
        if read() is not None
    ]
    if found:
        return failed(name, f"it has {', '.join(found)}: the mesh is already installed; run `ambientctl check` instead, or uninstall first")
    return passed(name, "it exists and is empty of them")


def _install_checks(cluster: _Cluster, namespace: str, now: datetime) -> Report:
    yield Section("custom resources")
    yield _guarded("the mesh's CRDs are installed and Established", lambda: crd_result(
        {item["metadata"]["name"]: item for item in cluster.call(cluster.extensions.list_custom_resource_definition).get("items") or ()},
        REQUIRED_CRDS,
    ))  # fmt: skip
    yield Section("control plane")
    try:
        present = cluster.call(cluster.core.read_namespace, namespace, missing_ok=True) is not None
    except _Unavailable as exc:
        yield failed(f"namespace {namespace} exists", str(exc))
        present = False
    else:
        yield passed(f"namespace {namespace} exists") if present else failed(f"namespace {namespace} exists", f"not found; {INSTALL_HINT} (or pass -i NAMESPACE)")
    if present:
        yield _guarded(f"{ISTIOD} Deployment is available", lambda: deployment_result(
            namespace, ISTIOD, cluster.call(cluster.apps.read_namespaced_deployment, ISTIOD, namespace, missing_ok=True)
        ))  # fmt: skip
        yield _guarded(f"{ZTUNNEL} DaemonSet is ready on every node", lambda: daemonset_result(
            namespace, ZTUNNEL,
            cluster.call(cluster.apps.read_namespaced_daemon_set, ZTUNNEL, namespace, missing_ok=True),
            len(cluster.call(cluster.core.list_node).get("items") or ()),
        ))  # fmt: skip
        yield Section("certificates")
        yield _guarded("root CA certificate is valid and not near expiry", lambda: _ca_secret(cluster, namespace, now))
    yield Section("data plane")
    yield _guarded("enrolled namespaces", lambda: enrolled_result(
        [item["metadata"]["name"] for item in cluster.call(
            cluster.core.list_namespace, label_selector=f"{DATAPLANE_MODE_LABEL}={DATAPLANE_MODE_AMBIENT}"
        ).get("items") or ()],
        f"`kubectl label namespace NAME {DATAPLANE_MODE_LABEL}={DATAPLANE_MODE_AMBIENT}`",
    ))  # fmt: skip
    yield _guarded("waypoints are programmed", lambda: _waypoints(cluster))


def _ca_secret(cluster: _Cluster, namespace: str, now: datetime) -> Result:
    name = "root CA certificate is valid and not near expiry"
    secret = cluster.call(cluster.core.read_namespaced_secret, CA_SECRET, namespace, missing_ok=True)
    if secret is None:
        return failed(name, f"secret {namespace}/{CA_SECRET} not found: istiod creates it on first start; check its logs")
    encoded = (secret.get("data") or {}).get("ca-cert.pem")
    if not encoded:
        return failed(name, f"secret {namespace}/{CA_SECRET} has no key ca-cert.pem")
    try:
        pem = base64.b64decode(encoded, validate=True)
    except ValueError:
        return failed(name, f"secret {namespace}/{CA_SECRET} key ca-cert.pem is not base64")
    return certificate_result(name, pem, now, f"secret {namespace}/{CA_SECRET} ca-cert.pem")


def _waypoints(cluster: _Cluster) -> Result:
    listing = cluster.call(cluster.custom.list_cluster_custom_object, *WAYPOINT_API, missing_ok=True)
    if listing is None:
        return failed("waypoints are programmed", f"the Waypoint CRD ({WAYPOINT_API[2]}.{WAYPOINT_API[0]}) is not served; {INSTALL_HINT}")
    return waypoints_result(listing.get("items") or [])


# --- against the one-machine mesh ---


def local_checks(run_dir: RunDir, *, now: datetime) -> Report:
    # Imported here: ambientctl.mesh pulls in the mesh's components, which a cluster check never needs.
    from ambientctl.mesh import ISTIOD_ADDRESS, istiod_dir

    yield Section("one-machine runtime")
    name = "the one-machine mesh is up"
    try:
        supervisor = running_supervisor(run_dir)
        state = RunState.load(run_dir.state_file)
    except NetworkError as exc:
        yield failed(name, str(exc))
        return
    if supervisor is None:
        yield failed(name, f"no `ambientctl up` is running for {run_dir.root}; start one (or pass --run-dir, or --kubeconfig for a cluster)")
        return
    yield passed(name, f"ambientctl up, pid {supervisor.pid}")
    yield Section("control plane")
    url = f"http://{ISTIOD_ADDRESS}:15014/ready"
    yield _http_ready("istiod_lite is ready", url, f"see {run_dir.service_log('cluster', 'istiod-lite')}")
    nodes = _local_nodes(run_dir, state)
    if not nodes:
        yield failed("a ztunnel runs on every node", f"no node of {run_dir.root} has a ztunnel configuration")
    for node, address in nodes:
        yield _http_ready(
            f"ztunnel on {node} is ready", f"http://{address}:15021/healthz/ready", f"see {run_dir.service_log(node, 'ztunnel')}"
        )
    yield Section("certificates")
    ca_cert = istiod_dir(run_dir.root) / "ca" / "ca-cert.pem"
    name = "root CA certificate is valid and not near expiry"
    try:
        pem = ca_cert.read_bytes()
    except OSError as exc:
        yield failed(name, f"cannot read {ca_cert}: {exc.strerror}")
    else:
        yield certificate_result(name, pem, now, str(ca_cert))
    yield Section("data plane")
    store = ObjectStore(run_dir.store)
    enrolled = [
        key.name for key, body in store.objects().items()
        if is_builtin(key, "Namespace") and (body["metadata"].get("labels") or {}).get(DATAPLANE_MODE_LABEL) == DATAPLANE_MODE_AMBIENT
    ]  # fmt: skip
    yield enrolled_result(enrolled, f"`ambientctl label namespace NAME {DATAPLANE_MODE_LABEL}={DATAPLANE_MODE_AMBIENT}`")
    yield local_waypoints_result(list_waypoints(store))


def _local_nodes(run_dir: RunDir, state: RunState) -> list[tuple[str, str]]:
    """(node, its address) for every node of the running mesh, from the ztunnel configs `up` wrote."""
    nodes = []
    for config in sorted((run_dir.root / "nodes").glob("*/ztunnel.yaml")):
        node = config.parent.name
        if node_netns(node) not in state.netns:
            continue  # a node of an earlier, larger run
        try:
            address = (yaml.safe_load(config.read_text()) or {}).get("address")
        except (OSError, yaml.YAMLError) as exc:
            _log.warning("cannot read a ztunnel configuration", path=str(config), error=str(exc))
            continue
        if isinstance(address, str):
            nodes.append((node, address))
    return nodes


def _http_ready(name: str, url: str, hint: str) -> Result:
    try:
        with urllib.request.urlopen(url, timeout=_HTTP_TIMEOUT):
            return passed(name, url)
    except urllib.error.HTTPError as exc:
        return failed(name, f"{url} answered {exc.code}; {hint}")
    except (OSError, ValueError) as exc:
        return failed(name, f"{url}: {_root_cause(exc)}; {hint}")


# --- the command ---


def register(commands: Any, common: argparse.ArgumentParser) -> None:
    check = commands.add_parser("check", parents=[common], help="check a cluster or the one-machine mesh (like `linkerd check`)")
    check.add_argument("--pre", action="store_true", help="check that a cluster is ready for `ambientctl install`")
    check.add_argument("--kubeconfig", type=Path, help="check this cluster (default: $KUBECONFIG; neither: the one-machine mesh)")
    check.add_argument("--context", help="the kubeconfig context (default: its current one)")
    check.add_argument("-i", "--namespace", default=DEFAULT_NAMESPACE, help=f"the control plane's namespace (default: {DEFAULT_NAMESPACE})")
    check.set_defaults(command=run_check)


def run_check(args: argparse.Namespace, run_dir: RunDir) -> int:
    now = datetime.now(UTC)
    kubeconfig = args.kubeconfig or (Path(os.environ["KUBECONFIG"]) if os.environ.get("KUBECONFIG") else None)
    if kubeconfig is not None:
        report = cluster_checks(kubeconfig, args.context, args.namespace, pre=args.pre, now=now)
    elif args.pre:
        print("error: --pre checks a cluster: pass --kubeconfig FILE or set KUBECONFIG", file=sys.stderr)
        return 2
    else:
        report = local_checks(run_dir, now=now)
    return print_report(report)


def print_report(report: Iterable[Section | Result]) -> int:
    """Print each line as its check finishes; 0 when none failed."""
    failures = 0
    first = True
    for item in report:
        if isinstance(item, Section):
            print(("" if first else "\n") + f"{item.title}\n{'-' * len(item.title)}", flush=True)
        else:
            print(item.line(), flush=True)
            failures += not item.ok
        first = False
    print(f"\nStatus check results are {'×' if failures else '√'}")
    return 1 if failures else 0
