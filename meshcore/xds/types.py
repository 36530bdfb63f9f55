"""xDS type URLs of the ambient resources (the full names of the protos in meshcore/proto)."""

ADDRESS_TYPE_URL = "type.googleapis.com/istio.workload.Address"
AUTHORIZATION_TYPE_URL = "type.googleapis.com/istio.security.Authorization"
