"""ztunnel/inpod: in-pod traffic capture, as Istio's ambient mode does it.

- `protocol`: ZDS, the messages a node agent and ztunnel exchange over a unix SEQPACKET
  socket to hand over each enrolled pod's network namespace (fd in SCM_RIGHTS).
- `agent`: the node agent (one per node): enrolls and releases pods, installs their
  redirect rules, replays its pods to every ztunnel that (re)connects.
- `client`: ztunnel's side of ZDS; feeds the pods to a handler that runs their proxies.
- `netns`: open a netns; make listeners and outbound sockets inside it.
- `redirect`: the nftables capture rules inside a pod's netns (15001 out, 15006 in).
"""
