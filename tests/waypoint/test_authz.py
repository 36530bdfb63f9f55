"""L7 authorization with Envoy RBAC semantics: DENY first, then ALLOW, conditions nested."""

from __future__ import annotations

import pytest

from waypoint.config.model import (
    AllOf,
    AnyOf,
    AnyRequest,
    AuthenticatedCondition,
    Condition,
    DestinationPortCondition,
    HeaderCondition,
    HeaderMatch,
    Not,
    Rbac,
    RbacAction,
    RbacPolicy,
    StringMatch,
    StringMatchKind,
    UrlPathCondition,
)
from waypoint.policy.authz import Decision, RequestAttributes, evaluate, holds
from waypoint.routing.match import RequestHead

EXACT, PREFIX, SUFFIX, CONTAINS, REGEX = StringMatchKind
FRONTEND = "spiffe://cluster.local/ns/default/sa/frontend"
OTHER = "spiffe://cluster.local/ns/other/sa/client"


def request(
    method: str = "GET",
    target: str = "/api/users",
    principal: str | None = FRONTEND,
    port: int = 9080,
    *headers: tuple[str, str],
) -> RequestAttributes:
    head = RequestHead.from_target(method, target, tuple(headers), authority="api.default:9080")
    return RequestAttributes(head, principal, port)


def principal_is(uri: str) -> AuthenticatedCondition:
    return AuthenticatedCondition(StringMatch(EXACT, uri))


def method_is(method: str) -> HeaderCondition:
    return HeaderCondition(HeaderMatch(":method", StringMatch(EXACT, method)))


def policy(
    name: str, permissions: tuple[Condition, ...], principals: tuple[Condition, ...]
) -> RbacPolicy:
    return RbacPolicy(name, permissions, principals)


# Istio's shape for "allow GET /api/* only from the frontend service account".
GET_API_FROM_FRONTEND = Rbac(
    RbacAction.ALLOW,
    (
        policy(
            "ns[default]-policy[api-readers]-rule[0]",
            (
                AllOf(
                    (
                        AnyOf((method_is("GET"),)),
                        AnyOf((UrlPathCondition(StringMatch(PREFIX, "/api/")),)),
                    )
                ),
            ),
            (AllOf((AnyOf((principal_is(FRONTEND),)),)),),
        ),
    ),
)


def test_l7_policy_allows_get_api_only_from_one_principal() -> None:
    assert evaluate(None, GET_API_FROM_FRONTEND, request()) == Decision(
        True, "ns[default]-policy[api-readers]-rule[0]"
    )
    assert evaluate(None, GET_API_FROM_FRONTEND, request(principal=OTHER)) == Decision(False, None)
    assert not evaluate(None, GET_API_FROM_FRONTEND, request(method="POST")).allowed
    assert not evaluate(None, GET_API_FROM_FRONTEND, request(target="/admin")).allowed
    # The query is not part of the path a policy sees.
    assert evaluate(None, GET_API_FROM_FRONTEND, request(target="/api/users?debug=1")).allowed
    # No verified identity: no principal matches.
    assert not evaluate(None, GET_API_FROM_FRONTEND, request(principal=None)).allowed


def test_no_policies_allow_everything() -> None:
    assert evaluate(None, None, request(principal=None)) == Decision(True, None)


def test_an_allow_filter_without_policies_allows_nothing() -> None:
    assert evaluate(None, Rbac(RbacAction.ALLOW, ()), request()) == Decision(False, None)


def test_deny_wins_over_allow() -> None:
    deny = Rbac(RbacAction.DENY, (policy("no-delete", (method_is("DELETE"),), (AnyRequest(),)),))
    allow_all = Rbac(RbacAction.ALLOW, (policy("all", (AnyRequest(),), (AnyRequest(),)),))
    assert evaluate(deny, allow_all, request(method="DELETE")) == Decision(False, "no-delete")
    assert evaluate(deny, allow_all, request(method="GET")) == Decision(True, "all")
    # DENY alone: what it does not match is allowed.
    assert evaluate(deny, None, request(method="GET")) == Decision(True, None)


def test_the_first_matching_policy_by_name_is_reported() -> None:
    rbac = Rbac(
        RbacAction.ALLOW,
        (
            policy("zeta", (AnyRequest(),), (AnyRequest(),)),
            policy("alpha", (AnyRequest(),), (AnyRequest(),)),
        ),
    )
    assert evaluate(None, rbac, request()).policy_name == "alpha"


def test_a_policy_needs_a_matching_permission_and_a_matching_principal() -> None:
    rbac = Rbac(
        RbacAction.ALLOW,
        (
            policy(
                "p",
                (method_is("GET"), method_is("HEAD")),
                (principal_is(OTHER), principal_is(FRONTEND)),
            ),
        ),
    )
    assert evaluate(None, rbac, request(method="HEAD")).allowed
    assert not evaluate(None, rbac, request(method="PUT")).allowed
    assert not evaluate(None, rbac, request(principal="spiffe://cluster.local/ns/x/sa/y")).allowed


@pytest.mark.parametrize(
    ("condition", "attributes", "expected"),
    [
        (AnyRequest(), request(principal=None), True),
        # Istio's namespaces: a regex on the SPIFFE URI.
        (AuthenticatedCondition(StringMatch(REGEX, ".*/ns/default/.*")), request(), True),
        (
            AuthenticatedCondition(StringMatch(REGEX, ".*/ns/default/.*")),
            request(principal=OTHER),
            False,
        ),
        # principal_name unset: any authenticated client.
        (AuthenticatedCondition(), request(), True),
        (AuthenticatedCondition(), request(principal=None), False),
        (Not(AuthenticatedCondition()), request(principal=None), True),
        (DestinationPortCondition(9080), request(port=9080), True),
        (DestinationPortCondition(9080), request(port=8080), False),
        # Istio's hosts: :authority, ignoring case.
        (
            HeaderCondition(
                HeaderMatch(":authority", StringMatch(PREFIX, "API.default", ignore_case=True))
            ),
            request(),
            True,
        ),
        # Istio's `when: request.headers[x-token]`.
        (
            HeaderCondition(HeaderMatch("x-token", StringMatch(EXACT, "s3cret"))),
            request("GET", "/", FRONTEND, 80, ("x-token", "s3cret")),
            True,
        ),
        (HeaderCondition(HeaderMatch("x-token", StringMatch(EXACT, "s3cret"))), request(), False),
        (UrlPathCondition(StringMatch(SUFFIX, "/users")), request(), True),
        (AllOf((method_is("GET"), DestinationPortCondition(1))), request(), False),
        (AnyOf((method_is("PUT"), DestinationPortCondition(9080))), request(), True),
        (Not(method_is("GET")), request(), False),
    ],
)
def test_conditions(condition: Condition, attributes: RequestAttributes, expected: bool) -> None:
    assert holds(condition, attributes) is expected
