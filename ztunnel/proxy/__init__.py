"""The ztunnel proxies: routing decisions, typed errors, and the trio shells that act."""
