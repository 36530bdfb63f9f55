"""ztunnel/inpod/redirect: the traffic capture rules inside an enrolled pod's network namespace.

The rules are Istio's in-pod iptables rules (istio/istio cni/pkg/iptables, default.golden)
written for nftables, in two tables of their own (the capture, and the reply path) so that
installing is atomic and removing is deleting them:

- nat OUTPUT: the pod's own outbound TCP connections (their opening SYN; conntrack keeps
  the rest of each connection on the same path) go to ztunnel's 15001, except traffic to
  127.0.0.1, traffic from the pod to itself over `lo`, and packets of ztunnel's own
  sockets (SO_MARK 0x539 under mask 0xfff).
- nat PREROUTING: inbound TCP connections go to ztunnel's 15006 (plaintext from non-mesh clients),
  except to 127.0.0.1, to 15008 (HBONE, which ztunnel already listens on in the pod) and
  ztunnel's marked packets.
- The transparent reply path: when ztunnel connects to the app with the client's address
  as source (IP_TRANSPARENT), that marked packet arrives over `lo` and its connection gets
  ct mark 0x111; the app's replies have 0x111 restored as packet mark, and the policy rule
  `fwmark 0x111/0xfff lookup 100` with `local 0.0.0.0/0 dev lo table 100` delivers them
  back to ztunnel's socket instead of sending them out of the pod.

Releasing a pod is two steps: `stop_redirect` ends the capture at once (new connections go
direct), `remove_redirect` later takes the rest, once the connections already redirected and
those ztunnel opened to the app with a client's address are done. Removing everything under
them resets them: without a nat chain the kernel stops translating redirected connections,
and without the reply path the app's replies leave the pod for a client that never opened
that connection.

All three are idempotent and blocking (they run `nft` and `ip` inside the netns); trio
callers use `trio.to_thread.run_sync`. IPv4 only, like the one-machine runtime's address plan.
"""

from __future__ import annotations

import shutil
import subprocess

from meshcore import netio
from ztunnel.inpod.netns import in_netns

OUTBOUND_PORT = 15001
INBOUND_PLAINTEXT_PORT = 15006
INBOUND_HBONE_PORT = 15008
MARK_MASK = 0xFFF
# ct mark for connections ztunnel opened to the app with a spoofed (transparent) source.
TPROXY_MARK = 0x111
ROUTE_TABLE = 100
RULE_PRIORITY = 32764
TABLE = "ztunnel-inpod"  # the capture: nat redirects to ztunnel's ports
REPLY_TABLE = "ztunnel-inpod-reply"  # the transparent reply path (ct mark -> fwmark)
_COMMAND_TIMEOUT = 10.0


class RedirectError(Exception):
    """Installing or removing the capture rules in a pod's netns failed."""


def redirect_ruleset() -> str:
    """The nft script that (re)creates both tables; applying it twice changes nothing."""
    mesh = f"meta mark & {MARK_MASK:#x} == {netio.MESH_MARK:#x}"
    unmarked = f"meta mark & {MARK_MASK:#x} != {netio.MESH_MARK:#x}"
    keep_high_bits = 0xFFFFFFFF & ~MARK_MASK
    # Only a connection's first SYN is redirected. Conntrack starts in a pod's netns when these
    # rules arrive, and picks up connections already open as "new" on their next packet: an
    # app's reply on a connection made just before capture would be redirected to ztunnel
    # and the connection broken.
    opening = "tcp flags & (syn | ack) == syn"
    return f"""\
table ip {REPLY_TABLE} {{}}
delete table ip {REPLY_TABLE}
table ip {REPLY_TABLE} {{
  chain prerouting_mangle {{
    type filter hook prerouting priority mangle; policy accept;
    {mesh} ct mark set ct mark & {keep_high_bits:#x} | {TPROXY_MARK:#x}
  }}
  chain output_mangle {{
    type route hook output priority mangle; policy accept;
    ct mark & {MARK_MASK:#x} == {TPROXY_MARK:#x} meta mark set ct mark
  }}
}}
table ip {TABLE} {{}}
delete table ip {TABLE}
table ip {TABLE} {{
  chain prerouting_nat {{
    type nat hook prerouting priority dstnat; policy accept;
    ip daddr != 127.0.0.1 tcp dport != {INBOUND_HBONE_PORT} {opening} {unmarked} redirect to :{INBOUND_PLAINTEXT_PORT}
  }}
  chain output_nat {{
    type nat hook output priority -100; policy accept;
    oifname "lo" ip daddr != 127.0.0.1 accept
    ip daddr != 127.0.0.1 {opening} {unmarked} redirect to :{OUTBOUND_PORT}
  }}
}}
"""


