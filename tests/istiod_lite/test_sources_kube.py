"""The kube source against a real kube-apiserver: what is created, changed and deleted there
arrives as ObjectEvents, across watch restarts, a cut connection and a forced 410 Gone."""

from __future__ import annotations

import functools
import json
import math
import urllib.request
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import kubernetes.client
import prometheus_client
import pytest
import trio

from istiod_lite.sources import kube
from istiod_lite.sources.base import ObjectEvent, SourceEvent, SyncComplete
from istiod_lite.sources.kube import KubeSource

EVENT_TIMEOUT = 10


async def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """A blocking client call, off the event loop the source runs on."""
    return await trio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))


class Watcher:
    """A running KubeSource and the events it sent."""

    def __init__(self, receive: trio.MemoryReceiveChannel[SourceEvent], registry) -> None:
        self._receive = receive
        self._registry = registry

    async def until_synced(self) -> list[ObjectEvent]:
        events = []
        with trio.fail_after(EVENT_TIMEOUT):
            while not isinstance(event := await self._receive.receive(), SyncComplete):
                events.append(event)
        return events

    async def next_in(self, namespace: str) -> ObjectEvent:
        """The next event about an object in `namespace` (or the namespace itself)."""
        with trio.fail_after(EVENT_TIMEOUT):
            while True:
                event = await self._receive.receive()
                assert not isinstance(event, SyncComplete), "SyncComplete sent twice"
                if event.namespace == namespace or (
                    event.kind == "Namespace" and event.name == namespace
                ):
                    return event

    def assert_nothing_sent(self) -> None:
        with pytest.raises(trio.WouldBlock):
            self._receive.receive_nowait()

    def count(self, metric: str, kind: str) -> float:
        name = f"istiod_lite_kube_{metric}_total"
        return self._registry.get_sample_value(name, {"kind": kind}) or 0


@asynccontextmanager
async def watching(api_client: kubernetes.client.ApiClient) -> AsyncIterator[Watcher]:
    registry = prometheus_client.CollectorRegistry()
    send, receive = trio.open_memory_channel[SourceEvent](math.inf)
    async with trio.open_nursery() as nursery:
        await nursery.start(KubeSource(api_client, registry=registry).run, send)
        yield Watcher(receive, registry)
        nursery.cancel_scope.cancel()


def pod(name: str, node: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": {"app": "web"}},
        "spec": {
            "nodeName": node,  # no scheduler here
            "serviceAccountName": "web",
            "containers": [{"name": "web", "image": "web", "ports": [{"containerPort": 8080}]}],
        },
    }


def custom(kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": kind,
        "metadata": {"name": name},
        "spec": spec,
    }


