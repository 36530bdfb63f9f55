"""The ztunnel's state: the mesh model, its immutable indexed snapshots, and the local config file."""
