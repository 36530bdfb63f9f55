"""Who is asking for a certificate: a bearer token in, the caller's node out.

Two authenticators, one per config source:

- `NodeTokenAuthenticator` (files source): the token is one istiod_lite minted for a node.
- `TokenReviewAuthenticator` (kube source): the token is a projected ServiceAccount token
  for audience `istio-ca`, checked with the Kubernetes TokenReview API like istiod does
  (security/pkg/server/ca/authenticate/kubeauth). A trusted account (ztunnel's) speaks for
  the node its pod runs on, taken from the token's `authentication.kubernetes.io/node-name`
  extra (bound tokens since Kubernetes 1.30), else from the pod the token is bound to, which
  must still exist with the same UID and account. Any other ServiceAccount (a waypoint, a
  sidecar) is a workload asking for its own identity only, as in Istio.

Authenticators are synchronous: the CA servicer runs in gRPC's thread pool and a TokenReview
is one blocking HTTP call there. Refusals raise `CaRequestRefused` subclasses, which carry
the gRPC status the caller receives.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import ClassVar, Protocol

import grpc
import kubernetes.client
import urllib3.exceptions
from kubernetes.client.exceptions import ApiException

from istiod_lite.ca.tokens import NodeTokens

DEFAULT_AUDIENCE = "istio-ca"
DEFAULT_TRUSTED_ACCOUNTS = frozenset({"istio-system/ztunnel"})

SERVICE_ACCOUNT_USER_PREFIX = "system:serviceaccount:"
POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
POD_UID_EXTRA = "authentication.kubernetes.io/pod-uid"
NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"


class CaRequestRefused(Exception):
    """A certificate request was refused; `status` is the gRPC status code the caller gets."""

    status: ClassVar[grpc.StatusCode]


class Unauthenticated(CaRequestRefused):
    """No token, or a token that proves nothing."""

    status = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(CaRequestRefused):
    """The caller is known but may not have what it asked for."""

    status = grpc.StatusCode.PERMISSION_DENIED


class AuthenticatorUnavailable(CaRequestRefused):
    """The token could not be checked (the Kubernetes API failed); the caller should retry."""

    status = grpc.StatusCode.UNAVAILABLE


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated caller: the node it speaks for (a node proxy) or the ServiceAccount it
    runs as (a workload asking for itself), and who it proved to be (for logs)."""

    node: str | None
    identity: str
    service_account: tuple[str, str] | None = None  # (namespace, name) when node is None


class Authenticator(Protocol):
    def authenticate(self, bearer_token: str) -> Caller:
        """The caller the token proves; raises CaRequestRefused."""
        ...


class NodeTokenAuthenticator:
    """Accepts the per-node tokens istiod_lite minted (files source)."""

    def __init__(self, tokens: NodeTokens) -> None:
        self._tokens = tokens

    def authenticate(self, bearer_token: str) -> Caller:
        node = self._tokens.node_for(bearer_token)
        if node is None:
            raise Unauthenticated("bearer token is not the token of any node")
        return Caller(node=node, identity=f"node-token:{node}")


class TokenReviewAuthenticator:
    """Accepts ServiceAccount tokens reviewed by the Kubernetes API: trusted accounts as node
    proxies, any other as a workload asking for itself."""

    def __init__(
        self,
        api_client: kubernetes.client.ApiClient,
        *,
        audience: str = DEFAULT_AUDIENCE,
        trusted_accounts: Iterable[str] = DEFAULT_TRUSTED_ACCOUNTS,
    ) -> None:
        self._authentication = kubernetes.client.AuthenticationV1Api(api_client)
        self._core = kubernetes.client.CoreV1Api(api_client)
        self._audience = audience
        self._trusted_accounts = frozenset(trusted_accounts)  # "<namespace>/<name>"

    def authenticate(self, bearer_token: str) -> Caller:
        review = kubernetes.client.V1TokenReview(
            spec=kubernetes.client.V1TokenReviewSpec(
                token=bearer_token, audiences=[self._audience]
            )
        )
        try:
            status = self._authentication.create_token_review(review).status
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise AuthenticatorUnavailable(f"TokenReview failed: {_describe(exc)}") from None
        if status is None or not status.authenticated:
            reason = (status.error if status is not None else None) or "token not authenticated"
            raise Unauthenticated(f"TokenReview rejected the token: {reason}")
        # An empty audience list means "valid for the API server", not for us.
        if self._audience not in (status.audiences or []):
            raise Unauthenticated(
                f"token is not for audience {self._audience!r} "
                f"(TokenReview audiences: {status.audiences or []})"
            )
        user = status.user
        username = (user.username if user is not None else None) or ""
        namespace, _, name = username.removeprefix(SERVICE_ACCOUNT_USER_PREFIX).partition(":")
        if not username.startswith(SERVICE_ACCOUNT_USER_PREFIX) or not namespace or not name:
            raise PermissionDenied(f"caller {username!r} is not a ServiceAccount")
        account = f"{namespace}/{name}"
        if account not in self._trusted_accounts:
            return Caller(node=None, identity=username, service_account=(namespace, name))
        extra = (user.extra if user is not None else None) or {}
        pod_name = _extra_value(extra, POD_NAME_EXTRA)
        if pod_name is None:
            raise Unauthenticated(
                f"token of {account} is not bound to a pod: mount a projected ServiceAccount "
                f"token with audience {self._audience!r}"
            )
        caller_identity = f"{username} (pod {namespace}/{pod_name})"
        node = _extra_value(extra, NODE_NAME_EXTRA) or self._node_of_pod(
            namespace, pod_name, name, _extra_value(extra, POD_UID_EXTRA)
        )
        return Caller(node=node, identity=caller_identity)

    def _node_of_pod(
        self, namespace: str, pod_name: str, service_account: str, pod_uid: str | None
    ) -> str:
        """The node of the pod the token is bound to (tokens from before node-name extras)."""
        try:
            pod = self._core.read_namespaced_pod(pod_name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                raise Unauthenticated(
                    f"pod {namespace}/{pod_name} the token is bound to no longer exists"
                ) from None
            raise AuthenticatorUnavailable(
                f"reading pod {namespace}/{pod_name} failed: {_describe(exc)}"
            ) from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise AuthenticatorUnavailable(
                f"reading pod {namespace}/{pod_name} failed: {_describe(exc)}"
            ) from None
        if pod_uid is not None and pod.metadata.uid != pod_uid:
            raise Unauthenticated(
                f"pod {namespace}/{pod_name} the token is bound to was replaced (uid {pod_uid} "
                f"is now {pod.metadata.uid})"
            )
        if pod.spec.service_account_name != service_account:
            raise Unauthenticated(
                f"pod {namespace}/{pod_name} runs as {pod.spec.service_account_name!r}, "
                f"not as the token's ServiceAccount {service_account!r}"
            )
        if not pod.spec.node_name:
            raise PermissionDenied(f"pod {namespace}/{pod_name} is not scheduled to a node")
        return pod.spec.node_name


def _extra_value(extra: Mapping[str, list[str]], key: str) -> str | None:
    values = extra.get(key) or []
    return values[0] if len(values) == 1 and values[0] else None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ApiException):
        return f"HTTP {exc.status} {exc.reason}"
    return str(exc) or type(exc).__name__
