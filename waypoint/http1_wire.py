"""waypoint/http1_wire: the plain HTTP/1.1 message, parsed and written without h11 (sans-IO).

Through h11 one exchange cost about 40 us of CPU on each side of the waypoint, a quarter of
a request's cost, while nearly every message is plain: HTTP/1.1, one Host, framed by one
Content-Length (or with no body), no Expect, Upgrade or obs-fold. This module parses exactly
those, with h11's grammar (h11/_abnf.py), and writes the waypoint's own messages. A head it
does not take gives None, and waypoint.http1 hands the connection to h11 for good, which
then answers every oddity, error and 100-continue as before. It is the HTTP/1.1 twin of the
HBONE tunnel's own DATA-frame path next to h2 (reference/python-hbone-ceiling.md).

Heads are given whole, up to and including the blank line that ends them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from http import HTTPStatus

from waypoint.messages import HOP_BY_HOP, Headers, without_hop_by_hop

HEAD_END = b"\r\n\r\n"
LAST_CHUNK = b"0\r\n\r\n"

# h11's ABNF (RFC 9110/9112, h11/_abnf.py), checked in two cheap passes instead of one
# backtracking match per line: every name a token, and no NUL, CR, LF, FF or VT anywhere in
# a line (a value's other characters are field-vchar, space or tab, as the grammar allows).
_TOKEN_CHARS = re.compile(r"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")
_FORBIDDEN_IN_LINE = re.compile(r"[\x00\r\n\f\v]")
_REQUEST_LINE = re.compile(rb"([-!#$%&'*+.^_`|~0-9a-zA-Z]+) (/[\x21-\x7e]*) HTTP/1\.1\r\n")
_STATUS_LINE = re.compile(rb"HTTP/1\.1 ([0-9]{3})(?: [^\x00\r\n\f\v]*)?\r\n")

# Request headers that need h11: other framing, 100-continue, protocol switches.
_NOT_PLAIN_REQUEST = frozenset({"transfer-encoding", "expect", "upgrade"})
_NO_BODY_STATUSES = frozenset({204, 304})
_REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}


@dataclass(frozen=True, slots=True)
class RequestHead:
    method: str
    target: str  # origin-form ("/..."); other forms go to h11
    host: str
    headers: Headers  # lower-case names, without Host and hop-by-hop headers
    content_length: int


@dataclass(frozen=True, slots=True)
class ResponseHead:
    status: int
    headers: Headers  # lower-case names, without hop-by-hop headers
    content_length: int  # 0 when the response has no body (HEAD, 204, 304)
    close: bool  # the server said Connection: close


def _header_fields(block: bytes) -> list[tuple[str, str]] | None:
    """The fields of header lines (each ending CRLF), or None if one breaks the grammar."""
    lines = block.decode("latin-1").split("\r\n")
    lines.pop()  # after the last CRLF
    fields = []
    for line in lines:
        name, colon, value = line.partition(":")
        if not colon or not name:
            return None
        fields.append((name.lower(), value.strip(" \t")))
    if fields and (
        _TOKEN_CHARS.fullmatch("".join([name for name, _ in fields])) is None
        or _FORBIDDEN_IN_LINE.search("".join(lines)) is not None
    ):
        return None
    return fields


def _length(value: str) -> int | None:
    return int(value) if value.isascii() and value.isdigit() else None


def parse_request_head(head: bytes) -> RequestHead | None:
    """A plain request head, or None for h11 to parse (or refuse)."""
    line = _REQUEST_LINE.match(head)
    if line is None:
        return None
    fields = _header_fields(head[line.end() : -2])
    if fields is None:
        return None
    host: str | None = None
    content_length: int | None = None
    hop_by_hop = False
    for name, value in fields:
        if name == "host":
            if host is not None:
                return None
            host = value
        elif name == "content-length":
            if content_length is not None or (content_length := _length(value)) is None:
                return None
        elif name in _NOT_PLAIN_REQUEST:
            return None
        elif name == "connection":
            if value.lower() != "keep-alive":
                return None  # close, upgrade...: h11 keeps the connection's state
            hop_by_hop = True
        elif name in HOP_BY_HOP:
            hop_by_hop = True
    method = line[1].decode("ascii")
    if host is None or method == "CONNECT":
        return None
    headers = tuple(field for field in fields if field[0] != "host")
    return RequestHead(
        method=method,
        target=line[2].decode("ascii"),
        host=host,
        headers=without_hop_by_hop(headers) if hop_by_hop else headers,
        content_length=content_length or 0,
    )


def parse_response_head(head: bytes, *, head_request: bool) -> ResponseHead | None:
    """A plain final response, or None for h11 (1xx, chunked, read-until-close, HTTP/1.0)."""
    line = _STATUS_LINE.match(head)
    if line is None:
        return None
    status = int(line[1])
    fields = _header_fields(head[line.end() : -2])
    if status < 200 or fields is None:
        return None
    content_length: int | None = None
    close = False
    hop_by_hop = False
    for name, value in fields:
        if name == "content-length":
            if content_length is not None or (content_length := _length(value)) is None:
                return None
        elif name == "transfer-encoding":
            return None
        elif name in HOP_BY_HOP:
            hop_by_hop = True
            if name == "connection":
                tokens = {token.strip().lower() for token in value.split(",")}
                if not tokens <= {"close", "keep-alive"}:
                    return None
                close = close or "close" in tokens
    if head_request or status in _NO_BODY_STATUSES:
        content_length = 0
    elif content_length is None:
        return None
    headers = tuple(fields)
    return ResponseHead(
        status=status,
        headers=without_hop_by_hop(headers) if hop_by_hop else headers,
        content_length=content_length,
        close=close,
    )


def _header_block(headers: Headers) -> bytes:
    """Header lines for the wire; ValueError for what would break (or inject into) framing."""
    if headers:
        names = [name for name, _ in headers]
        if not all(names) or _TOKEN_CHARS.fullmatch("".join(names)) is None:
            raise ValueError(f"a header name is not a token: {[name for name in names if not _TOKEN_CHARS.fullmatch(name)]}")
        if _FORBIDDEN_IN_LINE.search("".join([value for _, value in headers])) is not None:
            raise ValueError("a header value holds NUL, CR, LF, FF or VT")
    try:
        return "".join([f"{name}: {value}\r\n" for name, value in headers]).encode("latin-1")
    except UnicodeEncodeError as exc:
        raise ValueError(f"header not encodable as latin-1: {exc}") from None


def request_head(method: str, target: str, headers: Headers, *, chunked: bool) -> bytes:
    """An HTTP/1.1 request head; `headers` carry Host first. ValueError if not sendable."""
    text = f"{method} {target} HTTP/1.1\r\n"
    line = text.encode("ascii") if text.isascii() else b""  # never altered, refused
    if _REQUEST_LINE.fullmatch(line) is None:
        raise ValueError(f"request line {method} {target!r} is not valid HTTP/1.1")
    if chunked:
        headers = (*headers, ("transfer-encoding", "chunked"))
    return line + _header_block(headers) + b"\r\n"


def response_head(status: int, headers: Headers, *, chunked: bool, close: bool) -> bytes:
    """An HTTP/1.1 final response head. ValueError if not sendable."""
    if not 200 <= status <= 999:
        raise ValueError(f"status {status} is not a final response")
    if chunked:
        headers = (*headers, ("transfer-encoding", "chunked"))
    if close:
        headers = (*headers, ("connection", "close"))
    return b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"")) + _header_block(headers) + b"\r\n"


def reason(status: int) -> bytes:
    return _REASONS.get(status, b"")


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body (never the last: that is LAST_CHUNK or `last_chunk`)."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def last_chunk(trailers: Headers) -> bytes:
    return b"0\r\n" + _header_block(trailers) + b"\r\n" if trailers else LAST_CHUNK


def content_length(headers: Headers) -> int | None:
    """The body length `headers` declare; None if they declare none. ValueError when the
    declaration is unusable (not a number, or two of them)."""
    found: int | None = None
    for name, value in headers:
        if name == "content-length":
            length = _length(value.strip())
            if length is None or found is not None:
                raise ValueError(f"content-length {value!r} is not one number")
            found = length
    return found


def has_no_body(status: int) -> bool:
    return status in _NO_BODY_STATUSES
