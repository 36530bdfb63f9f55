"""Helper processes for tests and benchmarks: start, wait until serving, measure, stop.

Blocking on purpose: these helpers run in pytest fixtures and in perf scripts, never inside
a component's trio run. Every child writes stdout and stderr to its own log file (a pipe
could fill up and stall it), and the tail of that file goes into every error, so a failed
start says why. Processes are stopped by pid: SIGTERM, a short grace period, then SIGKILL.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

# /proc/PID/stat counts CPU time in clock ticks.
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class ProcessError(Exception):
    """A helper process failed to start, exited early or did not become ready in time."""


@dataclass(frozen=True, kw_only=True)
class ManagedProcess:
    """A child process started by `start_process`, with its log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_tail(self, lines: int = 20) -> str:
        """The last `lines` lines the process wrote to stdout/stderr."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def check_running(self) -> None:
        """Raise ProcessError (with the log tail) if the process has exited."""
        code = self.popen.poll()
        if code is not None:
            raise ProcessError(
                f"{self.name} (pid {self.pid}) exited with status {code}; log {self.log_path}:\n"
                f"{self.log_tail()}"
            )

    def cpu_seconds(self) -> float:
        """User plus system CPU time the process has used so far."""
        return cpu_seconds(self.pid)

    def stop(self, *, grace: float = 5.0) -> int:
        """Stop the process (SIGTERM, then SIGKILL after `grace` seconds); return its status."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode

    def __enter__(self) -> ManagedProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def start_process(
    name: str,
    argv: Sequence[str | os.PathLike[str]],
    *,
    log_dir: Path,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> ManagedProcess:
    """Start `argv` with stdout and stderr going to `log_dir/<name>.log`."""
    log_path = log_dir / f"{name}.log"
    with log_path.open("wb") as log:
        try:
            popen = subprocess.Popen(
                [os.fspath(arg) for arg in argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=None if env is None else dict(env),
                # Out of the terminal's process group: Ctrl-C reaches only the caller, which
                # then stops its children in order instead of having them die under it.
                start_new_session=True,
            )
        except OSError as exc:
            raise ProcessError(f"{name}: cannot start {argv[0]}: {exc}") from exc
    return ManagedProcess(name=name, popen=popen, log_path=log_path)


def wait_for_port(
    host: str, port: int, *, timeout: float = 10.0, process: ManagedProcess | None = None
) -> None:
    """Wait until a TCP connect to host:port succeeds; fail early if `process` exits."""
    deadline = time.monotonic() + timeout
    while True:
        if process is not None:
            process.check_running()
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError as exc:
            if time.monotonic() > deadline:
                raise ProcessError(
                    f"nothing accepted connections on {host}:{port} within {timeout:g}s "
                    f"({exc}){_log_hint(process)}"
                ) from exc
        time.sleep(0.02)


def wait_for_http_ok(
    url: str, *, timeout: float = 10.0, process: ManagedProcess | None = None
) -> bytes:
    """Wait until GET `url` answers 200; return the body. Fail early if `process` exits."""
    deadline = time.monotonic() + timeout
    last_problem = "no attempt"
    while True:
        if process is not None:
            process.check_running()
        try:
            with urllib.request.urlopen(url, timeout=1.0) as response:
                return response.read()
        except urllib.error.HTTPError as exc:
            last_problem = f"status {exc.code}"
        except OSError as exc:
            last_problem = str(exc)
        if time.monotonic() > deadline:
            raise ProcessError(
                f"GET {url} did not answer 200 within {timeout:g}s (last: {last_problem})"
                f"{_log_hint(process)}"
            )
        time.sleep(0.02)


def http_get(url: str, *, timeout: float = 5.0) -> str:
    """GET `url` and return the body as text; raises urllib's errors on failure."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` (all its threads) from /proc/PID/stat, in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / _CLOCK_TICKS


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on `host` a moment ago (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


# --- SOCKS5 ---

_SOCKS5_REPLIES = {
    1: "general failure",
    2: "connection not allowed by ruleset",
    3: "network unreachable",
    4: "host unreachable",
    5: "connection refused",
    6: "TTL expired",
    7: "command not supported",
    8: "address type not supported",
}


class Socks5Error(Exception):
    """The SOCKS5 proxy refused or failed the CONNECT; `reply` is the RFC 1928 reply code."""

    def __init__(self, message: str, *, reply: int | None = None) -> None:
        super().__init__(message)
        self.reply = reply


def socks5_connect(
    proxy: tuple[str, int],
    target: tuple[str, int],
    *,
    source_ip: str | None = None,
    timeout: float = 5.0,
) -> socket.socket:
    """Open a TCP connection to `target` (an IPv4 address) through a SOCKS5 proxy.

    `source_ip` binds the client side first: a ztunnel picks the source workload by the
    client's IP. Returns the connected socket, ready for payload.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        if source_ip is not None:
            sock.bind((source_ip, 0))
        sock.connect(proxy)
        sock.sendall(b"\x05\x01\x00")  # version 5, one method: no authentication
        if _recv_exactly(sock, 2, proxy) != b"\x05\x00":
            raise Socks5Error(f"SOCKS5 proxy {proxy[0]}:{proxy[1]} refused method 'no auth'")
        ip, port = target
        sock.sendall(b"\x05\x01\x00\x01" + socket.inet_aton(ip) + struct.pack("!H", port))
        version, reply, _, address_type = _recv_exactly(sock, 4, proxy)
        if version != 5 or reply != 0:
            reason = _SOCKS5_REPLIES.get(reply, f"reply {reply}")
            raise Socks5Error(
                f"SOCKS5 CONNECT {ip}:{port} via {proxy[0]}:{proxy[1]} failed: {reason}",
                reply=reply,
            )
        bound_length = {1: 4, 4: 16}.get(address_type)
        if bound_length is None:  # a domain name: one length byte first
            bound_length = _recv_exactly(sock, 1, proxy)[0]
        _recv_exactly(sock, bound_length + 2, proxy)
        sock.settimeout(None)
        return sock
    except BaseException:
        sock.close()
        raise


def _recv_exactly(sock: socket.socket, size: int, proxy: tuple[str, int]) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise Socks5Error(f"SOCKS5 proxy {proxy[0]}:{proxy[1]} closed the connection")
        data += chunk
    return data


def _log_hint(process: ManagedProcess | None) -> str:
    if process is None:
        return ""
    return f"; {process.name} log {process.log_path}:\n{process.log_tail()}"
