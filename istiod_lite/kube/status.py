"""The status writer: why translation rejected an object, written back to that object's status
so `kubectl get -o yaml` / `describe` shows it (kube source only).

Istio kinds (AuthorizationPolicy, PeerAuthentication, VirtualService, DestinationRule):
`status.conditions` gets `Accepted` (False, reason `Invalid` or `ReferenceNotFound`, the
message naming the field), and `status.validationMessages` Istio's analysis codes (IST0106
SchemaValidationError, IST0101 ReferencedResourceNotFound). HTTPRoute: one
`status.parents[]` entry per parentRef with controllerName `istio.io/gateway-controller` and
the Gateway API conditions `Accepted` and `ResolvedRefs`. Waypoints and Gateways get their
conditions from the waypoint controller.

Write only on change: an object that was never rejected gets no status (absence means
accepted); a rejected one gets the condition once; when it becomes valid its condition turns
True (reason `Accepted`) and its validation messages go. What an object's status already says
is compared first, so the watch event of our own write plans nothing.

Shell: the app hands source events to `observe` (cheap, never blocks); the writer task wakes
for changed objects and for objects whose errors appeared or went (an error can go because
another object changed: a DestinationRule arriving resolves a VirtualService's subset), and
merge-patches status subresources from worker threads. Failures are logged, counted and
retried with backoff per object (`WorkQueue`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import kubernetes.client
import prometheus_client
import trio

from istiod_lite.kube.api import KubeWriter, WriteFailed
from istiod_lite.kube.conditions import Condition, find, merge_conditions
from istiod_lite.kube.queue import WorkQueue
from istiod_lite.model import Translator
from istiod_lite.model.errors import TranslationError
from istiod_lite.sources.base import KINDS, ObjectEvent
from meshcore.log import get_logger

ISTIO_KINDS = ("AuthorizationPolicy", "PeerAuthentication", "VirtualService", "DestinationRule")
STATUS_KINDS = (*ISTIO_KINDS, "HTTPRoute")
GATEWAY_CONTROLLER = "istio.io/gateway-controller"
# Istio's analysis message types (pkg/config/analysis/msg/messages.yaml).
SCHEMA_VALIDATION_ERROR = ("IST0106", "SchemaValidationError")
REFERENCED_RESOURCE_NOT_FOUND = ("IST0101", "ReferencedResourceNotFound")
_DEBOUNCE_SECONDS = 0.1  # gathers a burst of events into one pass
_WRITE_THREADS = 2

ObjectKey = tuple[str, str, str]  # kind, namespace, name

_log = get_logger("status")


def status_patch(
    kind: str,
    obj: Mapping[str, Any],
    errors: Iterable[TranslationError],
    *,
    unresolved: frozenset[TranslationError] = frozenset(),
    now: datetime,
) -> dict[str, Any] | None:
    """The merge patch of `obj`'s status for its current `errors` (those in `unresolved` name
    something that does not exist); None when the status already says so."""
    errors = list(errors)
    status = obj.get("status") if isinstance(obj.get("status"), Mapping) else {}
    generation = (obj.get("metadata") or {}).get("generation")
    generation = generation if isinstance(generation, int) else None
    if kind == "HTTPRoute":
        return _route_patch(obj, status, errors, unresolved, generation, now)
    current = find(status.get("conditions"), "Accepted")
    if not errors and (current is None or current.get("status") == "True"):
        return None  # never rejected, or already cleared
    if errors:
        missing_only = all(error in unresolved for error in errors)
        accepted = Condition(
            "Accepted", False, "ReferenceNotFound" if missing_only else "Invalid", _describe(errors), generation
        )
        messages: list[dict[str, Any]] | None = [_validation_message(error in unresolved) for error in errors]
    else:
        accepted = Condition("Accepted", True, "Accepted", "accepted by istiod-lite", generation)
        messages = None
    conditions, changed = merge_conditions(status.get("conditions"), [accepted], now)
    if not changed and status.get("validationMessages") == messages:
        return None
    body = {"conditions": conditions, "validationMessages": messages}
    if generation is not None:
        body["observedGeneration"] = generation
    return {"status": body}


def _route_patch(
    obj: Mapping[str, Any],
    status: Mapping[str, Any],
    errors: list[TranslationError],
    unresolved: frozenset[TranslationError],
    generation: int | None,
    now: datetime,
) -> dict[str, Any] | None:
    parents = status.get("parents") if isinstance(status.get("parents"), list) else []
    ours = [p for p in parents if isinstance(p, Mapping) and p.get("controllerName") == GATEWAY_CONTROLLER]
    others = [p for p in parents if p not in ours]
    if not errors and not any(
        isinstance(c, Mapping) and c.get("status") == "False" for p in ours for c in p.get("conditions") or []
    ):
        return None  # never rejected, or already cleared
    refs = (obj.get("spec") or {}).get("parentRefs") if isinstance(obj.get("spec"), Mapping) else None
    refs = [ref for ref in refs if isinstance(ref, Mapping)] if isinstance(refs, list) else []
    invalid = [error for error in errors if error not in unresolved]
    missing = [error for error in errors if error in unresolved]
    wanted = [
        Condition("Accepted", False, "UnsupportedValue", _describe(invalid), generation)
        if invalid
        else Condition("Accepted", True, "Accepted", "Route was valid", generation),
        Condition("ResolvedRefs", False, "BackendNotFound", _describe(missing), generation)
        if missing
        else Condition("ResolvedRefs", True, "ResolvedRefs", "All references resolved", generation),
    ]
    new_parents = []
    changed = len(ours) != len(refs)
    for ref in refs:
        old = next((p for p in ours if p.get("parentRef") == ref), None)
        conditions, differs = merge_conditions(old.get("conditions") if old else None, wanted, now)
        changed = changed or differs or old is None
        new_parents.append({"parentRef": dict(ref), "controllerName": GATEWAY_CONTROLLER, "conditions": conditions})
    if not changed:
        return None
    return {"status": {"parents": [*others, *new_parents]}}


def _describe(errors: list[TranslationError]) -> str:
    return "; ".join(f"{e.field}: {e.message}" if e.field else e.message for e in errors)


def _validation_message(unresolved: bool) -> dict[str, Any]:
    code, name = REFERENCED_RESOURCE_NOT_FOUND if unresolved else SCHEMA_VALIDATION_ERROR
    return {
        "type": {"code": code, "name": name},
        "level": "ERROR",
        "documentationUrl": f"https://istio.io/latest/docs/reference/config/analysis/{code.lower()}/",
    }


class StatusWriter:
    def __init__(
        self,
        api_client: kubernetes.client.ApiClient,
        translator: Translator,
        *,
        registry: prometheus_client.CollectorRegistry,
    ) -> None:
        self._writer = KubeWriter(api_client)
        self._translator = translator
        self._objects: dict[ObjectKey, Mapping[str, Any]] = {}
        self._queue: WorkQueue[ObjectKey] = WorkQueue()
        self._errored: set[ObjectKey] = set()  # objects with errors at the last pass
        self._source_synced = trio.Event()
        self._limiter = trio.CapacityLimiter(_WRITE_THREADS)
        self._errors = prometheus_client.Counter(
            "istiod_lite_status_write_errors", "Failed status writes (retried with backoff)", registry=registry
        )
        self._writes = prometheus_client.Counter(
            "istiod_lite_status_writes", "Status subresource writes", ("kind",), registry=registry
        )

    def observe(self, event: ObjectEvent) -> None:
        """Take in one source event, after the translator has."""
        if event.kind not in STATUS_KINDS:
            return
        if event.action == "upsert" and event.obj is not None:
            self._objects[event.key] = event.obj
        else:
            self._objects.pop(event.key, None)
        self._queue.add(event.key)

    def source_synced(self) -> None:
        self._source_synced.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            task_status.started()
            await self._source_synced.wait()
            for key in self._objects:
                self._queue.add(key)  # e.g. clear conditions of objects fixed while we were down
            while True:
                await trio.sleep(_DEBOUNCE_SECONDS)
                keys = await self._queue.take()
                await self._pass(keys, nursery)

    async def _pass(self, keys: set[ObjectKey], nursery: trio.Nursery) -> None:
        errors: dict[ObjectKey, list[TranslationError]] = {}
        for error in self._translator.errors():
            errors.setdefault((error.kind, error.namespace, error.name), []).append(error)
        errored = {key for key in errors if key[0] in STATUS_KINDS}
        # Errors appear, change and go with other objects' changes too; the rejected objects
        # are few, and status_patch writes only what differs.
        keys |= {key for key in errored | self._errored if not self._queue.backing_off(key)}
        self._errored = errored
        unresolved = frozenset(self._translator.waypoints.errors())
        now = datetime.now(UTC)
        for key in sorted(keys):
            obj = self._objects.get(key)
            if obj is None:
                continue  # deleted: nothing to write on
            patch = status_patch(key[0], obj, errors.get(key, ()), unresolved=unresolved, now=now)
            if patch is None:
                continue
            info = KINDS[key[0]]
            try:
                await trio.to_thread.run_sync(
                    self._writer.patch_status,
                    info.api_version,
                    info.plural,
                    key[1],
                    key[2],
                    patch,
                    abandon_on_cancel=True,
                    limiter=self._limiter,
                )
            except WriteFailed as exc:
                self._errors.inc()
                delay = self._queue.failed(key, nursery)
                _log.warning(
                    "status write failed; retrying",
                    kind=key[0], namespace=key[1], name=key[2], error=str(exc), retry_in=delay,
                )
                continue
            self._queue.succeeded(key)
            self._writes.labels(key[0]).inc()
            _log.info(
                "status written", kind=key[0], namespace=key[1], name=key[2], rejected=bool(errors.get(key))
            )
