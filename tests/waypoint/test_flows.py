"""The waypoint publishes one flow event per request: HTTP method, path and status, the
client's identity, and the verdict with the AuthorizationPolicy that decided."""

from __future__ import annotations

import random
from types import MappingProxyType

from meshcore.flows import FlowBroadcaster, HttpSummary
from meshcore.metrics import new_registry
from waypoint.config.model import (
    AnyRequest,
    AuthenticatedCondition,
    AuthzPolicy,
    ClusterConfig,
    ClusterEndpoints,
    Rbac,
    RbacAction,
    RbacPolicy,
    Route,
    RouteMatch,
    RouteTable,
    ServiceRef,
    ServiceRoutes,
    StringMatch,
    StringMatchKind,
)
from waypoint.feeds import WaypointSnapshot, WaypointStore
from waypoint.flows import policy_key
from waypoint.metrics import WaypointMetrics
from waypoint.pipeline import Pipeline
from waypoint.settings import HttpLimits

from .test_pipeline import A, CLIENT, HOST, LISTENER, ScriptedUpstreams, action, call


def pipeline_with_flows(authz: AuthzPolicy) -> tuple[Pipeline, FlowBroadcaster]:
    cluster = ClusterConfig("c", service=ServiceRef(HOST, "ratings", "shop"))
    route = Route(RouteMatch(path=StringMatch(StringMatchKind.PREFIX, "/")), action())
    store = WaypointStore()
    store.publish(
        WaypointSnapshot(
            version=1,
            routes=RouteTable(MappingProxyType({LISTENER: ServiceRoutes(HOST, 9080, (route,), authz)})),
            clusters=MappingProxyType({"c": cluster}),
            endpoints=MappingProxyType({"c": ClusterEndpoints("c", (A,))}),
        )
    )
    flows = FlowBroadcaster("shop/waypoint")
    pipeline = Pipeline(store, ScriptedUpstreams(), WaypointMetrics(new_registry()), HttpLimits(), rng=random.Random(1), flows=flows)
    return pipeline, flows


def allow_only(principal: str) -> AuthzPolicy:
    condition = AuthenticatedCondition(StringMatch(StringMatchKind.EXACT, principal))
    return AuthzPolicy(allow=Rbac(RbacAction.ALLOW, (RbacPolicy("ns[shop]-policy[allow-frontend]-rule[0]", (AnyRequest(),), (condition,)),)))


async def test_an_allowed_request_is_a_flow_with_its_http_summary_and_policy():
    pipeline, flows = pipeline_with_flows(allow_only(CLIENT.uri))
    await call(pipeline, method="POST", target="/ratings/7", body=b"stars=5")
    [flow] = flows.recent()
    assert (flow.proxy, flow.reporter, flow.verdict, flow.policy) == ("shop/waypoint", "waypoint", "allowed", "shop/allow-frontend")
    assert flow.http == HttpSummary("POST", "/ratings/7", f"{HOST}:9080", 200)
    assert (flow.source.identity, flow.source.namespace, flow.source.address) == (CLIENT.uri, "shop", "198.18.1.7:40000")
    assert (flow.destination.address, flow.destination.service) == ("10.0.0.1:9080", HOST)
    assert (flow.bytes_sent, flow.flags) == (7, "-")


async def test_a_denied_request_is_a_denied_flow_naming_the_policy():
    pipeline, flows = pipeline_with_flows(allow_only("spiffe://cluster.local/ns/shop/sa/admin"))
    await call(pipeline)
    [flow] = flows.recent()
    assert (flow.verdict, flow.policy) == ("denied", None)  # no ALLOW policy matched
    assert flow.http is not None and flow.http.status == 403

    deny = Rbac(RbacAction.DENY, (RbacPolicy("ns[shop]-policy[no-frontend]-rule[1]", (AnyRequest(),), (AuthenticatedCondition(None),)),))
    pipeline, flows = pipeline_with_flows(AuthzPolicy(deny=deny))
    await call(pipeline)
    [flow] = flows.recent()
    assert (flow.verdict, flow.policy, flow.http.status) == ("denied", "shop/no-frontend", 403)


def test_rbac_policy_names_map_back_to_their_authorization_policy():
    assert policy_key("ns[books]-policy[allow-get]-rule[12]") == "books/allow-get"
    assert policy_key("hand-written") == "hand-written"
    assert policy_key(None) is None
