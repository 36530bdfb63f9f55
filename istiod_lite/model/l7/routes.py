"""The route vocabulary VirtualServices and HTTPRoutes both translate into.

Parsing (virtualservice.py, httproute.py) produces `RouteRule`s; `envoy.py` turns each into
Envoy routes. A rule's matches are ORed and each becomes one Envoy route with the same action,
in order, so first-match evaluation (Envoy's and the Python waypoint's) keeps the rule order.
"""

from __future__ import annotations

import datetime
import enum
from dataclasses import dataclass

from istiod_lite.model.fields import ObjectRef


class MatchKind(enum.Enum):
    EXACT = "exact"
    PREFIX = "prefix"
    REGEX = "regex"
    PRESENT = "present"  # headers and query parameters only: the name is there, any value


@dataclass(frozen=True, slots=True)
class StringMatch:
    kind: MatchKind
    value: str = ""


@dataclass(frozen=True, slots=True)
class HeaderMatch:
    """A request header (or pseudo-header: `:method`, `:authority`, `:scheme`) condition."""

    name: str
    match: StringMatch
    invert: bool = False


@dataclass(frozen=True, slots=True)
class QueryParamMatch:
    name: str
    match: StringMatch


@dataclass(frozen=True, slots=True)
class RequestMatch:
    """One alternative of a rule: every condition set here must hold."""

    path: StringMatch | None = None  # EXACT, PREFIX or REGEX; None: any path
    ignore_case: bool = False
    headers: tuple[HeaderMatch, ...] = ()
    query_params: tuple[QueryParamMatch, ...] = ()
    # The service port the request was sent to (VirtualService `match.port`); None: any.
    port: int | None = None


@dataclass(frozen=True, slots=True)
class HeaderOps:
    """Header changes; `set` replaces a header, `add` appends a value."""

    request_set: tuple[tuple[str, str], ...] = ()
    request_add: tuple[tuple[str, str], ...] = ()
    request_remove: tuple[str, ...] = ()
    response_set: tuple[tuple[str, str], ...] = ()
    response_add: tuple[tuple[str, str], ...] = ()
    response_remove: tuple[str, ...] = ()


NO_HEADER_OPS = HeaderOps()


@dataclass(frozen=True, slots=True)
class Destination:
    """A backend: a service host (FQDN), optionally a port and a DestinationRule subset."""

    host: str
    port: int | None
    subset: str
    weight: int
    headers: HeaderOps
    # Where the destination is written, for errors found when routes are built.
    field: str


@dataclass(frozen=True, slots=True)
class Retries:
    attempts: int
    per_try_timeout: datetime.timedelta | None
    retry_on: str  # Envoy's comma-separated retry conditions
    retriable_status_codes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class FaultDelay:
    delay: datetime.timedelta
    percent: float


@dataclass(frozen=True, slots=True)
class FaultAbort:
    http_status: int
    percent: float


@dataclass(frozen=True, slots=True)
class Rewrite:
    prefix: str | None = None  # replaces the matched prefix (or the whole matched path)
    regex: tuple[str, str] | None = None  # (pattern, substitution) applied to the path
    authority: str | None = None


@dataclass(frozen=True, slots=True)
class RouteRule:
    """One routing rule: where matching requests go and what happens on the way."""

    source: ObjectRef  # the VirtualService or HTTPRoute it comes from
    name: str  # the Envoy route name: the rule's own name, else where it is written
    matches: tuple[RequestMatch, ...]  # ORed; empty: every request
    destinations: tuple[Destination, ...]
    timeout: datetime.timedelta | None = None
    retries: Retries | None = None
    fault_delay: FaultDelay | None = None
    fault_abort: FaultAbort | None = None
    rewrite: Rewrite | None = None
    headers: HeaderOps = NO_HEADER_OPS
