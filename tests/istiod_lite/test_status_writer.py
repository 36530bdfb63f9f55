"""The status writer against the real kube-apiserver: a rejected AuthorizationPolicy or
VirtualService says why in its status (as `kubectl describe` shows it); fixing it clears the
condition; an object never rejected gets no status write. Both credentials (conftest.py)."""

from __future__ import annotations

import functools

import kubernetes
import trio

POLICIES = ("security.istio.io", "v1", "authorizationpolicies")
VIRTUAL_SERVICES = ("networking.istio.io", "v1", "virtualservices")


async def call(fn, *args, **kwargs):
    return await trio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))


async def eventually(read, check, timeout: float = 15.0):
    with trio.fail_after(timeout):
        while True:
            value = await call(read)
            if check(value):
                return value
            await trio.sleep(0.1)


def accepted(obj):
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == "Accepted"), None)


async def test_rejected_objects_say_why_until_fixed(istiod_factory, kube_apiserver, kube_namespace, nursery):
    ns = kube_namespace
    custom = kubernetes.client.CustomObjectsApi(kube_apiserver.api_client)
    istiod = istiod_factory()
    await nursery.start(istiod.run)

    def create(kind, name, spec):
        group, version, plural = kind
        body = {"apiVersion": f"{group}/{version}", "kind": {"authorizationpolicies": "AuthorizationPolicy", "virtualservices": "VirtualService"}[plural],
                "metadata": {"name": name}, "spec": spec}
        return call(custom.create_namespaced_custom_object, group, version, ns, plural, body)

    def read(kind, name):
        return functools.partial(custom.get_namespaced_custom_object, kind[0], kind[1], ns, kind[2], name)

    def patch(kind, name, spec):
        return call(custom.patch_namespaced_custom_object, kind[0], kind[1], ns, kind[2], name, {"spec": spec},
                    _content_type="application/merge-patch+json")

    await create(POLICIES, "good", {"action": "ALLOW", "rules": [{"from": [{"source": {"namespaces": [ns]}}]}]})
    await create(POLICIES, "bad-cidr", {"action": "ALLOW", "rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.0/99"]}}]}]})
    await create(VIRTUAL_SERVICES, "bad-weight", {
        "hosts": ["web"], "http": [{"route": [{"destination": {"host": "web"}, "weight": -5}]}],
    })

    policy = await eventually(read(POLICIES, "bad-cidr"), lambda o: accepted(o) is not None)
    condition = accepted(policy)
    assert (condition["status"], condition["reason"]) == ("False", "Invalid")
    assert condition["message"] == "spec.rules[0].from[0].source.ipBlocks[0]: '10.0.0.0/99' is not an IP address or CIDR"
    assert policy["status"]["validationMessages"][0]["type"] == {"code": "IST0106", "name": "SchemaValidationError"}
    service = await eventually(read(VIRTUAL_SERVICES, "bad-weight"), lambda o: accepted(o) is not None)
    assert accepted(service)["message"] == "spec.http[0].route[0].weight: -5 is out of range (0-100)"
    # The status write coming back as a watch event is not translated (and rejected) again.
    await trio.sleep(0.5)
    assert istiod.registry.get_sample_value("istiod_translation_errors_total", {"kind": "AuthorizationPolicy"}) == 1

    # Fixed: the condition turns True and the validation messages go.
    await patch(POLICIES, "bad-cidr", {"rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.0/8"]}}]}]})
    fixed = await eventually(read(POLICIES, "bad-cidr"), lambda o: accepted(o)["status"] == "True")
    assert "validationMessages" not in fixed["status"]
    assert accepted(fixed)["observedGeneration"] == fixed["metadata"]["generation"] == 2
    await patch(VIRTUAL_SERVICES, "bad-weight", {"http": [{"route": [{"destination": {"host": "web"}, "weight": 100}]}]})
    await eventually(read(VIRTUAL_SERVICES, "bad-weight"), lambda o: accepted(o)["status"] == "True")

    # Written on change only: the valid policy has no status; settled objects get no writes.
    assert "status" not in await call(read(POLICIES, "good"))
    writes = istiod.registry.get_sample_value("istiod_lite_status_writes_total", {"kind": "AuthorizationPolicy"})
    assert writes == 2  # rejected, cleared
    await patch(POLICIES, "good", {"action": "ALLOW", "rules": [{"from": [{"source": {"namespaces": [ns, "other"]}}]}]})
    await trio.sleep(1.0)
    assert istiod.registry.get_sample_value("istiod_lite_status_writes_total", {"kind": "AuthorizationPolicy"}) == 2

    for kind, name in ((POLICIES, "good"), (POLICIES, "bad-cidr"), (VIRTUAL_SERVICES, "bad-weight")):
        await call(custom.delete_namespaced_custom_object, kind[0], kind[1], ns, kind[2], name)