def install_redirect(netns_fd: int) -> None:
    """Install (or refresh) the capture rules in the netns `netns_fd`."""
    _require_tools()
    in_netns(netns_fd, _install)


def stop_redirect(netns_fd: int) -> None:
    """Stop capturing new connections in the netns `netns_fd` (the redirect rules go), keeping
    what connections already redirected, and those ztunnel opened to the app, still need."""
    _require_tools()
    in_netns(netns_fd, _remove_capture)


def remove_redirect(netns_fd: int) -> None:
    """Remove every capture rule from the netns `netns_fd`; nothing is left, absent rules are fine."""
    _require_tools()
    in_netns(netns_fd, _remove)


def _install() -> None:
    _run(["nft", "-f", "-"], script=redirect_ruleset())
    _run(["ip", "-4", "route", "replace", "local", "0.0.0.0/0", "dev", "lo", "table", str(ROUTE_TABLE)])
    # `ip rule add` refuses an identical rule with EEXIST, which is what idempotent means here.
    _run(_rule_command("add"), tolerate="File exists")


def _remove_capture() -> None:
    # The chains stay, empty: while a nat chain exists the kernel keeps translating the
    # connections it redirected already; without one they would go on untranslated (reset).
    _run(["nft", "-f", "-"], script=f"flush chain ip {TABLE} prerouting_nat\nflush chain ip {TABLE} output_nat\n",
         tolerate="No such file or directory")


def _remove() -> None:
    _run(["nft", "-f", "-"], script=f"table ip {TABLE} {{}}\ndelete table ip {TABLE}\n")
    _run(["nft", "-f", "-"], script=f"table ip {REPLY_TABLE} {{}}\ndelete table ip {REPLY_TABLE}\n")
    _run(_rule_command("del"), tolerate="No such file or directory")
    _run(["ip", "-4", "route", "flush", "table", str(ROUTE_TABLE)])


def _rule_command(action: str) -> list[str]:
    return [
        "ip", "-4", "rule", action,
        "fwmark", f"{TPROXY_MARK:#x}/{MARK_MASK:#x}", "pref", str(RULE_PRIORITY), "lookup", str(ROUTE_TABLE),
    ]  # fmt: skip


def _run(command: list[str], *, script: str | None = None, tolerate: str | None = None) -> None:
    try:
        completed = subprocess.run(
            command, input=script, capture_output=True, text=True, timeout=_COMMAND_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise RedirectError(f"`{' '.join(command)}` in the pod netns took over {_COMMAND_TIMEOUT:.0f}s") from exc
    stderr = completed.stderr.strip()
    if completed.returncode != 0 and not (tolerate and tolerate in stderr):
        raise RedirectError(f"`{' '.join(command)}` in the pod netns failed (exit {completed.returncode}): {stderr}")


def _require_tools() -> None:
    missing = [tool for tool in ("nft", "ip") if shutil.which(tool) is None]
    if missing:
        raise RedirectError(
            f"capture rules need {' and '.join(missing)} on PATH (Debian: apt-get install nftables iproute2)"
        )
