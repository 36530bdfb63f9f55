"""Per-node tokens (files source) and the authenticator that accepts them."""

from __future__ import annotations

import base64
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from istiod_lite.ca.authn import Caller, NodeTokenAuthenticator, Unauthenticated
from istiod_lite.ca.tokens import NodeTokens, TokenFileError


def test_token_is_minted_once_into_a_private_file(tmp_path: Path) -> None:
    tokens = NodeTokens(tmp_path / "tokens")
    token = tokens.token_for("node-a")
    assert len(base64.urlsafe_b64decode(token + "=")) == 32
    assert tokens.token_for("node-a") == token
    assert NodeTokens(tmp_path / "tokens").token_for("node-a") == token  # survives a restart
    path = tmp_path / "tokens" / "node-a.token"
    assert path.read_text().strip() == token
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert tokens.token_for("node-b") != token


def test_token_maps_back_to_its_node_only(tmp_path: Path) -> None:
    tokens = NodeTokens(tmp_path)
    token_a, token_b = tokens.token_for("node-a"), tokens.token_for("node-b")
    assert tokens.node_for(token_a) == "node-a"
    assert tokens.node_for(token_b) == "node-b"
    assert tokens.node_for(token_a[:-1]) is None
    assert tokens.node_for("") is None
    assert tokens.node_for("ünïcode") is None


def test_tokens_minted_by_another_process_are_seen_and_deleted_ones_revoked(
    tmp_path: Path,
) -> None:
    server_side = NodeTokens(tmp_path)
    token = NodeTokens(tmp_path).token_for("node-a")  # e.g. the runtime, before istiod_lite
    assert server_side.node_for(token) == "node-a"
    (tmp_path / "node-a.token").unlink()
    assert server_side.node_for(token) is None


def test_concurrent_first_use_agrees_on_one_token(tmp_path: Path) -> None:
    with ThreadPoolExecutor(max_workers=8) as pool:
        minted = set(pool.map(lambda _: NodeTokens(tmp_path).token_for("node-a"), range(32)))
    assert len(minted) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["node-a.token"]


@pytest.mark.parametrize("node", ["../etc", "Node-A", "", "a/b", "-a", "a" * 254])
def test_node_name_that_is_not_a_dns_subdomain_is_refused(tmp_path: Path, node: str) -> None:
    with pytest.raises(TokenFileError, match="expected a DNS-1123 subdomain"):
        NodeTokens(tmp_path).token_for(node)
    assert list(tmp_path.iterdir()) == []


def test_token_file_readable_by_others_is_refused_and_not_accepted(tmp_path: Path) -> None:
    tokens = NodeTokens(tmp_path)
    token = tokens.token_for("node-a")
    os.chmod(tmp_path / "node-a.token", 0o644)
    with pytest.raises(TokenFileError, match="mode 0644"):
        tokens.token_for("node-a")
    assert tokens.node_for(token) is None


def test_node_token_authenticator(tmp_path: Path) -> None:
    tokens = NodeTokens(tmp_path)
    authenticator = NodeTokenAuthenticator(tokens)
    assert authenticator.authenticate(tokens.token_for("node-a")) == Caller(
        node="node-a", identity="node-token:node-a"
    )
    with pytest.raises(Unauthenticated, match="not the token of any node"):
        authenticator.authenticate("guess")
