"""ztunnel/inpod/netns: open network namespaces and make sockets inside them.

A socket belongs to the network namespace of the thread that created it and stays there
for its whole life, whatever that thread does next. So ztunnel (like istio/ztunnel
src/inpod/netns.rs) makes a pod's sockets by switching one thread into the pod's netns
with setns(fd, CLONE_NEWNET), creating the socket, and switching back. The listeners and
outbound sockets then work from any thread, trio's included.

The switching happens only on this module's own worker threads, never on trio's thread
or trio's shared thread cache: a thread stranded in a pod's netns (switching back failed)
must not run anyone else's code. Such a worker is retired with its pool.

Calls block the caller until the worker is done. Making a socket takes microseconds, so
trio code calls `listen_in_netns` / `connect_socket_in_netns` directly; slow work
(running `nft`) goes through `trio.to_thread.run_sync(in_netns, ...)`.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from meshcore import netio

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
# ioctl(NS_GET_NSTYPE) = _IO(0xb7, 0x3): which kind of namespace an nsfs fd refers to.
_NS_GET_NSTYPE = 0xB703
# A few workers, so that a slow call (nft in one pod) does not hold up socket creation.
_WORKERS = 4


class NetnsError(Exception):
    """A network namespace could not be opened, entered or left."""


def open_netns(path: str | os.PathLike[str]) -> int:
    """Open a netns (`/var/run/netns/NAME`, `/proc/PID/ns/net`) and return an fd the caller owns."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise NetnsError(f"cannot open network namespace {path}: {exc.strerror}") from exc
    try:
        kind = fcntl.ioctl(fd, _NS_GET_NSTYPE)
    except OSError as exc:
        os.close(fd)
        raise NetnsError(f"{path} is not a namespace file: {exc.strerror}") from exc
    if kind != CLONE_NEWNET:
        os.close(fd)
        raise NetnsError(f"{path} is a namespace, but not a network namespace")
    return fd


def in_netns(fd: int, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
    """Run `fn(*args, **kwargs)` inside the netns `fd` on a netns worker thread; blocks until done.

    Processes started by `fn` (subprocess) are born in that netns too.
    """
    return _pool.run(fd, fn, args, kwargs)


def listen_in_netns(
    fd: int, address: tuple[str, int], *, mark: int = netio.MESH_MARK, transparent: bool = False
) -> socket.socket:
    """A non-blocking TCP listener bound inside the netns `fd`, carrying SO_MARK `mark`.

    SO_REUSEPORT is set, as ztunnel does by default (INPOD_PORT_REUSE), so that a new
    ztunnel can bind a pod's ports while the old one still drains.
    """
    return in_netns(fd, _listen, address, mark, transparent)


def connect_socket_in_netns(
    fd: int, family: socket.AddressFamily = socket.AF_INET, *, mark: int = netio.MESH_MARK
) -> socket.socket:
    """An unconnected, non-blocking, tuned TCP socket inside the netns `fd`, carrying SO_MARK
    `mark`: connections made with it leave with the pod's own address and skip capture."""
    return in_netns(fd, _outbound_socket, family, mark)


def _listen(address: tuple[str, int], mark: int, transparent: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        netio.set_mark(sock, mark)
        if transparent:
            sock.setsockopt(socket.SOL_IP, socket.IP_TRANSPARENT, 1)
        sock.bind(address)
        sock.listen(1024)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _outbound_socket(family: socket.AddressFamily, mark: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        netio.set_mark(sock, mark)
        netio.tune(sock)
    except BaseException:
        sock.close()
        raise
    return sock


# --- The netns worker threads ---


_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if hasattr(os, "setns"):  # Python 3.12+
        os.setns(fd, CLONE_NEWNET)
        return
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


class _NetnsPool:
    """Worker threads that enter a netns per call and always try to come back home."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._home_fd: int | None = None

    def run(self, fd: int, fn: Callable[..., T], args: tuple, kwargs: dict) -> T:
        with self._lock:
            if self._home_fd is None:
                # /proc/self is the thread-group leader: the process's own netns, not a worker's.
                self._home_fd = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=_WORKERS, thread_name_prefix="netns")
            executor = self._executor
        return executor.submit(self._switched, executor, fd, fn, args, kwargs).result()

    def _switched(self, executor: ThreadPoolExecutor, fd: int, fn: Callable[..., T], args: tuple, kwargs: dict) -> T:
        assert self._home_fd is not None
        try:
            _setns(fd)
        except OSError as exc:
            hint = " (needs CAP_SYS_ADMIN)" if exc.errno == errno.EPERM else ""
            raise NetnsError(f"cannot enter network namespace (fd {fd}): {exc.strerror}{hint}") from exc
        try:
            return fn(*args, **kwargs)
        finally:
            try:
                _setns(self._home_fd)
            except OSError as exc:
                self._retire(executor)
                raise NetnsError(f"cannot return a worker thread to its own network namespace: {exc.strerror}") from exc

    def _retire(self, executor: ThreadPoolExecutor) -> None:
        """A stranded worker must never run another call: the pool goes, the next call makes a new one."""
        with self._lock:
            if self._executor is executor:
                self._executor = None
        executor.shutdown(wait=False)


_pool = _NetnsPool()
