"""Loading manifests: what is accepted, and errors that name file, object and field."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from ambientctl.cli import DEMO_DIR
from ambientctl.runtime.manifests import ManifestErrors, load_manifests

DEPLOYMENT = """\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: shop
spec:
  replicas: 2
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
        - name: web
          command: [python3, server.py]
          workingDir: apps
"""


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def errors_of(path: Path) -> list[str]:
    with pytest.raises(ManifestErrors) as caught:
        load_manifests(path)
    return [str(error) for error in caught.value.errors]


def test_the_shipped_demo_loads_with_an_enrolled_namespace():
    manifests = load_manifests(DEMO_DIR)
    kinds = {(m.key.kind, m.key.name) for m in manifests}
    assert ("Namespace", "bookinfo") in kinds
    assert {name for kind, name in kinds if kind == "Deployment"} == {
        "frontend-v1", "details-v1", "reviews-v1", "reviews-v2", "reviews-v3", "ratings-v1", "trafficgen",
    }
    assert {name for kind, name in kinds if kind == "Service"} == {"frontend", "details", "reviews", "ratings"}
    namespace = next(m for m in manifests if m.key.kind == "Namespace")
    assert namespace.body["metadata"]["labels"]["istio.io/dataplane-mode"] == "ambient"
    for manifest in manifests:
        if manifest.key.kind == "Deployment":
            [container] = manifest.body["spec"]["template"]["spec"]["containers"]
            assert Path(container["workingDir"], container["command"][1]).is_file()


def test_relative_working_dirs_are_resolved_against_the_manifest_folder(tmp_path):
    write(tmp_path, "web.yaml", DEPLOYMENT)
    [manifest] = load_manifests(tmp_path)
    assert manifest.body["spec"]["template"]["spec"]["containers"][0]["workingDir"] == str(tmp_path / "apps")


def test_mesh_configuration_passes_through_untouched(tmp_path):
    path = write(
        tmp_path,
        "policy.yaml",
        """\
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: deny-all, namespace: shop}
        spec: {action: DENY, anything: [goes, here]}
        ---
        apiVersion: gateway.networking.k8s.io/v1
        kind: Gateway
        metadata: {name: waypoint}
        spec: {gatewayClassName: istio-waypoint}
        """,
    )
    policy, gateway = load_manifests(path)
    assert policy.body["spec"] == {"action": "DENY", "anything": ["goes", "here"]}
    assert (gateway.key.group, gateway.key.namespace) == ("gateway.networking.k8s.io", "default")
    assert "namespace" not in gateway.body["metadata"]


def test_unknown_kind_names_file_object_and_kind(tmp_path):
    path = write(tmp_path, "odd.yaml", "apiVersion: example.com/v1\nkind: Frobnicator\nmetadata: {name: frob}\n")
    [error] = errors_of(path)
    assert error.startswith(f"{path}: Frobnicator frob: kind: unknown kind example.com/v1 Frobnicator")


def test_missing_command_names_the_container_field(tmp_path):
    path = write(tmp_path, "web.yaml", DEPLOYMENT.replace("          command: [python3, server.py]\n", ""))
    [error] = errors_of(path)
    assert f"{path}: Deployment shop/web: spec.template.spec.containers[0].command: required" in error


def test_every_problem_of_every_file_is_reported_at_once(tmp_path):
    write(
        tmp_path,
        "a.yaml",
        """\
        apiVersion: v1
        kind: Service
        metadata: {name: Web_Site, labels: {version: 2}}
        spec:
          type: LoadBalancer
          ports: [{port: 70000}]
        """,
    )
    write(tmp_path, "b.yaml", "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: []}\n")
    write(tmp_path, "c.yaml", "kind: Pod\n  bad: [indent\n")
    errors = "\n".join(errors_of(tmp_path))
    assert "a.yaml: Service default/Web_Site: metadata.name: 'Web_Site' must be a DNS label" in errors
    assert "a.yaml: Service default/Web_Site: metadata.labels.version: keys and values must be strings" in errors
    assert "a.yaml: Service default/Web_Site: spec.type: only ClusterIP services are supported" in errors
    assert "a.yaml: Service default/Web_Site: spec.ports[0].port: must be a port number 1-65535, got 70000" in errors
    assert "b.yaml: Pod default/p: spec.containers: must not be empty" in errors
    assert "c.yaml: invalid YAML" in errors


def test_the_same_object_twice_is_a_clash_naming_both_places(tmp_path):
    write(tmp_path, "one.yaml", DEPLOYMENT)
    write(tmp_path, "two.yaml", DEPLOYMENT)
    [error] = errors_of(tmp_path)
    assert error.startswith(f"{tmp_path / 'two.yaml'}: Deployment shop/web: metadata.name: name clash")
    assert str(tmp_path / "one.yaml") in error


def test_selector_must_match_the_template_and_documents_are_counted(tmp_path):
    path = write(tmp_path, "web.yaml", "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\n" + DEPLOYMENT.replace("labels: {app: web}", "labels: {app: other}"))
    [error] = errors_of(path)
    assert error.startswith(f"{path} (document 2): Deployment shop/web: spec.template.metadata.labels: must include")


def test_a_missing_path_and_an_empty_folder_are_errors(tmp_path):
    assert "no such file or folder" in errors_of(tmp_path / "nope.yaml")[0]
    assert "no .yaml/.yml/.json files" in errors_of(tmp_path)[0]
