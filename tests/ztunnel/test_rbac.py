"""L4 authorization: ztunnel's matching and ALLOW/DENY/dry-run semantics, case by case."""

from __future__ import annotations

from ipaddress import ip_address, ip_network

import pytest

from meshcore.identity.spiffe import Identity
from ztunnel.rbac import ConnectionAttributes, Decision, authorize, policy_matches
from ztunnel.state.model import (
    Authorization,
    Clause,
    Match,
    PolicyAction,
    PolicyScope,
    Rule,
    ServiceAccountMatch,
    StringMatch,
)

IDENTITY = Identity(trust_domain="td", namespace="namespace", service_account="account")
MTLS = ConnectionAttributes(ip_address("127.0.0.1"), ip_address("127.0.0.2"), 8080, IDENTITY)
PLAIN = ConnectionAttributes(ip_address("127.0.0.1"), ip_address("127.0.0.2"), 8080, None)
V6 = ConnectionAttributes(ip_address("fd00::1"), ip_address("fd00::2"), 8080, IDENTITY)


def policy(
    *matches_per_clause: tuple[Match, ...],
    action: PolicyAction = PolicyAction.ALLOW,
    name: str = "p",
    dry_run: bool = False,
) -> Authorization:
    """A policy with one rule whose clauses hold the given Matches."""
    rule = Rule(tuple(Clause(matches) for matches in matches_per_clause))
    return Authorization(name, "ns", PolicyScope.NAMESPACE, action, (rule,), dry_run)


def exact(value: str) -> StringMatch:
    return StringMatch("exact", value)


# --- One Match: each field family, positive and negative ---

MATCH_CASES = [
    # namespaces come from the peer identity
    (Match(namespaces=(exact("namespace"),)), MTLS, True),
    (Match(namespaces=(exact("other"),)), MTLS, False),
    (Match(namespaces=(exact("other"), exact("namespace"))), MTLS, True),
    (Match(not_namespaces=(exact("namespace"),)), MTLS, False),
    (Match(not_namespaces=(exact("other"),)), MTLS, True),
    (Match(namespaces=(StringMatch("presence"),)), PLAIN, False),
    (Match(not_namespaces=(exact("namespace"),)), PLAIN, True),
    # principals are td/ns/x/sa/y, without spiffe://
    (Match(principals=(exact("td/ns/namespace/sa/account"),)), MTLS, True),
    (Match(principals=(exact("spiffe://td/ns/namespace/sa/account"),)), MTLS, False),
    (Match(principals=(StringMatch("prefix", "td/ns/namespace/"),)), MTLS, True),
    (Match(principals=(StringMatch("prefix", "td/ns/other/"),)), MTLS, False),
    (Match(principals=(StringMatch("suffix", "/sa/account"),)), MTLS, True),
    (Match(principals=(StringMatch("suffix", "/sa/other"),)), MTLS, False),
    (Match(principals=(StringMatch("presence"),)), MTLS, True),
    (Match(principals=(StringMatch("presence"),)), PLAIN, False),
    (Match(not_principals=(StringMatch("presence"),)), PLAIN, True),
    (Match(not_principals=(StringMatch("presence"),)), MTLS, False),
    # service accounts: namespace and account of the identity
    (Match(service_accounts=(ServiceAccountMatch("namespace", "account"),)), MTLS, True),
    (Match(service_accounts=(ServiceAccountMatch("other", "account"),)), MTLS, False),
    (Match(service_accounts=(ServiceAccountMatch("namespace", "other"),)), MTLS, False),
    (Match(service_accounts=(ServiceAccountMatch("namespace", "account"),)), PLAIN, False),
    (Match(not_service_accounts=(ServiceAccountMatch("namespace", "account"),)), MTLS, False),
    (Match(not_service_accounts=(ServiceAccountMatch("namespace", "account"),)), PLAIN, True),
    # source and destination IPs are CIDRs
    (Match(source_ips=(ip_network("127.0.0.0/8"),)), MTLS, True),
    (Match(source_ips=(ip_network("127.0.0.2/32"),)), MTLS, False),
    (Match(not_source_ips=(ip_network("127.0.0.1/32"),)), MTLS, False),
    (Match(not_source_ips=(ip_network("10.0.0.0/8"),)), MTLS, True),
    (Match(destination_ips=(ip_network("127.0.0.2/32"),)), MTLS, True),
    (Match(destination_ips=(ip_network("127.0.0.1/32"),)), MTLS, False),
    (Match(not_destination_ips=(ip_network("127.0.0.2/32"),)), MTLS, False),
    (Match(source_ips=(ip_network("fd00::/64"),)), V6, True),
    (Match(source_ips=(ip_network("0.0.0.0/0"),)), V6, False),
    # destination ports
    (Match(destination_ports=(80, 8080)), MTLS, True),
    (Match(destination_ports=(80,)), MTLS, False),
    (Match(not_destination_ports=(8080,)), MTLS, False),
    (Match(not_destination_ports=(9999,)), MTLS, True),
    # every populated family must hold
    (Match(destination_ports=(8080,), namespaces=(exact("namespace"),)), MTLS, True),
    (Match(destination_ports=(8080,), namespaces=(exact("other"),)), MTLS, False),
    (Match(destination_ports=(8080,), not_destination_ports=(8080,)), MTLS, False),
    (Match(namespaces=(exact("namespace"),), not_principals=(StringMatch("presence"),)), MTLS,
     False),
]


