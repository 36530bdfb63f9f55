"""The `kube` source: list + watch of every kind in `KINDS` on the Kubernetes API.

Theory of operation
-------------------
One task per kind runs the reflector loop of client-go (and kopf's `watching.py`):

1. **List** the whole collection. Send an upsert for every object that is new or whose
   `resourceVersion` changed since the last list, and a delete for every object we knew
   that is gone, then remember the list's `resourceVersion`. After the first list of every
   kind the source sends `SyncComplete()` once.
2. **Watch** from that `resourceVersion` with `allowWatchBookmarks`: ADDED/MODIFIED become
   upserts, DELETED deletes, BOOKMARK only advances the remembered version. When the server
   ends the watch (its `timeoutSeconds`), watch again from the newest version seen.
3. **410 Gone** (as the HTTP status or as an ERROR event): the version is older than what
   etcd keeps, so changes were missed: list again (step 1) after the backoff delay below.
   The list's diff against what we knew emits the deletes for objects removed in the gap.
4. **Any other failure** (connection refused or reset, a 5xx, 403 Forbidden, a read timeout):
   log it with what the API said, count it, wait (100 ms doubling to 30 s, reset once a
   request succeeds) and resume where we left off: watch from the remembered version, or
   list if no list succeeded yet. A custom kind whose CRD is not installed (404) counts as
   listed-and-empty, so a cluster without Istio's CRDs still syncs; it is listed again
   with the same backoff until the CRD appears.

Threads: the official client is synchronous, so every blocking call runs in a worker thread
(`trio.to_thread.run_sync` with this source's own limiter, so six endless watches never use
up trio's shared thread budget). A watch is read one line per thread call; the trio task
parses it and awaits `send`, so a slow consumer holds back the watch. On cancellation the
thread is abandoned and its socket shut down, which wakes it at once.

Objects: the JSON the API server sent, parsed as is (`_preload_content=False`): exactly the
fields it sent, camelCase, without a round trip through the client's models, which costs
more than the parsing and drops fields this client version does not know. List items carry
no `kind`/`apiVersion`; they are filled in so every upsert looks like a watch event's object.
"""

from __future__ import annotations

import functools
import json
import socket
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import kubernetes.client
import prometheus_client
import trio
import urllib3
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines

from istiod_lite.kube.api import describe_api_error
from istiod_lite.sources.base import (
    KINDS,
    Action,
    KindInfo,
    ObjectEvent,
    SourceEvent,
    SyncComplete,
)
from meshcore.log import get_logger

# Server-side length of one watch; the read timeout must outlast it since a quiet
# collection sends nothing (bookmarks are at the server's discretion).
WATCH_SECONDS = 300
_WATCH_READ_TIMEOUT = WATCH_SECONDS + 30
_LIST_READ_TIMEOUT = 60
_CONNECT_TIMEOUT = 10

BACKOFF_INITIAL = 0.1
BACKOFF_MAX = 30.0

_GONE = 410
_NOT_FOUND = 404

# What a failing list or watch can raise, besides ApiException: transport errors of urllib3
# (refused, reset, timeouts, TLS) and a response that is not the JSON we expect.
_TRANSPORT_ERRORS = (
    urllib3.exceptions.HTTPError,
    OSError,
    json.JSONDecodeError,
    UnicodeDecodeError,
)

_log = get_logger("sources.kube")

_Key = tuple[str, str]  # namespace, name


class _Gone(Exception):
    """The watch's resourceVersion is too old: list again."""


class _ApiError(Exception):
    """The API server reported an error in a watch stream, or answered something unreadable."""


class _Backoff:
    def __init__(self) -> None:
        self._next = BACKOFF_INITIAL

    def reset(self) -> None:
        self._next = BACKOFF_INITIAL

    def next_delay(self) -> float:
        delay = self._next
        self._next = min(self._next * 2, BACKOFF_MAX)
        return delay


