"""The local config file: ztunnel's LOCAL_XDS_PATH format, defaults, and precise errors."""

from __future__ import annotations

from ipaddress import ip_address, ip_network
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from ztunnel.state.localconfig import (
    LocalConfig,
    LocalConfigError,
    load_local_config,
    parse_local_config,
)
from ztunnel.state.model import (
    Authorization,
    Clause,
    GatewayAddress,
    HealthStatus,
    Match,
    NamespacedHostname,
    PolicyAction,
    PolicyScope,
    Port,
    Rule,
    Service,
    ServiceAccountMatch,
    StringMatch,
    TunnelProtocol,
    Workload,
    WorkloadType,
)

EXAMPLE = Path(__file__).parents[2] / "ztunnel" / "examples" / "localhost.yaml"

# Istio ztunnel's examples/localhost.yaml at 62d82653, verbatim: its users' files must load.
UPSTREAM_EXAMPLE = """\
workloads:
- uid: cluster1//v1/Pod/default/local
  name: local
  namespace: default
  serviceAccount: default
  workloadIps: ["127.0.0.1"]
  protocol: HBONE
  node: local
  network: ""
  services:
    "default/example.com":
      80: 8080
    "default/example2.com":
      80: 8080
- uid: cluster1//v1/Pod/default/local-tcp
  name: local-tcp
  namespace: default
  serviceAccount: default
  workloadIps: ["127.0.0.2"]
  protocol: TCP
  node: local
  network: ""
  services:
    "default/example.com":
      80: 8080
    "default/example2.com":
      80: 8080
policies:
  - action: Allow
    rules:
    - - - notDestinationPorts:
          - 9999
    name: deny-9999
    namespace: default
    scope: Namespace
    dryRun: false
services:
- name: local
  namespace: default
  hostname: example.com
  vips:
    - /127.10.0.1
  ports:
    80: 8080
  subjectAltNames:
   - spiffe://cluster.local/ns/default/sa/local
  canonical: true
- name: remote
  namespace: default
  hostname: example2.com
  vips:
    - remote/127.10.0.2
  ports:
    80: 8080
  canonical: true
"""


def test_upstream_example_loads() -> None:
    config = parse_local_config(UPSTREAM_EXAMPLE, source="localhost.yaml")
    local, local_tcp = config.workloads
    assert local == Workload(
        uid="cluster1//v1/Pod/default/local",
        name="local",
        namespace="default",
        addresses=(ip_address("127.0.0.1"),),
        node="local",
        tunnel_protocol=TunnelProtocol.HBONE,
        services=(
            ("default/example.com", (Port(80, 8080),)),
            ("default/example2.com", (Port(80, 8080),)),
        ),
    )
    assert local_tcp.tunnel_protocol is TunnelProtocol.NONE
    assert local.identity.uri == "spiffe://cluster.local/ns/default/sa/default"
    assert config.services == (
        Service(
            name="local",
            namespace="default",
            hostname="example.com",
            vips=(("", ip_address("127.10.0.1")),),
            ports=(Port(80, 8080),),
            subject_alt_names=("spiffe://cluster.local/ns/default/sa/local",),
        ),
        Service(
            name="remote",
            namespace="default",
            hostname="example2.com",
            vips=(("remote", ip_address("127.10.0.2")),),
            ports=(Port(80, 8080),),
        ),
    )
    assert config.policies == (
        Authorization(
            name="deny-9999",
            namespace="default",
            scope=PolicyScope.NAMESPACE,
            action=PolicyAction.ALLOW,
            rules=(Rule((Clause((Match(not_destination_ports=(9999,)),)),)),),
        ),
    )


def test_shipped_example_loads_from_disk() -> None:
    config = load_local_config(EXAMPLE)
    assert [w.name for w in config.workloads] == ["local", "local-tcp"]
    assert [s.key for s in config.services] == ["default/example.com", "default/example2.com"]
    assert [p.key for p in config.policies] == ["default/deny-9999"]


def test_defaults_follow_ztunnel() -> None:
    (workload,) = parse_local_config(
        "workloads: [{name: web, namespace: shop}]", source="state.yaml"
    ).workloads
    assert workload == Workload(
        uid="Kubernetes//Pod/shop/web",
        name="web",
        namespace="shop",
        addresses=(),
        node="",
        service_account="default",
        trust_domain="cluster.local",
        tunnel_protocol=TunnelProtocol.NONE,
        cluster_id="Kubernetes",
        status=HealthStatus.HEALTHY,
        capacity=1,
    )


