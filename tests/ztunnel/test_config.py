"""ztunnel's config file: what a DaemonSet's environment fills in, and what it cannot."""

from __future__ import annotations

from pathlib import Path

import pytest

from ztunnel.config import ConfigError, parse_config

IN_CLUSTER = {
    "controlPlane": {"address": "istiod.istio-system.svc:15012", "rootCert": "/r.pem", "tokenFile": "/t"},
    "inpod": {"socket": "/var/run/ztunnel/ztunnel.sock"},
}
DOWNWARD_API = {"NODE_NAME": "node-7", "INSTANCE_IP": "10.4.0.9"}


def parse(raw: dict, environ: dict[str, str]):
    return parse_config(raw, source="config.yaml", base=Path("/etc/ztunnel"), environ=environ)


def test_node_and_address_come_from_the_daemonsets_environment_when_the_file_leaves_them_out():
    config = parse(IN_CLUSTER, DOWNWARD_API)
    assert (config.node, config.address) == ("node-7", "10.4.0.9")


def test_the_file_wins_over_the_environment():
    config = parse({**IN_CLUSTER, "node": "node-a", "address": "127.0.0.1"}, DOWNWARD_API)
    assert (config.node, config.address) == ("node-a", "127.0.0.1")


@pytest.mark.parametrize(
    ("environ", "error"),
    [
        ({"INSTANCE_IP": "10.4.0.9"}, "node: required"),
        ({"NODE_NAME": "node-7"}, "address: required"),
        ({"NODE_NAME": "node-7", "INSTANCE_IP": "not-an-ip"}, "address: 'not-an-ip' is not an IP address"),
    ],
)
def test_missing_or_bad_values_name_the_field(environ, error):
    with pytest.raises(ConfigError, match=error):
        parse(IN_CLUSTER, environ)
