"""Route matching (Envoy semantics, first match wins), rewrites and header changes."""

from __future__ import annotations

import pytest

from waypoint.config.model import (
    HeaderAppendAction,
    HeaderMatch,
    HeaderToAdd,
    QueryParamMatch,
    RegexRewrite,
    Route,
    RouteAction,
    RouteMatch,
    StringMatch,
    StringMatchKind,
    WeightedBackend,
)
from waypoint.routing.match import (
    RequestHead,
    apply_header_changes,
    find_route,
    rewritten_target,
    route_matches,
)

EXACT, PREFIX, SUFFIX, CONTAINS, REGEX = StringMatchKind


def route(match: RouteMatch, cluster: str, **action: object) -> Route:
    return Route(match, RouteAction((WeightedBackend(cluster),), **action), name=cluster)  # type: ignore[arg-type]


def get(
    target: str, *headers: tuple[str, str], method: str = "GET", authority: str = ""
) -> RequestHead:
    return RequestHead.from_target(method, target, tuple(headers), authority)


# The bookinfo "reviews" VirtualService: end-user jason goes to v2, everyone else to v1.
REVIEWS = (
    route(
        RouteMatch(
            path=StringMatch(PREFIX, "/"),
            headers=(HeaderMatch("end-user", StringMatch(EXACT, "jason")),),
        ),
        "outbound|9080|v2|reviews.bookinfo.svc.cluster.local",
    ),
    route(
        RouteMatch(path=StringMatch(PREFIX, "/")),
        "outbound|9080|v1|reviews.bookinfo.svc.cluster.local",
    ),
)


def chosen(routes: tuple[Route, ...], request: RequestHead) -> str | None:
    found = find_route(routes, request)
    return found.name if found else None


def test_header_route_sends_jason_to_v2_and_everyone_else_to_v1() -> None:
    assert chosen(REVIEWS, get("/reviews/1", ("end-user", "jason"))) == REVIEWS[0].name
    assert chosen(REVIEWS, get("/reviews/1", ("end-user", "alice"))) == REVIEWS[1].name
    assert chosen(REVIEWS, get("/reviews/1")) == REVIEWS[1].name
    # Header values are case-sensitive unless the matcher says ignore_case.
    assert chosen(REVIEWS, get("/reviews/1", ("end-user", "Jason"))) == REVIEWS[1].name


def test_first_matching_route_wins_even_if_a_later_one_is_more_specific() -> None:
    routes = (
        route(RouteMatch(path=StringMatch(PREFIX, "/api")), "broad"),
        route(RouteMatch(path=StringMatch(EXACT, "/api/users")), "specific"),
    )
    assert chosen(routes, get("/api/users")) == "broad"


def test_no_route_when_nothing_matches() -> None:
    routes = (route(RouteMatch(path=StringMatch(PREFIX, "/api")), "api"),)
    assert find_route(routes, get("/other")) is None
    assert find_route((), get("/")) is None


@pytest.mark.parametrize(
    ("path", "target", "expected"),
    [
        (StringMatch(EXACT, "/api/users"), "/api/users", True),
        (StringMatch(EXACT, "/api/users"), "/api/users?id=1", True),  # the query is not the path
        (StringMatch(EXACT, "/api/users"), "/api/users/1", False),
        (StringMatch(PREFIX, "/api/"), "/api/users", True),
        (StringMatch(PREFIX, "/api/"), "/apix", False),
        (StringMatch(PREFIX, "/API/", ignore_case=True), "/api/users", True),
        (StringMatch(REGEX, "/api/users/[0-9]+"), "/api/users/42", True),
        (StringMatch(REGEX, "/api/users/[0-9]+"), "/api/users/42/x", False),  # full match
        (StringMatch(REGEX, "/api/users/[0-9]+"), "/api/users/42?x=y", True),
        (StringMatch(REGEX, "/api/users/[0-9]+"), "/api/users/42#frag", True),
        (None, "/anything", True),
    ],
)
def test_path_matches(path: StringMatch | None, target: str, expected: bool) -> None:
    assert route_matches(RouteMatch(path=path), get(target)) is expected