async def test_objects_created_changed_and_deleted_arrive_as_events(
    kube_apiserver, kube_namespace, monkeypatch
):
    # Short server-side watches: the source has to resume several of them in this test
    # without losing or repeating anything.
    monkeypatch.setattr(kube, "WATCH_SECONDS", 1)
    ns = kube_namespace
    core = kubernetes.client.CoreV1Api(kube_apiserver.api_client)
    objects = kubernetes.client.CustomObjectsApi(kube_apiserver.api_client)
    await call(core.create_namespaced_service_account, ns, {"metadata": {"name": "web"}})

    async with watching(kube_apiserver.api_client) as watcher:
        initial = {(e.kind, e.namespace, e.name): e for e in await watcher.until_synced()}
        namespace = initial[("Namespace", "", ns)]
        assert namespace.action == "upsert"
        assert namespace.obj["metadata"]["labels"]["istio.io/dataplane-mode"] == "ambient"
        # Listed objects look like watched ones: kind and apiVersion filled in.
        account = initial[("ServiceAccount", ns, "web")].obj
        assert (account["apiVersion"], account["kind"]) == ("v1", "ServiceAccount")

        await call(core.create_namespaced_pod, ns, pod("web-1", node="node-a"))
        event = await watcher.next_in(ns)
        assert (event.kind, event.action, event.name) == ("Pod", "upsert", "web-1")
        assert event.obj["spec"]["nodeName"] == "node-a"
        assert event.obj["status"]["phase"] == "Pending"

        await trio.sleep(1.5)  # at least one watch ended by the server and resumed meanwhile

        # What a kubelet reports once the pod runs.
        status = {
            "status": {
                "phase": "Running",
                "podIP": "10.244.1.7",
                "podIPs": [{"ip": "10.244.1.7"}],
                "hostIP": "192.168.0.11",
                "conditions": [{"type": "Ready", "status": "True"}],
            }
        }
        await call(core.patch_namespaced_pod_status, "web-1", ns, status)
        event = await watcher.next_in(ns)
        assert (event.kind, event.action, event.name) == ("Pod", "upsert", "web-1")
        assert event.obj["status"]["podIP"] == "10.244.1.7"
        assert event.obj["status"]["phase"] == "Running"
        assert {"type": "Ready", "status": "True"} in [
            {k: c[k] for k in ("type", "status")} for c in event.obj["status"]["conditions"]
        ]

        service = {
            "metadata": {"name": "web"},
            "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]},
        }
        await call(core.create_namespaced_service, ns, service)
        event = await watcher.next_in(ns)
        assert (event.kind, event.action, event.name) == ("Service", "upsert", "web")
        assert event.obj["spec"]["clusterIP"].startswith("10.96.")
        assert event.obj["spec"]["ports"][0]["targetPort"] == 8080

        policy = custom(
            "AuthorizationPolicy",
            "allow-web",
            {
                "selector": {"matchLabels": {"app": "web"}},
                "action": "ALLOW",
                "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/x/sa/y"]}}]}],
            },
        )
        await call(
            objects.create_namespaced_custom_object,
            "security.istio.io", "v1", ns, "authorizationpolicies", policy,
        )
        event = await watcher.next_in(ns)
        assert (event.kind, event.action) == ("AuthorizationPolicy", "upsert")
        assert event.name == "allow-web"
        assert event.obj["spec"] == policy["spec"]
        assert event.obj["apiVersion"] == "security.istio.io/v1"

        strict = custom("PeerAuthentication", "strict", {"mtls": {"mode": "STRICT"}})
        await call(
            objects.create_namespaced_custom_object,
            "security.istio.io", "v1", ns, "peerauthentications", strict,
        )
        event = await watcher.next_in(ns)
        assert (event.kind, event.action, event.name) == ("PeerAuthentication", "upsert", "strict")
        assert event.obj["spec"] == {"mtls": {"mode": "STRICT"}}

        labels = {"metadata": {"labels": {"istio.io/use-waypoint": "wp"}}}
        await call(core.patch_namespace, ns, labels)
        event = await watcher.next_in(ns)
        assert (event.kind, event.action, event.namespace) == ("Namespace", "upsert", "")
        assert event.obj["metadata"]["labels"]["istio.io/use-waypoint"] == "wp"

        await call(core.delete_namespaced_pod, "web-1", ns, grace_period_seconds=0)
        # A scheduled pod is first marked terminating, then removed (grace 0: no kubelet to
        # wait for).
        event = await watcher.next_in(ns)
        assert (event.kind, event.action) == ("Pod", "upsert")
        assert "deletionTimestamp" in event.obj["metadata"]
        assert await watcher.next_in(ns) == ObjectEvent("Pod", "delete", ns, "web-1", None)
        await call(
            objects.delete_namespaced_custom_object,
            "security.istio.io", "v1", ns, "authorizationpolicies", "allow-web",
        )
        assert await watcher.next_in(ns) == ObjectEvent(
            "AuthorizationPolicy", "delete", ns, "allow-web", None
        )
        for kind in ("Pod", "Namespace", "ServiceAccount", "AuthorizationPolicy"):
            assert watcher.count("watch_errors", kind) == 0
            assert watcher.count("relists", kind) == 0


class CuttableProxy:
    """A TCP forwarder to the API server whose connections the test can cut and refuse."""

    def __init__(self, target_port: int) -> None:
        self._target_port = target_port
        self._refusing = False
        self._scopes: set[trio.CancelScope] = set()
        self.port = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        [listener] = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listener.socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._forward, [listener])

    def cut(self) -> None:
        """Drop every open connection and refuse new ones until `restore`."""
        self._refusing = True
        for scope in self._scopes:
            scope.cancel()

    def restore(self) -> None:
        self._refusing = False

    async def _forward(self, client: trio.SocketStream) -> None:
        async with client:
            if self._refusing:
                return
            with trio.CancelScope() as scope:
                self._scopes.add(scope)
                try:
                    async with await trio.open_tcp_stream("127.0.0.1", self._target_port) as server:
                        async with trio.open_nursery() as nursery:
                            nursery.start_soon(_pipe, client, server)
                            nursery.start_soon(_pipe, server, client)
                finally:
                    self._scopes.discard(scope)


async def _pipe(source: trio.SocketStream, sink: trio.SocketStream) -> None:
    try:
        async for chunk in source:
            await sink.send_all(chunk)
        await sink.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


