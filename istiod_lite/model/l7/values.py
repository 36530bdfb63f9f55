"""Typed reads of the values L7 config is written in: durations, regexes, percentages, hosts.

Every reader takes the object and the dotted field path and raises a `TranslationError` naming
both, like `istiod_lite.model.fields`.

- Durations are Go/Gateway API style (`30s`, `1.5s`, `100ms`, `1m30s`, `1h`) and must be
  positive: a zero or negative timeout, interval or delay is rejected, as Istio's validation
  does.
- Regexes are evaluated as RE2 by Envoy. They are compiled with Python's `re` and the few
  constructs RE2 lacks (lookaround, backreferences, atomic groups, possessive repeats) are
  refused, so what is accepted here means the same to Envoy and to the Python waypoint.
- Hosts: a name without dots is a Service in the object's namespace (`reviews` ->
  `reviews.<ns>.svc.cluster.local`); anything with a dot is taken as written, as Istio does.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Mapping
from typing import Any

from istiod_lite.model.fields import ObjectRef, check_keys, mapping
from istiod_lite.model.services import CLUSTER_DOMAIN, service_hostname

# The unit values of a Go duration, in microseconds (timedelta's resolution).
_DURATION_UNITS_US: Mapping[str, float] = {
    "h": 3_600_000_000,
    "m": 60_000_000,
    "s": 1_000_000,
    "ms": 1_000,
    "us": 1,
    "µs": 1,
    "ns": 0.001,
}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(h|ms|m|s|us|µs|ns)")
_SERVICE_SUFFIX = f".svc.{CLUSTER_DOMAIN}"
_MAX_PERCENT = 100.0

# Regex syntax RE2 has no equivalent for (Python's sre opcodes; re._parser is the parser `re`
# itself uses, stable within a Python version).
_RE2_UNSUPPORTED = {
    "ASSERT": "lookaround",
    "ASSERT_NOT": "negative lookaround",
    "GROUPREF": "a backreference",
    "GROUPREF_EXISTS": "a conditional group",
    "ATOMIC_GROUP": "an atomic group",
    "POSSESSIVE_REPEAT": "a possessive repeat",
}


def duration(
    ref: ObjectRef, value: Any, path: str, *, allow_zero: bool = False
) -> datetime.timedelta:
    """A positive duration such as `30s`, `1.5s`, `250ms` or `1m30s` (zero only if allowed)."""
    if not isinstance(value, str) or not value:
        raise ref.error(path, f"expected a duration such as '1s' or '250ms', got {value!r}")
    text = value.strip()
    if text.startswith("-"):
        raise ref.error(path, f"{value!r} is negative; durations must be positive")
    position, micros = 0, 0.0
    while position < len(text) and (part := _DURATION_PART.match(text, position)) is not None:
        micros += float(part.group(1)) * _DURATION_UNITS_US[part.group(2)]
        position = part.end()
    if position != len(text) or position == 0:
        raise ref.error(
            path, f"{value!r} is not a duration (use a number and a unit: h, m, s, ms, us, ns)"
        )
    result = datetime.timedelta(microseconds=round(micros))
    if result <= datetime.timedelta(0) and not allow_zero:
        raise ref.error(path, f"{value!r} is zero; durations must be positive")
    return result


def regex(ref: ObjectRef, value: Any, path: str) -> str:
    """A regex both RE2 (Envoy) and Python accept, with the same meaning."""
    if not isinstance(value, str) or not value:
        raise ref.error(path, f"expected a regular expression, got {value!r}")
    try:
        parsed = re._parser.parse(value)  # type: ignore[attr-defined]
    except re.error as exc:
        raise ref.error(path, f"{value!r} is not a valid regular expression: {exc}") from None
    unsupported = _unsupported_construct(parsed)
    if unsupported is not None:
        raise ref.error(
            path, f"{value!r} uses {unsupported}, which RE2 (Envoy's regex engine) does not support"
        )
    return value


def _unsupported_construct(parsed: Any) -> str | None:
    for op, argument in parsed:
        name = _RE2_UNSUPPORTED.get(str(op))
        if name is not None:
            return name
        for child in _subpatterns(argument):
            found = _unsupported_construct(child)
            if found is not None:
                return found
    return None


def _subpatterns(argument: Any) -> list[Any]:
    """The nested patterns inside one sre opcode's argument, whatever its shape."""
    if isinstance(argument, re._parser.SubPattern):  # type: ignore[attr-defined]
        return [argument]
    if isinstance(argument, list | tuple):
        return [found for item in argument for found in _subpatterns(item)]
    return []


def percentage(ref: ObjectRef, value: Any, path: str) -> float:
    """A percentage 0-100 given as `{value: <number>}` (Istio's Percent); absent means 100."""
    if value is None:
        return _MAX_PERCENT
    if not isinstance(value, Mapping):
        raise ref.error(path, f"expected a mapping with 'value', got {value!r}")
    number = value.get("value", 0.0)
    if isinstance(number, bool) or not isinstance(number, int | float):
        raise ref.error(f"{path}.value", f"expected a number, got {number!r}")
    if not 0.0 <= number <= _MAX_PERCENT:
        raise ref.error(f"{path}.value", f"{number!r} is not a percentage (0-100)")
    return float(number)


def integer(ref: ObjectRef, value: Any, path: str, *, minimum: int, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ref.error(path, f"expected an integer, got {value!r}")
    if not minimum <= value <= maximum:
        raise ref.error(path, f"{value} is out of range ({minimum}-{maximum})")
    return value


def resolve_host(host: str, namespace: str) -> str:
    """A Service short name -> its FQDN in `namespace`; other hosts as written."""
    if "." in host or host.startswith("*"):
        return host
    return service_hostname(namespace, host)


def service_of_host(host: str) -> tuple[str, str] | None:
    """(namespace, name) of a `<name>.<ns>.svc.cluster.local` hostname; None for other hosts."""
    if not host.endswith(_SERVICE_SUFFIX):
        return None
    name, dot, namespace = host[: -len(_SERVICE_SUFFIX)].partition(".")
    if not dot or not name or not namespace or "." in namespace:
        return None
    return namespace, name


def host_matches(pattern: str, host: str) -> bool:
    """Istio host matching: exact, or `*.suffix` / `*` wildcards."""
    if pattern == "*":
        return True
    if pattern.startswith("*"):
        return host.endswith(pattern[1:])
    return pattern == host


def section(
    ref: ObjectRef,
    value: Any,
    path: str,
    supported: frozenset[str],
    unsupported: frozenset[str] = frozenset(),
) -> Mapping[str, Any]:
    """A mapping whose keys must be `supported`; Istio fields waypoints cannot honour are named
    as such rather than silently ignored."""
    result = mapping(ref, value, path)
    for key in result:
        if key in unsupported and result[key] not in (None, [], {}, False):
            raise ref.error(f"{path}.{key}", "not supported by waypoints")
    check_keys(ref, result, supported | unsupported, path)
    return result
