"""Route selection, with Envoy's semantics, and what the chosen route does to the request.

`find_route(routes, request)` returns the first route whose match holds: routes are in
VirtualService / HTTPRoute order (istiod_lite keeps it), exactly as Envoy walks a virtual
host's routes. Within one RouteMatch every condition must hold:

- path: EXACT / PREFIX / REGEX (full match) against the path without query or fragment;
  `case_sensitive: false` compares case-insensitively (regexes are unaffected);
- method: the request method, exactly;
- headers: each HeaderMatch on the header's values joined with "," (`:method`, `:path`,
  `:authority` read the pseudo-headers; `:authority` falls back to Host);
- query parameters: each on the parameter's first percent-decoded value.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from urllib.parse import parse_qsl

from waypoint.config.model import (
    HeaderAppendAction,
    HeaderToAdd,
    Route,
    RouteMatch,
    StringMatchKind,
)

Headers = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class RequestHead:
    """What routing and authorization see of a request.

    `headers` are (lower-case name, value) pairs as received, pseudo-headers excluded;
    `path` excludes the query, which is `query` (without "?").
    """

    method: str
    path: str
    headers: Headers
    query: str = ""
    authority: str = ""

    @classmethod
    def from_target(
        cls, method: str, target: str, headers: Headers, authority: str = ""
    ) -> RequestHead:
        """Split an origin-form target ("/p?q#f") into path and query."""
        path, _, query = target.partition("#")[0].partition("?")
        return cls(method, path, headers, query, authority)

    def header(self, name: str) -> str | None:
        """The values of header `name` joined with ",", or None if absent."""
        match name:
            case ":method":
                return self.method
            case ":path":
                return f"{self.path}?{self.query}" if self.query else self.path
            case ":authority":
                return self.authority or self._header_index.get("host")
        return self._header_index.get(name)

    @cached_property
    def _header_index(self) -> dict[str, str]:
        index: dict[str, str] = {}
        for name, value in self.headers:
            index[name] = f"{index[name]},{value}" if name in index else value
        return index

    @cached_property
    def query_params(self) -> dict[str, str]:
        """First decoded value of each query parameter."""
        params: dict[str, str] = {}
        for name, value in parse_qsl(self.query, keep_blank_values=True):
            params.setdefault(name, value)
        return params


def find_route(routes: Iterable[Route], request: RequestHead) -> Route | None:
    """The first route whose match holds for `request`, or None (Envoy answers 404 NR)."""
    for route in routes:
        if route_matches(route.match, request):
            return route
    return None


def route_matches(match: RouteMatch, request: RequestHead) -> bool:
    if match.method is not None and request.method != match.method:
        return False
    if match.path is not None and not match.path.matches(request.path):
        return False
    for header in match.headers:
        if not header.matches(request.header(header.name)):
            return False
    for param in match.query_params:
        value = request.query_params.get(param.name)
        if value is None or (param.value is not None and not param.value.matches(value)):
            return False
    return True


# --- What the chosen route does to the request ---


def rewritten_target(route: Route, request: RequestHead) -> str:
    """The target (path and query) to send upstream after the route's rewrite.

    `prefix_rewrite` replaces the part of the path the route matched: the prefix of a
    PREFIX match, the whole path of an EXACT or REGEX match. `regex_rewrite` substitutes
    every match in the path. The query is kept as it was.
    """
    action, path = route.action, request.path
    if action.prefix_rewrite is not None:
        matched = route.match.path
        if matched is None:
            path = action.prefix_rewrite + path
        elif matched.kind is StringMatchKind.PREFIX:
            path = action.prefix_rewrite + path[len(matched.value) :]
        else:
            path = action.prefix_rewrite
    elif action.regex_rewrite is not None:
        path = action.regex_rewrite.apply(path)
    path = path or "/"
    return f"{path}?{request.query}" if request.query else path


def apply_header_changes(
    headers: Headers, to_add: Sequence[HeaderToAdd], to_remove: Sequence[str]
) -> Headers:
    """`headers` after removing `to_remove`, then adding `to_add` (Envoy's order).

    Additions with an empty value are skipped, as Envoy does by default.
    """
    if not to_add and not to_remove:
        return headers
    removed = frozenset(to_remove)
    result = [(name, value) for name, value in headers if name not in removed]
    for header in to_add:
        if not header.value:
            continue
        present = any(name == header.name for name, _ in result)
        match header.action:
            case HeaderAppendAction.APPEND_IF_EXISTS_OR_ADD:
                result.append((header.name, header.value))
            case HeaderAppendAction.ADD_IF_ABSENT:
                if not present:
                    result.append((header.name, header.value))
            case HeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD:
                result = [(n, v) for n, v in result if n != header.name]
                result.append((header.name, header.value))
            case HeaderAppendAction.OVERWRITE_IF_EXISTS:
                if present:
                    result = [(n, v) for n, v in result if n != header.name]
                    result.append((header.name, header.value))
    return tuple(result)
