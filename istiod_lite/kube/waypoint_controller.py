"""The waypoint deployment controller's trio shell (kube source only); the decisions are
`istiod_lite/kube/waypoints.py`'s pure `plan_waypoint`.

Task tree (under IstiodLite.run):
    WaypointController.run
    ├── Deployment reflector: list+watch of the Deployments we manage (the source's
    │   reflector, label-selected; the config source does not watch Deployments)
    └── worker: dirty waypoint names -> plan -> writes in worker threads
        └── one sleeper per waypoint whose writes failed (WorkQueue backoff)

Inputs: the app hands every source event to `observe` (Waypoints, Gateways, and the Services
and ServiceAccounts labelled as ours matter), and `source_synced` after the initial
list. Nothing is planned before both the source and the Deployment list are complete: a
Deployment whose Waypoint has not been seen yet is not an orphan.

Each event marks its waypoint name dirty in a `WorkQueue`; the worker plans every dirty
name against the latest objects. A failed write is logged, counted, and the name retried
after the queue's backoff (0.2 s doubling to 30 s). An invalid spec is not a failure: it gets
a status condition once and is planned again only when something changes.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import kubernetes.client
import prometheus_client
import trio

from istiod_lite.kube.api import KubeWriter, WriteFailed
from istiod_lite.kube.queue import WorkQueue
from istiod_lite.kube.waypoints import (
    MANAGED_BY,
    MANAGED_LABEL,
    OWNED_KINDS,
    OWNER_KINDS,
    OWNER_PLURALS,
    DeploymentSettings,
    Plan,
    WaypointKey,
    plan_waypoint,
)
from istiod_lite.sources.base import KindInfo, ObjectEvent, SourceEvent
from istiod_lite.sources.kube import Reflector
from meshcore.log import get_logger

_WRITE_THREADS = 4

_log = get_logger("waypoints")


class WaypointController:
    def __init__(
        self,
        api_client: kubernetes.client.ApiClient,
        settings: DeploymentSettings,
        *,
        registry: prometheus_client.CollectorRegistry,
    ) -> None:
        self._api_client = api_client
        self._settings = settings
        self._writer = KubeWriter(api_client)
        self._limiter = trio.CapacityLimiter(_WRITE_THREADS)
        # kind -> (namespace, name) -> object: the owners and the objects that run them.
        self._objects: dict[str, dict[WaypointKey, Mapping[str, Any]]] = {
            kind: {} for kind in (*OWNER_KINDS, *OWNED_KINDS)
        }
        self._queue: WorkQueue[WaypointKey] = WorkQueue()
        self._source_synced = trio.Event()
        self._errors = prometheus_client.Counter(
            "istiod_lite_waypoint_reconcile_errors",
            "Failed writes of waypoint objects or status (retried with backoff)",
            registry=registry,
        )
        self._writes = prometheus_client.Counter(
            "istiod_lite_waypoint_writes",
            "Writes of waypoint objects and status to the Kubernetes API",
            ("verb", "kind"),
            registry=registry,
        )
        self._watch_errors = prometheus_client.Counter(
            "istiod_lite_waypoint_deployment_watch_errors",
            "Failed lists and watches of waypoint Deployments (retried with backoff)",
            registry=registry,
        )
        self._relists = prometheus_client.Counter(
            "istiod_lite_waypoint_deployment_relists",
            "Lists of waypoint Deployments after their watch expired (410 Gone)",
            registry=registry,
        )

    # --- inputs, from the app's controller loop (never blocks) ---

    def observe(self, event: ObjectEvent) -> None:
        """Take in one source event; only waypoint-related objects are kept."""
        objects = self._objects.get(event.kind)
        if objects is None:
            return
        key = (event.namespace, event.name)
        obj = event.obj if event.action == "upsert" else None
        if event.kind in OWNED_KINDS and obj is not None and not _managed(obj):
            obj = None  # not (or no longer) labelled as ours
        if obj is None:
            if objects.pop(key, None) is None:
                return
        else:
            objects[key] = obj
        self._queue.add(key)

    def source_synced(self) -> None:
        self._source_synced.set()

    # --- the shell ---

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        send, receive = trio.open_memory_channel[SourceEvent](256)
        deployments_listed = trio.Event()
        apps = kubernetes.client.AppsV1Api(self._api_client)
        reflector = Reflector(
            "Deployment",
            KindInfo("apps/v1", "deployments", namespaced=True),
            functools.partial(
                apps.list_deployment_for_all_namespaces, label_selector=f"{MANAGED_LABEL}={MANAGED_BY}"
            ),
            functools.partial(trio.to_thread.run_sync, abandon_on_cancel=True),
            errors=self._watch_errors,
            relists=self._relists,
            send_channel=send,
            listed=deployments_listed,
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reflector.run, name="waypoint-deployment-reflector")
            nursery.start_soon(self._take_deployments, receive)
            nursery.start_soon(self._work, deployments_listed, nursery)
            task_status.started()

    async def _take_deployments(self, receive: trio.MemoryReceiveChannel[SourceEvent]) -> None:
        async for event in receive:
            if isinstance(event, ObjectEvent):
                self.observe(event)

    async def _work(self, deployments_listed: trio.Event, nursery: trio.Nursery) -> None:
        await self._source_synced.wait()
        await deployments_listed.wait()
        owners = len(self._objects["Waypoint"]) + len(self._objects["Gateway"])
        _log.info("waypoint controller started", waypoints_and_gateways=owners)
        while True:
            for key in sorted(await self._queue.take()):
                await self._reconcile(key, nursery)

    async def _reconcile(self, key: WaypointKey, nursery: trio.Nursery) -> None:
        plan = plan_waypoint(
            waypoint=self._objects["Waypoint"].get(key),
            gateway=self._objects["Gateway"].get(key),
            observed={kind: obj for kind in OWNED_KINDS if (obj := self._objects[kind].get(key)) is not None},
            settings=self._settings,
            now=datetime.now(UTC),
        )
        try:
            await self._execute(key, plan)
        except WriteFailed as exc:
            self._errors.inc()
            delay = self._queue.failed(key, nursery)
            _log.warning(
                "waypoint reconcile failed; retrying", namespace=key[0], name=key[1], error=str(exc), retry_in=delay
            )
            return
        self._queue.succeeded(key)

    async def _execute(self, key: WaypointKey, plan: Plan) -> None:
        namespace, name = key
        for obj in plan.applies:
            await self._in_thread(self._writer.apply, obj)
            self._writes.labels("apply", obj["kind"]).inc()
            _log.info("waypoint object applied", kind=obj["kind"], namespace=namespace, name=name)
        for kind, uid in plan.deletes:
            await self._in_thread(self._writer.delete, kind, namespace, name, uid)
            self._writes.labels("delete", kind).inc()
            _log.info("waypoint object deleted: its waypoint is gone", kind=kind, namespace=namespace, name=name)
        if plan.status is not None:
            kind = plan.status.kind
            await self._in_thread(
                self._writer.patch_status, OWNER_KINDS[kind], OWNER_PLURALS[kind], namespace, name, plan.status.body
            )
            self._writes.labels("status", kind).inc()

    async def _in_thread(self, fn: Any, *args: Any) -> None:
        await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=True, limiter=self._limiter)


def _managed(obj: Mapping[str, Any]) -> bool:
    return ((obj.get("metadata") or {}).get("labels") or {}).get(MANAGED_LABEL) == MANAGED_BY
