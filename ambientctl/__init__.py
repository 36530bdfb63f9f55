"""ambientctl: the mesh's CLI and its one-machine runtime (nodes and pods as network namespaces)."""
