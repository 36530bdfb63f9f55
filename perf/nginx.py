"""nginx as the benchmark backend: a private config, pid and logs in a work directory.

Serves `/` (a small page) and `/big` (BIG_BYTES of random data) with keep-alive and no
access log, one worker, so the backend costs the same on every measured path.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from meshcore.testing.procs import ManagedProcess, ProcessError, start_process, wait_for_port

BIG_BYTES = 20_000_000
SMALL_BODY = b"<html><body>hello from the l4 benchmark backend</body></html>\n"

_CONFIG = """\
daemon off;
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nodelay on;
    # wrk keeps its connections for the whole run: never close them from this side.
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    client_body_temp_path {workdir}/tmp/body;
    proxy_temp_path {workdir}/tmp/proxy;
    fastcgi_temp_path {workdir}/tmp/fastcgi;
    uwsgi_temp_path {workdir}/tmp/uwsgi;
    scgi_temp_path {workdir}/tmp/scgi;
    default_type application/octet-stream;
    server {{
        {listen_directives}
        root {workdir}/www;
        location = / {{ try_files /index.html =404; }}
        location = /big {{ }}
    }}
}}
"""


def start_nginx(listen: list[tuple[str, int]], *, workdir: Path) -> ManagedProcess:
    """Start nginx serving `/` and `/big` on every address in `listen`; wait until it accepts."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    www = workdir / "www"
    www.mkdir(parents=True, exist_ok=True)
    (workdir / "tmp").mkdir(exist_ok=True)
    (www / "index.html").write_bytes(SMALL_BODY)
    (www / "big").write_bytes(os.urandom(BIG_BYTES))
    # nginx's worker drops to an unprivileged user: it must be able to read the files.
    for path in (workdir, www, www / "index.html", www / "big"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    config = workdir / "nginx.conf"
    config.write_text(
        _CONFIG.format(
            workdir=workdir,
            listen_directives=" ".join(f"listen {ip}:{port};" for ip, port in listen),
        )
    )
    process = start_process("nginx", [binary, "-c", config, "-p", workdir], log_dir=workdir)
    try:
        for ip, port in listen:
            wait_for_port(ip, port, process=process)
    except ProcessError:
        process.stop()
        raise
    return process
