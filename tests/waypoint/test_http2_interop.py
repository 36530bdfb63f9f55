"""The waypoint's HTTP/2 server against real clients built on nghttp2 (curl, nghttp, h2load),
over loopback TCP: what users and the benchmark actually send, flow control included."""

from __future__ import annotations

import functools
import re
import shutil
import subprocess

import pytest
import trio

from waypoint.http2 import serve_http2
from waypoint.messages import BufferedBody, Request, Response
from waypoint.settings import HttpLimits

BIG = 3 * 1024 * 1024  # larger than the client's default windows: WINDOW_UPDATEs must flow


def needs(tool: str):
    return pytest.mark.skipif(shutil.which(tool) is None, reason=f"{tool} is not installed (scripts/setup.sh installs it)")


async def handler(request: Request, respond) -> None:
    received = 0
    while chunk := await request.body.read():
        received += len(chunk)
    if request.path == "/big":
        body = b"x" * BIG
    else:
        body = f"{request.method} {request.path} {received}\n".encode()
    await respond(Response(200, (("content-type", "text/plain"), ("content-length", str(len(body)))), BufferedBody(body)))


async def serving_and_run(*command: str) -> subprocess.CompletedProcess:
    """Serve HTTP/2 (prior knowledge) on a loopback port while `command` runs against it;
    `{url}` in an argument is the server's base URL."""
    async def serve(stream: trio.SocketStream) -> None:
        async with stream:
            await serve_http2(stream, handler, HttpLimits())

    async with trio.open_nursery() as nursery:
        (listener,) = await nursery.start(functools.partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
        port = listener.socket.getsockname()[1]
        argv = [arg.replace("{url}", f"http://127.0.0.1:{port}") for arg in command]
        with trio.fail_after(60):
            result = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
        nursery.cancel_scope.cancel()
    return result


@needs("curl")
async def test_curl_posts_a_body_and_downloads_more_than_a_window(tmp_path):
    upload = tmp_path / "upload"
    upload.write_bytes(b"y" * 200_000)
    posted = await serving_and_run("curl", "-sS", "--http2-prior-knowledge", "--data-binary", f"@{upload}", "{url}/echo")
    assert posted.returncode == 0, posted.stderr
    assert posted.stdout == b"POST /echo 200000\n"

    fetched = await serving_and_run(
        "curl", "-sS", "--http2-prior-knowledge", "-o", str(tmp_path / "big"), "-w", "%{http_version} %{http_code}", "{url}/big"
    )
    assert fetched.returncode == 0, fetched.stderr
    assert fetched.stdout == b"2 200"
    assert (tmp_path / "big").stat().st_size == BIG


@needs("nghttp")
async def test_nghttp_concurrent_streams_on_one_connection():
    result = await serving_and_run("nghttp", "-n", "-s", "-m", "20", "{url}/many")
    assert result.returncode == 0, result.stderr
    # one line of statistics per finished stream, each with the response's status
    assert len(re.findall(rb"\s200\s", result.stdout)) == 20, result.stdout.decode()


@needs("h2load")
async def test_h2load_multiplexed_load_all_succeeds():
    result = await serving_and_run("h2load", "-n", "2000", "-c", "4", "-m", "10", "{url}/load")
    assert result.returncode == 0, result.stderr
    assert b"2000 succeeded, 0 failed, 0 errored" in result.stdout, result.stdout.decode()
