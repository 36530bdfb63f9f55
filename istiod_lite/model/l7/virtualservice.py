"""Istio VirtualService -> `RouteRule`s for the waypoints of its hosts.

Follows Istio's networking/v1 API and pilot/pkg/networking/core/route translation:
- `hosts`: short names are Services of the VirtualService's namespace; `*.suffix` wildcards
  apply to every matching service. Only VirtualServices bound to the mesh (no `gateways`, or
  one of them `mesh`) configure waypoints; others are for ingress gateways and are ignored.
- `http[]` rules keep their order (first match wins). Each `match[]` alternative becomes one
  Envoy route: `uri` exact/prefix/regex, `headers`/`queryParams` (an empty condition means
  "present"), `method`, `authority`, `scheme`, `withoutHeaders`, `ignoreUriCase`, `port`;
  an alternative whose `gateways` leave out `mesh` is dropped.
- `route[]`: `destination {host, subset, port.number}` and `weight`; with several
  destinations the weights must add up to 100. Per-destination `headers` apply to that backend.
- `retries`: `attempts` (0 disables), `perTryTimeout`, `retryOn` (status codes such as `503`
  become retriable status codes); without `retryOn`, Istio's default conditions.
- `timeout`, `fault.delay.fixedDelay`/`fault.abort.httpStatus` with `percentage.value`,
  `rewrite.uri`/`uriRegexRewrite`/`authority`, `headers.request|response.set|add|remove`.
Fields waypoints cannot honour (redirects, mirrors, CORS, delegation, TCP/TLS routes, ...) are
rejected by name rather than ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from istiod_lite.model.fields import (
    ObjectRef,
    boolean,
    mapping,
    port_number,
    sequence,
    string,
    string_list,
    string_map,
)
from istiod_lite.model.l7 import values
from istiod_lite.model.l7.routes import (
    NO_HEADER_OPS,
    Destination,
    FaultAbort,
    FaultDelay,
    HeaderMatch,
    HeaderOps,
    MatchKind,
    QueryParamMatch,
    RequestMatch,
    Retries,
    Rewrite,
    RouteRule,
    StringMatch,
)

MESH_GATEWAY = "mesh"
TOTAL_WEIGHT = 100
MAX_RETRY_ATTEMPTS = 100
# Istio's default retry conditions (pilot/pkg/networking/core/route/retry `DefaultPolicy`).
DEFAULT_RETRY_ON = "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
DEFAULT_RETRIABLE_STATUS_CODES = (503,)
# Envoy's retry conditions (router filter `x-envoy-retry-on` and `x-envoy-retry-grpc-on`).
RETRY_CONDITIONS = frozenset(
    {
        "5xx",
        "gateway-error",
        "reset",
        "reset-before-request",
        "connect-failure",
        "envoy-ratelimited",
        "retriable-4xx",
        "refused-stream",
        "retriable-status-codes",
        "retriable-headers",
        "http3-post-connect-failure",
        "cancelled",
        "deadline-exceeded",
        "internal",
        "resource-exhausted",
        "unavailable",
    }
)

_SPEC = frozenset({"hosts", "gateways", "http", "exportTo"})
_SPEC_UNSUPPORTED = frozenset({"tcp", "tls"})
_HTTP = frozenset({"name", "match", "route", "rewrite", "timeout", "retries", "fault", "headers"})
_HTTP_UNSUPPORTED = frozenset(
    {
        "redirect",
        "directResponse",
        "delegate",
        "mirror",
        "mirrors",
        "mirrorPercent",
        "mirrorPercentage",
        "mirror_percent",
        "corsPolicy",
    }
)
_MATCH = frozenset(
    {
        "name",
        "uri",
        "scheme",
        "method",
        "authority",
        "headers",
        "port",
        "queryParams",
        "ignoreUriCase",
        "withoutHeaders",
        "gateways",
    }
)
_MATCH_UNSUPPORTED = frozenset({"sourceLabels", "sourceNamespace", "statPrefix"})
_STRING_MATCH = frozenset({"exact", "prefix", "regex"})
_ROUTE = frozenset({"destination", "weight", "headers"})
_DESTINATION = frozenset({"host", "subset", "port"})
_PORT_SELECTOR = frozenset({"number"})
_RETRIES = frozenset({"attempts", "perTryTimeout", "retryOn"})
_RETRIES_UNSUPPORTED = frozenset({"retryRemoteLocalities", "retryIgnorePreviousHosts", "backoff"})
_FAULT = frozenset({"delay", "abort"})
_DELAY = frozenset({"fixedDelay", "percentage"})
_DELAY_UNSUPPORTED = frozenset({"exponentialDelay", "percent"})
_ABORT = frozenset({"httpStatus", "percentage"})
_ABORT_UNSUPPORTED = frozenset({"grpcStatus", "http2Error"})
_REWRITE = frozenset({"uri", "uriRegexRewrite", "authority"})
_REGEX_REWRITE = frozenset({"match", "rewrite"})
_HEADERS = frozenset({"request", "response"})
_HEADER_OPERATIONS = frozenset({"set", "add", "remove"})
_MIN_STATUS, _MAX_STATUS = 200, 599


@dataclass(frozen=True, slots=True)
class VirtualService:
    namespace: str
    name: str
    created: str
    hosts: tuple[str, ...]  # FQDNs or wildcards
    # False: bound to ingress gateways only, so no waypoint uses it.
    for_mesh: bool
    rules: tuple[RouteRule, ...]

    @property
    def age_key(self) -> tuple[str, str, str]:
        """Oldest first, then by namespace/name: which one wins when several claim a host."""
        return (self.created, self.namespace, self.name)


def parse_virtual_service(namespace: str, name: str, obj: Mapping[str, Any]) -> VirtualService:
    ref = ObjectRef("VirtualService", namespace, name)
    meta = mapping(ref, obj.get("metadata"), "metadata")
    spec = values.section(ref, obj.get("spec"), "spec", _SPEC, _SPEC_UNSUPPORTED)
    hosts = string_list(ref, spec.get("hosts"), "spec.hosts")
    if not hosts:
        raise ref.error("spec.hosts", "required: at least one host")
    for i, host in enumerate(hosts):
        if not host:
            raise ref.error(f"spec.hosts[{i}]", "empty host")
    gateways = string_list(ref, spec.get("gateways"), "spec.gateways")
    rules = []
    for i, entry in enumerate(sequence(ref, spec.get("http"), "spec.http")):
        rule = _rule(ref, entry, f"spec.http[{i}]", namespace)
        if rule is not None:
            rules.append(rule)
    return VirtualService(
        namespace=namespace,
        name=name,
        created=string(ref, meta.get("creationTimestamp"), "metadata.creationTimestamp"),
        hosts=tuple(values.resolve_host(host, namespace) for host in hosts),
        for_mesh=not gateways or MESH_GATEWAY in gateways,
        rules=tuple(rules),
    )


def _rule(ref: ObjectRef, value: Any, path: str, namespace: str) -> RouteRule | None:
    """One `http[]` entry; None when all its match alternatives are for gateways only."""
    http = values.section(ref, value, path, _HTTP, _HTTP_UNSUPPORTED)
    rule_name = string(ref, http.get("name"), f"{path}.name")
    entries = sequence(ref, http.get("match"), f"{path}.match")
    matches = tuple(
        match
        for j, entry in enumerate(entries)
        if (match := _match(ref, entry, f"{path}.match[{j}]")) is not None
    )
    destinations = _destinations(ref, http.get("route"), f"{path}.route", namespace)
    fault_delay, fault_abort = _fault(ref, http.get("fault"), f"{path}.fault")
    rule = RouteRule(
        source=ref,
        name=rule_name or f"{namespace}/{ref.name}.{path.removeprefix('spec.')}",
        matches=matches,
        destinations=destinations,
        timeout=(
            values.duration(ref, http["timeout"], f"{path}.timeout")
            if http.get("timeout") is not None
            else None
        ),
        retries=_retries(ref, http.get("retries"), f"{path}.retries"),
        fault_delay=fault_delay,
        fault_abort=fault_abort,
        rewrite=_rewrite(ref, http.get("rewrite"), f"{path}.rewrite"),
        headers=header_ops(ref, http.get("headers"), f"{path}.headers"),
    )
    if entries and not matches:
        return None
    return rule


def _match(ref: ObjectRef, value: Any, path: str) -> RequestMatch | None:
    match = values.section(ref, value, path, _MATCH, _MATCH_UNSUPPORTED)
    gateways = string_list(ref, match.get("gateways"), f"{path}.gateways")
    headers: list[HeaderMatch] = []
    for field, pseudo_header in (
        ("method", ":method"),
        ("authority", ":authority"),
        ("scheme", ":scheme"),
    ):
        if match.get(field) is not None:
            condition = string_match(ref, match[field], f"{path}.{field}", allow_present=False)
            headers.append(HeaderMatch(pseudo_header, condition))
    for key, invert in (("headers", False), ("withoutHeaders", True)):
        for header, condition in mapping(ref, match.get(key), f"{path}.{key}").items():
            header_path = f"{path}.{key}.{header}"
            headers.append(
                HeaderMatch(header.lower(), string_match(ref, condition, header_path), invert)
            )
    query_params = tuple(
        QueryParamMatch(param, string_match(ref, condition, f"{path}.queryParams.{param}"))
        for param, condition in mapping(
            ref, match.get("queryParams"), f"{path}.queryParams"
        ).items()
    )
    uri = (
        string_match(ref, match["uri"], f"{path}.uri", allow_present=False)
        if match.get("uri") is not None
        else None
    )
    request_match = RequestMatch(
        path=uri,
        ignore_case=boolean(ref, match.get("ignoreUriCase"), f"{path}.ignoreUriCase"),
        headers=tuple(headers),
        query_params=query_params,
        port=(
            port_number(ref, match["port"], f"{path}.port")
            if match.get("port") is not None
            else None
        ),
    )
    if gateways and MESH_GATEWAY not in gateways:
        return None
    return request_match


def string_match(
    ref: ObjectRef, value: Any, path: str, *, allow_present: bool = True
) -> StringMatch:
    """Istio's StringMatch: one of exact/prefix/regex; `{}` means "present" where allowed."""
    condition = values.section(ref, value, path, _STRING_MATCH)
    given = [key for key in ("exact", "prefix", "regex") if condition.get(key) is not None]
    if not given:
        if allow_present:
            return StringMatch(MatchKind.PRESENT)
        raise ref.error(path, "needs one of exact, prefix, regex")
    if len(given) > 1:
        raise ref.error(path, f"set only one of exact, prefix, regex (got {', '.join(given)})")
    key = given[0]
    text = string(ref, condition[key], f"{path}.{key}")
    if key == "regex":
        return StringMatch(MatchKind.REGEX, values.regex(ref, text, f"{path}.regex"))
    if key == "prefix" and not text:
        raise ref.error(f"{path}.prefix", "empty prefix")
    return StringMatch(MatchKind.EXACT if key == "exact" else MatchKind.PREFIX, text)


