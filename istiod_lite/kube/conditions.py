"""Kubernetes `Condition`s (metav1.Condition: type, status, reason, message,
lastTransitionTime, observedGeneration), compared and merged without needless writes."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any


@dataclass(frozen=True, slots=True)
class Condition:
    """One condition as a controller computes it; `lastTransitionTime` is added on merge."""

    type: str
    status: bool
    reason: str  # CamelCase, e.g. "Accepted", "Invalid"
    message: str
    observed_generation: int | None = None

    def as_dict(self, last_transition_time: str) -> dict[str, Any]:
        condition: dict[str, Any] = {
            "type": self.type,
            "status": "True" if self.status else "False",
            "reason": self.reason,
            "message": self.message,
            "lastTransitionTime": last_transition_time,
        }
        if self.observed_generation is not None:
            condition["observedGeneration"] = self.observed_generation
        return condition


def timestamp(now: datetime) -> str:
    """RFC 3339 in whole seconds, as the API server stores it."""
    return now.strftime("%Y-%m-%dT%H:%M:%SZ")


def merge_conditions(
    current: Any, wanted: Iterable[Condition], now: datetime
) -> tuple[list[dict[str, Any]], bool]:
    """`current` (an object's status.conditions, possibly malformed) with `wanted` set.

    Conditions of other types are kept. A condition whose status did not change keeps its
    lastTransitionTime. Returns the list and whether anything differs from `current`.
    """
    existing = [c for c in current if isinstance(c, Mapping)] if isinstance(current, list) else []
    merged = [dict(c) for c in existing]
    changed = not isinstance(current, list) or len(existing) != len(current)
    for condition in wanted:
        index = next((i for i, c in enumerate(merged) if c.get("type") == condition.type), None)
        old = merged[index] if index is not None else None
        same_status = old is not None and old.get("status") == ("True" if condition.status else "False")
        transition = old.get("lastTransitionTime") if same_status and old is not None else None
        new = condition.as_dict(transition if isinstance(transition, str) else timestamp(now))
        if old != new:
            changed = True
            if index is None:
                merged.append(new)
            else:
                merged[index] = new
    return merged, changed


def find(conditions: Any, condition_type: str) -> Mapping[str, Any] | None:
    """The condition of `condition_type` in a status.conditions value, if any."""
    if not isinstance(conditions, Sequence):
        return None
    for condition in conditions:
        if isinstance(condition, Mapping) and condition.get("type") == condition_type:
            return condition
    return None
