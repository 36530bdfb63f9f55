"""waypoint/messages: one HTTP exchange as the waypoint's servers, pipeline and clients see it.

The HTTP/1.1 and HTTP/2 codecs (http1.py, http2.py) turn wire messages into these values and
back, so the pipeline never knows which protocol a request arrived on or leaves with:

- header names are lower-case `str` (latin-1, so any byte survives), pseudo-headers and
  hop-by-hop headers removed; the request's `authority` is the Host / `:authority`;
- a body is read chunk by chunk (`await body.read()`, b"" at the end) so large and streaming
  bodies (gRPC streams) flow through without being held in memory; trailers (gRPC's
  `grpc-status`) are readable once the body has ended.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

Headers = tuple[tuple[str, str], ...]

# RFC 9110 §7.6.1: meaningful for one connection only, never forwarded by a proxy.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "te",
        "upgrade",
        "trailer",
        "proxy-authenticate",
        "proxy-authorization",
    }
)


class Body(Protocol):
    """A message body read in chunks."""

    async def read(self) -> bytes:
        """The next chunk; b"" once the body has ended. Raises BodyError if it broke."""
        ...

    @property
    def trailers(self) -> Headers:
        """Trailers, valid after `read()` returned b""."""
        ...

    async def aclose(self) -> None:
        """Stop reading: an upstream body not read to its end gives its connection up."""
        ...


class BodyError(Exception):
    """A body could not be read to its end (the peer reset it, or it broke a limit).

    `status` is the answer owed to the client when it was the request body that broke and
    no response has started (400 malformed, 413 too large).
    """

    def __init__(self, message: str, *, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class BufferedBody:
    """A body already in memory (a local reply, a test request)."""

    def __init__(self, data: bytes = b"", trailers: Headers = ()) -> None:
        self._data = data
        self._trailers = trailers

    async def read(self) -> bytes:
        data, self._data = self._data, b""
        return data

    @property
    def trailers(self) -> Headers:
        return self._trailers

    async def aclose(self) -> None:
        self._data = b""


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    authority: str
    target: str  # origin-form: path and query, as received
    headers: Headers
    body: Body
    protocol: str  # "HTTP/1.1" or "HTTP/2"
    scheme: str = "http"

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    @property
    def query(self) -> str:
        return self.target.partition("?")[2]

    def header(self, name: str) -> str | None:
        return header_value(self.headers, name)


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    headers: Headers
    body: Body

    def header(self, name: str) -> str | None:
        return header_value(self.headers, name)


def header_value(headers: Headers, name: str) -> str | None:
    """The first value of `name` (lower-case), or None."""
    return next((v for k, v in headers if k == name), None)


def without_hop_by_hop(headers: Headers) -> Headers:
    """`headers` minus hop-by-hop ones, including those the Connection header names."""
    if HOP_BY_HOP.isdisjoint([name for name, _ in headers]):
        return headers  # the common case, on every message: nothing to take out
    named = {
        token.strip().lower()
        for name, value in headers
        if name == "connection"
        for token in value.split(",")
    }
    return tuple((k, v) for k, v in headers if k not in HOP_BY_HOP and k not in named)


def local_reply(status: int, text: str, headers: Headers = ()) -> Response:
    """A response the waypoint makes itself (errors: 403 "RBAC: access denied", 503 ...)."""
    body = text.encode()
    return Response(
        status,
        (("content-type", "text/plain"), ("content-length", str(len(body))), *headers),
        BufferedBody(body),
    )