def test_every_workload_field() -> None:
    (workload,) = parse_local_config(
        """
workloads:
- name: web
  namespace: shop
  clusterId: east
  serviceAccount: web-sa
  trustDomain: example.org
  workloadIps: ["10.0.0.1", "fd00::1"]
  protocol: HBONE
  node: node-a
  network: net1
  canonicalName: web
  canonicalRevision: v2
  workloadName: web-deploy
  workloadType: cronjob
  status: Unhealthy
  capacity: 7
  services: {"shop/web.shop.svc.cluster.local": {"80": 8080, 443: 0}}
  authorizationPolicies: [shop/only-frontend]
  waypoint: {destination: "shop/waypoint.shop.svc.cluster.local", hboneMtlsPort: 15009}
""",
        source="state.yaml",
    ).workloads
    assert workload == Workload(
        uid="east//Pod/shop/web",
        name="web",
        namespace="shop",
        addresses=(ip_address("10.0.0.1"), ip_address("fd00::1")),
        node="node-a",
        service_account="web-sa",
        trust_domain="example.org",
        tunnel_protocol=TunnelProtocol.HBONE,
        network="net1",
        canonical_name="web",
        canonical_revision="v2",
        workload_name="web-deploy",
        workload_type=WorkloadType.CRONJOB,
        cluster_id="east",
        status=HealthStatus.UNHEALTHY,
        capacity=7,
        services=(("shop/web.shop.svc.cluster.local", (Port(80, 8080), Port(443, 0))),),
        authorization_policies=("shop/only-frontend",),
        waypoint=GatewayAddress(
            None, NamespacedHostname("shop", "waypoint.shop.svc.cluster.local"), 15009
        ),
    )
    assert workload.identity.uri == "spiffe://example.org/ns/shop/sa/web-sa"


def test_waypoint_by_network_address_and_default_port() -> None:
    (service,) = parse_local_config(
        """
services:
- {name: s, namespace: ns, hostname: s.ns, vips: [], ports: {},
   waypoint: {destination: "net1/fd00::9"}}
""",
        source="state.yaml",
    ).services
    assert service.waypoint == GatewayAddress(ip_address("fd00::9"), None, 15008)


def test_every_match_field_and_string_match_form() -> None:
    (policy,) = parse_local_config(
        """
policies:
- name: all
  namespace: ns
  scope: WorkloadSelector
  action: Deny
  dryRun: true
  rules:
  - - - namespaces: [{Exact: a}]
        notNamespaces: [!Prefix b]
        principals: [{Suffix: /sa/c}, !Presence []]
        notPrincipals: [{Presence: []}, {Presence: null}]
        sourceIps: [10.0.0.0/8, 10.1.2.3]
        notSourceIps: ["fd00::/64"]
        destinationIps: [10.2.3.4/16]
        notDestinationIps: [127.0.0.1/32]
        destinationPorts: [80]
        notDestinationPorts: [81]
        serviceAccounts: [{namespace: ns, serviceAccount: sa}]
        notServiceAccounts: [{namespace: ns2, serviceAccount: sa2}]
      - {}
    - []
  - []
""",
        source="state.yaml",
    ).policies
    assert policy == Authorization(
        name="all",
        namespace="ns",
        scope=PolicyScope.WORKLOAD_SELECTOR,
        action=PolicyAction.DENY,
        dry_run=True,
        rules=(
            Rule(
                (
                    Clause(
                        (
                            Match(
                                namespaces=(StringMatch("exact", "a"),),
                                not_namespaces=(StringMatch("prefix", "b"),),
                                principals=(
                                    StringMatch("suffix", "/sa/c"),
                                    StringMatch("presence"),
                                ),
                                not_principals=(StringMatch("presence"), StringMatch("presence")),
                                source_ips=(ip_network("10.0.0.0/8"), ip_network("10.1.2.3/32")),
                                not_source_ips=(ip_network("fd00::/64"),),
                                destination_ips=(ip_network("10.2.0.0/16"),),
                                not_destination_ips=(ip_network("127.0.0.1/32"),),
                                destination_ports=(80,),
                                not_destination_ports=(81,),
                                service_accounts=(ServiceAccountMatch("ns", "sa"),),
                                not_service_accounts=(ServiceAccountMatch("ns2", "sa2"),),
                            ),
                            Match(),
                        )
                    ),
                    Clause(),
                )
            ),
            Rule(),
        ),
    )


