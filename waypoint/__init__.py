"""The waypoint: an L7 proxy that ztunnels send a service's traffic to (ambient mode).

It terminates HBONE, reads the HTTP inside, authorizes it with the client's identity, routes,
splits and load-balances it, and sends it on over HBONE to the chosen endpoint. Its config is
Envoy's own xDS types (Listener, RouteConfiguration, Cluster, ClusterLoadAssignment),
converted once at the edge (`waypoint.config.from_xds`) into frozen dataclasses that the pure
cores in `waypoint.routing` and `waypoint.policy` decide on; the trio modules only act.
"""
