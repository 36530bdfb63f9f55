"""`ambientctl`: bring the one-machine mesh up and down, and edit its objects like kubectl.

    ambientctl up [DIR] [--nodes N]     build nodes and pods from DIR (default: the bookinfo demo)
                                        and run them until Ctrl-C or `ambientctl down`
    ambientctl down                     remove every namespace, link, rule and process, and the objects
    ambientctl apply -f FILE|DIR        create or update objects (all or nothing)
    ambientctl delete -f FILE|DIR       delete the objects named in the files
    ambientctl get pods|services|namespaces [NAME...] [-n NS | -A] [-o wide|yaml]
    ambientctl label namespace NS k=v [k2-] [--overwrite]
    ambientctl waypoint apply -n NS [--name N] [--enroll-namespace] | list [-n NS | -A] | delete -n NS [--name N]
    ambientctl check [--pre] [--kubeconfig FILE] [-i NS]   verify this machine's mesh, or a cluster, like `linkerd check`
    ambientctl dashboard [--port 20001] [--prometheus URL]   the mesh's web page (service graph, golden signals)
    ambientctl observe [-f] [-n NS] [--pod [NS/]P] [--verdict allowed|denied] [--last K] [-o json]
                                        live connection and request events, like `hubble observe`

Every command takes `--run-dir` (default: $AMBIENT_RUN_DIR, else /var/run/ambient-mesh as root
or when it exists, else ./run). Exit status: 0 success, 1 refused or failed, 2 usage errors.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import trio
import yaml

from ambientctl import check, dashboard, install, observe, stat
from ambientctl.runtime import (
    AlreadyRunning,
    ClusterService,
    NodeService,
    RunDir,
    Runtime,
    Summary,
    running_supervisor,
    stop_supervisor,
    teardown,
)
from ambientctl.runtime.kubeproxy import KubeProxyError
from ambientctl.runtime.manifests import (
    BUILTIN_KINDS,
    DEFAULT_NAMESPACE,
    Manifest,
    ManifestErrors,
    ObjectKey,
    is_builtin,
    label_key_problem,
    label_value_problem,
    load_manifests,
)
from ambientctl.runtime.netns import (
    NODE_LINK,
    NetworkError,
    RunState,
    effective_capabilities,
    missing_capabilities,
    node_netns,
    preflight_problems,
)
from ambientctl.runtime.processes import DEFAULT_GRACE_SECONDS
from ambientctl.runtime.store import ObjectStore, StoreError
from ambientctl.waypoints import DEFAULT_WAYPOINT_NAME, USE_WAYPOINT_LABEL, apply_waypoint, delete_waypoint, list_waypoints
from meshcore.log import LEVEL_NAMES, configure_logging

# Modules with a `register(commands, common)` that adds their own subcommands (see _parser).
_COMMAND_MODULES: tuple[Any, ...] = (dashboard, stat, install, check, observe)

DEMO_DIR = Path(__file__).resolve().parent.parent / "deploy" / "examples" / "bookinfo"
SYSTEM_RUN_DIR = Path("/var/run/ambient-mesh")
# `down` gives a running `up` this long to stop its processes and remove its namespaces.
_SUPERVISOR_STOP_SECONDS = DEFAULT_GRACE_SECONDS + 20.0

# kubectl's names for the kinds `get` and `label` handle.
_KIND_ALIASES = {
    alias: kind
    for kind, aliases in {
        "Pod": ("pods", "pod", "po"),
        "Service": ("services", "service", "svc"),
        "Namespace": ("namespaces", "namespace", "ns"),
    }.items()
    for alias in aliases
}


def mesh_services(run_dir: RunDir) -> tuple[list[ClusterService], list[NodeService]]:
    """The components `up` starts: cluster services once, then node services on every node.

    This is where the mesh joins the runtime (istiod_lite as a cluster service; ztunnel and
    its node agent as node services); `--no-mesh` runs the plain cluster.
    """
    from ambientctl.mesh import IstiodService, ZtunnelService

    return [IstiodService()], [ZtunnelService()]


def default_run_dir() -> Path:
    if os.environ.get("AMBIENT_RUN_DIR"):
        return Path(os.environ["AMBIENT_RUN_DIR"])
    if os.geteuid() == 0 or SYSTEM_RUN_DIR.exists():
        return SYSTEM_RUN_DIR
    return Path("run")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops filling a list positional at the first option; kubectl habits put names
    # after options too (`get svc -n demo web`), so leftovers that are not options join it.
    trailing = getattr(args, "trailing", None)
    if extra and (trailing is None or any(item.startswith("-") for item in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        setattr(args, trailing, [*getattr(args, trailing), *extra])
    configure_logging(args.log_level)
    run_dir = RunDir(args.run_dir.resolve())
    try:
        return args.command(args, run_dir)
    except ManifestErrors as exc:
        _error(f"nothing was applied:\n{_indent(str(exc))}")
    except (StoreError, NetworkError) as exc:
        _error(str(exc))
    return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ambientctl", description="The ambient mesh on one machine.")
    # The options go before or after the command; only the top level sets the defaults.
    common = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    for options in (parser, common):
        options.add_argument("--run-dir", type=Path, help=f"journal, object store and logs (default: {default_run_dir()})")
        options.add_argument("--log-level", choices=LEVEL_NAMES, help="runtime log level (default: warning)")
    parser.set_defaults(run_dir=default_run_dir(), log_level="warning")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    up = commands.add_parser("up", parents=[common], help="build the mesh from manifests and run it")
    up.add_argument("dir", nargs="?", type=Path, default=DEMO_DIR, help="manifest file or folder (default: the bookinfo demo)")
    up.add_argument("--nodes", type=int, default=2, help="number of nodes (default: 2)")
    up.set_defaults(command=_up)

    down = commands.add_parser("down", parents=[common], help="remove everything `up` created")
    down.set_defaults(command=_down)

    for name, handler, verb in (("apply", _apply, "create or update"), ("delete", _delete, "delete")):
        sub = commands.add_parser(name, parents=[common], help=f"{verb} the objects in files")
        sub.add_argument("-f", "--filename", dest="paths", type=Path, action="append", required=True, help="file or folder (repeatable)")
        sub.set_defaults(command=handler)

    get = commands.add_parser("get", parents=[common], help="list pods, services or namespaces")
    get.add_argument("kind", choices=sorted(_KIND_ALIASES), metavar="pods|services|namespaces")
    get.add_argument("names", nargs="*")
    _add_namespace_options(get)
    get.add_argument("-o", "--output", choices=("wide", "yaml"))
    get.add_argument("--show-labels", action="store_true", help="add a LABELS column")
    get.set_defaults(command=_get, trailing="names")

    label = commands.add_parser("label", parents=[common], help="set (k=v) or remove (k-) labels")
    label.add_argument("kind", choices=sorted(_KIND_ALIASES), metavar="namespace|pod|service")
    label.add_argument("name")
    label.add_argument("changes", nargs="+", metavar="KEY=VALUE|KEY-")
    label.add_argument("-n", "--namespace", default=DEFAULT_NAMESPACE)
    label.add_argument("--overwrite", action="store_true", help="allow replacing a label's value")
    label.set_defaults(command=_label, trailing="changes")

    waypoint = commands.add_parser("waypoint", parents=[common], help="run waypoints (like `istioctl waypoint`)")
    waypoint_commands = waypoint.add_subparsers(required=True, metavar="apply|list|delete")
    apply_waypoint_cmd = waypoint_commands.add_parser("apply", parents=[common], help="create or update a waypoint")
    apply_waypoint_cmd.add_argument("-n", "--namespace", default=DEFAULT_NAMESPACE)
    apply_waypoint_cmd.add_argument("--name", default=DEFAULT_WAYPOINT_NAME)
    apply_waypoint_cmd.add_argument("--enroll-namespace", action="store_true", help=f"label the namespace {USE_WAYPOINT_LABEL}=NAME")
    apply_waypoint_cmd.set_defaults(command=_waypoint_apply)
    list_waypoint_cmd = waypoint_commands.add_parser("list", parents=[common], help="list waypoints")
    _add_namespace_options(list_waypoint_cmd)
    list_waypoint_cmd.set_defaults(command=_waypoint_list)
    delete_waypoint_cmd = waypoint_commands.add_parser("delete", parents=[common], help="delete a waypoint")
    delete_waypoint_cmd.add_argument("-n", "--namespace", default=DEFAULT_NAMESPACE)
    delete_waypoint_cmd.add_argument("--name", default=DEFAULT_WAYPOINT_NAME)
    delete_waypoint_cmd.set_defaults(command=_waypoint_delete)

    # Commands that live in modules of their own: each `register(commands, common)` adds its
    # subparsers with `set_defaults(command=handler)`, handler(args, run_dir) -> exit code.
    for module in _COMMAND_MODULES:
        module.register(commands, common)
    return parser


def _add_namespace_options(parser: argparse.ArgumentParser) -> None:
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", default=DEFAULT_NAMESPACE)
    scope.add_argument("-A", "--all-namespaces", action="store_true")


# --- up / down ---


def _up(args: argparse.Namespace, run_dir: RunDir) -> int:
    problems = preflight_problems()
    if problems:
        _error("cannot bring the mesh up:\n" + _indent("\n".join(problems)))
        return 1
    if not 1 <= args.nodes <= 253:
        _error(f"--nodes must be between 1 and 253, got {args.nodes}")
        return 2
    supervisor = running_supervisor(run_dir)
    if supervisor is not None:
        _error(f"the mesh in {run_dir.root} is already up (pid {supervisor.pid}); run `ambientctl down` first")
        return 1
    manifests = load_manifests(args.dir)
    store = ObjectStore(run_dir.store)
    for change in store.apply(manifests):
        print(change)
    cluster_services, node_services = mesh_services(run_dir)
    runtime = Runtime(
        run_dir=run_dir,
        node_names=[f"node-{index}" for index in range(1, args.nodes + 1)],
        node_services=node_services,
        cluster_services=cluster_services,
    )
    print(f"building {args.nodes} nodes and starting pods (run dir {run_dir.root}) ...", flush=True)
    failures: list[Exception] = []
    try:
        trio.run(_serve, runtime, store)
    except* (NetworkError, KubeProxyError, AlreadyRunning) as group:
        failures.extend(group.exceptions)
    if failures:
        for exc in failures:
            _error(str(exc))
        _error("the mesh did not come up; everything it had created was removed")
        return 1
    print("the mesh is down; its objects are kept (`ambientctl up` brings them back, `ambientctl down` removes them)")
    return 0


async def _serve(runtime: Runtime, store: ObjectStore) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:

            async def stop_on_signal() -> None:
                async for signum in signals:
                    print(f"\n{signal.Signals(signum).name}: stopping pods and removing namespaces ...", flush=True)
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(stop_on_signal)
            summary = await nursery.start(runtime.run)
            print(await trio.to_thread.run_sync(_describe, summary, runtime.run_dir, store), flush=True)


def _describe(summary: Summary, run_dir: RunDir, store: ObjectStore) -> str:
    objects = store.objects()
    pods = [body for key, body in objects.items() if is_builtin(key, "Pod")]
    services = [body for key, body in objects.items() if is_builtin(key, "Service")]
    node_rows = [
        [node.name, node_netns(node.name), str(node.pod_network), str(node.link_address)] for node in summary.nodes
    ]
    lines = [
        f"\nthe mesh is up: {len(summary.nodes)} nodes, {len(pods)} pods, {len(services)} services\n",
        _table(["NODE", "NETNS", "POD NETWORK", "NODE IP"], node_rows),
        "",
        _table(*_pod_rows(pods, all_namespaces=True, wide=True, show_labels=False)),
        "",
        _table(*_service_rows(services, all_namespaces=True, wide=False, show_labels=False)),
        "\nwhere to look:",
    ]
    for service in sorted(services, key=lambda s: (s["metadata"]["namespace"], s["metadata"]["name"])):
        port = service["spec"]["ports"][0]["port"]
        name = f"{service['metadata']['namespace']}/{service['metadata']['name']}"
        lines.append(f"  curl http://{service['spec']['clusterIP']}:{port}/    # {name}, from this host")
    first_node = summary.nodes[0].name
    lines += [
        "  ambientctl get pods -A -o wide              # pods, their IPs and nodes",
        f"  ls {run_dir.logs}/pods/*/*/                  # one log file per container",
        f"  ip netns exec {node_netns(first_node)} tcpdump -ni {NODE_LINK} -A   # traffic on {first_node}'s node link",
        *(f"  {hint}" for hint in summary.hints),
        "\nCtrl-C stops the mesh and keeps its objects; `ambientctl down` (from any shell) removes everything.",
    ]
    return "\n".join(lines)


def _down(args: argparse.Namespace, run_dir: RunDir) -> int:
    state = RunState.load(run_dir.state_file)
    if state.is_empty and not run_dir.store.exists():
        print(f"nothing to remove: no mesh in {run_dir.root}")
        return 0
    if not state.is_empty:
        missing = missing_capabilities(effective_capabilities())
        if missing:
            _error(f"cannot remove the mesh: missing {' and '.join(missing)} (run as root)")
            return 1
    supervisor = running_supervisor(run_dir)
    if supervisor is not None:
        print(f"stopping `ambientctl up` (pid {supervisor.pid}) ...", flush=True)
        if not stop_supervisor(supervisor, timeout=_SUPERVISOR_STOP_SECONDS):
            print(f"it did not stop within {_SUPERVISOR_STOP_SECONDS:g}s and was killed; cleaning up after it")
    report = teardown(run_dir)
    shutil.rmtree(run_dir.store, ignore_errors=True)
    if report.anything:
        print(
            f"removed {report.namespaces} network namespaces, {report.links} host links, "
            f"{report.tables} host nftables tables; stopped {report.processes} processes"
        )
    print(f"the mesh is gone; logs are kept in {run_dir.logs}")
    return 0


# --- apply / delete / get / label ---


def _apply(args: argparse.Namespace, run_dir: RunDir) -> int:
    manifests = _load_all(args.paths)
    for change in ObjectStore(run_dir.store).apply(manifests):
        print(change)
    return 0


def _delete(args: argparse.Namespace, run_dir: RunDir) -> int:
    manifests = _load_all(args.paths)
    status = 0
    for change in ObjectStore(run_dir.store).delete([manifest.key for manifest in manifests]):
        resource = f"{_plural(change.key)}{'.' + change.key.group if change.key.group else ''}"
        if change.action == "not found":
            _error(f'{resource} "{change.key.name}" not found', prefix="Error from server (NotFound): ")
            status = 1
        else:
            print(f'{change.key.resource} "{change.key.name}" deleted')
    return status


def _load_all(paths: Sequence[Path]) -> list[Manifest]:
    manifests: list[Manifest] = []
    errors = []
    for path in paths:
        try:
            manifests.extend(load_manifests(path))
        except ManifestErrors as exc:
            errors.extend(exc.errors)
    if errors:
        raise ManifestErrors(errors)
    return manifests


def _get(args: argparse.Namespace, run_dir: RunDir) -> int:
    kind = _KIND_ALIASES[args.kind]
    namespaced = BUILTIN_KINDS[kind].namespaced
    selected = []
    for key, body in sorted(ObjectStore(run_dir.store).objects().items()):
        if not is_builtin(key, kind):
            continue
        if namespaced and not args.all_namespaces and key.namespace != args.namespace:
            continue
        if args.names and key.name not in args.names:
            continue
        selected.append(body)
    missing = [name for name in args.names if name not in {body["metadata"]["name"] for body in selected}]
    for name in missing:
        _error(f'{BUILTIN_KINDS[kind].plural} "{name}" not found', prefix="Error from server (NotFound): ")
    if args.output == "yaml":
        if selected or not args.names:
            document: Any = selected[0] if len(args.names) == 1 else {"apiVersion": "v1", "kind": "List", "items": selected}
            print(yaml.safe_dump(document, sort_keys=False), end="")
        return 1 if missing else 0
    if not selected:
        if not missing:
            where = "" if not namespaced or args.all_namespaces else f" in {args.namespace} namespace"
            print(f"No resources found{where}.", file=sys.stderr)
        return 1 if missing else 0
    all_namespaces = namespaced and args.all_namespaces
    wide = args.output == "wide"
    rows: Callable[..., tuple[list[str], list[list[str]]]] = {
        "Pod": _pod_rows,
        "Service": _service_rows,
        "Namespace": _namespace_rows,
    }[kind]
    print(_table(*rows(selected, all_namespaces=all_namespaces, wide=wide, show_labels=args.show_labels)))
    return 1 if missing else 0


def _label(args: argparse.Namespace, run_dir: RunDir) -> int:
    kind = _KIND_ALIASES[args.kind]
    namespace = args.namespace if BUILTIN_KINDS[kind].namespaced else ""
    set_labels: dict[str, str] = {}
    remove: list[str] = []
    for change in args.changes:
        if change.endswith("-") and "=" not in change:
            name, value = change[:-1], None
        elif "=" in change:
            name, _, value = change.partition("=")
        else:
            _error(f"invalid label change {change!r}: expected KEY=VALUE or KEY-")
            return 2
        problem = label_key_problem(name) or (label_value_problem(value) if value is not None else None)
        if problem:
            _error(problem)
            return 2
        if value is None:
            remove.append(name)
        else:
            set_labels[name] = value
    key = ObjectKey(group="", kind=kind, namespace=namespace, name=args.name)
    print(ObjectStore(run_dir.store).label(key, set_labels=set_labels, remove=remove, overwrite=args.overwrite))
    return 0


# --- waypoint ---


def _waypoint_apply(args: argparse.Namespace, run_dir: RunDir) -> int:
    for change in apply_waypoint(ObjectStore(run_dir.store), run_dir, args.namespace, args.name, enroll_namespace=args.enroll_namespace):
        print(change)
    return 0


def _waypoint_list(args: argparse.Namespace, run_dir: RunDir) -> int:
    waypoints = list_waypoints(ObjectStore(run_dir.store), None if args.all_namespaces else args.namespace)
    if not waypoints:
        where = "" if args.all_namespaces else f" in {args.namespace} namespace"
        print(f"No waypoints found{where}.", file=sys.stderr)
        return 0
    rows = [[w.namespace, w.name, f"{w.ready_pods}/{w.pods}", w.traffic_type] for w in waypoints]
    print(_table(["NAMESPACE", "NAME", "READY", "TRAFFIC TYPE"], rows))
    return 0


def _waypoint_delete(args: argparse.Namespace, run_dir: RunDir) -> int:
    for change in delete_waypoint(ObjectStore(run_dir.store), args.namespace, args.name):
        print(change)
    return 0


# --- tables like kubectl's ---


def _pod_rows(pods: list[dict[str, Any]], *, all_namespaces: bool, wide: bool, show_labels: bool) -> tuple[list[str], list[list[str]]]:
    header = ["NAME", "READY", "STATUS", "RESTARTS", "AGE"] + (["IP", "NODE"] if wide else [])
    rows = []
    for pod in pods:
        status = pod.get("status") or {}
        statuses = status.get("containerStatuses") or []
        ready = sum(1 for s in statuses if s.get("ready"))
        row = [
            pod["metadata"]["name"],
            f"{ready}/{len(pod['spec']['containers'])}",
            _pod_status(status),
            str(sum(s.get("restartCount", 0) for s in statuses)),
            _age(pod),
        ]
        if wide:
            row += [status.get("podIP") or "<none>", pod["spec"].get("nodeName") or "<none>"]
        rows.append(row)
    return _decorate(header, rows, pods, all_namespaces=all_namespaces, show_labels=show_labels)


def _pod_status(status: dict[str, Any]) -> str:
    # kubectl shows why a container stopped (Error, Completed) rather than the bare phase.
    for container in status.get("containerStatuses") or ():
        terminated = (container.get("state") or {}).get("terminated")
        if terminated and status.get("phase") != "Running":
            return terminated.get("reason", "Terminated")
    return status.get("reason") if status.get("phase") in ("Failed", "Unknown") and status.get("reason") else status.get("phase", "Pending")


def _service_rows(services: list[dict[str, Any]], *, all_namespaces: bool, wide: bool, show_labels: bool) -> tuple[list[str], list[list[str]]]:
    header = ["NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)", "AGE"] + (["SELECTOR"] if wide else [])
    rows = []
    for service in services:
        spec = service["spec"]
        ports = ",".join(f"{port['port']}/{port.get('protocol', 'TCP')}" for port in spec["ports"])
        row = [service["metadata"]["name"], spec.get("type", "ClusterIP"), spec.get("clusterIP") or "<none>", "<none>", ports, _age(service)]
        if wide:
            row.append(",".join(f"{k}={v}" for k, v in (spec.get("selector") or {}).items()) or "<none>")
        rows.append(row)
    return _decorate(header, rows, services, all_namespaces=all_namespaces, show_labels=show_labels)


def _namespace_rows(namespaces: list[dict[str, Any]], *, all_namespaces: bool, wide: bool, show_labels: bool) -> tuple[list[str], list[list[str]]]:
    rows = [[ns["metadata"]["name"], (ns.get("status") or {}).get("phase", "Active"), _age(ns)] for ns in namespaces]
    return _decorate(["NAME", "STATUS", "AGE"], rows, namespaces, all_namespaces=False, show_labels=show_labels)


def _decorate(
    header: list[str], rows: list[list[str]], bodies: list[dict[str, Any]], *, all_namespaces: bool, show_labels: bool
) -> tuple[list[str], list[list[str]]]:
    if all_namespaces:
        header = ["NAMESPACE", *header]
        rows = [[body["metadata"]["namespace"], *row] for row, body in zip(rows, bodies)]
    if show_labels:
        header = [*header, "LABELS"]
        rows = [
            [*row, ",".join(f"{k}={v}" for k, v in (body["metadata"].get("labels") or {}).items()) or "<none>"]
            for row, body in zip(rows, bodies)
        ]
    return header, rows


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    return "\n".join("   ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows])


def _age(body: dict[str, Any]) -> str:
    created = body["metadata"].get("creationTimestamp")
    if not created:
        return "<unknown>"
    seconds = int((datetime.now(timezone.utc) - datetime.strptime(created, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)).total_seconds())
    seconds = max(seconds, 0)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 600:
        return f"{seconds // 60}m{seconds % 60}s"
    if seconds < 3 * 3600:
        return f"{seconds // 60}m"
    if seconds < 48 * 3600:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


def _plural(key: ObjectKey) -> str:
    builtin = BUILTIN_KINDS.get(key.kind)
    return builtin.plural if builtin is not None else key.kind.lower() + "s"


def _error(message: str, *, prefix: str = "error: ") -> None:
    print(f"{prefix}{message}", file=sys.stderr)


def _indent(text: str) -> str:
    return "\n".join(f"  {line}" for line in text.splitlines())
