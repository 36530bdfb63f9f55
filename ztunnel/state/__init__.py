"""The ztunnel state: mesh model, immutable indexed snapshots, and the local config file."""
