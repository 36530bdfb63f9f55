"""Pure per-request policy cores: L7 authorization (`authz`), retries (`retry`), outlier
ejection (`outlier`), load balancing (`lb`) and connection-pool limits (`limits`).

No I/O: clocks and random sources are passed in, so tests drive them deterministically."""