def test_empty_file_is_an_empty_config() -> None:
    assert parse_local_config("", source="state.yaml") == LocalConfig()
    assert parse_local_config("workloads: []\n", source="state.yaml") == LocalConfig()


# --- Errors name the file, the field path and the problem ---

WORKLOAD = "workloads:\n- {name: w, namespace: ns, %s}\n"
SERVICE = "services:\n- {name: s, namespace: ns, hostname: s.ns, vips: [], ports: {}, %s}\n"
POLICY = "policies:\n- {name: p, namespace: ns, scope: Global, action: Allow, %s}\n"

ERROR_CASES = [
    (
        "workloads:\n- {name: a, namespace: ns}\n- {name: b, namespace: ns}\n"
        "- {name: c, namespace: ns, workloadIps: ['1.2.3']}\n",
        "workloads[2].workloadIps[0]: '1.2.3' is not an IP address",
    ),
    (WORKLOAD % "workloadIp: 10.0.0.1",
     "workloads[0].workloadIp: unknown key (did you mean 'workloadIps'?); known keys: uid,"),
    (WORKLOAD % "workloadIps: 10.0.0.1", "workloads[0].workloadIps: expected a list, got "
                                         "'10.0.0.1'"),
    (WORKLOAD % "workloadIps: [167772161]", "workloads[0].workloadIps[0]: expected a string"),
    ("workloads:\n- {name: w}\n", "workloads[0].namespace: required"),
    ("workloads:\n- {namespace: ns}\n", "workloads[0].uid: required when the workload has no name"),
    (WORKLOAD % "protocol: UDP", "workloads[0].protocol: expected one of TCP, HBONE, got 'UDP'"),
    (WORKLOAD % "status: [Healthy]",
     "workloads[0].status: expected one of Healthy, Unhealthy, got ['Healthy']"),
    (WORKLOAD % "capacity: -1", "workloads[0].capacity: expected an integer from 0 to 4294967295"),
    (WORKLOAD % "capacity: true", "workloads[0].capacity: expected an integer"),
    (WORKLOAD % "services: {web: {80: 8080}}",
     "workloads[0].services: 'web' is not of the form 'namespace/name'"),
    (WORKLOAD % "services: {ns/web: {80: 70000}}",
     "workloads[0].services[ns/web][80]: expected an integer from 0 to 65535, got 70000"),
    (WORKLOAD % "services: {ns/web: [80]}",
     "workloads[0].services[ns/web]: expected a mapping, got [80]"),
    (WORKLOAD % "trustDomain: Example.ORG",
     "workloads[0]: workload Kubernetes//Pod/ns/w has no valid SPIFFE identity: trust domain"),
    (WORKLOAD % "waypoint: {destination: waypoint}",
     "workloads[0].waypoint.destination: 'waypoint' is neither 'network/ip' nor 'ns/hostname'"),
    (WORKLOAD % "waypoint: {destination: /10.0.0.1, port: 15008}",
     "workloads[0].waypoint.port: unknown key"),
    (SERVICE % "vips: [10.96.0.1]",
     "services[0].vips[0]: '10.96.0.1' is not 'network/ip' (use '/ip' for the default network)"),
    (SERVICE % "vips: [/10.96.0.300]", "services[0].vips[0]: '10.96.0.300' is not an IP address"),
    (SERVICE % "subjectAltNames: [cluster.local/ns/a/sa/b]",
     "services[0].subjectAltNames[0]: 'cluster.local/ns/a/sa/b' is not a SPIFFE ID"),
    (SERVICE % "canonical: yes please", "services[0].canonical: expected true or false"),
    (SERVICE % "endpoints: {}", "services[0].endpoints: unknown key"),
    ("services:\n- {name: s, namespace: ns, vips: []}\n", "services[0].hostname: required"),
    (POLICY % "scope: Cluster, rules: []",
     "policies[0].scope: expected one of Global, Namespace, WorkloadSelector, got 'Cluster'"),
    ("policies:\n- {name: p, namespace: ns, scope: Global, rules: []}\n",
     "policies[0].action: expected one of Allow, Deny, got None"),
    (POLICY % "rules: [[[{principals: [{Regex: a.*}]}]]]",
     "policies[0].rules[0][0][0].principals[0]: unknown string match 'Regex'"),
    (POLICY % "rules: [[[{principals: [{Exact: a, Prefix: b}]}]]]",
     "policies[0].rules[0][0][0].principals[0]: expected {Exact: v}"),
    (POLICY % "rules: [[[{principals: [spiffe://td/ns/a/sa/b]}]]]",
     "policies[0].rules[0][0][0].principals[0]: expected {Exact: v}"),
    (POLICY % "rules: [[[{principals: [{Exact: [a]}]}]]]",
     "policies[0].rules[0][0][0].principals[0].Exact: expected a string, got ['a']"),
    (POLICY % "rules: [[[{principals: [{Presence: x}]}]]]",
     "policies[0].rules[0][0][0].principals[0]: Presence takes no value, got 'x'"),
    (POLICY % "rules: [[[{sourceIps: [10.0.0.0/33]}]]]",
     "policies[0].rules[0][0][0].sourceIps[0]: '10.0.0.0/33' is not a CIDR"),
    (POLICY % "rules: [[[{destinationPort: [80]}]]]",
     "policies[0].rules[0][0][0].destinationPort: unknown key (did you mean 'destinationPorts'?)"),
    (POLICY % "rules: [[{destinationPorts: [80]}]]",
     "policies[0].rules[0][0]: expected a list, got {'destinationPorts': [80]}"),
    (POLICY % "rules: [], dryRun: 'false'", "policies[0].dryRun: expected true or false"),
    ("workloads:\n- {name: w, namespace: ns}\n- {uid: Kubernetes//Pod/ns/w, namespace: ns}\n",
     "workloads[1]: duplicate uid 'Kubernetes//Pod/ns/w' (also workloads[0])"),
    (POLICY % "rules: []" + "- {name: p, namespace: ns, scope: Global, action: Deny, rules: []}\n",
     "policies[1]: duplicate namespace/name 'ns/p' (also policies[0])"),
    ("- name: local\n  namespace: default\n",
     "expected a mapping with keys workloads, services, policies, got [{"),
    ("workload: []\n", "workload: unknown key (did you mean 'workloads'?)"),
    ("workloads: [\n", "not valid YAML"),
    ("[" * 5000 + "]" * 5000, "not valid YAML: nested too deeply"),
    ("workloads: !!python/object:os.system {}\n", "not valid YAML"),
]


