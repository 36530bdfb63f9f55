"""The ztunnel's proxies: routing decisions, their typed errors, and the trio shells that act on them."""