@asynccontextmanager
async def behind_proxy(
    kube_apiserver,
) -> AsyncIterator[tuple[CuttableProxy, kubernetes.client.ApiClient]]:
    proxy = CuttableProxy(int(kube_apiserver.url.rsplit(":", 1)[1]))
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.run)
        with kube_apiserver.client(f"https://127.0.0.1:{proxy.port}") as api_client:
            yield proxy, api_client
        nursery.cancel_scope.cancel()


def compact_etcd(etcd_url: str) -> None:
    """Compact etcd's history up to now: every older resourceVersion is gone for watches."""

    def post(path: str, body: dict[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(
            etcd_url + path, data=json.dumps(body).encode(), method="POST"
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.load(response)

    revision = int(post("/v3/kv/range", {"key": "AA=="})["header"]["revision"])
    post("/v3/kv/compaction", {"revision": revision, "physical": True})


async def test_watch_survives_a_cut_and_a_410_by_relisting(kube_apiserver, kube_namespace):
    ns = kube_namespace
    core = kubernetes.client.CoreV1Api(kube_apiserver.api_client)
    for name in ("keep", "gone"):
        await call(core.create_namespaced_service_account, ns, {"metadata": {"name": name}})

    async with behind_proxy(kube_apiserver) as (proxy, api_client), watching(api_client) as watcher:
        synced = {(e.kind, e.namespace, e.name) for e in await watcher.until_synced()}
        assert {("ServiceAccount", ns, "keep"), ("ServiceAccount", ns, "gone")} <= synced

        proxy.cut()
        # While the source cannot reach the API server, the world moves on, and etcd forgets
        # the history the source would need to catch up by watching (ServiceAccounts have no
        # watch cache on this server, see scripts/kube-apiserver.sh).
        await call(core.delete_namespaced_service_account, "gone", ns)
        labels = {"metadata": {"labels": {"v": "2"}}}
        await call(core.patch_namespaced_service_account, "keep", ns, labels)
        await call(core.create_namespaced_service_account, ns, {"metadata": {"name": "new"}})
        await call(compact_etcd, kube_apiserver.etcd_url)
        with trio.fail_after(EVENT_TIMEOUT):
            while watcher.count("watch_errors", "ServiceAccount") == 0:
                await trio.sleep(0.05)
        proxy.restore()

        events = [await watcher.next_in(ns) for _ in range(3)]
        assert {(e.action, e.name) for e in events} == {
            ("delete", "gone"),
            ("upsert", "keep"),
            ("upsert", "new"),
        }
        keep = next(e for e in events if e.name == "keep")
        assert keep.obj["metadata"]["labels"] == {"v": "2"}
        assert watcher.count("relists", "ServiceAccount") >= 1

        # Watching again after the relist: changes keep arriving.
        await call(core.delete_namespaced_service_account, "new", ns)
        assert await watcher.next_in(ns) == ObjectEvent("ServiceAccount", "delete", ns, "new", None)


async def test_unreachable_api_server_is_retried_until_it_answers(kube_apiserver, kube_namespace):
    async with behind_proxy(kube_apiserver) as (proxy, api_client):
        proxy.cut()
        async with watching(api_client) as watcher:
            with trio.fail_after(EVENT_TIMEOUT):
                while watcher.count("watch_errors", "Pod") < 2:  # retried, with backoff
                    await trio.sleep(0.05)
            proxy.restore()
            synced = {(e.kind, e.name) for e in await watcher.until_synced()}
            assert ("Namespace", kube_namespace) in synced


async def test_forbidden_kinds_are_retried_and_hold_back_sync(kube_apiserver, kube_namespace):
    """A service account without RBAC rights: every list fails with 403, nothing is synced."""
    core = kubernetes.client.CoreV1Api(kube_apiserver.api_client)
    account = {"metadata": {"name": "nobody"}}
    await call(core.create_namespaced_service_account, kube_namespace, account)
    token_request = await call(
        core.create_namespaced_service_account_token,
        "nobody",
        kube_namespace,
        {"spec": {"audiences": ["https://kubernetes.default.svc.cluster.local"]}},
    )
    with kube_apiserver.client(token=token_request.status.token) as api_client:
        async with watching(api_client) as watcher:
            with trio.fail_after(EVENT_TIMEOUT):
                while watcher.count("watch_errors", "Pod") < 2:
                    await trio.sleep(0.05)
            watcher.assert_nothing_sent()