class KubeSource:
    """Namespaces, Pods, Services, ServiceAccounts and the mesh kinds from the Kubernetes API."""

    def __init__(
        self,
        api_client: kubernetes.client.ApiClient,
        *,
        registry: prometheus_client.CollectorRegistry | None = None,
    ) -> None:
        """`registry` None: a private one (tests)."""
        registry = registry if registry is not None else prometheus_client.CollectorRegistry()
        self._listers = _listers(api_client)
        self._limiter = trio.CapacityLimiter(2 * len(KINDS))
        self._errors = prometheus_client.Counter(
            "istiod_lite_kube_watch_errors",
            "Failed lists and watches of a kind (retried with backoff)",
            ("kind",),
            registry=registry,
        )
        self._relists = prometheus_client.Counter(
            "istiod_lite_kube_relists",
            "Lists of a kind after its watch's resourceVersion expired (410 Gone)",
            ("kind",),
            registry=registry,
        )

    async def run(
        self,
        send_channel: trio.MemorySendChannel[SourceEvent],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Send every object, then SyncComplete, then the changes, until cancelled."""
        listed = {kind: trio.Event() for kind in KINDS}
        async with trio.open_nursery() as nursery:
            for kind, info in KINDS.items():
                reflector = Reflector(
                    kind,
                    info,
                    self._listers[kind],
                    self._in_thread,
                    errors=self._errors.labels(kind),
                    relists=self._relists.labels(kind),
                    send_channel=send_channel,
                    listed=listed[kind],
                )
                nursery.start_soon(reflector.run, name=f"kube-reflector-{kind}")
            task_status.started()
            for event in listed.values():
                await event.wait()
            await send_channel.send(SyncComplete())
            _log.info("initial list of every kind sent", kinds=list(KINDS))

    async def _in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await trio.to_thread.run_sync(
            fn, *args, abandon_on_cancel=True, limiter=self._limiter
        )


class Reflector:
    """List + watch of one kind; see the module docstring. Also used for kinds that are not
    configuration (the waypoint controller's Deployments), with a channel of their own."""

    def __init__(
        self,
        kind: str,
        info: KindInfo,
        lister: Callable[..., Any],
        in_thread: Callable[..., Awaitable[Any]],
        *,
        errors: prometheus_client.Counter,
        relists: prometheus_client.Counter,
        send_channel: trio.MemorySendChannel[SourceEvent],
        listed: trio.Event,
    ) -> None:
        self._kind = kind
        self._info = info
        self._lister = lister
        self._in_thread = in_thread
        self._errors = errors
        self._relists = relists
        self._send_channel = send_channel
        self._listed = listed
        self._known: dict[_Key, str] = {}  # -> resourceVersion
        self._resource_version: str | None = None  # None: list next
        self._backoff = _Backoff()

    async def run(self) -> None:
        while True:
            try:
                if self._resource_version is None:
                    await self._list()
                await self._watch()
                continue  # the server ended the watch: resume at once
            except _Gone as exc:
                self._relist(str(exc))
            except ApiException as exc:
                if exc.status == _GONE:
                    self._relist(describe_api_error(exc))
                elif exc.status == _NOT_FOUND and self._info.group:
                    await self._not_installed()
                else:
                    self._failed(describe_api_error(exc))
            except (_ApiError, *_TRANSPORT_ERRORS) as exc:
                self._failed(f"{type(exc).__name__}: {exc}")
            # After a 410 too, as client-go does: a server that keeps expiring watches must
            # not be relisted in a tight loop.
            await trio.sleep(self._backoff.next_delay())

    def _relist(self, reason: str) -> None:
        self._relists.inc()
        _log.info("watch expired; listing again", kind=self._kind, reason=reason)
        self._resource_version = None

    def _failed(self, error: str) -> None:
        self._errors.inc()
        _log.warning(
            "list/watch failed; retrying",
            kind=self._kind,
            listing=self._resource_version is None,
            error=error,
        )

    async def _list(self) -> None:
        items, resource_version = await self._in_thread(_list_json, self._lister)
        self._backoff.reset()
        fresh: dict[_Key, str] = {}
        for item in items:
            obj = {"apiVersion": self._info.api_version, "kind": self._kind, **item}
            key, version = _identity(obj)
            fresh[key] = version
            if self._known.get(key) != version:
                await self._send("upsert", key, obj)
        for key in self._known.keys() - fresh.keys():
            await self._send("delete", key, None)
        self._known = fresh
        self._resource_version = resource_version
        self._listed.set()

    async def _not_installed(self) -> None:
        if not self._listed.is_set() or self._known:
            _log.warning(
                "custom resource definition not installed; treating the kind as empty",
                kind=self._kind,
                api_version=self._info.api_version,
            )
        for key in list(self._known):
            await self._send("delete", key, None)
        self._known = {}
        self._resource_version = None
        self._listed.set()

    async def _watch(self) -> None:
        response = await self._in_thread(
            functools.partial(
                self._lister,
                watch=True,
                resource_version=self._resource_version,
                allow_watch_bookmarks=True,
                timeout_seconds=WATCH_SECONDS,
                _preload_content=False,
                _request_timeout=(_CONNECT_TIMEOUT, _WATCH_READ_TIMEOUT),
            )
        )
        self._backoff.reset()
        try:
            lines = iter_resp_lines(response)
            while (line := await self._in_thread(next, lines, None)) is not None:
                if line:
                    await self._handle(json.loads(line))
        finally:
            _abort(response)

    async def _handle(self, event: Mapping[str, Any]) -> None:
        event_type = event.get("type")
        obj = event.get("object")
        if not isinstance(obj, dict):
            raise _ApiError(f"watch event without an object: {str(event)[:200]}")
        if event_type == "ERROR":  # obj is a Status
            if obj.get("code") == _GONE:
                raise _Gone(obj.get("message", "410 Gone"))
            raise _ApiError(f"{obj.get('code')} {obj.get('reason')}: {obj.get('message')}")
        key, version = _identity(obj)
        if event_type == "BOOKMARK":
            self._resource_version = version
            return
        if event_type in ("ADDED", "MODIFIED"):
            self._known[key] = version
            await self._send("upsert", key, obj)
        elif event_type == "DELETED":
            self._known.pop(key, None)
            await self._send("delete", key, None)
        else:
            _log.warning("skipping watch event of unknown type", kind=self._kind, type=event_type)
        self._resource_version = version

    async def _send(self, action: Action, key: _Key, obj: Mapping[str, Any] | None) -> None:
        namespace, name = key
        await self._send_channel.send(ObjectEvent(self._kind, action, namespace, name, obj))


def _listers(api_client: kubernetes.client.ApiClient) -> dict[str, Callable[..., Any]]:
    """The client's list-or-watch call of each kind, across all namespaces."""
    core = kubernetes.client.CoreV1Api(api_client)
    custom = kubernetes.client.CustomObjectsApi(api_client)
    listers: dict[str, Callable[..., Any]] = {
        "Namespace": core.list_namespace,
        "Pod": core.list_pod_for_all_namespaces,
        "Service": core.list_service_for_all_namespaces,
        "ServiceAccount": core.list_service_account_for_all_namespaces,
    }
    for kind, info in KINDS.items():
        if info.group:
            group, version = info.api_version.split("/")
            listers[kind] = functools.partial(
                custom.list_cluster_custom_object, group, version, info.plural
            )
    return listers


def _list_json(lister: Callable[..., Any]) -> tuple[list[dict[str, Any]], str]:
    """Thread body: one list call; returns its items and resourceVersion."""
    response = lister(
        _preload_content=False, _request_timeout=(_CONNECT_TIMEOUT, _LIST_READ_TIMEOUT)
    )
    try:
        body = json.loads(response.data)
    finally:
        response.release_conn()
    metadata = body.get("metadata") if isinstance(body, dict) else None
    items = body.get("items") or [] if isinstance(body, dict) else None
    if not isinstance(metadata, dict) or not isinstance(items, list):
        raise _ApiError(f"list response without metadata or items: {str(body)[:200]}")
    return items, str(metadata.get("resourceVersion", ""))


def _identity(obj: Mapping[str, Any]) -> tuple[_Key, str]:
    """((namespace, name), resourceVersion) of an object from the API server."""
    metadata = obj.get("metadata")
    if not isinstance(metadata, dict) or not isinstance(metadata.get("resourceVersion"), str):
        raise _ApiError(f"object without metadata.resourceVersion: {str(obj)[:200]}")
    key = (metadata.get("namespace", ""), metadata.get("name", ""))
    return key, metadata["resourceVersion"]


def _abort(response: urllib3.BaseHTTPResponse) -> None:
    """End a watch response, waking a thread that may still be blocked reading it."""
    connection = response.connection
    sock = getattr(connection, "sock", None)
    if sock is not None:
        # close() alone leaves a blocked recv() waiting; shutdown() wakes it.
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already closed by the peer
    response.close()