@pytest.mark.parametrize(("match", "conn", "expected"), MATCH_CASES)
def test_match_fields(match: Match, conn: ConnectionAttributes, expected: bool) -> None:
    assert policy_matches(policy((match,)), conn) is expected


# --- Rule / clause / policy structure ---

PORT_8080 = Match(destination_ports=(8080,))
PORT_80 = Match(destination_ports=(80,))
EMPTY = Match()


def with_rules(*rules: Rule) -> Authorization:
    return Authorization("p", "ns", PolicyScope.NAMESPACE, PolicyAction.ALLOW, rules)


STRUCTURE_CASES = [
    ("no rules match nothing", with_rules(), False),
    ("a rule without clauses matches everything", with_rules(Rule()), True),
    ("a clause without matches counts as a match", with_rules(Rule((Clause(),))), True),
    ("an empty Match is ignored", with_rules(Rule((Clause((EMPTY,)),))), False),
    ("an empty Match beside a real one", with_rules(Rule((Clause((EMPTY, PORT_8080)),))), True),
    ("clause: any match", with_rules(Rule((Clause((PORT_80, PORT_8080)),))), True),
    ("clause: no match", with_rules(Rule((Clause((PORT_80,)),))), False),
    ("rule: all clauses", with_rules(Rule((Clause((PORT_8080,)), Clause((PORT_80,))))), False),
    ("rule: all clauses hold", with_rules(Rule((Clause((PORT_8080,)), Clause()))), True),
    ("policy: any rule", with_rules(Rule((Clause((PORT_80,)),)), Rule((Clause((PORT_8080,)),))),
     True),
]


@pytest.mark.parametrize(
    ("case", "pol", "expected"), STRUCTURE_CASES, ids=[c[0] for c in STRUCTURE_CASES]
)
def test_rule_structure(case: str, pol: Authorization, expected: bool) -> None:
    assert policy_matches(pol, MTLS) is expected


# --- Decisions ---

DENY_8080 = policy((PORT_8080,), action=PolicyAction.DENY, name="deny-8080")
DENY_80 = policy((PORT_80,), action=PolicyAction.DENY, name="deny-80")
ALLOW_8080 = policy((PORT_8080,), name="allow-8080")
ALLOW_80 = policy((PORT_80,), name="allow-80")
STRICT = policy(
    (Match(not_principals=(StringMatch("presence"),)),),
    action=PolicyAction.DENY,
    name="istio_converted_static_strict",
)

DECISION_CASES = [
    ("no policies: allow", [], MTLS, True, None),
    ("matching DENY denies", [DENY_8080], MTLS, False, "ns/deny-8080"),
    ("non-matching DENY alone allows", [DENY_80], MTLS, True, None),
    ("matching ALLOW allows", [ALLOW_80, ALLOW_8080], MTLS, True, "ns/allow-8080"),
    ("no ALLOW matches: deny", [ALLOW_80], MTLS, False, None),
    ("DENY wins over ALLOW", [ALLOW_8080, DENY_8080], MTLS, False, "ns/deny-8080"),
    ("STRICT denies plaintext", [STRICT], PLAIN, False, "ns/istio_converted_static_strict"),
    ("STRICT allows mTLS", [STRICT], MTLS, True, None),
    ("dry-run DENY never denies",
     [policy((PORT_8080,), action=PolicyAction.DENY, dry_run=True)], MTLS, True, None),
    ("dry-run ALLOW does not make ALLOW required", [policy((PORT_80,), dry_run=True)], MTLS,
     True, None),
    ("dry-run ALLOW does not allow", [ALLOW_80, policy((PORT_8080,), dry_run=True)], MTLS,
     False, None),
]


@pytest.mark.parametrize(
    ("case", "policies", "conn", "allowed", "decided_by"),
    DECISION_CASES,
    ids=[c[0] for c in DECISION_CASES],
)
def test_authorize(
    case: str,
    policies: list[Authorization],
    conn: ConnectionAttributes,
    allowed: bool,
    decided_by: str | None,
) -> None:
    decision = authorize(policies, conn)
    assert (decision.allowed, decision.policy) == (allowed, decided_by)


def test_reasons_tell_the_operator_what_happened() -> None:
    assert authorize([], MTLS).reason == "no ALLOW policy applies to the workload"
    assert authorize([DENY_8080], MTLS).reason == "DENY policy ns/deny-8080 matched"
    assert authorize([ALLOW_80, ALLOW_8080], MTLS).reason == "ALLOW policy ns/allow-8080 matched"
    assert authorize([ALLOW_80], MTLS) == Decision(
        False, None, "no ALLOW policy matched (checked ns/allow-80)"
    )


def test_dry_run_outcomes_are_reported_but_do_not_decide() -> None:
    dry_deny = policy((PORT_8080,), action=PolicyAction.DENY, name="try-deny", dry_run=True)
    dry_allow = policy((PORT_80,), name="try-allow", dry_run=True)
    decision = authorize([dry_deny, dry_allow], MTLS)
    assert decision.allowed
    assert "dry-run DENY policy ns/try-deny matched" in decision.reason
    assert "dry-run: no ALLOW policy would match" in decision.reason
