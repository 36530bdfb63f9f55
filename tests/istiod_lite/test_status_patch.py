"""The status writer's pure core: an object + translation's errors -> its status patch; and its
shell's retries when the API refuses."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import kubernetes
import prometheus_client
import pytest
import trio

from istiod_lite.kube.api import WriteFailed
from istiod_lite.kube.status import GATEWAY_CONTROLLER, StatusWriter, status_patch
from istiod_lite.model import Translator
from istiod_lite.model.errors import TranslationError
from istiod_lite.sources.base import ObjectEvent

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def error(kind="AuthorizationPolicy", field="spec.rules[0].from[0].source.ipBlocks[0]", message="'10.0.0.0/99' is not an IP address or CIDR"):
    return TranslationError(kind=kind, namespace="shop", name="p", field=field, message=message)


def obj(kind="AuthorizationPolicy", status=None, generation=4, spec=None):
    body = {"kind": kind, "metadata": {"name": "p", "namespace": "shop", "generation": generation}, "spec": spec or {}}
    if status is not None:
        body["status"] = status
    return body


def accepted(patch):
    return next(c for c in patch["status"]["conditions"] if c["type"] == "Accepted")


@pytest.mark.parametrize("kind", ["AuthorizationPolicy", "PeerAuthentication", "VirtualService", "DestinationRule"])
def test_a_rejected_istio_object_gets_a_false_condition_naming_the_field(kind):
    patch = status_patch(kind, obj(kind), [error(kind)], now=NOW)
    condition = accepted(patch)
    assert (condition["status"], condition["reason"]) == ("False", "Invalid")
    assert condition["message"] == "spec.rules[0].from[0].source.ipBlocks[0]: '10.0.0.0/99' is not an IP address or CIDR"
    assert condition["observedGeneration"] == 4 and condition["lastTransitionTime"] == "2026-11-26T12:00:00Z"
    assert patch["status"]["validationMessages"] == [{
        "type": {"code": "IST0106", "name": "SchemaValidationError"},
        "level": "ERROR",
        "documentationUrl": "https://istio.io/latest/docs/reference/config/analysis/ist0106/",
    }]


def test_a_missing_reference_is_reported_as_such():
    missing = error("VirtualService", "spec.http[0].route[0].destination.subset", "subset 'v2' is not defined")
    patch = status_patch("VirtualService", obj("VirtualService"), [missing], unresolved=frozenset({missing}), now=NOW)
    assert accepted(patch)["reason"] == "ReferenceNotFound"
    assert patch["status"]["validationMessages"][0]["type"]["code"] == "IST0101"


def test_an_object_never_rejected_gets_no_status_write():
    assert status_patch("AuthorizationPolicy", obj(), [], now=NOW) is None


def test_the_same_rejection_is_written_once():
    first = status_patch("AuthorizationPolicy", obj(), [error()], now=NOW)
    later = status_patch("AuthorizationPolicy", obj(status=first["status"]), [error()], now=NOW + timedelta(minutes=5))
    assert later is None


def test_a_fixed_object_is_cleared_and_then_left_alone():
    rejected = status_patch("AuthorizationPolicy", obj(), [error()], now=NOW)["status"]
    cleared = status_patch("AuthorizationPolicy", obj(status=rejected, generation=5), [], now=NOW + timedelta(minutes=1))
    condition = accepted(cleared)
    assert (condition["status"], condition["reason"], condition["observedGeneration"]) == ("True", "Accepted", 5)
    assert condition["lastTransitionTime"] == "2026-11-26T12:01:00Z"
    assert cleared["status"]["validationMessages"] is None  # a merge patch deletes the field
    settled = {key: value for key, value in cleared["status"].items() if value is not None}  # as stored
    assert status_patch("AuthorizationPolicy", obj(status=settled, generation=5), [], now=NOW) is None


def test_other_controllers_conditions_are_kept():
    reconciled = {"type": "Reconciled", "status": "True", "reason": "Synced", "message": "", "lastTransitionTime": "x"}
    patch = status_patch("AuthorizationPolicy", obj(status={"conditions": [reconciled]}), [error()], now=NOW)
    assert patch["status"]["conditions"][0] == reconciled


def test_a_malformed_status_does_not_stop_the_write():
    patch = status_patch("AuthorizationPolicy", obj(status={"conditions": "garbage"}), [error()], now=NOW)
    assert [c["type"] for c in patch["status"]["conditions"]] == ["Accepted"]


ROUTE_SPEC = {"parentRefs": [{"group": "", "kind": "Service", "name": "reviews"}], "rules": []}
OTHER_PARENT = {"parentRef": {"name": "edge"}, "controllerName": "example.com/other", "conditions": []}


def route_error(field="spec.rules[0].matches[0].path.type", message="'Glob' is not one of Exact, PathPrefix"):
    return TranslationError(kind="HTTPRoute", namespace="shop", name="p", field=field, message=message)


def test_a_rejected_route_says_so_per_parent_for_our_controller_only():
    route = obj("HTTPRoute", spec=ROUTE_SPEC, status={"parents": [OTHER_PARENT]})
    patch = status_patch("HTTPRoute", route, [route_error()], now=NOW)
    other, ours = patch["status"]["parents"]
    assert other == OTHER_PARENT
    assert ours["parentRef"] == ROUTE_SPEC["parentRefs"][0]
    assert ours["controllerName"] == GATEWAY_CONTROLLER
    conditions = {c["type"]: c for c in ours["conditions"]}
    assert (conditions["Accepted"]["status"], conditions["Accepted"]["reason"]) == ("False", "UnsupportedValue")
    assert conditions["Accepted"]["message"].startswith("spec.rules[0].matches[0].path.type: ")
    assert conditions["ResolvedRefs"]["status"] == "True"


def test_a_route_to_a_missing_backend_is_accepted_but_not_resolved():
    missing = route_error("spec.rules[0].backendRefs[0]", "Service shop/nope does not exist")
    patch = status_patch("HTTPRoute", obj("HTTPRoute", spec=ROUTE_SPEC), [missing], unresolved=frozenset({missing}), now=NOW)
    conditions = {c["type"]: c for c in patch["status"]["parents"][0]["conditions"]}
    assert conditions["Accepted"]["status"] == "True"
    assert (conditions["ResolvedRefs"]["status"], conditions["ResolvedRefs"]["reason"]) == ("False", "BackendNotFound")


def test_a_fixed_route_is_cleared_once():
    rejected = status_patch("HTTPRoute", obj("HTTPRoute", spec=ROUTE_SPEC), [route_error()], now=NOW)["status"]
    cleared = status_patch("HTTPRoute", obj("HTTPRoute", spec=ROUTE_SPEC, status=rejected), [], now=NOW)["status"]
    assert {c["status"] for c in cleared["parents"][0]["conditions"]} == {"True"}
    assert status_patch("HTTPRoute", obj("HTTPRoute", spec=ROUTE_SPEC, status=cleared), [], now=NOW) is None
    assert status_patch("HTTPRoute", obj("HTTPRoute", spec=ROUTE_SPEC), [], now=NOW) is None


async def test_a_refused_status_write_is_retried_with_backoff_not_per_event(autojump_clock, monkeypatch):
    """The shell: the API refuses every write; events keep coming; attempts stay few."""
    translator = Translator(registry=prometheus_client.CollectorRegistry())
    writer = StatusWriter(kubernetes.client.ApiClient(), translator, registry=prometheus_client.CollectorRegistry())
    attempts: list[float] = []

    def refuse(*args):
        attempts.append(trio.current_time())
        raise WriteFailed("patch status of authorizationpolicies.security.istio.io shop/p: 403 forbidden")

    writer._writer.patch_status = refuse

    async def in_this_thread(fn, *args, **kwargs):  # the autojump clock would skip thread time
        return fn(*args)

    monkeypatch.setattr(trio.to_thread, "run_sync", in_this_thread)
    policy = {
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy", "metadata": {"name": "p", "namespace": "shop"},
        "spec": {"rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.0/99"]}}]}]},
    }
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        writer.source_synced()
        valid = {**policy, "metadata": {"name": "ok", "namespace": "shop"}, "spec": {}}
        for _ in range(60):  # events for it and for another policy, every second for a minute
            for event in (
                ObjectEvent("AuthorizationPolicy", "upsert", "shop", "p", policy),
                ObjectEvent("AuthorizationPolicy", "upsert", "shop", "ok", valid),
            ):
                translator.apply(event)
                writer.observe(event)
            await trio.sleep(1.0)
        nursery.cancel_scope.cancel()
    # Backoff 0.2 s doubling to 30 s: about 9 attempts in a minute, not 60 or a busy loop.
    assert 5 <= len(attempts) <= 10
    assert attempts[-1] - attempts[-2] > 12.7  # the 8th backoff: 0.2 s * 2**6
