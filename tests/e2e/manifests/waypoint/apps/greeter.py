"""A gRPC server without a .proto: grpcio's generic handler with raw bytes in and out.

Service `test.Greeter` on $PORT (default 50051):
- `Say` (unary): b"hello " + the request;
- `Count` (server streaming): the request is a number N; streams b"0" .. b"N-1";
- `Flaky` (unary): every other call fails with UNAVAILABLE before any message (a
  trailers-only response, which a waypoint can retry), the others answer b"ok".
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from concurrent import futures

import grpc

PORT = int(os.environ.get("PORT", "50051"))
_flaky_calls = itertools.count(1)


def say(request: bytes, context: grpc.ServicerContext) -> bytes:
    return b"hello " + request


def count(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    for i in range(int(request)):
        yield str(i).encode()


def flaky(request: bytes, context: grpc.ServicerContext) -> bytes:
    if next(_flaky_calls) % 2:
        context.abort(grpc.StatusCode.UNAVAILABLE, "every other call fails")
    return b"ok"


# No serializers: grpcio hands the handlers the message bytes and sends theirs as they are.
handler = grpc.method_handlers_generic_handler(
    "test.Greeter",
    {
        "Say": grpc.unary_unary_rpc_method_handler(say),
        "Count": grpc.unary_stream_rpc_method_handler(count),
        "Flaky": grpc.unary_unary_rpc_method_handler(flaky),
    },
)
server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
server.add_generic_rpc_handlers((handler,))
server.add_insecure_port(f"0.0.0.0:{PORT}")
server.start()
server.wait_for_termination()
