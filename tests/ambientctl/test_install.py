"""`ambientctl install` / `uninstall` offline: what they print, --set, and strict validation."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from ambientctl import cli
from ambientctl.cli import main
from ambientctl.install import value_keys
from istiod_lite.config import parse_args as parse_istiod_args
from ztunnel.config import parse_config as parse_ztunnel_config

REPO = Path(__file__).resolve().parents[2]
KUBERNETES_VERSION = "1.33"
# kubectl's client-side apply records the whole object in an annotation; the API server
# refuses annotations over 256 KiB.
LAST_APPLIED_LIMIT = 262144
# libyaml: the output is half a megabyte.
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
SOME_VALUES = (
    "image=registry.example/mesh/ambient-mesh:1.2.3",
    "imagePullPolicy=Always",
    "trustDomain=prod.example",
    "istiod.replicas=3",
    "istiod.logLevel=debug",
    "istiod.resources.requests.cpu=500m",
    "istiod.resources.requests.memory=1Gi",
    "ztunnel.logLevel=warning",
    "ztunnel.resources.requests.cpu=0.5",
    "ztunnel.resources.requests.memory=512Mi",
)


@pytest.fixture
def ambientctl(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "configure_logging", lambda level: None)

    def run(*args: str) -> tuple[int, str, str]:
        status = main([*args, "--run-dir", str(tmp_path / "run")])
        captured = capsys.readouterr()
        return status, captured.out, captured.err

    return run


def _install(ambientctl, *settings: str) -> list[dict]:
    status, out, err = ambientctl("install", *(arg for setting in settings for arg in ("--set", setting)))
    assert status == 0, err
    return [doc for doc in yaml.load_all(out, Loader=_Loader) if doc]


def _one(objects: list[dict], kind: str, name: str) -> dict:
    [found] = [obj for obj in objects if obj["kind"] == kind and obj["metadata"]["name"] == name]
    return found


def _containers(objects: list[dict]) -> dict[str, dict]:
    workloads = [_one(objects, "Deployment", "istiod"), _one(objects, "DaemonSet", "ztunnel")]
    return {c["name"]: c for w in workloads for c in w["spec"]["template"]["spec"]["containers"]}


def _flag(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def test_install_prints_crds_first_then_namespace_rbac_istiod_ztunnel(ambientctl):
    objects = _install(ambientctl)
    kinds = [obj["kind"] for obj in objects]
    crds = {obj["metadata"]["name"] for obj in objects if obj["kind"] == "CustomResourceDefinition"}
    assert crds == {
        "waypoints.istiodlite.io",
        "authorizationpolicies.security.istio.io",
        "peerauthentications.security.istio.io",
        "virtualservices.networking.istio.io",
        "destinationrules.networking.istio.io",
        "gateways.gateway.networking.k8s.io",
        "httproutes.gateway.networking.k8s.io",
        "gatewayclasses.gateway.networking.k8s.io",
    }
    assert kinds[: len(crds)] == ["CustomResourceDefinition"] * len(crds)
    assert kinds[len(crds)] == "Namespace"
    rest = [(obj["kind"], obj["metadata"]["name"]) for obj in objects[len(crds) + 1 :]]
    assert rest.index(("Deployment", "istiod")) < rest.index(("DaemonSet", "ztunnel"))
    assert all(obj["metadata"].get("namespace") in (None, "istio-system") for obj in objects)


@pytest.mark.parametrize("settings", [(), SOME_VALUES], ids=["defaults", "with-values"])
def test_every_manifest_validates_strictly_against_current_kubernetes(ambientctl, settings):
    for obj in _install(ambientctl, *settings):
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{obj['kind']} {obj['metadata']['name']}: {exc}")


def test_every_object_fits_kubectl_client_side_apply(ambientctl):
    for obj in _install(ambientctl):
        size = len(json.dumps(obj, separators=(",", ":")))
        assert size < LAST_APPLIED_LIMIT, f"{obj['kind']} {obj['metadata']['name']} is {size} bytes"


def test_defaults_run_the_components_as_the_shared_decisions_say(ambientctl):
    objects = _install(ambientctl)
    containers = _containers(objects)
    istiod = containers["istiod"]["command"]
    assert istiod[:5] == ["istiod-lite", "--source", "kube", "--listen-address", "0.0.0.0"]
    assert _flag(istiod, "--trust-domain") == "cluster.local"
    assert _flag(istiod, "--waypoint-image") == "ambient-mesh:latest"
    assert containers["node-agent"]["command"][:7] == [
        "ztunnel-node-agent", "--node-name", "$(NODE_NAME)", "--socket", "/var/run/ztunnel/ztunnel.sock", "--proc", "/host/proc",
    ]
    assert {c["image"] for c in containers.values()} == {"ambient-mesh:latest"}
    assert _one(objects, "Deployment", "istiod")["spec"]["replicas"] == 1
    service_ports = {p["name"]: p["port"] for p in _one(objects, "Service", "istiod")["spec"]["ports"]}
    assert service_ports == {"grpc-xds": 15010, "https-dds": 15012, "http-monitoring": 15014}
    ztunnel_pod = _one(objects, "DaemonSet", "ztunnel")["spec"]["template"]
    assert ztunnel_pod["metadata"]["annotations"]["prometheus.io/port"] == "15020"
    assert not ztunnel_pod["spec"].get("hostNetwork")
    token = next(v for v in ztunnel_pod["spec"]["volumes"] if v["name"] == "istio-token")
    assert token["projected"]["sources"][0]["serviceAccountToken"]["audience"] == "istio-ca"


def test_the_istiod_command_line_and_the_ztunnel_config_parse_as_their_programs_read_them(ambientctl):
    objects = _install(ambientctl, "trustDomain=prod.example")
    config, log_level = parse_istiod_args(_containers(objects)["istiod"]["command"][1:])
    assert (config.source, config.listen_address, config.trust_domain, log_level) == ("kube", "0.0.0.0", "prod.example", "info")
    raw = yaml.safe_load(_one(objects, "ConfigMap", "ztunnel-config")["data"]["config.yaml"])
    # Node name and pod IP are per node: the DaemonSet gives them as NODE_NAME and INSTANCE_IP
    # (Downward API), which the shared ConfigMap cannot.
    env = {item["name"]: item["valueFrom"]["fieldRef"]["fieldPath"] for item in _containers(objects)["ztunnel"]["env"] if "valueFrom" in item}
    assert (env["NODE_NAME"], env["INSTANCE_IP"]) == ("spec.nodeName", "status.podIP")
    ztunnel = parse_ztunnel_config(
        raw, source="config.yaml", base=Path("/etc/ztunnel"), environ={"NODE_NAME": "node-1", "INSTANCE_IP": "10.1.2.3"}
    )
    assert (ztunnel.node, ztunnel.address) == ("node-1", "10.1.2.3")
    assert ztunnel.trust_domain == "prod.example"
    assert ztunnel.source.address == "istiod.istio-system.svc:15012"
    assert str(ztunnel.source.token_path) == "/var/run/secrets/tokens/istio-token"
    assert str(ztunnel.inpod_socket) == "/var/run/ztunnel/ztunnel.sock"
    assert (ztunnel.ports.socks5, ztunnel.ports.admin, ztunnel.ports.readiness, ztunnel.ports.metrics) == (0, 0, 15021, 15020)


def test_the_defaults_are_the_files_themselves_so_kubectl_apply_of_deploy_gives_the_same(ambientctl):
    def comparable(objects: list[dict]) -> list[dict]:
        for obj in objects:
            if obj["kind"] == "ConfigMap":
                obj["data"] = {key: yaml.safe_load(text) for key, text in obj["data"].items()}
        return objects

    files = [
        doc
        for folder in ("crds", "install")
        for path in sorted((REPO / "deploy" / folder).glob("*.yaml"))
        for doc in yaml.load_all(path.read_text(), Loader=_Loader)
        if doc
    ]
    assert comparable(_install(ambientctl)) == comparable(files)


def test_every_value_changes_the_output_where_it_belongs(ambientctl):
    assert set(value_keys()) == {setting.partition("=")[0] for setting in SOME_VALUES}
    objects = _install(ambientctl, *SOME_VALUES)
    containers = _containers(objects)
    assert {c["image"] for c in containers.values()} == {"registry.example/mesh/ambient-mesh:1.2.3"}
    assert {c["imagePullPolicy"] for c in containers.values()} == {"Always"}
    istiod = containers["istiod"]["command"]
    assert _flag(istiod, "--waypoint-image") == "registry.example/mesh/ambient-mesh:1.2.3"
    assert _flag(istiod, "--trust-domain") == "prod.example"
    assert _flag(istiod, "--log-level") == "debug"
    assert _one(objects, "Deployment", "istiod")["spec"]["replicas"] == 3
    assert containers["istiod"]["resources"]["requests"] == {"cpu": "500m", "memory": "1Gi"}
    assert _flag(containers["ztunnel"]["command"], "--log-level") == "warning"
    assert _flag(containers["node-agent"]["command"], "--log-level") == "warning"
    assert containers["ztunnel"]["resources"]["requests"] == {"cpu": "0.5", "memory": "512Mi"}
    config = yaml.safe_load(_one(objects, "ConfigMap", "ztunnel-config")["data"]["config.yaml"])
    assert config["trustDomain"] == "prod.example"


def test_a_later_set_of_the_same_key_wins(ambientctl):
    objects = _install(ambientctl, "istiod.replicas=2", "istiod.replicas=4")
    assert _one(objects, "Deployment", "istiod")["spec"]["replicas"] == 4


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ("istiod.replica=2", ["istiod.replica", "unknown key", "istiod.replicas", "ztunnel.logLevel"]),
        ("istiod=2", ["istiod", "unknown key"]),
        ("istiod.replicas=two", ["istiod.replicas", "an integer"]),
        ("istiod.replicas=-1", ["istiod.replicas", "an integer >= 0"]),
        ("ztunnel.logLevel=loud", ["ztunnel.logLevel", "one of", "debug"]),
        ("imagePullPolicy=sometimes", ["imagePullPolicy", "Always, IfNotPresent, Never"]),
        ("istiod.resources.requests.memory=lots", ["istiod.resources.requests.memory", "quantity"]),
        ("trustDomain=Not A Domain", ["trustDomain", "DNS-style name"]),
        ("image=", ["image", "image reference"]),
        ("image", ["'image'", "KEY=VALUE"]),
    ],
)
def test_a_bad_set_is_a_usage_error_naming_the_key_with_nothing_on_stdout(ambientctl, setting, expected):
    status, out, err = ambientctl("install", "--set", "image=fine:1", "--set", setting)
    assert (status, out) == (2, "")
    assert err.startswith("error: --set ")
    for text in expected:
        assert text in err


def test_uninstall_names_every_installed_object_namespaced_first_crds_last(ambientctl):
    installed = {(o["apiVersion"], o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in _install(ambientctl)}
    status, out, err = ambientctl("uninstall")
    assert status == 0, err
    removed = [doc for doc in yaml.load_all(out, Loader=_Loader) if doc]
    keys = [(o["apiVersion"], o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in removed]
    assert sorted(keys, key=str) == sorted(installed, key=str)
    ranks = [2 if kind == "CustomResourceDefinition" else 0 if namespace else 1 for _, kind, namespace, _ in keys]
    assert ranks == sorted(ranks)
    assert keys.index(("v1", "Namespace", None, "istio-system")) < ranks.index(2)


def test_every_program_the_manifests_run_is_a_console_script_of_the_image():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    objects = [doc for path in sorted((REPO / "deploy" / "install").glob("*.yaml")) for doc in yaml.load_all(path.read_text(), Loader=_Loader) if doc]
    programs = {
        container["command"][0]
        for obj in objects
        if obj["kind"] in ("Deployment", "DaemonSet")
        for container in obj["spec"]["template"]["spec"]["containers"]
    }
    assert programs == {"istiod-lite", "ztunnel", "ztunnel-node-agent"}
    assert programs <= set(scripts)
