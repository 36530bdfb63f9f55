"""ambientctl/mesh: the mesh on top of the one-machine runtime.

`up` starts, as a cluster service, istiod_lite (files source on the runtime's object store,
listening on the node link's router address inside `mesh-net`), and on every node a node
agent plus a ztunnel in in-pod mode (its own process inside the node's namespace, fed over
delta xDS, certificates from istiod_lite's CA with the node's token). The node service also
decides enrolment: a pod is captured when its namespace or the pod itself is labelled
`istio.io/dataplane-mode=ambient` and the pod is not labelled `none`; label changes capture
or release running pods without restarting them.
"""

from __future__ import annotations

import sys
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import trio
import yaml

from ambientctl.runtime import ClusterContext, NodeContext, RunningPod
from ambientctl.runtime.addressing import ROUTER_LINK_ADDRESS
from ambientctl.runtime.manifests import ObjectKey
from ambientctl.runtime.netns import ROUTER_NETNS
from ambientctl.runtime.store import ObjectStore
from istiod_lite.ca.root import load_or_create_root
from istiod_lite.ca.tokens import NodeTokens
from meshcore.enrolment import REDIRECTION_ANNOTATION, is_captured
from meshcore.log import get_logger
from ztunnel.inpod.agent import EnrolledPod, NodeAgent

_log = get_logger("ambientctl")

ISTIOD_ADDRESS = str(ROUTER_LINK_ADDRESS)
READY_TIMEOUT = 30.0
RESTART_DELAY = 1.0
# Time for "not HBONE any more" to reach every ztunnel before the pod's listeners close.
REDIRECTION_SETTLE = 0.5
REPO = Path(__file__).resolve().parents[1]


def istiod_dir(run_root: Path) -> Path:
    return run_root / "istiod"


async def wait_http_ok(url: str, what: str) -> None:
    def probe() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                return resp.status == 200
        except OSError:
            return False

    with trio.move_on_after(READY_TIMEOUT):
        while not await trio.to_thread.run_sync(probe):
            await trio.sleep(0.1)
        return
    raise RuntimeError(f"{what} did not become ready within {READY_TIMEOUT:.0f} s ({url})")


class IstiodService:
    name = "istiod-lite"

    async def run(self, cluster: ClusterContext, *, task_status: trio.TaskStatus[Sequence[str]]) -> None:
        root = istiod_dir(cluster.run_dir.root)
        # The root and node tokens exist before anything starts, so ztunnels can be configured.
        load_or_create_root(root / "ca")
        tokens = NodeTokens(root / "node-tokens")
        for node in cluster.nodes:
            tokens.token_for(node.name)
        argv = [
            sys.executable, "-m", "istiod_lite", "--source", "files", "--dir", str(cluster.store_dir),
            "--root-dir", str(root), "--listen-address", ISTIOD_ADDRESS, "--poll-interval", "0.1",
        ]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: cluster.run_process(self.name, argv, netns=ROUTER_NETNS, cwd=REPO))
            await wait_http_ok(f"http://{ISTIOD_ADDRESS}:15014/ready", "istiod_lite")
            task_status.started([
                f"istiod_lite: xDS+CA {ISTIOD_ADDRESS}:15012, metrics http://{ISTIOD_ADDRESS}:15014/metrics, "
                f"log {cluster.run_dir.service_log('cluster', self.name)}"
            ])


class ZtunnelService:
    name = "ztunnel"

    async def run(self, node: NodeContext, *, task_status: trio.TaskStatus[Sequence[str]]) -> None:
        root = istiod_dir(node.run_dir.root)
        folder = node.run_dir.root / "nodes" / node.name
        folder.mkdir(parents=True, exist_ok=True)
        socket_path = folder / "ztunnel.sock"
        address = str(node.addresses.link_address)
        config = folder / "ztunnel.yaml"
        config.write_text(yaml.safe_dump({
            "node": node.name,
            "address": address,
            "controlPlane": {
                "address": f"{ISTIOD_ADDRESS}:15012",
                "tokenFile": str(NodeTokens(root / "node-tokens").path_for(node.name)),
                "rootCert": str(root / "ca" / "ca-cert.pem"),
            },
            "inpod": {"socket": str(socket_path)},
            "ports": {"socks5": 0},
        }, sort_keys=False))
        agent = NodeAgent(socket_path)
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.run)
            argv = [sys.executable, "-m", "ztunnel", "--config", str(config)]
            nursery.start_soon(self._keep_running, node, argv)
            await wait_http_ok(f"http://{address}:15021/healthz/ready", f"ztunnel on {node.name}")
            task_status.started([
                f"ztunnel {node.name}: metrics http://{address}:15020/metrics, ready http://{address}:15021/healthz/ready, "
                f"log {node.run_dir.service_log(node.name, self.name)}"
            ])
            await self._enrol(node, agent)

    @staticmethod
    async def _annotate(store: ObjectStore, pod: RunningPod, value: str) -> None:
        """Report capture on the pod, as Istio's CNI does; istiod_lite switches HBONE on it."""

        def mutate(obj: dict) -> None:
            obj.setdefault("metadata", {}).setdefault("annotations", {})[REDIRECTION_ANNOTATION] = value

        await trio.to_thread.run_sync(store.update, ObjectKey(group="", kind="Pod", namespace=pod.namespace, name=pod.name), mutate)

    async def _keep_running(self, node: NodeContext, argv: list[str]) -> None:
        """Like a DaemonSet: a ztunnel that exits is started again; the agent replays its pods."""
        while True:
            status = await node.run_process(self.name, argv, cwd=REPO)
            _log.warning("ztunnel exited; restarting it", node=node.name, status=status)
            await trio.sleep(RESTART_DELAY)

    async def _enrol(self, node: NodeContext, agent: NodeAgent) -> None:
        """Keep the agent's enrolled set equal to the node's captured pods."""
        enrolled: dict[str, RunningPod] = {}
        store = ObjectStore(node.run_dir.store)
        pods = node.pods()
        while True:
            wanted = {pod.uid: pod for pod in pods if is_captured(pod.labels, pod.namespace_labels)}
            for uid in enrolled.keys() - wanted.keys():
                pod = enrolled.pop(uid)
                # Peers stop using HBONE first, then the capture goes (Istio's CNI order).
                await self._annotate(store, pod, "disabled")
                await trio.sleep(REDIRECTION_SETTLE)
                await agent.release(uid)
                _log.info("pod released from the mesh", node=node.name, pod=f"{pod.namespace}/{pod.name}")
            for uid, pod in wanted.items():
                if uid in enrolled:
                    continue
                await agent.enroll(EnrolledPod(
                    uid=uid, name=pod.name, namespace=pod.namespace, service_account=pod.service_account, netns_path=pod.netns_path
                ))
                enrolled[uid] = pod
                await self._annotate(store, pod, "enabled")
                _log.info("pod enrolled in the mesh", node=node.name, pod=f"{pod.namespace}/{pod.name}")
            pods = await node.next_pods(pods)
