"""The object store: what apply/delete/label do to objects, as the API server and controllers would."""

from __future__ import annotations

import random
import re
import textwrap
from pathlib import Path

import pytest
import yaml

from ambientctl.runtime.manifests import ManifestErrors, ObjectKey, load_manifests
from ambientctl.runtime.store import ObjectStore, StoreError

NAMESPACE = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n"


def deployment(replicas: int = 2, image_arg: str = "server.py") -> str:
    return textwrap.dedent(
        f"""\
        apiVersion: apps/v1
        kind: Deployment
        metadata: {{name: web, namespace: shop}}
        spec:
          replicas: {replicas}
          selector: {{matchLabels: {{app: web}}}}
          template:
            metadata: {{labels: {{app: web, version: v1}}}}
            spec:
              containers:
                - name: web
                  command: [python3, {image_arg}]
                  ports: [{{name: http, containerPort: 8080}}]
        """
    )


SERVICE = """\
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: http}]
"""


@pytest.fixture
def store(tmp_path: Path) -> ObjectStore:
    return ObjectStore(tmp_path / "store")


def apply(store: ObjectStore, folder: Path, *documents: str, seed: int = 1) -> list[str]:
    path = folder / f"apply-{len(list(folder.glob('apply-*')))}.yaml"
    path.write_text("---\n".join(documents))
    return [str(change) for change in store.apply(load_manifests(path), rng=random.Random(seed))]


def pods(store: ObjectStore) -> dict[str, dict]:
    return {key.name: body for key, body in store.objects().items() if key.kind == "Pod"}


def test_a_deployment_gets_its_pods_named_and_owned_like_kubernetes(store, tmp_path):
    assert apply(store, tmp_path, NAMESPACE, deployment()) == ["namespace/shop created", "deployment.apps/web created"]
    created = pods(store)
    assert len(created) == 2
    for name, pod in created.items():
        template_hash = pod["metadata"]["labels"]["pod-template-hash"]
        assert re.fullmatch(rf"web-{template_hash}-[bcdfghjklmnpqrstvwxz2456789]{{5}}", name)
        assert pod["metadata"]["labels"]["app"] == "web"
        [owner] = pod["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["name"], owner["controller"]) == ("ReplicaSet", f"web-{template_hash}", True)
        assert pod["spec"]["serviceAccountName"] == "default"
        assert pod["status"] == {"phase": "Pending"}
        assert pod["metadata"]["uid"] and pod["metadata"]["creationTimestamp"]


def test_reapplying_keeps_pods_scaling_and_template_changes_replace_them(store, tmp_path):
    apply(store, tmp_path, NAMESPACE, deployment(replicas=3))
    first = set(pods(store))
    assert apply(store, tmp_path, NAMESPACE, deployment(replicas=3), seed=2) == ["namespace/shop unchanged", "deployment.apps/web unchanged"]
    assert set(pods(store)) == first
    apply(store, tmp_path, deployment(replicas=1))
    assert len(pods(store)) == 1 and set(pods(store)) < first
    apply(store, tmp_path, deployment(replicas=2, image_arg="server-v2.py"), seed=3)
    replaced = pods(store)
    assert len(replaced) == 2 and not set(replaced) & first
    assert all(pod["spec"]["containers"][0]["command"] == ["python3", "server-v2.py"] for pod in replaced.values())


def test_deleting_a_deployment_or_namespace_deletes_what_belongs_to_it(store, tmp_path):
    apply(store, tmp_path, NAMESPACE, deployment(), SERVICE)
    web = ObjectKey(group="apps", kind="Deployment", namespace="shop", name="web")
    assert [str(c) for c in store.delete([web])] == ["deployment.apps/web deleted"]
    assert pods(store) == {}
    shop = ObjectKey(group="", kind="Namespace", namespace="", name="shop")
    store.delete([shop])
    assert {key.namespace for key in store.objects()} == {""}  # only the default namespace is left
    assert [str(c) for c in store.delete([web])] == ["deployment.apps/web not found"]


def test_services_get_stable_vips_and_defaults(store, tmp_path):
    apply(store, tmp_path, NAMESPACE, SERVICE, SERVICE.replace("name: web", "name: api"))
    services = {key.name: body["spec"] for key, body in store.objects().items() if key.kind == "Service"}
    assert {services["web"]["clusterIP"], services["api"]["clusterIP"]} == {"198.19.128.1", "198.19.128.2"}
    assert services["web"]["type"] == "ClusterIP" and services["web"]["ports"][0]["protocol"] == "TCP"
    apply(store, tmp_path, NAMESPACE, SERVICE)
    again = next(body for key, body in store.objects().items() if key.name == "web" and key.kind == "Service")
    assert again["spec"]["clusterIP"] == services["web"]["clusterIP"]


def test_nothing_is_applied_when_one_object_is_refused(store, tmp_path):
    with pytest.raises(ManifestErrors) as caught:
        apply(store, tmp_path, deployment(), SERVICE)  # namespace shop does not exist
    messages = [str(error) for error in caught.value.errors]
    assert any("Deployment shop/web: metadata.namespace: namespace 'shop' does not exist" in m for m in messages)
    assert all("apply-0.yaml" in m for m in messages)
    assert {key.kind for key in store.objects()} == {"Namespace"}  # just `default`


def test_admission_refuses_unknown_accounts_and_changes_kubernetes_forbids(store, tmp_path):
    pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: shop, labels: {a: b}}\nspec: {containers: [{name: c, command: [sleep, '60']}]}\n"
    apply(store, tmp_path, NAMESPACE, pod, SERVICE.replace("ports:", "clusterIP: 198.19.130.7\n  ports:"))
    with pytest.raises(ManifestErrors) as caught:
        apply(
            store,
            tmp_path,
            pod.replace("'60'", "'61'"),
            SERVICE.replace("ports:", "clusterIP: 198.19.130.8\n  ports:"),
            deployment().replace("      containers:", "      serviceAccountName: ghost\n      containers:"),
        )
    messages = "\n".join(str(error) for error in caught.value.errors)
    assert "Pod shop/p: spec: a Pod's spec cannot change" in messages
    assert "Service shop/web: spec.clusterIP: field is immutable (it is 198.19.130.7)" in messages
    assert "Deployment shop/web: spec.template.spec.serviceAccountName: service account 'ghost' does not exist" in messages
    assert apply(store, tmp_path, pod.replace("a: b", "a: c")) == ["pod/p configured"]  # labels may change


