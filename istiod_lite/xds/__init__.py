"""istiod_lite's delta xDS server: resource store, per-stream protocol sessions, gRPC service."""

from istiod_lite.xds.resources import ResourceChanges, ResourceStore, StoredResource
from istiod_lite.xds.server import XdsServer, XdsServerStatistics
from istiod_lite.xds.session import DeltaSession, XdsRequestError

__all__ = [
    "DeltaSession",
    "ResourceChanges",
    "ResourceStore",
    "StoredResource",
    "XdsRequestError",
    "XdsServer",
    "XdsServerStatistics",
]