def _destinations(ref: ObjectRef, value: Any, path: str, namespace: str) -> tuple[Destination, ...]:
    entries = sequence(ref, value, path)
    if not entries:
        raise ref.error(path, "required: at least one destination")
    destinations = []
    for i, entry in enumerate(entries):
        entry_path = f"{path}[{i}]"
        route = values.section(ref, entry, entry_path, _ROUTE)
        target = values.section(
            ref, route.get("destination"), f"{entry_path}.destination", _DESTINATION
        )
        host = string(ref, target.get("host"), f"{entry_path}.destination.host")
        if not host:
            raise ref.error(f"{entry_path}.destination.host", "required")
        if host.startswith("*"):
            raise ref.error(
                f"{entry_path}.destination.host", f"{host!r}: a destination cannot be a wildcard"
            )
        port = None
        if target.get("port") is not None:
            selector = values.section(
                ref, target["port"], f"{entry_path}.destination.port", _PORT_SELECTOR
            )
            port = port_number(ref, selector.get("number"), f"{entry_path}.destination.port.number")
        weight = (
            values.integer(
                ref, route["weight"], f"{entry_path}.weight", minimum=0, maximum=TOTAL_WEIGHT
            )
            if route.get("weight") is not None
            else None
        )
        destinations.append(
            Destination(
                host=values.resolve_host(host, namespace),
                port=port,
                subset=string(ref, target.get("subset"), f"{entry_path}.destination.subset"),
                weight=TOTAL_WEIGHT if weight is None and len(entries) == 1 else weight or 0,
                headers=header_ops(ref, route.get("headers"), f"{entry_path}.headers"),
                field=f"{entry_path}.destination",
            )
        )
    if len(destinations) > 1:
        total = sum(d.weight for d in destinations)
        if total != TOTAL_WEIGHT:
            raise ref.error(
                path,
                f"weights add up to {total}; with several destinations they must add up to 100",
            )
    elif destinations[0].weight == 0:
        raise ref.error(
            f"{path}[0].weight", "the only destination has weight 0: nothing would be routed"
        )
    return tuple(destinations)