@pytest.mark.parametrize(("text", "message"), ERROR_CASES, ids=[m for _, m in ERROR_CASES])
def test_errors_name_file_and_field(text: str, message: str) -> None:
    with pytest.raises(LocalConfigError) as raised:
        parse_local_config(text, source="state.yaml")
    assert str(raised.value).startswith("state.yaml: ")
    assert message in str(raised.value)


def test_unreadable_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    with pytest.raises(LocalConfigError, match="missing.yaml: cannot read local config"):
        load_local_config(missing)


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "state.yaml"
    path.write_text("workloads:\n- {name: w, namespace: ns, protocol: UDP}\n")
    with pytest.raises(LocalConfigError, match=r"^state\.yaml: workloads\[0\]\.protocol: "):
        load_local_config(path)


# --- Bad input never escapes as anything but LocalConfigError ---

_KEYS = [
    "workloads", "services", "policies", "uid", "name", "namespace", "workloadIps", "protocol",
    "services", "waypoint", "destination", "vips", "ports", "rules", "scope", "action",
    "principals", "sourceIps", "destinationPorts", "serviceAccounts", "Exact", "Presence",
    "capacity", "subjectAltNames", "status",
]
_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 70000), st.floats(allow_nan=False),
    st.sampled_from(["", "HBONE", "Global", "Allow", "ns/x", "/10.0.0.1", "10.0.0.0/8",
                     "spiffe://td/ns/a/sa/b", "a/b", "::1", "Healthy"]),
    st.text(max_size=8),
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.one_of(st.sampled_from(_KEYS), st.integers(0, 100)), inner,
                        max_size=4),
    ),
    max_leaves=25,
)


@settings(max_examples=300, deadline=None)
@given(_VALUES)
def test_arbitrary_documents_fail_only_with_local_config_error(document: object) -> None:
    try:
        parse_local_config(yaml.safe_dump(document), source="fuzz.yaml")
    except LocalConfigError:
        pass
