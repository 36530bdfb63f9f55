"""Waypoint (L7) translation: Istio and Gateway API routing, traffic policy and authorization
-> Envoy's own Listener, RouteConfiguration, Cluster and ClusterLoadAssignment resources, each
visible only to the waypoints that use it; and which Services and pods use which waypoint.

Parsing modules (virtualservice, httproute, destinationrule, authz, waypoints) turn one object
into frozen values or reject it with a `TranslationError`; `envoy` builds protos from those
values; `config.WaypointConfig` keeps the accepted objects and rebuilds, per service host, only
what a change can affect.
"""
