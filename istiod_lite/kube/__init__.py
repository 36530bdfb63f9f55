"""What istiod_lite writes to the Kubernetes API (kube source only): the objects that run
waypoints, the status of what it consumes."""
