"""`ambientctl apply/get/label/delete` against a run dir, as a user types them (no root needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ambientctl import cli
from ambientctl.cli import DEMO_DIR, main


@pytest.fixture
def ambientctl(tmp_path: Path, capsys, monkeypatch):
    # In-process runs must not point the process-wide logging at capsys's soon-closed stream.
    monkeypatch.setattr(cli, "configure_logging", lambda level: None)

    def run(*args: str) -> tuple[int, str, str]:
        status = main([*args, "--run-dir", str(tmp_path / "run")])
        captured = capsys.readouterr()
        return status, captured.out, captured.err

    return run


def test_apply_the_demo_then_list_it_like_kubectl(ambientctl):
    status, out, _ = ambientctl("apply", "-f", str(DEMO_DIR))
    assert status == 0 and "namespace/bookinfo created" in out and "deployment.apps/reviews-v2 created" in out
    status, out, _ = ambientctl("get", "pods", "-n", "bookinfo", "-o", "wide")
    header, *rows = out.splitlines()
    assert header.split() == ["NAME", "READY", "STATUS", "RESTARTS", "AGE", "IP", "NODE"]
    assert len(rows) == 7 and all(row.split()[1:3] == ["0/1", "Pending"] for row in rows)
    status, out, _ = ambientctl("get", "svc", "-A")
    assert [line.split()[:4] for line in out.splitlines()[1:]] == [
        ["bookinfo", "details", "ClusterIP", "198.19.128.1"],
        ["bookinfo", "frontend", "ClusterIP", "198.19.128.2"],
        ["bookinfo", "ratings", "ClusterIP", "198.19.128.3"],
        ["bookinfo", "reviews", "ClusterIP", "198.19.128.4"],
    ]
    status, out, err = ambientctl("get", "pods")
    assert status == 0 and out == "" and err == "No resources found in default namespace.\n"


def test_get_yaml_round_trips_through_apply(ambientctl, tmp_path):
    ambientctl("apply", "-f", str(DEMO_DIR / "namespace.yaml"))
    status, out, _ = ambientctl("get", "ns", "-o", "yaml")
    listing = yaml.safe_load(out)
    assert listing["kind"] == "List" and {item["metadata"]["name"] for item in listing["items"]} == {"bookinfo", "default"}
    (tmp_path / "dump.yaml").write_text(out)
    status, out, _ = ambientctl("apply", "-f", str(tmp_path / "dump.yaml"))
    assert status == 0 and out.splitlines() == ["namespace/bookinfo unchanged", "namespace/default unchanged"]


def test_label_enrols_and_releases_a_namespace(ambientctl):
    ambientctl("apply", "-f", str(DEMO_DIR / "namespace.yaml"))
    status, out, err = ambientctl("label", "namespace", "bookinfo", "istio.io/dataplane-mode=none")
    assert status == 1 and "'istio.io/dataplane-mode' already has a value (ambient), and --overwrite is false" in err
    assert ambientctl("label", "ns", "bookinfo", "istio.io/dataplane-mode=none", "--overwrite")[1] == "namespace/bookinfo labeled\n"
    assert ambientctl("label", "ns", "bookinfo", "istio.io/dataplane-mode-")[1] == "namespace/bookinfo unlabeled\n"
    status, out, _ = ambientctl("get", "ns", "bookinfo", "--show-labels")
    assert out.splitlines()[1].split()[-1] == "<none>"
    status, _, err = ambientctl("label", "ns", "bookinfo", "bad key=x")
    assert status == 2 and "label key 'bad key'" in err


def test_bad_manifest_is_refused_with_file_object_and_field(ambientctl, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: nowhere}\nspec: {ports: [{port: 80}]}\n")
    status, out, err = ambientctl("apply", "-f", str(bad))
    assert status == 1 and out == ""
    assert f"{bad}: Service nowhere/web: metadata.namespace: namespace 'nowhere' does not exist" in err
    assert ambientctl("get", "svc", "-A")[2] == "No resources found.\n"


def test_delete_reports_what_it_deleted_and_what_was_not_there(ambientctl):
    ambientctl("apply", "-f", str(DEMO_DIR))
    status, out, err = ambientctl("delete", "-f", str(DEMO_DIR / "trafficgen.yaml"))
    assert status == 0 and out.splitlines() == ['serviceaccount "trafficgen" deleted', 'deployment.apps "trafficgen" deleted']
    assert not [line for line in ambientctl("get", "pods", "-n", "bookinfo")[1].splitlines() if "trafficgen" in line]
    status, out, err = ambientctl("delete", "-f", str(DEMO_DIR / "trafficgen.yaml"))
    assert status == 1 and 'Error from server (NotFound): deployments.apps "trafficgen" not found' in err


def test_down_without_a_mesh_is_a_no_op(ambientctl, tmp_path):
    status, out, _ = ambientctl("down")
    assert status == 0 and "nothing to remove" in out
