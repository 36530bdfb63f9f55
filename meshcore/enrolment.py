"""meshcore/enrolment: which pods the mesh captures, one rule for every node agent.

Istio's rule (ambient-facts §6): the pod's `istio.io/dataplane-mode` label beats its
namespace's; `ambient` enrols, anything else (`none`) opts out. The one-machine runtime
(ambientctl/mesh.py) and the Kubernetes node agent (ztunnel/inpod/kube.py) both decide
with `is_captured`, so a pod is captured the same way wherever it runs.
"""

from __future__ import annotations

from collections.abc import Mapping

DATAPLANE_MODE_LABEL = "istio.io/dataplane-mode"
DATAPLANE_MODE_AMBIENT = "ambient"
# Set by the node agent once the pod's traffic goes through ztunnel (istio-cni does the
# same); istiod_lite switches peers to HBONE on it.
REDIRECTION_ANNOTATION = "ambient.istio.io/redirection"


def is_captured(pod_labels: Mapping[str, str], namespace_labels: Mapping[str, str]) -> bool:
    """Whether a pod with these labels, in a namespace with these labels, is captured."""
    mode = pod_labels.get(DATAPLANE_MODE_LABEL)
    if mode is not None:
        return mode == DATAPLANE_MODE_AMBIENT
    return namespace_labels.get(DATAPLANE_MODE_LABEL) == DATAPLANE_MODE_AMBIENT