def _retries(ref: ObjectRef, value: Any, path: str) -> Retries | None:
    if value is None:
        return None
    retries = values.section(ref, value, path, _RETRIES, _RETRIES_UNSUPPORTED)
    attempts = values.integer(
        ref, retries.get("attempts", 0), f"{path}.attempts", minimum=0, maximum=MAX_RETRY_ATTEMPTS
    )
    per_try_timeout = (
        values.duration(ref, retries["perTryTimeout"], f"{path}.perTryTimeout")
        if retries.get("perTryTimeout") is not None
        else None
    )
    retry_on = string(ref, retries.get("retryOn"), f"{path}.retryOn")
    conditions: list[str] = []
    codes: list[int] = []
    for token in (t.strip() for t in retry_on.split(",")):
        if not token:
            continue
        if token.isdigit():
            code = int(token)
            if not _MIN_STATUS <= code <= _MAX_STATUS:
                raise ref.error(f"{path}.retryOn", f"{token} is not an HTTP status code")
            codes.append(code)
        elif token in RETRY_CONDITIONS:
            conditions.append(token)
        else:
            raise ref.error(
                f"{path}.retryOn",
                f"unknown retry condition {token!r}; expected status codes or "
                f"{', '.join(sorted(RETRY_CONDITIONS))}",
            )
    if attempts == 0:
        return None
    if not conditions and not codes:
        conditions, codes = DEFAULT_RETRY_ON.split(","), list(DEFAULT_RETRIABLE_STATUS_CODES)
    elif codes and "retriable-status-codes" not in conditions:
        conditions.append("retriable-status-codes")
    return Retries(
        attempts=attempts,
        per_try_timeout=per_try_timeout,
        retry_on=",".join(conditions),
        retriable_status_codes=tuple(codes),
    )


