"""The few writes istiod_lite makes to the Kubernetes API, as blocking calls for worker threads.

Objects are sent and answered as plain JSON (`_preload_content=False`): the controllers build
dicts and read nothing back but the status code. Every failure raises `WriteFailed` naming the
object and what the API server said; callers log it, count it and retry with backoff.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import kubernetes.client
import urllib3
from kubernetes.client.exceptions import ApiException

FIELD_MANAGER = "istiod-lite"
APPLY_PATCH = "application/apply-patch+yaml"  # server-side apply; JSON is YAML
MERGE_PATCH = "application/merge-patch+json"
_REQUEST_TIMEOUT = (10, 30)  # connect, read seconds
_NOT_FOUND = 404
_CONFLICT = 409


class WriteFailed(Exception):
    """A write was refused or did not reach the API server; the message says which and why."""


class KubeWriter:
    def __init__(self, api_client: kubernetes.client.ApiClient) -> None:
        self._core = kubernetes.client.CoreV1Api(api_client)
        self._apps = kubernetes.client.AppsV1Api(api_client)
        self._custom = kubernetes.client.CustomObjectsApi(api_client)

    def apply(self, obj: dict[str, Any]) -> None:
        """Create or update `obj` (ServiceAccount, Service or Deployment) by server-side
        apply, forcing ownership of the fields we set (an edit by someone else is undone)."""
        kind, metadata = obj["kind"], obj["metadata"]
        patch = {
            "ServiceAccount": self._core.patch_namespaced_service_account,
            "Service": self._core.patch_namespaced_service,
            "Deployment": self._apps.patch_namespaced_deployment,
        }[kind]
        self._call(
            f"apply {kind} {metadata['namespace']}/{metadata['name']}",
            patch,
            metadata["name"],
            metadata["namespace"],
            obj,
            field_manager=FIELD_MANAGER,
            force=True,
            _content_type=APPLY_PATCH,
        )

    def delete(self, kind: str, namespace: str, name: str, uid: str) -> None:
        """Delete the object if it is still the one with `uid` (gone already: done)."""
        delete = {
            "ServiceAccount": self._core.delete_namespaced_service_account,
            "Service": self._core.delete_namespaced_service,
            "Deployment": self._apps.delete_namespaced_deployment,
        }[kind]
        body = {"preconditions": {"uid": uid}, "propagationPolicy": "Background"}
        self._call(
            f"delete {kind} {namespace}/{name}",
            delete,
            name,
            namespace,
            body=body,
            ignore=(_NOT_FOUND, _CONFLICT),  # 409: replaced by a new object, not ours to delete
        )

    def patch_status(self, api_version: str, plural: str, namespace: str, name: str, body: dict[str, Any]) -> None:
        """Merge-patch the status subresource of a custom object (gone already: nothing to say)."""
        group, version = api_version.split("/")
        self._call(
            f"patch status of {plural}.{group} {namespace}/{name}",
            self._custom.patch_namespaced_custom_object_status,
            group,
            version,
            namespace,
            plural,
            name,
            body,
            _content_type=MERGE_PATCH,
            ignore=(_NOT_FOUND,),
        )

    @staticmethod
    def _call(what: str, fn: Callable[..., Any], *args: Any, ignore: tuple[int, ...] = (), **kwargs: Any) -> None:
        try:
            response = fn(*args, _preload_content=False, _request_timeout=_REQUEST_TIMEOUT, **kwargs)
        except ApiException as exc:
            if exc.status in ignore:
                return
            raise WriteFailed(f"{what}: {describe_api_error(exc)}") from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise WriteFailed(f"{what}: {type(exc).__name__}: {exc}") from None
        # The body must be read off the connection before it goes back to the pool, or the
        # next request on it reads that body as its status line.
        response.drain_conn()
        response.release_conn()


def describe_api_error(exc: ApiException) -> str:
    """HTTP status plus the message of the API server's Status body (e.g. an RBAC refusal)."""
    message = exc.reason or ""
    try:
        status = json.loads(exc.body or b"")
    except ValueError:
        status = None
    if isinstance(status, dict) and status.get("message"):
        message = status["message"]
    return f"{exc.status} {message}".strip()
