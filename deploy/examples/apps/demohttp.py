"""What the demo apps share: a threaded JSON/HTML server and a JSON client, stdlib only.

Each app is one process listening on $PORT (default 9080). Upstreams are found the
Kubernetes way, through the `<SERVICE>_SERVICE_HOST` / `_PORT` variables the runtime sets.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# A response: status, content type, body.
Response = tuple[int, str, bytes]
POD = os.environ.get("HOSTNAME", "unknown")
UPSTREAM_TIMEOUT_SECONDS = 2.0


class UpstreamError(Exception):
    """An upstream service did not answer 200 in time; the message names it and says how."""


def service_url(service: str, path: str) -> str:
    """http://<VIP>:<port><path> for a Service of the pod's namespace."""
    prefix = service.upper().replace("-", "_")
    host = os.environ.get(f"{prefix}_SERVICE_HOST")
    if host is None:
        raise UpstreamError(f"{service}: no {prefix}_SERVICE_HOST in the environment (is the Service defined?)")
    return f"http://{host}:{os.environ.get(f'{prefix}_SERVICE_PORT', '9080')}{path}"


def fetch_json(service: str, path: str) -> dict:
    url = service_url(service, path)
    try:
        with urllib.request.urlopen(url, timeout=UPSTREAM_TIMEOUT_SECONDS) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        raise UpstreamError(f"{service}: {url} answered {exc.code}") from exc
    except (OSError, ValueError) as exc:
        raise UpstreamError(f"{service}: {url} failed: {exc}") from exc


def json_response(data: dict, status: int = 200) -> Response:
    return status, "application/json", json.dumps(data).encode()


def serve(name: str, handle: Callable[[str], Response]) -> None:
    """Serve GET requests with `handle(path)` until killed; one log line per request."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            try:
                status, content_type, body = handle(self.path)
            except Exception as exc:  # a demo bug must not take the server down
                status, content_type, body = 500, "text/plain", f"{name}: {exc}\n".encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            print(f"{name} {self.client_address[0]} {format % args}", file=sys.stderr, flush=True)

    port = int(os.environ.get("PORT", "9080"))
    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    server.daemon_threads = True
    print(f"{name} ({POD}) listening on :{port}", flush=True)
    server.serve_forever()