def _fault(ref: ObjectRef, value: Any, path: str) -> tuple[FaultDelay | None, FaultAbort | None]:
    if value is None:
        return None, None
    fault = values.section(ref, value, path, _FAULT)
    delay = abort = None
    if fault.get("delay") is not None:
        spec = values.section(ref, fault["delay"], f"{path}.delay", _DELAY, _DELAY_UNSUPPORTED)
        delay = FaultDelay(
            delay=values.duration(ref, spec.get("fixedDelay"), f"{path}.delay.fixedDelay"),
            percent=values.percentage(ref, spec.get("percentage"), f"{path}.delay.percentage"),
        )
    if fault.get("abort") is not None:
        spec = values.section(ref, fault["abort"], f"{path}.abort", _ABORT, _ABORT_UNSUPPORTED)
        abort = FaultAbort(
            http_status=values.integer(
                ref,
                spec.get("httpStatus"),
                f"{path}.abort.httpStatus",
                minimum=_MIN_STATUS,
                maximum=_MAX_STATUS,
            ),
            percent=values.percentage(ref, spec.get("percentage"), f"{path}.abort.percentage"),
        )
    if delay is None and abort is None:
        raise ref.error(path, "needs delay or abort")
    return delay, abort


def _rewrite(ref: ObjectRef, value: Any, path: str) -> Rewrite | None:
    if value is None:
        return None
    rewrite = values.section(ref, value, path, _REWRITE)
    uri = string(ref, rewrite.get("uri"), f"{path}.uri")
    authority = string(ref, rewrite.get("authority"), f"{path}.authority")
    regex = None
    if rewrite.get("uriRegexRewrite") is not None:
        if uri:
            raise ref.error(path, "set only one of uri and uriRegexRewrite")
        spec = values.section(
            ref, rewrite["uriRegexRewrite"], f"{path}.uriRegexRewrite", _REGEX_REWRITE
        )
        regex = (
            values.regex(ref, spec.get("match"), f"{path}.uriRegexRewrite.match"),
            string(ref, spec.get("rewrite"), f"{path}.uriRegexRewrite.rewrite"),
        )
    if not (uri or regex or authority):
        raise ref.error(path, "needs uri, uriRegexRewrite or authority")
    return Rewrite(prefix=uri or None, regex=regex, authority=authority or None)


def header_ops(ref: ObjectRef, value: Any, path: str) -> HeaderOps:
    """Istio's Headers: `request`/`response` each with `set`, `add` (maps) and `remove` (list)."""
    if value is None:
        return NO_HEADER_OPS
    headers = values.section(ref, value, path, _HEADERS)
    parts: dict[str, Any] = {}
    for direction in ("request", "response"):
        operations = values.section(
            ref, headers.get(direction), f"{path}.{direction}", _HEADER_OPERATIONS
        )
        for operation in ("set", "add"):
            items = string_map(ref, operations.get(operation), f"{path}.{direction}.{operation}")
            parts[f"{direction}_{operation}"] = tuple(sorted(items.items()))
        parts[f"{direction}_remove"] = tuple(
            string_list(ref, operations.get("remove"), f"{path}.{direction}.remove")
        )
    return HeaderOps(**parts)
