"""L4 authorization: does a connection pass the policies that apply to its destination?

Pure functions over `ztunnel.state.model.Authorization`, with ztunnel's semantics
(src/rbac.rs `Authorization::matches`, src/state.rs `assert_rbac`):

Decision order
  1. dry-run policies never decide; whether they would have matched is only reported;
  2. any matching DENY policy denies;
  3. no ALLOW policies at all: allow;
  4. any matching ALLOW policy allows;
  5. otherwise deny.

Matching
  - a policy matches if ANY rule matches; a policy without rules matches nothing;
  - a rule matches if ALL its clauses match; a rule without clauses matches everything;
  - a clause matches if ANY of its Matches matches; a clause without Matches counts as a
    match, but a Match with no field set is skipped (so a clause of only empty Matches fails);
  - within a Match every populated family must hold: the positive list needs any value to
    match, the `not_` list needs none to match.
  - principals are compared with `identity.principal` ("td/ns/x/sa/y", no "spiffe://");
    namespaces with the identity's namespace (never the source IP's workload). Without a
    peer identity every principal/namespace/service-account comparison is false, so a
    positive list fails and a `not_` list passes: `not_principals: [presence]` (what
    PeerAuthentication STRICT becomes) denies plaintext.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from meshcore.identity.spiffe import Identity
from ztunnel.state.model import (
    Authorization,
    IpAddress,
    Match,
    PolicyAction,
    ServiceAccountMatch,
)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ConnectionAttributes:
    """What L4 policy can see of a connection; dst_port is the real target, not 15008."""

    src_ip: IpAddress
    dst_ip: IpAddress
    dst_port: int
    src_identity: Identity | None


@dataclass(frozen=True, slots=True)
class Decision:
    """The verdict, the "ns/name" of the policy that decided it (if one did), and why."""

    allowed: bool
    policy: str | None
    reason: str


# --- Matching ---


def _family_holds(
    positive: Sequence[T], negative: Sequence[T], predicate: Callable[[T], bool]
) -> bool:
    if positive and not any(predicate(value) for value in positive):
        return False
    return not any(predicate(value) for value in negative)


def _service_account_matches(sa: ServiceAccountMatch, identity: Identity | None) -> bool:
    return (
        identity is not None
        and identity.namespace == sa.namespace
        and identity.service_account == sa.service_account
    )


def match_holds(match: Match, conn: ConnectionAttributes) -> bool:
    """Whether every populated field family of `match` holds for `conn`."""
    identity = conn.src_identity
    return (
        _family_holds(
            match.destination_ips, match.not_destination_ips, lambda net: conn.dst_ip in net
        )
        and _family_holds(match.source_ips, match.not_source_ips, lambda net: conn.src_ip in net)
        and _family_holds(
            match.destination_ports, match.not_destination_ports, lambda p: p == conn.dst_port
        )
        and _family_holds(
            match.service_accounts,
            match.not_service_accounts,
            lambda sa: _service_account_matches(sa, identity),
        )
        and _family_holds(
            match.principals,
            match.not_principals,
            lambda sm: identity is not None and sm.matches(identity.principal),
        )
        and _family_holds(
            match.namespaces,
            match.not_namespaces,
            lambda sm: identity is not None and sm.matches(identity.namespace),
        )
    )


def policy_matches(policy: Authorization, conn: ConnectionAttributes) -> bool:
    """Whether `policy`'s rules select `conn` (regardless of action and dry-run)."""
    return any(
        all(
            not clause.matches
            or any(not m.is_empty() and match_holds(m, conn) for m in clause.matches)
            for clause in rule.clauses
        )
        for rule in policy.rules
    )


# --- Decision ---


def authorize(policies: Iterable[Authorization], conn: ConnectionAttributes) -> Decision:
    """Decide whether `conn` may reach a workload to which `policies` apply."""
    applicable = tuple(policies)
    enforced = [p for p in applicable if not p.dry_run]
    dry_run_notes = _dry_run_notes([p for p in applicable if p.dry_run], conn, enforced)

    def decided(allowed: bool, policy: str | None, reason: str) -> Decision:
        return Decision(allowed, policy, reason + dry_run_notes)

    for policy in enforced:
        if policy.action is PolicyAction.DENY and policy_matches(policy, conn):
            return decided(False, policy.key, f"DENY policy {policy.key} matched")
    allows = [p for p in enforced if p.action is PolicyAction.ALLOW]
    if not allows:
        return decided(True, None, "no ALLOW policy applies to the workload")
    for policy in allows:
        if policy_matches(policy, conn):
            return decided(True, policy.key, f"ALLOW policy {policy.key} matched")
    names = ", ".join(p.key for p in allows)
    return decided(False, None, f"no ALLOW policy matched (checked {names})")


def _dry_run_notes(
    dry_run: Sequence[Authorization],
    conn: ConnectionAttributes,
    enforced: Sequence[Authorization],
) -> str:
    """What dry-run policies would have done, for the operator trying them out."""
    matched = [p for p in dry_run if policy_matches(p, conn)]
    notes = [f"dry-run {p.action.name} policy {p.key} matched" for p in matched]
    dry_allows = [p for p in dry_run if p.action is PolicyAction.ALLOW]
    enforced_allows = any(p.action is PolicyAction.ALLOW for p in enforced)
    if dry_allows and not enforced_allows and not any(p in matched for p in dry_allows):
        notes.append("dry-run: no ALLOW policy would match")
    return "".join(f"; {note}" for note in notes)
