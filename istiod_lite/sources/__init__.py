"""Configuration sources: where istiod_lite's objects come from.

`files` (a directory of Kubernetes YAML, the one-machine default) and `kube` (the Kubernetes
API) emit the same `ObjectEvent`s and `SyncComplete` on a trio memory channel (see `base`).
"""

from istiod_lite.sources.base import (
    KINDS,
    KindInfo,
    ObjectEvent,
    Source,
    SourceEvent,
    SyncComplete,
)

__all__ = ["KINDS", "KindInfo", "ObjectEvent", "Source", "SourceEvent", "SyncComplete"]
