"""L7 authorization: Envoy's RBAC HTTP filter semantics over `waypoint.config.model.Rbac`.

Decision order (Istio's filter order on a waypoint listener: DENY filter, then ALLOW):
  1. a DENY filter with any matching policy denies;
  2. no ALLOW filter at all: allow;
  3. an ALLOW filter with any matching policy allows;
  4. otherwise deny (an ALLOW filter with no policies allows nothing).

A policy matches when ANY of its permissions and ANY of its principals match. Conditions
nest with AllOf / AnyOf / Not. The client identity is the SPIFFE URI of the HBONE peer
certificate (the client ztunnel's workload identity); without one, AuthenticatedCondition
is false, so a Not around it holds. Policies are checked in name order, so the reported
policy is the first matching name, as Envoy reports it.
"""

from __future__ import annotations

from dataclasses import dataclass

from waypoint.config.model import (
    AllOf,
    AnyOf,
    AnyRequest,
    AuthenticatedCondition,
    Condition,
    DestinationPortCondition,
    HeaderCondition,
    Not,
    Rbac,
    RbacPolicy,
    UrlPathCondition,
)
from waypoint.routing.match import RequestHead


@dataclass(frozen=True, slots=True)
class RequestAttributes:
    """What L7 policy can see of a request."""

    request: RequestHead
    principal: str | None  # the client's SPIFFE URI, None without a verified identity
    destination_port: int  # the service port the client addressed


@dataclass(frozen=True, slots=True)
class Decision:
    """The verdict and the policy that decided it (None when no policy matched)."""

    allowed: bool
    policy_name: str | None


def evaluate(deny: Rbac | None, allow: Rbac | None, attributes: RequestAttributes) -> Decision:
    """Authorize a request against a listener's DENY and ALLOW filters."""
    if deny is not None:
        matched = first_matching_policy(deny, attributes)
        if matched is not None:
            return Decision(False, matched)
    if allow is None:
        return Decision(True, None)
    matched = first_matching_policy(allow, attributes)
    return Decision(matched is not None, matched)


def first_matching_policy(rbac: Rbac, attributes: RequestAttributes) -> str | None:
    """The name of the first policy of `rbac` that matches, or None."""
    for policy in rbac.policies:
        if policy_matches(policy, attributes):
            return policy.name
    return None


def policy_matches(policy: RbacPolicy, attributes: RequestAttributes) -> bool:
    return any(holds(c, attributes) for c in policy.permissions) and any(
        holds(c, attributes) for c in policy.principals
    )


def holds(condition: Condition, attributes: RequestAttributes) -> bool:
    """Whether one permission or principal condition holds for the request."""
    match condition:
        case AnyRequest():
            return True
        case HeaderCondition(match=header):
            return header.matches(attributes.request.header(header.name))
        case UrlPathCondition(path=path):
            return path.matches(attributes.request.path)
        case DestinationPortCondition(port=port):
            return attributes.destination_port == port
        case AuthenticatedCondition(principal=principal):
            if attributes.principal is None:
                return False
            return principal is None or principal.matches(attributes.principal)
        case AllOf(conditions=conditions):
            return all(holds(c, attributes) for c in conditions)
        case AnyOf(conditions=conditions):
            return any(holds(c, attributes) for c in conditions)
        case Not(condition=inner):
            return not holds(inner, attributes)
    raise TypeError(f"unknown authorization condition {condition!r}")
