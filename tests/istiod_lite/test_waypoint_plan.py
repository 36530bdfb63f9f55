"""The waypoint controller's pure core: Waypoint/Gateway + what exists -> writes and status."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from istiod_lite.config import parse_args
from istiod_lite.kube.waypoints import (
    CONFIG_ANNOTATION,
    ROOT_CERT_ANNOTATION,
    DeploymentSettings,
    covers,
    desired_objects,
    plan_waypoint,
    read_owner,
)
from meshcore.identity.ca import CertificateAuthority
from waypoint.settings import load_settings

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
SETTINGS = DeploymentSettings(
    image="registry.example/ambient-mesh:1.2",
    istiod_address="istiod.istio-system.svc:15012",
    trust_domain="cluster.local",
    root_cert_pem="-----BEGIN CERTIFICATE-----\nroot\n-----END CERTIFICATE-----\n",
)


def waypoint(name="wp", *, spec=None, status=None, generation=1, uid="uid-1"):
    obj = {
        "apiVersion": "istiodlite.io/v1alpha1",
        "kind": "Waypoint",
        "metadata": {"name": name, "namespace": "shop", "uid": uid, "generation": generation},
        "spec": {"trafficType": "service"} if spec is None else spec,
    }
    if status is not None:
        obj["status"] = status
    return obj


def gateway(name="wp", *, class_name="istio-waypoint", labels=None):
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {"name": name, "namespace": "shop", "uid": "gw-uid", "generation": 3, "labels": labels or {}},
        "spec": {"gatewayClassName": class_name, "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]},
    }


def as_stored(obj, cluster_ip="10.96.0.20"):
    """`obj` as the API server returns it: defaults added, a uid, a clusterIP for Services."""
    stored = copy.deepcopy(obj)
    stored["metadata"].update(uid=f"{obj['kind']}-uid", resourceVersion="7", creationTimestamp="2026-11-26T11:00:00Z")
    if obj["kind"] == "Service":
        stored["spec"].update(clusterIP=cluster_ip, type="ClusterIP", sessionAffinity="None")
    if obj["kind"] == "Deployment":
        stored["spec"].update(revisionHistoryLimit=10, progressDeadlineSeconds=600)
        pod = stored["spec"]["template"]["spec"]
        pod.update(restartPolicy="Always", dnsPolicy="ClusterFirst", schedulerName="default-scheduler")
        pod["containers"][0].update(imagePullPolicy="IfNotPresent", terminationMessagePath="/dev/termination-log")
        pod["containers"][0]["readinessProbe"].update(timeoutSeconds=1, periodSeconds=10, failureThreshold=3)
    return stored


def all_stored(owner_obj):
    owner = read_owner("Waypoint", owner_obj)
    return {kind: as_stored(obj) for kind, obj in desired_objects(owner, SETTINGS).items()}


def plan(**kwargs):
    kwargs.setdefault("waypoint", None)
    kwargs.setdefault("gateway", None)
    kwargs.setdefault("observed", {})
    return plan_waypoint(settings=SETTINGS, now=NOW, **kwargs)


def test_a_new_waypoint_gets_its_three_objects_owned_by_it():
    result = plan(waypoint=waypoint(spec={"trafficType": "service", "replicas": 3}))
    assert [obj["kind"] for obj in result.applies] == ["ServiceAccount", "Service", "Deployment"]
    for obj in result.applies:
        assert obj["metadata"]["name"] == "wp" and obj["metadata"]["namespace"] == "shop"
        assert obj["metadata"]["labels"] == {
            "gateway.networking.k8s.io/gateway-name": "wp", "gateway.istio.io/managed": "istiod-lite"
        }
        assert obj["metadata"]["ownerReferences"] == [{
            "apiVersion": "istiodlite.io/v1alpha1", "kind": "Waypoint", "name": "wp", "uid": "uid-1",
            "controller": True, "blockOwnerDeletion": True,
        }]
    _, service, deployment = result.applies
    assert service["spec"]["ports"] == [
        {"name": "mesh", "port": 15008, "targetPort": 15008, "protocol": "TCP", "appProtocol": "hbone"}
    ]
    assert service["spec"]["selector"] == {"gateway.networking.k8s.io/gateway-name": "wp"}
    assert deployment["spec"]["replicas"] == 3
    template = deployment["spec"]["template"]
    assert template["metadata"]["labels"] == {
        "gateway.networking.k8s.io/gateway-name": "wp", "istio.io/dataplane-mode": "none"
    }
    assert template["spec"]["serviceAccountName"] == "wp"
    [container] = template["spec"]["containers"]
    assert container["image"] == "registry.example/ambient-mesh:1.2"
    assert container["command"] == ["waypoint"]
    assert container["args"][-2:] == ["--address", "$(POD_IP)"]
    assert container["env"] == [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]
    token = template["spec"]["volumes"][1]["projected"]["sources"][0]["serviceAccountToken"]
    assert token["audience"] == "istio-ca"
    # Not accepted as programmed before its Service has an address.
    conditions = {c["type"]: c for c in result.status.body["status"]["conditions"]}
    assert conditions["Accepted"]["status"] == "True"
    assert (conditions["Programmed"]["status"], conditions["Programmed"]["reason"]) == ("False", "Pending")
    assert result.status.body["status"]["addresses"] == []


def test_the_config_the_pod_mounts_is_one_the_waypoint_starts_from(tmp_path: Path):
    ca = CertificateAuthority.generate("cluster.local")
    settings = DeploymentSettings("img", "istiod.istio-system.svc:15012", "example.org", ca.cert_pem.decode())
    deployment = desired_objects(read_owner("Waypoint", waypoint()), settings)["Deployment"]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    # What the Downward API volume writes into /etc/waypoint.
    (tmp_path / "config.yaml").write_text(annotations[CONFIG_ANNOTATION])
    (tmp_path / "root-cert.pem").write_text(annotations[ROOT_CERT_ANNOTATION])
    loaded = load_settings(tmp_path / "config.yaml", address="10.244.3.9")
    assert loaded.address == "10.244.3.9"
    assert loaded.identity.uri == "spiffe://example.org/ns/shop/sa/wp"
    assert loaded.control_plane.address == "istiod.istio-system.svc:15012"
    assert loaded.control_plane.root_cert_path.read_bytes() == ca.cert_pem
    assert str(loaded.control_plane.token_path) == "/var/run/secrets/tokens/istio-token"


def test_objects_as_the_api_server_stores_them_need_no_write_and_status_shows_the_address():
    owner = waypoint()
    result = plan(waypoint=owner, observed=all_stored(owner))
    assert result.applies == () and result.deletes == ()
    status = result.status.body["status"]
    assert status["addresses"] == [{"type": "IPAddress", "value": "10.96.0.20"}]
    programmed = next(c for c in status["conditions"] if c["type"] == "Programmed")
    assert programmed["status"] == "True" and programmed["observedGeneration"] == 1
    # Once the status says so, nothing is written at all: our own writes plan nothing.
    settled = plan(waypoint=waypoint(status=status), observed=all_stored(owner))
    assert settled.applies == () and settled.status is None


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d["spec"].update(replicas=0),
        lambda d: d["spec"]["template"]["spec"]["containers"][0].update(image="evil:latest"),
        lambda d: d["spec"]["template"]["metadata"]["labels"].pop("istio.io/dataplane-mode"),
        lambda d: d["metadata"].update(ownerReferences=[]),
    ],
    ids=["replicas", "image", "pod-label", "owner-reference"],
)
def test_an_edited_deployment_is_planned_back(edit):
    owner = waypoint()
    observed = all_stored(owner)
    edit(observed["Deployment"])
    [apply] = plan(waypoint=owner, observed=observed).applies
    assert apply["kind"] == "Deployment"
    assert covers(apply, desired_objects(read_owner("Waypoint", owner), SETTINGS)["Deployment"])


def test_a_spec_change_updates_the_deployment_and_the_observed_generation():
    old = waypoint(spec={"trafficType": "service", "replicas": 1})
    observed = all_stored(old)
    new = waypoint(spec={"trafficType": "service", "replicas": 2}, generation=2)
    result = plan(waypoint=new, observed=observed)
    [apply] = result.applies
    assert apply["spec"]["replicas"] == 2
    assert {c["observedGeneration"] for c in result.status.body["status"]["conditions"]} == {2}


@pytest.mark.parametrize(
    ("spec", "name", "field"),
    [
        ({"trafficType": "bogus"}, "wp", "spec.trafficType"),
        ({"trafficType": "service", "replicas": -1}, "wp", "spec.replicas"),
        ({"trafficType": "service", "replicas": "two"}, "wp", "spec.replicas"),
        ("not a mapping", "wp", "spec"),
        ({"trafficType": "service"}, "1st-waypoint", "metadata.name"),
    ],
)
def test_an_invalid_waypoint_is_not_accepted_and_names_the_field(spec, name, field):
    result = plan(waypoint=waypoint(name, spec=spec))
    assert result.applies == () and result.deletes == ()
    conditions = {c["type"]: c for c in result.status.body["status"]["conditions"]}
    accepted = conditions["Accepted"]
    assert (accepted["status"], accepted["reason"]) == ("False", "Invalid")
    assert accepted["message"].startswith(f"{field}: ")
    assert conditions["Programmed"]["status"] == "False"
    assert "addresses" not in result.status.body["status"]


def test_an_invalid_waypoint_is_reported_once_and_keeps_what_runs():
    valid = waypoint()
    observed = all_stored(valid)
    first = plan(waypoint=waypoint(spec={"trafficType": "bogus"}, generation=2), observed=observed)
    assert first.applies == () and first.deletes == ()  # the last valid spec keeps running
    status = first.status.body["status"]
    assert "stays deployed" in next(c for c in status["conditions"] if c["type"] == "Programmed")["message"]
    again = plan(
        waypoint=waypoint(spec={"trafficType": "bogus"}, generation=2, status=status),
        observed=observed,
        # later: still invalid, a minute on: no new write
    )
    assert again.status is None


def test_a_status_condition_keeps_its_transition_time_while_it_holds():
    owner = waypoint()
    observed = all_stored(owner)
    status = plan(waypoint=owner, observed=observed).status.body["status"]
    later = plan_waypoint(
        waypoint=waypoint(status=status, generation=2), gateway=None, observed=observed,
        settings=SETTINGS, now=NOW + timedelta(hours=1),
    )
    for condition in later.status.body["status"]["conditions"]:
        assert condition["lastTransitionTime"] == "2026-11-26T12:00:00Z"
        assert condition["observedGeneration"] == 2


def test_when_the_owner_goes_only_the_objects_we_made_for_it_are_deleted():
    observed = all_stored(waypoint())
    observed["ServiceAccount"]["metadata"]["ownerReferences"] = []  # someone else's now
    result = plan(observed=observed)
    assert result.deletes == (("Service", "Service-uid"), ("Deployment", "Deployment-uid"))
    assert result.applies == () and result.status is None
    # Another gateway controller's Deployment, owned by a Gateway of another class.
    istio_gateway = all_stored(waypoint())["Deployment"]
    istio_gateway["metadata"]["labels"]["gateway.istio.io/managed"] = "istio.io-gateway-controller"
    istio_gateway["metadata"]["ownerReferences"][0].update(kind="Gateway", apiVersion="gateway.networking.k8s.io/v1")
    assert plan(gateway=gateway(class_name="istio"), observed={"Deployment": istio_gateway}).deletes == ()


def test_an_istio_waypoint_gateway_is_deployed_and_another_class_is_not():
    result = plan(gateway=gateway())
    assert len(result.applies) == 3
    assert result.applies[0]["metadata"]["ownerReferences"][0]["kind"] == "Gateway"
    assert result.applies[2]["spec"]["replicas"] == 1
    assert result.status.kind == "Gateway"
    assert plan(gateway=gateway(class_name="istio")) == plan()


def test_a_gateway_with_a_bad_waypoint_for_label_names_it():
    result = plan(gateway=gateway(labels={"istio.io/waypoint-for": "everything"}))
    accepted = result.status.body["status"]["conditions"][0]
    assert accepted["status"] == "False"
    assert accepted["message"].startswith("metadata.labels[istio.io/waypoint-for]: ")


def test_a_waypoint_and_a_gateway_of_one_name_run_as_the_waypoint():
    result = plan(waypoint=waypoint(), gateway=gateway())
    assert result.applies[0]["metadata"]["ownerReferences"][0]["kind"] == "Waypoint"
    assert result.status.kind == "Waypoint"


@pytest.mark.parametrize(
    ("actual", "desired", "expected"),
    [
        ({"a": 1, "b": 2}, {"a": 1}, True),
        ({"a": 1}, {"a": 1, "b": 2}, False),
        ({"l": [{"x": 1, "y": 2}]}, {"l": [{"x": 1}]}, True),
        ({"l": [{"x": 1}, {"x": 2}]}, {"l": [{"x": 1}]}, False),
        ({"a": "1"}, {"a": 1}, False),
        (None, {"a": 1}, False),
    ],
)
def test_covers(actual, desired, expected):
    assert covers(actual, desired) is expected


def test_the_waypoint_image_is_a_flag_and_a_bad_one_is_named(capsys):
    assert parse_args(["--source", "kube"])[0].waypoint_image == "ambient-mesh:latest"
    assert parse_args(["--source", "kube", "--waypoint-image", "reg.example/mesh:2"])[0].waypoint_image == "reg.example/mesh:2"
    with pytest.raises(SystemExit):
        parse_args(["--source", "kube", "--waypoint-image", "two words"])
    assert "--waypoint-image: 'two words' is not an image reference" in capsys.readouterr().err
