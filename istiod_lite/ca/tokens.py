"""Per-node bearer tokens for the files source, where there is no Kubernetes to vouch for nodes.

istiod_lite mints one random token per node (`token_for`) into `<dir>/<node>.token` (0600);
the runtime hands that file to the node's ztunnel, which presents the token to the CA. A
token proves "I am the ztunnel of node N" and nothing more; which identities N may then
obtain is the CA's decision.

The files are the only state: `node_for` reads the directory on every call, so tokens minted
by another process (the runtime) are seen at once and deleting a file revokes its token.
Methods are synchronous and thread-safe (the CA calls them from gRPC's thread pool).
"""

from __future__ import annotations

import hmac
import os
import re
import secrets
import stat
from pathlib import Path

from meshcore.log import get_logger

TOKEN_SUFFIX = ".token"
TOKEN_BYTES = 32
TOKEN_FILE_MODE = 0o600
# Kubernetes node names are DNS-1123 subdomains; the shape also keeps them safe as file names.
_NODE_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_MAX_NODE_NAME = 253

_log = get_logger("ca")


class TokenFileError(Exception):
    """A node token cannot be minted or read; the message names the node or file."""


class NodeTokens:
    """The token files in `directory` (created 0700 if missing)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def token_for(self, node: str) -> str:
        """The node's token, minted on first use; raises TokenFileError."""
        _check_node_name(node)
        path = self.path_for(node)
        if not path.exists():
            self._mint(node, path)
        return _read_token(path)

    def node_for(self, token: str) -> str | None:
        """The node whose token this is, or None; each comparison takes constant time."""
        presented = token.encode()
        for path in sorted(self.directory.glob("*" + TOKEN_SUFFIX)):
            try:
                expected = _read_token(path).encode()
            except TokenFileError as exc:
                _log.warning("ignoring node token file", error=str(exc))
                continue
            if hmac.compare_digest(presented, expected):
                return path.name.removesuffix(TOKEN_SUFFIX)
        return None

    def path_for(self, node: str) -> Path:
        return self.directory / (node + TOKEN_SUFFIX)

    def _mint(self, node: str, path: Path) -> None:
        token = secrets.token_urlsafe(TOKEN_BYTES)
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, TOKEN_FILE_MODE)
            with os.fdopen(fd, "w") as file:
                file.write(token + "\n")
            try:
                # link() never replaces: if another thread or process minted first, its token
                # stays (the caller may already have handed it out) and ours is dropped.
                os.link(temporary, path)
            except FileExistsError:
                pass
            else:
                _log.info("minted node token", node=node, file=str(path))
            finally:
                temporary.unlink()
        except OSError as exc:
            raise TokenFileError(
                f"cannot write the token of node {node!r} to {path}: {exc}"
            ) from None


def _check_node_name(node: str) -> None:
    if len(node) > _MAX_NODE_NAME or not _NODE_NAME.fullmatch(node):
        raise TokenFileError(
            f"node name {node!r} is invalid: expected a DNS-1123 subdomain "
            "(lower-case letters, digits, '-' and '.')"
        )


def _read_token(path: Path) -> str:
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise TokenFileError(
                f"node token file {path} has mode {mode:04o}: it must not be accessible to "
                f"group or others; run `chmod 600 {path}`"
            )
        token = path.read_text().strip()
    except OSError as exc:
        raise TokenFileError(f"cannot read node token file {path}: {exc.strerror}") from None
    if not token:
        raise TokenFileError(f"node token file {path} is empty")
    return token