def test_method_match() -> None:
    match = RouteMatch(method="POST")
    assert route_matches(match, get("/", method="POST"))
    assert not route_matches(match, get("/", method="GET"))


@pytest.mark.parametrize(
    ("header", "headers", "expected"),
    [
        (HeaderMatch("x-a"), [("x-a", "")], True),  # nothing set = presence
        (HeaderMatch("x-a"), [], False),
        (HeaderMatch("x-a", invert=True), [], True),
        (HeaderMatch("x-a", present=False), [], True),
        (HeaderMatch("x-a", present=False), [("x-a", "1")], False),
        (HeaderMatch("x-a", StringMatch(EXACT, "1")), [("x-a", "1")], True),
        (HeaderMatch("x-a", StringMatch(EXACT, "1")), [("x-a", "2")], False),
        (HeaderMatch("x-a", StringMatch(EXACT, "1"), invert=True), [("x-a", "2")], True),
        # A missing header fails value matches, inverted or not (Envoy).
        (HeaderMatch("x-a", StringMatch(EXACT, "1"), invert=True), [], False),
        (HeaderMatch("x-a", StringMatch(PREFIX, "ab")), [("x-a", "abc")], True),
        (HeaderMatch("x-a", StringMatch(SUFFIX, "bc")), [("x-a", "abc")], True),
        (HeaderMatch("x-a", StringMatch(CONTAINS, "b")), [("x-a", "abc")], True),
        (HeaderMatch("x-a", StringMatch(EXACT, "ABC", ignore_case=True)), [("x-a", "abc")], True),
        (HeaderMatch("x-a", StringMatch(REGEX, "v[12]")), [("x-a", "v2")], True),
        (HeaderMatch("x-a", StringMatch(REGEX, "v[12]")), [("x-a", "v21")], False),
        # Repeated headers are matched joined with ",".
        (HeaderMatch("x-a", StringMatch(EXACT, "1,2")), [("x-a", "1"), ("x-a", "2")], True),
        (HeaderMatch("X-A", StringMatch(EXACT, "1")), [("x-a", "1")], True),  # names lower-cased
    ],
)
def test_header_matches(
    header: HeaderMatch, headers: list[tuple[str, str]], expected: bool
) -> None:
    assert route_matches(RouteMatch(headers=(header,)), get("/", *headers)) is expected


def test_pseudo_headers_are_matchable() -> None:
    request = get("/p?q=1", ("host", "reviews:9080"), method="PUT")
    assert route_matches(
        RouteMatch(headers=(HeaderMatch(":method", StringMatch(EXACT, "PUT")),)), request
    )
    assert route_matches(
        RouteMatch(headers=(HeaderMatch(":path", StringMatch(EXACT, "/p?q=1")),)), request
    )
    # :authority is the HTTP/2 authority, or the Host header for HTTP/1.1.
    by_host = HeaderMatch(":authority", StringMatch(PREFIX, "reviews"))
    assert route_matches(RouteMatch(headers=(by_host,)), request)
    with_authority = get("/", ("host", "other"), authority="reviews.bookinfo:9080")
    assert route_matches(RouteMatch(headers=(by_host,)), with_authority)


@pytest.mark.parametrize(
    ("param", "query", "expected"),
    [
        (QueryParamMatch("debug"), "debug", True),
        (QueryParamMatch("debug"), "other=1", False),
        (QueryParamMatch("user", StringMatch(EXACT, "jason smith")), "user=jason%20smith", True),
        (
            QueryParamMatch("user", StringMatch(EXACT, "jason")),
            "user=jason&user=bob",
            True,
        ),  # first
        (QueryParamMatch("user", StringMatch(EXACT, "bob")), "user=jason&user=bob", False),
        (QueryParamMatch("id", StringMatch(REGEX, "[0-9]+")), "id=123", True),
        (QueryParamMatch("id", StringMatch(REGEX, "[0-9]+")), "id=12a", False),
    ],
)
def test_query_param_matches(param: QueryParamMatch, query: str, expected: bool) -> None:
    assert route_matches(RouteMatch(query_params=(param,)), get(f"/search?{query}")) is expected


