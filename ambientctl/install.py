"""`ambientctl install` / `ambientctl uninstall`: the mesh's Kubernetes manifests, for kubectl.

    ambientctl install [--set KEY=VALUE ...] | kubectl apply -f -
    ambientctl uninstall | kubectl delete -f -

The manifests are the plain YAML files under deploy/ (deploy/crds, then deploy/install in
file-name order: namespace, istiod_lite, ztunnel); they are valid as they are and carry the
default values. `--set` (dotted keys, like helm's) changes the few things that differ between
clusters; `ambientctl install --help` lists the keys. An unknown key or a value of the wrong
type is a usage error (exit 2) that names the key, and nothing is printed on stdout.

`uninstall` prints every object `install` creates, namespaced ones first and the CRDs last.
Deleting the CRDs deletes every object of those kinds (policies, routes, waypoints) too.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ambientctl.runtime import RunDir
from meshcore.log import LEVEL_NAMES

DEPLOY_DIR = Path(__file__).resolve().parent.parent / "deploy"

Manifest = dict[str, Any]
# libyaml when present: the CRDs are half a megabyte of YAML.
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Dumper(getattr(yaml, "CSafeDumper", yaml.SafeDumper)):  # type: ignore[misc]
    """Multi-line strings (the ztunnel config file) as literal blocks, readable as written."""


def _represent_text(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None)


_Dumper.add_representer(str, _represent_text)


class SettingError(Exception):
    """A `--set` that cannot be used; the message names the key."""


# --- values ---


def _text(expected: str, pattern: str) -> Callable[[str], str]:
    compiled = re.compile(pattern)

    def parse(text: str) -> str:
        if not compiled.fullmatch(text):
            raise ValueError(expected)
        return text

    return parse


def _choice(*choices: str) -> Callable[[str], str]:
    return _text(f"one of {', '.join(choices)}", "|".join(re.escape(choice) for choice in choices))


def _count(text: str) -> int:
    if not re.fullmatch(r"[0-9]+", text):
        raise ValueError("an integer >= 0")
    return int(text)


# A Kubernetes resource quantity: 100m, 0.5, 256Mi, 1G.
_quantity = _text("a Kubernetes quantity such as 100m, 0.5, 256Mi", r"\+?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+|[numkMGTPE]|[KMGTPE]i)?")
_image = _text("an image reference without spaces, such as registry/ambient-mesh:1.0", r"[A-Za-z0-9][A-Za-z0-9._/:@+-]*")
_trust_domain = _text("a DNS-style name such as cluster.local", r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_log_level = _choice(*LEVEL_NAMES)


def _value(default: Any, parse: Callable[[str], Any], description: str) -> Any:
    return field(default=default, metadata={"parse": parse, "description": description})


@dataclass(frozen=True, slots=True)
class Requests:
    cpu: str = _value("100m", _quantity, "CPU request")
    memory: str = _value("256Mi", _quantity, "memory request")


@dataclass(frozen=True, slots=True)
class Resources:
    requests: Requests = field(default_factory=Requests)


@dataclass(frozen=True, slots=True)
class IstiodValues:
    replicas: int = _value(1, _count, "istiod_lite pods")
    logLevel: str = _value("info", _log_level, "istiod_lite's log level")
    resources: Resources = field(default_factory=Resources)


@dataclass(frozen=True, slots=True)
class ZtunnelValues:
    logLevel: str = _value("info", _log_level, "log level of ztunnel and its node agent")
    resources: Resources = field(default_factory=lambda: Resources(Requests(cpu="200m", memory="256Mi")))


@dataclass(frozen=True, slots=True)
class InstallValues:
    """What `--set` can change; the field names are the keys (camelCase, like helm values)."""

    image: str = _value("ambient-mesh:latest", _image, "the one image every component runs from (waypoints too)")
    imagePullPolicy: str = _value("IfNotPresent", _choice("Always", "IfNotPresent", "Never"), "pull policy of every container")
    trustDomain: str = _value("cluster.local", _trust_domain, "SPIFFE trust domain of the mesh's identities")
    istiod: IstiodValues = field(default_factory=IstiodValues)
    ztunnel: ZtunnelValues = field(default_factory=ZtunnelValues)


def value_keys(values: Any = None, prefix: str = "") -> dict[str, tuple[Any, dataclasses.Field]]:
    """Every settable key ("istiod.replicas") -> its current value and its field."""
    values = InstallValues() if values is None else values
    keys: dict[str, tuple[Any, dataclasses.Field]] = {}
    for item in dataclasses.fields(values):
        current = getattr(values, item.name)
        if dataclasses.is_dataclass(current):
            keys.update(value_keys(current, f"{prefix}{item.name}."))
        else:
            keys[f"{prefix}{item.name}"] = (current, item)
    return keys


def parse_values(settings: list[str]) -> InstallValues:
    """`KEY=VALUE` strings applied in order over the defaults (a later one wins, as in helm)."""
    keys = value_keys()
    chosen: dict[str, Any] = {}
    for setting in settings:
        key, equals, text = setting.partition("=")
        if not equals or not key:
            raise SettingError(f"--set {setting!r}: expected KEY=VALUE")
        if key not in keys:
            raise SettingError(f"--set {key}: unknown key; valid keys: {', '.join(keys)}")
        try:
            chosen[key] = keys[key][1].metadata["parse"](text)
        except ValueError as exc:
            raise SettingError(f"--set {key}={text!r}: expected {exc}") from None
    return _replace(InstallValues(), chosen)


def _replace(values: Any, chosen: dict[str, Any], prefix: str = "") -> Any:
    changes = {}
    for item in dataclasses.fields(values):
        current = getattr(values, item.name)
        key = f"{prefix}{item.name}"
        if dataclasses.is_dataclass(current):
            changes[item.name] = _replace(current, chosen, f"{key}.")
        elif key in chosen:
            changes[item.name] = chosen[key]
    return dataclasses.replace(values, **changes)


# --- manifests ---


def load_manifests(deploy_dir: Path = DEPLOY_DIR) -> list[Manifest]:
    """The objects under deploy/, CRDs first, each folder in file-name order."""
    files = [*sorted((deploy_dir / "crds").glob("*.yaml")), *sorted((deploy_dir / "install").glob("*.yaml"))]
    if not files:
        raise FileNotFoundError(f"no manifests in {deploy_dir}/crds and {deploy_dir}/install (ambientctl install runs from a source checkout)")
    return [document for path in files for document in yaml.load_all(path.read_text(), Loader=_Loader) if document]


def render(values: InstallValues, manifests: list[Manifest]) -> list[Manifest]:
    """The manifests with `values` applied (a deep copy: `manifests` is left as it was)."""
    objects = copy.deepcopy(manifests)
    istiod = _find(objects, "Deployment", "istiod")
    ztunnel = _find(objects, "DaemonSet", "ztunnel")
    istiod["spec"]["replicas"] = values.istiod.replicas
    istiod_container = _container(istiod, "istiod")
    for flag, value in (
        ("--trust-domain", values.trustDomain),
        ("--waypoint-image", values.image),
        ("--log-level", values.istiod.logLevel),
    ):
        _set_flag(istiod_container["command"], flag, value)
    istiod_container["resources"]["requests"] = dataclasses.asdict(values.istiod.resources.requests)
    for container in (_container(ztunnel, "ztunnel"), _container(ztunnel, "node-agent")):
        _set_flag(container["command"], "--log-level", values.ztunnel.logLevel)
    _container(ztunnel, "ztunnel")["resources"]["requests"] = dataclasses.asdict(values.ztunnel.resources.requests)
    for workload in (istiod, ztunnel):
        for container in workload["spec"]["template"]["spec"]["containers"]:
            container["image"] = values.image
            container["imagePullPolicy"] = values.imagePullPolicy
    config_map = _find(objects, "ConfigMap", "ztunnel-config")
    ztunnel_config = yaml.safe_load(config_map["data"]["config.yaml"])
    ztunnel_config["trustDomain"] = values.trustDomain
    config_map["data"]["config.yaml"] = yaml.safe_dump(ztunnel_config, sort_keys=False)
    return objects


def removal_order(objects: list[Manifest]) -> list[Manifest]:
    """What `kubectl delete -f -` needs, namespaced objects first, then cluster-wide, CRDs last."""

    def rank(obj: Manifest) -> int:
        if obj["kind"] == "CustomResourceDefinition":
            return 2
        return 0 if obj["metadata"].get("namespace") else 1

    stubs = []
    for obj in sorted(reversed(objects), key=rank):
        metadata = {"name": obj["metadata"]["name"]}
        if obj["metadata"].get("namespace"):
            metadata["namespace"] = obj["metadata"]["namespace"]
        stubs.append({"apiVersion": obj["apiVersion"], "kind": obj["kind"], "metadata": metadata})
    return stubs


def to_yaml(objects: list[Manifest]) -> str:
    return yaml.dump_all(objects, Dumper=_Dumper, sort_keys=False, width=1000, explicit_start=True)


def _find(objects: list[Manifest], kind: str, name: str) -> Manifest:
    for obj in objects:
        if obj["kind"] == kind and obj["metadata"]["name"] == name:
            return obj
    raise LookupError(f"deploy/ has no {kind} {name}")


def _container(workload: Manifest, name: str) -> Manifest:
    for container in workload["spec"]["template"]["spec"]["containers"]:
        if container["name"] == name:
            return container
    raise LookupError(f"{workload['kind']} {workload['metadata']['name']} has no container {name}")


def _set_flag(command: list[str], flag: str, value: str) -> None:
    command[command.index(flag) + 1] = value


# --- commands ---


def register(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    keys = "\n".join(f"  {key} (default {default}): {item.metadata['description']}" for key, (default, item) in value_keys().items())
    install = commands.add_parser(
        "install",
        parents=[common],
        help="print the mesh's Kubernetes manifests (| kubectl apply -f -)",
        description="Print the CRDs, namespace, RBAC, istiod_lite and the ztunnel DaemonSet as YAML for `kubectl apply -f -`.",
        epilog=f"keys for --set:\n{keys}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    install.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE", help="change a value (repeatable)")
    install.set_defaults(command=_install)
    uninstall = commands.add_parser(
        "uninstall",
        parents=[common],
        help="print what removes the mesh from Kubernetes (| kubectl delete -f -)",
        description="Print every object `install` creates, for `kubectl delete -f -`. Deleting the CRDs deletes the policies, routes and waypoints of those kinds too.",
    )
    uninstall.set_defaults(command=_uninstall)


def _install(args: argparse.Namespace, run_dir: RunDir) -> int:
    try:
        values = parse_values(args.settings)
    except SettingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return _print(lambda manifests: render(values, manifests))


def _uninstall(args: argparse.Namespace, run_dir: RunDir) -> int:
    return _print(removal_order)


def _print(build: Callable[[list[Manifest]], list[Manifest]]) -> int:
    try:
        manifests = load_manifests()
    except (OSError, yaml.YAMLError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(to_yaml(build(manifests)))
    return 0
