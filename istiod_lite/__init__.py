"""istiod_lite: the mesh controller.

It watches configuration (the Kubernetes API, or a directory of the same YAML), translates
it into the resources ztunnels consume (`istio.workload.Address`, `istio.security.
Authorization`), serves them over gRPC delta xDS, and runs the certificate authority that
issues workload certificates. Like the proxies it imports only `meshcore`, never `ztunnel`
or `waypoint`.
"""
