"""An HTTP backend whose health a test switches at run time (stdlib only).

Every request is answered with the pod's name (`$HOSTNAME`), after the configured delay;
while failing, with 500. `/sleep?ms=N` answers after N ms whatever the mode. The mode is set
with `PUT /control?fail=0|1&delay_ms=N`, sent straight to the pod (not through the Service)
so that it reaches this replica and no other; it answers the mode now in force.
"""

from __future__ import annotations

import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

PORT = int(os.environ.get("PORT", "8080"))
NAME = os.environ.get("HOSTNAME", "unknown")


class Mode:
    """What the next requests get; changed by /control from any handler thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.failing = False
        self.delay = 0.0

    def set(self, query: dict[str, list[str]]) -> dict[str, object]:
        with self._lock:
            if "fail" in query:
                self.failing = query["fail"][0] == "1"
            if "delay_ms" in query:
                self.delay = int(query["delay_ms"][0]) / 1000.0
            return {"failing": self.failing, "delay_ms": round(self.delay * 1000)}


MODE = Mode()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def answer(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        if url.path == "/control":
            self.send(200, json.dumps(MODE.set(query)).encode())
        elif url.path == "/sleep":
            time.sleep(int(query.get("ms", ["0"])[0]) / 1000.0)
            self.send(200, NAME.encode())
        else:
            time.sleep(MODE.delay)
            self.send(500 if MODE.failing else 200, NAME.encode())

    def send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # one line per request would drown the pod log under load

    do_GET = do_POST = do_PUT = answer


ThreadingHTTPServer(("0.0.0.0", PORT), Handler).serve_forever()
