"""The metrics/readiness/admin HTTP servers, exercised over loopback with a real HTTP client."""

import http.client
import io
import json
import logging
from contextlib import asynccontextmanager

import prometheus_client
import pytest
import structlog
import trio
from prometheus_client.parser import text_string_to_metric_families

from meshcore import log
from meshcore.admin import (
    Readiness,
    Response,
    StreamingBody,
    StreamingResponse,
    admin_routes,
    metrics_routes,
    readiness_routes,
    serve_http,
)
from meshcore.drain import Drain
from meshcore.metrics import new_registry


@asynccontextmanager
async def serving(routes):
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_http, ("127.0.0.1", 0), routes)
        yield port
        nursery.cancel_scope.cancel()


async def fetch(port, requests):
    """Send (method, path) requests over one keep-alive connection; [(status, type, body)]."""

    def run():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            out = []
            for method, path in requests:
                conn.request(method, path)
                resp = conn.getresponse()
                out.append((resp.status, resp.getheader("content-type"), resp.read().decode()))
            return out
        finally:
            conn.close()

    return await trio.to_thread.run_sync(run)


async def fetch_one(port, path, method="GET"):
    [result] = await fetch(port, [(method, path)])
    return result


async def raw_exchange(port, data):
    """Send raw bytes, return everything the server sends until it closes."""
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(data)
            received = b""
            while chunk := await stream.receive_some(65536):
                received += chunk
            return received


# --- Readiness ---


async def test_readiness_reports_pending_tasks_until_all_are_ready():
    readiness = Readiness(pending=("state", "certificates", "proxy"))
    async with serving(readiness_routes(readiness)) as port:
        assert await fetch_one(port, "/healthz/ready") == (
            500,
            "text/plain",
            "not ready, pending: state, certificates, proxy\n",
        )
        readiness.mark_ready("certificates")
        readiness.mark_ready("state")
        status, _, body = await fetch_one(port, "/healthz/ready")
        assert (status, body) == (500, "not ready, pending: proxy\n")

        readiness.mark_ready("proxy")
        readiness.mark_ready("proxy")  # repeating is harmless
        assert await fetch_one(port, "/healthz/ready") == (200, "text/plain", "ready\n")
    assert readiness.ready and readiness.pending == ()


def test_readiness_rejects_unknown_task_names():
    readiness = Readiness(pending=("state",))
    with pytest.raises(ValueError, match="'stat'.*state"):
        readiness.mark_ready("stat")
    assert readiness.pending == ("state",)


# --- Metrics ---


async def test_metrics_scrape_parses_on_both_paths():
    registry = new_registry()
    requests = prometheus_client.Counter(
        "demo_requests", "Requests seen", ("code",), registry=registry
    )
    requests.labels("200").inc(3)
    async with serving(metrics_routes(registry)) as port:
        results = await fetch(port, [("GET", "/metrics"), ("GET", "/stats/prometheus")])

    for status, content_type, body in results:
        assert status == 200
        assert content_type.startswith("text/plain; version=0.0.4")
        [family] = text_string_to_metric_families(body)
        assert family.name == "demo_requests"
        assert [(s.labels, s.value) for s in family.samples if s.name.endswith("_total")] == [
            ({"code": "200"}, 3.0)
        ]


# --- Admin ---


async def test_config_dump_is_json():
    state = {"workloads": [{"name": "reviews-v1", "namespace": "default"}], "services": []}
    async with serving(admin_routes(lambda: state, Drain())) as port:
        status, content_type, body = await fetch_one(port, "/config_dump")
    assert (status, content_type) == (200, "application/json")
    assert json.loads(body) == state


async def test_quitquitquit_starts_the_drain_only_on_post():
    drain = Drain()
    async with serving(admin_routes(dict, drain)) as port:
        status, _, _ = await fetch_one(port, "/quitquitquit")
        assert status == 405 and not drain.started
        status, _, _ = await fetch_one(port, "/quitquitquit", method="POST")
    assert status == 200
    assert drain.started


@pytest.fixture
def restore_logging():
    """Undo process-wide logging changes so other tests see the configuration they expect."""
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    structlog.configure(**saved)
    root.handlers = handlers
    root.setLevel(level)


