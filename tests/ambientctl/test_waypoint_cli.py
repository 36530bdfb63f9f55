"""`ambientctl waypoint apply|list|delete` against a run dir (no root), and the waypoint pod's config."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ambientctl import cli
from ambientctl.cli import main
from ambientctl.runtime import RunDir
from ambientctl.waypoints import WaypointPodError, waypoint_config
from waypoint.settings import parse_settings


@pytest.fixture
def ambientctl(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "configure_logging", lambda level: None)
    (tmp_path / "ns.yaml").write_text("apiVersion: v1\nkind: Namespace\nmetadata: {name: demo}\n")

    def run(*args: str) -> tuple[int, str, str]:
        status = main([*args, "--run-dir", str(tmp_path / "run")])
        captured = capsys.readouterr()
        return status, captured.out, captured.err

    assert run("apply", "-f", str(tmp_path / "ns.yaml"))[0] == 0
    return run


def _yaml(ambientctl, *args: str):
    status, out, err = ambientctl(*args, "-o", "yaml")
    assert status == 0, err
    return yaml.safe_load(out)


def test_apply_creates_what_istiod_deploys_for_a_waypoint_and_enrols_the_namespace(ambientctl):
    status, out, _ = ambientctl("waypoint", "apply", "-n", "demo", "--enroll-namespace")
    assert status == 0
    assert out.split("\n")[:-1] == [
        "waypoint.istiodlite.io/waypoint created",
        "serviceaccount/waypoint created",
        "service/waypoint created",
        "deployment.apps/waypoint created",
        "namespace/demo labeled",
    ]
    assert _yaml(ambientctl, "get", "ns", "demo")["metadata"]["labels"] == {"istio.io/use-waypoint": "waypoint"}
    port = _yaml(ambientctl, "get", "svc", "-n", "demo", "waypoint")["spec"]["ports"]
    assert port == [{"name": "mesh", "port": 15008, "targetPort": 15008, "appProtocol": "hbone", "protocol": "TCP"}]
    (pod,) = _yaml(ambientctl, "get", "pods", "-n", "demo")["items"]
    assert pod["metadata"]["labels"]["gateway.networking.k8s.io/gateway-name"] == "waypoint"
    assert pod["metadata"]["labels"]["istio.io/dataplane-mode"] == "none"
    assert pod["spec"]["serviceAccountName"] == "waypoint"
    status, out, _ = ambientctl("waypoint", "list", "-A")
    assert out.split("\n")[1].split() == ["demo", "waypoint", "0/1", "service"]


def test_apply_twice_is_unchanged_and_a_second_name_is_a_second_waypoint(ambientctl):
    ambientctl("waypoint", "apply", "-n", "demo")
    status, out, _ = ambientctl("waypoint", "apply", "-n", "demo")
    assert status == 0 and out.count("unchanged") == 4
    ambientctl("waypoint", "apply", "-n", "demo", "--name", "reviews-wp")
    _, out, _ = ambientctl("waypoint", "list", "-n", "demo")
    assert [line.split()[1] for line in out.split("\n")[1:-1]] == ["reviews-wp", "waypoint"]


def test_delete_removes_the_waypoint_its_pods_and_the_namespace_binding(ambientctl):
    ambientctl("waypoint", "apply", "-n", "demo", "--enroll-namespace")
    status, out, _ = ambientctl("waypoint", "delete", "-n", "demo")
    assert status == 0 and "deployment.apps/waypoint deleted" in out and "namespace/demo unlabeled" in out
    assert _yaml(ambientctl, "get", "pods", "-n", "demo")["items"] == []
    assert not _yaml(ambientctl, "get", "ns", "demo")["metadata"].get("labels")
    status, _, err = ambientctl("waypoint", "delete", "-n", "demo")
    assert status == 1 and 'waypoint "waypoint" not found in namespace "demo"' in err


def test_apply_to_a_missing_namespace_is_refused(ambientctl):
    status, _, err = ambientctl("waypoint", "apply", "-n", "nope")
    assert status == 1 and 'namespace "nope" not found' in err


def test_the_pod_config_names_the_pod_ip_and_the_token_of_the_pods_node(tmp_path: Path):
    run_dir = RunDir(tmp_path / "run")
    pod = {
        "metadata": {"name": "waypoint-abc", "namespace": "demo"},
        "spec": {"nodeName": "node-2"},
        "status": {"podIP": "198.18.2.7"},
    }
    config = waypoint_config(run_dir, pod, "waypoint")
    settings = parse_settings(config, source="test", base=tmp_path)
    assert settings.address == "198.18.2.7" and settings.waypoint_key == "demo/waypoint"
    assert settings.control_plane.token_path == run_dir.root / "istiod" / "node-tokens" / "node-2.token"
    with pytest.raises(WaypointPodError, match="demo/waypoint-abc: not scheduled yet"):
        waypoint_config(run_dir, {**pod, "status": {}}, "waypoint")