def test_every_condition_of_a_match_must_hold() -> None:
    match = RouteMatch(
        path=StringMatch(PREFIX, "/api"),
        headers=(HeaderMatch("end-user", StringMatch(EXACT, "jason")),),
        method="GET",
    )
    assert route_matches(match, get("/api/x", ("end-user", "jason")))
    assert not route_matches(match, get("/api/x", ("end-user", "jason"), method="POST"))
    assert not route_matches(match, get("/web", ("end-user", "jason")))
    assert not route_matches(match, get("/api/x"))


def test_invalid_regex_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="invalid regex"):
        StringMatch(REGEX, "(unclosed")


# --- Rewrites and header changes ---


@pytest.mark.parametrize(
    ("match", "rewrite", "target", "expected"),
    [
        (StringMatch(PREFIX, "/v1/"), "/", "/v1/users?id=1", "/users?id=1"),
        (StringMatch(PREFIX, "/old"), "/new", "/old/x", "/new/x"),
        (StringMatch(EXACT, "/login"), "/auth/login", "/login", "/auth/login"),
        (StringMatch(REGEX, "/a/.*"), "/b", "/a/c", "/b"),
        (StringMatch(PREFIX, "/x"), "", "/x", "/"),
    ],
)
def test_prefix_rewrite_replaces_what_the_route_matched(
    match: StringMatch, rewrite: str, target: str, expected: str
) -> None:
    chosen_route = route(RouteMatch(path=match), "c", prefix_rewrite=rewrite)
    assert rewritten_target(chosen_route, get(target)) == expected


def test_regex_rewrite_substitutes_in_the_path_only() -> None:
    chosen_route = route(
        RouteMatch(path=StringMatch(PREFIX, "/")),
        "c",
        regex_rewrite=RegexRewrite(r"^/service/([^/]+)(/.*)$", r"\2/instance/\1"),
    )
    assert rewritten_target(chosen_route, get("/service/foo/v1/api?x=/service/a/b")) == (
        "/v1/api/instance/foo?x=/service/a/b"
    )


def test_no_rewrite_keeps_the_target() -> None:
    assert rewritten_target(REVIEWS[1], get("/reviews/1?a=b")) == "/reviews/1?a=b"


def test_header_changes_remove_then_add_with_envoys_append_actions() -> None:
    headers = (("x-a", "1"), ("x-b", "1"), ("x-c", "1"))
    changed = apply_header_changes(
        headers,
        [
            HeaderToAdd("x-a", "2"),  # append
            HeaderToAdd("X-B", "2", HeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD),
            HeaderToAdd("x-c", "2", HeaderAppendAction.ADD_IF_ABSENT),
            HeaderToAdd("x-d", "2", HeaderAppendAction.ADD_IF_ABSENT),
            HeaderToAdd("x-e", "2", HeaderAppendAction.OVERWRITE_IF_EXISTS),
            HeaderToAdd("x-f", ""),  # empty values are not added
            HeaderToAdd("x-gone", "new"),  # removed first, then added back
        ],
        ["x-gone", "x-c"],
    )
    assert changed == (
        ("x-a", "1"),
        ("x-a", "2"),
        ("x-b", "2"),
        ("x-c", "2"),
        ("x-d", "2"),
        ("x-gone", "new"),
    )


def test_routes_cannot_change_pseudo_headers_or_host() -> None:
    with pytest.raises(ValueError, match="cannot be added or removed"):
        HeaderToAdd(":path", "/x")
    with pytest.raises(ValueError, match="cannot be added or removed"):
        RouteAction((WeightedBackend("c"),), request_headers_to_remove=("host",))