def test_labels_like_kubectl(store, tmp_path):
    apply(store, tmp_path, NAMESPACE)
    shop = ObjectKey(group="", kind="Namespace", namespace="", name="shop")
    mode = "istio.io/dataplane-mode"
    assert str(store.label(shop, set_labels={mode: "ambient"}, remove=(), overwrite=False)) == "namespace/shop labeled"
    with pytest.raises(StoreError, match="already has a value \\(ambient\\), and --overwrite is false"):
        store.label(shop, set_labels={mode: "none"}, remove=(), overwrite=False)
    assert store.label(shop, set_labels={mode: "ambient"}, remove=(), overwrite=False).action == "not labeled"
    assert store.label(shop, set_labels={}, remove=[mode], overwrite=False).action == "unlabeled"
    assert "labels" not in store.get(shop)["metadata"] or store.get(shop)["metadata"]["labels"] == {}
    with pytest.raises(StoreError, match='namespace "nope" not found'):
        store.label(ObjectKey(group="", kind="Namespace", namespace="", name="nope"), set_labels={"a": "b"}, remove=(), overwrite=False)


def test_one_complete_yaml_file_per_object_for_the_control_plane(store, tmp_path):
    apply(store, tmp_path, NAMESPACE, deployment(), SERVICE)
    files = sorted(store.directory.glob("*"))
    assert not [f for f in files if f.name.endswith(".tmp")]
    documents = [yaml.safe_load(f.read_text()) for f in files if f.suffix == ".yaml"]
    assert sorted(d["kind"] for d in documents) == ["Deployment", "Namespace", "Namespace", "Pod", "Pod", "Service"]
    assert all(d["metadata"].get("namespace") == "shop" for d in documents if d["kind"] != "Namespace")