async def test_logging_shows_and_changes_the_level(restore_logging):
    output = io.StringIO()
    log.configure_logging("info", stream=output)
    debug_probe = log.get_logger("probe")
    debug_probe.debug("hidden")
    async with serving(admin_routes(dict, Drain())) as port:
        results = await fetch(
            port,
            [
                ("GET", "/logging"),
                ("POST", "/logging?level=debug"),
                ("GET", "/logging?level=loud"),
            ],
        )
    assert results[0][:2] == (200, "text/plain") and "info" in results[0][2]
    assert results[1][0] == 200 and "debug" in results[1][2]
    assert results[2][0] == 400 and "'loud'" in results[2][2]
    assert log.current_level() == "debug"
    debug_probe.debug("shown", answer=42)
    events = [json.loads(line) for line in output.getvalue().splitlines()]
    [probe_event] = [e for e in events if e["component"] == "probe"]  # "hidden" was filtered
    assert probe_event["event"] == "shown" and probe_event["level"] == "debug"
    assert probe_event["answer"] == 42 and probe_event["timestamp"].endswith("Z")


async def test_index_lists_admin_endpoints():
    async with serving(admin_routes(dict, Drain())) as port:
        status, _, body = await fetch_one(port, "/")
    assert status == 200
    for path in ("/config_dump", "/logging", "/quitquitquit"):
        assert path in body


# --- Server behaviour ---


async def test_unknown_path_is_404():
    async with serving(readiness_routes(Readiness(pending=()))) as port:
        status, _, body = await fetch_one(port, "/nope")
    assert status == 404
    assert "/nope" in body


async def test_malformed_request_gets_400_and_server_keeps_serving():
    async with serving(readiness_routes(Readiness(pending=()))) as port:
        reply = await raw_exchange(port, b"GARBAGE\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 400 ")
        assert (await fetch_one(port, "/healthz/ready"))[0] == 200


async def test_oversized_headers_are_refused_with_431():
    async with serving(readiness_routes(Readiness(pending=()))) as port:
        # A head that keeps growing past the limit without ever ending.
        endless_head = b"GET /healthz/ready HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000
        reply = await raw_exchange(port, endless_head)
        assert reply.startswith(b"HTTP/1.1 431 ")
        assert (await fetch_one(port, "/healthz/ready"))[0] == 200


async def test_failing_handler_gets_500_and_connection_stays_usable():
    async def broken(request):
        raise RuntimeError("boom")

    async def fine(request):
        return Response(200, f"{request.method} {request.query}".encode())

    async def bad_status(request):
        return Response(999, b"")

    routes = {"/broken": broken, "/bad-status": bad_status, "/fine": fine}
    async with serving(routes) as port:
        results = await fetch(
            port,
            [
                ("GET", "/broken"),
                ("GET", "/bad-status"),
                ("HEAD", "/fine"),
                ("GET", "/fine?a=1&b=x%20y"),
            ],
        )
    assert [status for status, _, _ in results[:2]] == [500, 500]
    assert results[2] == (200, "text/plain", "")  # HEAD: headers only
    assert results[3] == (200, "text/plain", "GET {'a': '1', 'b': 'x y'}")


async def test_port_in_use_error_names_the_address():
    async with serving({}) as port:
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
            await serve_http(("127.0.0.1", port), {})


# --- Streaming ---


class _Chunks(StreamingBody):
    """Yields `chunks`, then raises `error` (if any) or ends; remembers being closed."""

    def __init__(self, chunks, error=None):
        self._chunks = list(chunks)
        self._error = error
        self.closed = False

    async def __anext__(self):
        await trio.lowlevel.checkpoint()
        if self._chunks:
            return self._chunks.pop(0)
        if self._error is not None:
            raise self._error
        raise StopAsyncIteration

    async def aclose(self):
        self.closed = True


async def test_streaming_responses_are_chunked_and_a_failing_one_does_not_stop_the_server():
    bodies = []

    async def stream(request):
        bodies.append(_Chunks([b"one\n", b"two\n"], RuntimeError("boom") if "fail" in request.query else None))
        return StreamingResponse(200, bodies[-1], "application/x-ndjson")

    async def fine(request):
        return Response(200, b"still serving\n")

    async with serving({"/stream": stream, "/fine": fine}) as port:
        whole = await raw_exchange(port, b"GET /stream HTTP/1.1\r\nhost: x\r\n\r\n")
        broken = await raw_exchange(port, b"GET /stream?fail=1 HTTP/1.1\r\nhost: x\r\n\r\n")
        assert await fetch_one(port, "/fine") == (200, "text/plain", "still serving\n")
    assert b"transfer-encoding: chunked" in whole.lower()
    assert whole.endswith(b"4\r\none\n\r\n4\r\ntwo\n\r\n0\r\n\r\n")  # ends with the last chunk
    assert b"4\r\ntwo\n\r\n" in broken and not broken.endswith(b"0\r\n\r\n")  # cut short, not ended
    assert all(body.closed for body in bodies)
