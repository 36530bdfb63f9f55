"""Delta xDS shared by the control plane and the proxies: type URLs, client, gRPC bridge."""
