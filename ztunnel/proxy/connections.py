"""ztunnel/proxy/connections: live inbound connections, re-authorized when policy changes.

ztunnel closes an open connection whose authorization no longer holds after a policy update
(`AuthorizationPolicyLateRejection`); this registry is how: each inbound relay registers its
attributes and a cancel scope, and `watch_policies` re-runs the decision on every new state.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import trio

from meshcore.log import get_logger
from ztunnel.rbac import ConnectionAttributes, authorize
from ztunnel.state.store import StateStore

_log = get_logger("connections")


@dataclass(slots=True)
class _Tracked:
    attributes: ConnectionAttributes
    workload_uid: str
    scope: trio.CancelScope
    closed_by_policy: str | None = None


class ConnectionManager:
    def __init__(self, state: StateStore) -> None:
        self._state = state
        self._live: dict[int, _Tracked] = {}
        self._ids = itertools.count()

    def __len__(self) -> int:
        return len(self._live)

    def register(self, attributes: ConnectionAttributes, workload_uid: str, scope: trio.CancelScope) -> int:
        key = next(self._ids)
        self._live[key] = _Tracked(attributes, workload_uid, scope)
        return key

    def unregister(self, key: int) -> str | None:
        """Forget a connection; returns the policy that closed it, if one did."""
        tracked = self._live.pop(key, None)
        return tracked.closed_by_policy if tracked else None

    async def watch_policies(self) -> None:
        version = self._state.current.version
        while True:
            state = await self._state.wait_for_change(version)
            version = state.version
            for tracked in list(self._live.values()):
                workload = state.workload_by_uid(tracked.workload_uid)
                decision = authorize(state.policies_for(workload), tracked.attributes) if workload else None
                if decision is None or not decision.allowed:
                    reason = decision.reason if decision else "destination workload was removed"
                    tracked.closed_by_policy = (decision.policy if decision else None) or "-"
                    _log.info(
                        "closing connection no longer allowed",
                        src=str(tracked.attributes.src_ip),
                        dst=f"{tracked.attributes.dst_ip}:{tracked.attributes.dst_port}",
                        reason=reason,
                    )
                    tracked.scope.cancel()
