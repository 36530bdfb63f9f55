"""TokenReview authentication: from a reviewed ServiceAccount token to the caller's node.

The Kubernetes API is faked at the HTTP boundary of the official client (`ApiClient.call_api`),
answering with the JSON a kube-apiserver sends, so the client's own request building and
deserialisation run for real. The live kube-apiserver path is tested with the kube source.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import urllib3.exceptions
from kubernetes.client import ApiClient, rest

from istiod_lite.ca.authn import (
    AuthenticatorUnavailable,
    Caller,
    PermissionDenied,
    TokenReviewAuthenticator,
    Unauthenticated,
)

ZTUNNEL_USER = "system:serviceaccount:istio-system:ztunnel"
TOKEN_REVIEWS = "/apis/authentication.k8s.io/v1/tokenreviews"
ZTUNNEL_POD = "/api/v1/namespaces/istio-system/pods/ztunnel-x7k2p"


class _Response:
    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.status = status
        self.reason = "OK" if status < 400 else "Error"
        self.data = json.dumps(body).encode()
        self.headers = {"content-type": "application/json"}


class FakeKubeApi(ApiClient):
    """Answers the API paths in `responses` with (status, JSON body); records request bodies."""

    def __init__(self, responses: dict[str, tuple[int, dict[str, Any]]]) -> None:
        super().__init__()
        self.responses = responses
        self.requests: list[tuple[str, str, Any]] = []

    def call_api(  # type: ignore[override]
        self, method: str, url: str, header_params: Any = None, body: Any = None, *_: Any, **__: Any
    ) -> rest.RESTResponse:
        path = url.removeprefix(self.configuration.host)
        self.requests.append((method, path, body))
        status, answer = self.responses.get(path, (404, {"kind": "Status", "code": 404}))
        if status < 300 and isinstance(body, dict) and "spec" in body:
            answer = {**answer, "spec": body["spec"]}  # the API server echoes a review's spec
        return rest.RESTResponse(_Response(status, answer))


def _review(
    *,
    authenticated: bool = True,
    username: str = ZTUNNEL_USER,
    audiences: list[str] | None = None,
    extra: dict[str, list[str]] | None = None,
    error: str | None = None,
) -> tuple[int, dict[str, Any]]:
    status: dict[str, Any] = {
        "authenticated": authenticated,
        "audiences": ["istio-ca"] if audiences is None else audiences,
    }
    if authenticated:
        status["user"] = {"username": username, "extra": extra or {}}
    if error is not None:
        status["error"] = error
    body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "status": status}
    return 201, body


def _bound_to_pod(*, node: str | None = None, uid: str = "uid-1") -> dict[str, list[str]]:
    extra = {
        "authentication.kubernetes.io/pod-name": ["ztunnel-x7k2p"],
        "authentication.kubernetes.io/pod-uid": [uid],
    }
    if node is not None:
        extra["authentication.kubernetes.io/node-name"] = [node]
    return extra


def _pod(*, node: str = "node-b", uid: str = "uid-1", sa: str = "ztunnel") -> tuple[int, dict]:
    return 200, {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "ztunnel-x7k2p", "namespace": "istio-system", "uid": uid},
        "spec": {"nodeName": node, "serviceAccountName": sa, "containers": []},
    }


def test_bound_token_maps_to_the_node_the_apiserver_names() -> None:
    api = FakeKubeApi({TOKEN_REVIEWS: _review(extra=_bound_to_pod(node="node-a"))})
    caller = TokenReviewAuthenticator(api).authenticate("projected-token")
    assert caller == Caller(
        node="node-a", identity=f"{ZTUNNEL_USER} (pod istio-system/ztunnel-x7k2p)"
    )
    [(method, path, body)] = api.requests  # no pod lookup needed
    assert (method, path) == ("POST", TOKEN_REVIEWS)
    assert body["spec"] == {"token": "projected-token", "audiences": ["istio-ca"]}


def test_without_node_name_the_bound_pod_is_looked_up() -> None:
    api = FakeKubeApi({TOKEN_REVIEWS: _review(extra=_bound_to_pod()), ZTUNNEL_POD: _pod()})
    assert TokenReviewAuthenticator(api).authenticate("t").node == "node-b"
    assert [path for _, path, _ in api.requests] == [TOKEN_REVIEWS, ZTUNNEL_POD]


@pytest.mark.parametrize(
    ("pod", "refusal"),
    [
        (_pod(uid="uid-2"), "was replaced"),
        (_pod(sa="default"), "runs as 'default'"),
        ((404, {"kind": "Status", "code": 404}), "no longer exists"),
    ],
)
def test_bound_pod_must_still_be_the_same_pod(pod: tuple[int, dict], refusal: str) -> None:
    api = FakeKubeApi({TOKEN_REVIEWS: _review(extra=_bound_to_pod()), ZTUNNEL_POD: pod})
    with pytest.raises(Unauthenticated, match=refusal):
        TokenReviewAuthenticator(api).authenticate("t")


@pytest.mark.parametrize(
    ("review", "refusal"),
    [
        (_review(authenticated=False, error="token has expired"), "token has expired"),
        (_review(audiences=[], extra=_bound_to_pod(node="n")), "not for audience 'istio-ca'"),
        (_review(extra={}), "not bound to a pod"),
    ],
)
def test_tokens_that_prove_nothing_are_unauthenticated(
    review: tuple[int, dict], refusal: str
) -> None:
    with pytest.raises(Unauthenticated, match=refusal):
        TokenReviewAuthenticator(FakeKubeApi({TOKEN_REVIEWS: review})).authenticate("t")


def test_only_service_accounts_may_call() -> None:
    review = _review(username="kubernetes-admin", extra=_bound_to_pod(node="node-a"))
    with pytest.raises(PermissionDenied, match="'kubernetes-admin' is not a ServiceAccount"):
        TokenReviewAuthenticator(FakeKubeApi({TOKEN_REVIEWS: review})).authenticate("t")


def test_an_untrusted_service_account_speaks_only_for_itself() -> None:
    # A waypoint's or sidecar's token: no node to speak for, just its own account.
    review = _review(username="system:serviceaccount:default:reviews", extra={})
    caller = TokenReviewAuthenticator(FakeKubeApi({TOKEN_REVIEWS: review})).authenticate("t")
    assert (caller.node, caller.service_account) == (None, ("default", "reviews"))


def test_trusted_accounts_and_audience_are_configurable() -> None:
    review = _review(
        username="system:serviceaccount:mesh:node-proxy",
        audiences=["mesh-ca"],
        extra=_bound_to_pod(node="node-a"),
    )
    authenticator = TokenReviewAuthenticator(
        FakeKubeApi({TOKEN_REVIEWS: review}),
        audience="mesh-ca",
        trusted_accounts={"mesh/node-proxy"},
    )
    assert authenticator.authenticate("t").node == "node-a"


def test_api_failure_is_unavailable() -> None:
    api = FakeKubeApi({TOKEN_REVIEWS: (500, {"kind": "Status", "code": 500})})
    with pytest.raises(AuthenticatorUnavailable, match="TokenReview failed: HTTP 500"):
        TokenReviewAuthenticator(api).authenticate("t")


def test_unreachable_api_is_unavailable() -> None:
    class Unreachable(FakeKubeApi):
        def call_api(self, *args: Any, **kwargs: Any) -> rest.RESTResponse:
            refused = "Failed to establish a new connection: connection refused"
            raise urllib3.exceptions.NewConnectionError(None, refused)  # type: ignore[arg-type]

    with pytest.raises(AuthenticatorUnavailable, match="connection refused"):
        TokenReviewAuthenticator(Unreachable({})).authenticate("t")
