"""Gateway API HTTPRoute -> `RouteRule`s for waypoints (the GAMMA "mesh" profile).

- `parentRefs`: a Service (group "" or core, kind Service, same namespace as the route;
  `port` narrows it to one service port) routes requests addressed to that service; a
  waypoint Gateway (kind Gateway, or our Waypoint) routes requests of every service bound to
  it whose hostname matches `hostnames` (all when empty).
- `rules[].matches` (none: every request): `path` Exact / PathPrefix / RegularExpression,
  `headers` and `queryParams` Exact / RegularExpression, `method`. A PathPrefix matches whole
  path segments (`/api` matches `/api` and `/api/x`, not `/apix`), so it becomes two Envoy
  routes: exact `/api` and prefix `/api/`.
- `backendRefs`: Services of the route's namespace with a `port` and a `weight` (default 1;
  weights are relative); `filters` RequestHeaderModifier, ResponseHeaderModifier and
  URLRewrite (hostname, ReplaceFullPath, ReplacePrefixMatch), on the rule or a backend.
- `timeouts.request` ("0s": none).
Gateway API orders matches by precedence, not by position: exact path, then longer prefixes,
then method, more headers, more query parameters; then the oldest route, then namespace/name,
then rule order. `precedence` gives that order so first-match evaluation honours it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from istiod_lite.model.fields import ObjectRef, mapping, port_number, sequence, string
from istiod_lite.model.l7 import values
from istiod_lite.model.l7.routes import (
    NO_HEADER_OPS,
    Destination,
    HeaderMatch,
    HeaderOps,
    MatchKind,
    QueryParamMatch,
    RequestMatch,
    Rewrite,
    RouteRule,
    StringMatch,
)

GATEWAY_GROUP = "gateway.networking.k8s.io"
WAYPOINT_GROUP = "istiodlite.io"
_CORE_GROUPS = frozenset({"", "core"})
_MAX_WEIGHT = 1_000_000

_SPEC = frozenset({"parentRefs", "hostnames", "rules"})
_PARENT = frozenset({"group", "kind", "namespace", "name", "sectionName", "port"})
_RULE = frozenset({"name", "matches", "filters", "backendRefs", "timeouts"})
_RULE_UNSUPPORTED = frozenset({"sessionPersistence", "retry"})
_MATCH = frozenset({"path", "headers", "queryParams", "method"})
_PATH = frozenset({"type", "value"})
_NAMED_MATCH = frozenset({"type", "name", "value"})
_FILTER = frozenset({"type", "requestHeaderModifier", "responseHeaderModifier", "urlRewrite"})
_FILTER_UNSUPPORTED = frozenset({"requestRedirect", "requestMirror", "extensionRef", "cors"})
_HEADER_MODIFIER = frozenset({"set", "add", "remove"})
_HEADER_VALUE = frozenset({"name", "value"})
_URL_REWRITE = frozenset({"hostname", "path"})
_PATH_MODIFIER = frozenset({"type", "replaceFullPath", "replacePrefixMatch"})
_BACKEND = frozenset({"group", "kind", "name", "namespace", "port", "weight", "filters"})
_TIMEOUTS = frozenset({"request"})
_TIMEOUTS_UNSUPPORTED = frozenset({"backendRequest"})
_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)
# Replaces a whole path (RE2 and Python agree on `^.*$` matching it exactly once).
_WHOLE_PATH = "^.*$"


@dataclass(frozen=True, slots=True)
class ParentRef:
    """What a route attaches to: a Service, or a waypoint (Gateway or Waypoint)."""

    kind: str  # "Service" or "Waypoint"
    namespace: str
    name: str
    port: int | None  # Service parents only: one service port, or all


@dataclass(frozen=True, slots=True)
class OrderedRule:
    """A rule with a single match alternative and its Gateway API precedence (lower first)."""

    precedence: tuple[int, int, int, int, int]
    rule: RouteRule


@dataclass(frozen=True, slots=True)
class HttpRoute:
    namespace: str
    name: str
    created: str
    parents: tuple[ParentRef, ...]
    hostnames: tuple[str, ...]
    rules: tuple[OrderedRule, ...]

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    def sort_key(self, ordered: OrderedRule, index: int) -> tuple[Any, ...]:
        return (*ordered.precedence, self.created, self.namespace, self.name, index)

    def serves_host(self, host: str) -> bool:
        """Whether a waypoint-parented route covers a service hostname."""
        return not self.hostnames or any(values.host_matches(h, host) for h in self.hostnames)


def parse_http_route(namespace: str, name: str, obj: Mapping[str, Any]) -> HttpRoute:
    ref = ObjectRef("HTTPRoute", namespace, name)
    meta = mapping(ref, obj.get("metadata"), "metadata")
    spec = values.section(ref, obj.get("spec"), "spec", _SPEC)
    parents = tuple(
        _parent(ref, entry, f"spec.parentRefs[{i}]", namespace)
        for i, entry in enumerate(sequence(ref, spec.get("parentRefs"), "spec.parentRefs"))
    )
    if not parents:
        raise ref.error("spec.parentRefs", "required: a Service or a waypoint to attach to")
    hostnames = tuple(
        string(ref, h, f"spec.hostnames[{i}]").lower()
        for i, h in enumerate(sequence(ref, spec.get("hostnames"), "spec.hostnames"))
    )
    rules: list[OrderedRule] = []
    for i, entry in enumerate(sequence(ref, spec.get("rules"), "spec.rules")):
        rules.extend(_rule(ref, entry, f"spec.rules[{i}]", namespace))
    return HttpRoute(
        namespace=namespace,
        name=name,
        created=string(ref, meta.get("creationTimestamp"), "metadata.creationTimestamp"),
        parents=parents,
        hostnames=hostnames,
        rules=tuple(rules),
    )


def _parent(ref: ObjectRef, value: Any, path: str, namespace: str) -> ParentRef:
    parent = values.section(ref, value, path, _PARENT)
    kind = string(ref, parent.get("kind"), f"{path}.kind", default="Gateway")
    # Gateway API defaults the group to its own; a Service can only be the core group's.
    group = string(
        ref,
        parent.get("group"),
        f"{path}.group",
        default="" if kind == "Service" else GATEWAY_GROUP,
    )
    parent_name = string(ref, parent.get("name"), f"{path}.name")
    if not parent_name:
        raise ref.error(f"{path}.name", "required")
    parent_namespace = string(ref, parent.get("namespace"), f"{path}.namespace") or namespace
    port = (
        port_number(ref, parent["port"], f"{path}.port") if parent.get("port") is not None else None
    )
    if group in _CORE_GROUPS and kind == "Service":
        if parent_namespace != namespace:
            raise ref.error(
                f"{path}.namespace",
                "a route for a Service of another namespace (a consumer route) is not supported; "
                "put the route in the Service's namespace",
            )
        return ParentRef("Service", parent_namespace, parent_name, port)
    if (
        (group, kind) == (GATEWAY_GROUP, "Gateway")
        or kind == "Waypoint"
        and group
        in (
            GATEWAY_GROUP,
            WAYPOINT_GROUP,
        )
    ):
        return ParentRef("Waypoint", parent_namespace, parent_name, None)
    raise ref.error(
        f"{path}.kind",
        f"{group or 'core'}/{kind} is not a parent waypoints serve; "
        "use a Service or a waypoint Gateway",
    )


def _rule(ref: ObjectRef, value: Any, path: str, namespace: str) -> list[OrderedRule]:
    rule = values.section(ref, value, path, _RULE, _RULE_UNSUPPORTED)
    rule_name = string(ref, rule.get("name"), f"{path}.name")
    headers, rewrite = _filters(ref, rule.get("filters"), f"{path}.filters")
    destinations = _backends(ref, rule.get("backendRefs"), f"{path}.backendRefs", namespace)
    timeout = None
    if rule.get("timeouts") is not None:
        timeouts = values.section(
            ref, rule["timeouts"], f"{path}.timeouts", _TIMEOUTS, _TIMEOUTS_UNSUPPORTED
        )
        if timeouts.get("request") is not None:
            timeout = values.duration(
                ref, timeouts["request"], f"{path}.timeouts.request", allow_zero=True
            )
            timeout = timeout or None  # "0s": no timeout
    base = RouteRule(
        source=ref,
        name=rule_name or f"{namespace}/{ref.name}.{path.removeprefix('spec.')}",
        matches=(),
        destinations=destinations,
        timeout=timeout,
        headers=headers,
    )
    entries = sequence(ref, rule.get("matches"), f"{path}.matches") or [{}]
    ordered: list[OrderedRule] = []
    for j, entry in enumerate(entries):
        ordered.extend(_ordered(ref, entry, f"{path}.matches[{j}]", base, rewrite))
    return ordered


def _ordered(
    ref: ObjectRef, value: Any, path: str, base: RouteRule, rewrite: _UrlRewrite | None
) -> list[OrderedRule]:
    """One match alternative as rules: a PathPrefix becomes exact + prefix-with-slash."""
    match = values.section(ref, value, path, _MATCH)
    headers = [
        HeaderMatch(name.lower(), condition)
        for name, condition in _named(ref, match.get("headers"), f"{path}.headers")
    ]
    method = string(ref, match.get("method"), f"{path}.method")
    if method:
        if method not in _METHODS:
            raise ref.error(f"{path}.method", f"{method!r} is not an HTTP method")
        headers.insert(0, HeaderMatch(":method", StringMatch(MatchKind.EXACT, method)))
    query_params = tuple(
        QueryParamMatch(name, condition)
        for name, condition in _named(ref, match.get("queryParams"), f"{path}.queryParams")
    )
    path_spec = values.section(ref, match.get("path"), f"{path}.path", _PATH)
    kind = string(ref, path_spec.get("type"), f"{path}.path.type", default="PathPrefix")
    text = string(ref, path_spec.get("value"), f"{path}.path.value", default="/")
    if not text.startswith("/") and kind != "RegularExpression":
        raise ref.error(f"{path}.path.value", f"{text!r} must start with '/'")

    def rule(path_match: StringMatch, prefix_rewrite: str | None) -> RouteRule:
        request = RequestMatch(path=path_match, headers=tuple(headers), query_params=query_params)
        rule_rewrite = None
        if rewrite is not None:
            rule_rewrite = Rewrite(
                prefix=prefix_rewrite,
                regex=(_WHOLE_PATH, rewrite.full_path) if rewrite.full_path is not None else None,
                authority=rewrite.hostname,
            )
        return replace(base, matches=(request,), rewrite=rule_rewrite)

    counts = (1 if method else 0, len(headers) - (1 if method else 0), len(query_params))
    if rewrite is not None and rewrite.prefix is not None and kind != "PathPrefix":
        raise ref.error(f"{path}.path.type", "ReplacePrefixMatch rewrites need a PathPrefix match")
    replacement = rewrite.prefix if rewrite is not None else None
    if kind == "Exact":
        rules = [rule(StringMatch(MatchKind.EXACT, text), replacement)]
        rank = (0, 0)
    elif kind == "RegularExpression":
        pattern = values.regex(ref, text, f"{path}.path.value")
        rules = [rule(StringMatch(MatchKind.REGEX, pattern), replacement)]
        rank = (2, 0)
    elif kind == "PathPrefix":
        prefix = text.rstrip("/")
        if not prefix:
            rules = [rule(StringMatch(MatchKind.PREFIX, "/"), replacement)]
        else:
            with_slash = None if replacement is None else replacement.rstrip("/") + "/"
            rules = [
                rule(StringMatch(MatchKind.EXACT, prefix), replacement),
                rule(StringMatch(MatchKind.PREFIX, prefix + "/"), with_slash),
            ]
        rank = (1, -len(prefix))
    else:
        raise ref.error(
            f"{path}.path.type", f"{kind!r} is not one of Exact, PathPrefix, RegularExpression"
        )
    precedence = (*rank, *(-count for count in counts))
    return [OrderedRule(precedence, r) for r in rules]


def _named(ref: ObjectRef, value: Any, path: str) -> list[tuple[str, StringMatch]]:
    conditions = []
    for i, entry in enumerate(sequence(ref, value, path)):
        entry_path = f"{path}[{i}]"
        condition = values.section(ref, entry, entry_path, _NAMED_MATCH)
        name = string(ref, condition.get("name"), f"{entry_path}.name")
        if not name:
            raise ref.error(f"{entry_path}.name", "required")
        text = string(ref, condition.get("value"), f"{entry_path}.value")
        kind = string(ref, condition.get("type"), f"{entry_path}.type", default="Exact")
        if kind == "Exact":
            conditions.append((name, StringMatch(MatchKind.EXACT, text)))
        elif kind == "RegularExpression":
            pattern = values.regex(ref, text, f"{entry_path}.value")
            conditions.append((name, StringMatch(MatchKind.REGEX, pattern)))
        else:
            raise ref.error(
                f"{entry_path}.type", f"{kind!r} is not one of Exact, RegularExpression"
            )
    return conditions


@dataclass(frozen=True, slots=True)
class _UrlRewrite:
    hostname: str | None
    full_path: str | None
    prefix: str | None


def _filters(ref: ObjectRef, value: Any, path: str) -> tuple[HeaderOps, _UrlRewrite | None]:
    parts: dict[str, Any] = {}
    rewrite = None
    for i, entry in enumerate(sequence(ref, value, path)):
        entry_path = f"{path}[{i}]"
        spec = values.section(ref, entry, entry_path, _FILTER, _FILTER_UNSUPPORTED)
        kind = string(ref, spec.get("type"), f"{entry_path}.type")
        if kind in ("RequestHeaderModifier", "ResponseHeaderModifier"):
            direction = "request" if kind.startswith("Request") else "response"
            field = f"{direction}HeaderModifier"
            modifier = values.section(
                ref, spec.get(field), f"{entry_path}.{field}", _HEADER_MODIFIER
            )
            for operation in ("set", "add"):
                parts[f"{direction}_{operation}"] = parts.get(
                    f"{direction}_{operation}", ()
                ) + tuple(
                    _header_values(
                        ref, modifier.get(operation), f"{entry_path}.{field}.{operation}"
                    )
                )
            removed = modifier.get("remove")
            parts[f"{direction}_remove"] = parts.get(f"{direction}_remove", ()) + tuple(
                string(ref, name, f"{entry_path}.{field}.remove[{j}]")
                for j, name in enumerate(sequence(ref, removed, f"{entry_path}.{field}.remove"))
            )
        elif kind == "URLRewrite":
            rewrite = _url_rewrite(ref, spec.get("urlRewrite"), f"{entry_path}.urlRewrite")
        else:
            raise ref.error(
                f"{entry_path}.type",
                f"{kind!r} filters are not supported by waypoints; use RequestHeaderModifier, "
                "ResponseHeaderModifier or URLRewrite",
            )
    return (HeaderOps(**parts) if parts else NO_HEADER_OPS), rewrite


def _header_values(ref: ObjectRef, value: Any, path: str) -> list[tuple[str, str]]:
    result = []
    for i, entry in enumerate(sequence(ref, value, path)):
        header = values.section(ref, entry, f"{path}[{i}]", _HEADER_VALUE)
        name = string(ref, header.get("name"), f"{path}[{i}].name")
        if not name:
            raise ref.error(f"{path}[{i}].name", "required")
        result.append((name.lower(), string(ref, header.get("value"), f"{path}[{i}].value")))
    return result


def _url_rewrite(ref: ObjectRef, value: Any, path: str) -> _UrlRewrite:
    spec = values.section(ref, value, path, _URL_REWRITE)
    hostname = string(ref, spec.get("hostname"), f"{path}.hostname") or None
    full_path = prefix = None
    if spec.get("path") is not None:
        modifier = values.section(ref, spec["path"], f"{path}.path", _PATH_MODIFIER)
        kind = string(ref, modifier.get("type"), f"{path}.path.type")
        if kind == "ReplaceFullPath":
            full_path = string(ref, modifier.get("replaceFullPath"), f"{path}.path.replaceFullPath")
        elif kind == "ReplacePrefixMatch":
            prefix = string(
                ref, modifier.get("replacePrefixMatch"), f"{path}.path.replacePrefixMatch"
            )
            prefix = prefix or "/"
        else:
            raise ref.error(
                f"{path}.path.type", f"{kind!r} is not one of ReplaceFullPath, ReplacePrefixMatch"
            )
    if hostname is None and full_path is None and prefix is None:
        raise ref.error(path, "needs hostname or path")
    return _UrlRewrite(hostname=hostname, full_path=full_path, prefix=prefix)


def _backends(ref: ObjectRef, value: Any, path: str, namespace: str) -> tuple[Destination, ...]:
    destinations = []
    for i, entry in enumerate(sequence(ref, value, path)):
        entry_path = f"{path}[{i}]"
        backend = values.section(ref, entry, entry_path, _BACKEND)
        group = string(ref, backend.get("group"), f"{entry_path}.group")
        kind = string(ref, backend.get("kind"), f"{entry_path}.kind", default="Service")
        if group not in _CORE_GROUPS or kind != "Service":
            raise ref.error(
                f"{entry_path}.kind", f"{group or 'core'}/{kind}: only Services are supported"
            )
        backend_namespace = string(ref, backend.get("namespace"), f"{entry_path}.namespace")
        if backend_namespace and backend_namespace != namespace:
            raise ref.error(
                f"{entry_path}.namespace",
                "backends in other namespaces need a ReferenceGrant, which is not supported",
            )
        name = string(ref, backend.get("name"), f"{entry_path}.name")
        if not name:
            raise ref.error(f"{entry_path}.name", "required")
        if backend.get("port") is None:
            raise ref.error(f"{entry_path}.port", "required for a Service backend")
        weight = values.integer(
            ref, backend.get("weight", 1), f"{entry_path}.weight", minimum=0, maximum=_MAX_WEIGHT
        )
        headers, rewrite = _filters(ref, backend.get("filters"), f"{entry_path}.filters")
        if rewrite is not None:
            raise ref.error(
                f"{entry_path}.filters", "URLRewrite is supported on rules, not backends"
            )
        if weight:
            destinations.append(
                Destination(
                    host=values.resolve_host(name, namespace),
                    port=port_number(ref, backend["port"], f"{entry_path}.port"),
                    subset="",
                    weight=weight,
                    headers=headers,
                    field=entry_path,
                )
            )
    if not destinations:
        raise ref.error(path, "required: at least one backend with a weight above 0")
    return tuple(destinations)
