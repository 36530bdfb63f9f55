"""The waypoint's configuration: frozen dataclasses (`model`) and their conversion from Envoy's
xDS resources (`from_xds`)."""
