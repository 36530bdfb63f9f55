"""Wake-ups when files under a directory tree are written, moved or removed (Linux inotify).

    watcher = DirectoryWatcher.open()          # None where inotify is unavailable
    if watcher.watch_tree(directories): ...    # after each scan: the folders that exist now
    await watcher.wait_changed()               # returns once something was written

Only a signal: callers rescan to learn what changed, so a lost or overflowed queue costs
nothing but the wait (the files source still polls as a fallback). Events come on close
after writing, on renames and on deletes, not on every `write()`: a file rewritten in place
is read once it is closed, not half-written.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from collections.abc import Iterable
from pathlib import Path

import trio

from meshcore.log import get_logger

_IN_CLOSE_WRITE = 0x00000008
_IN_MOVED_FROM = 0x00000040
_IN_MOVED_TO = 0x00000080
_IN_CREATE = 0x00000100  # new sub-folders (files are announced by IN_CLOSE_WRITE)
_IN_DELETE = 0x00000200
_IN_DELETE_SELF = 0x00000400
_IN_MOVE_SELF = 0x00000800
_IN_ONLYDIR = 0x01000000
_IN_NONBLOCK = 0o4000
_IN_CLOEXEC = 0o2000000
_MASK = (
    _IN_CLOSE_WRITE | _IN_MOVED_FROM | _IN_MOVED_TO | _IN_CREATE | _IN_DELETE
    | _IN_DELETE_SELF | _IN_MOVE_SELF | _IN_ONLYDIR
)

_log = get_logger("sources.inotify")


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    libc = ctypes.CDLL(name, use_errno=True)
    if not hasattr(libc, "inotify_init1"):
        return None
    libc.inotify_add_watch.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32)
    libc.inotify_rm_watch.argtypes = (ctypes.c_int, ctypes.c_int)
    return libc


class DirectoryWatcher:
    """One inotify instance watching a set of folders (not recursive by itself: callers pass
    every folder of the tree to `watch_tree`)."""

    def __init__(self, libc: ctypes.CDLL, fd: int) -> None:
        self._libc = libc
        self._fd = fd
        self._watched: dict[Path, int] = {}

    @classmethod
    def open(cls) -> DirectoryWatcher | None:
        libc = _libc()
        if libc is None:
            return None
        fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            _log.warning("inotify unavailable; polling only", error=os.strerror(ctypes.get_errno()))
            return None
        return cls(libc, fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def watch_tree(self, directories: Iterable[Path]) -> bool:
        """Watch exactly `directories` from now on (new ones added, vanished ones dropped).

        True when a folder was added: a file written in it before its watch existed was
        announced to nobody, so the caller scans once more."""
        added = False
        wanted = set(directories)
        for directory in [d for d in self._watched if d not in wanted]:
            # The kernel may already have dropped it (the folder was removed): EINVAL is fine.
            self._libc.inotify_rm_watch(self._fd, self._watched.pop(directory))
        for directory in wanted - self._watched.keys():
            descriptor = self._libc.inotify_add_watch(self._fd, os.fsencode(directory), _MASK)
            if descriptor < 0:
                code = ctypes.get_errno()
                if code != errno.ENOENT:  # removed since the scan: the next scan forgets it
                    # ENOSPC: fs.inotify.max_user_watches reached; this folder is polled only.
                    _log.warning("cannot watch folder; it is polled only", folder=str(directory), error=os.strerror(code))
                continue
            self._watched[directory] = descriptor
            added = True
        return added

    async def wait_changed(self) -> None:
        """Return once at least one event arrived; consumes every event queued by then."""
        while True:
            await trio.lowlevel.wait_readable(self._fd)
            if self._drain():
                return

    def _drain(self) -> bool:
        got = False
        while True:
            try:
                chunk = os.read(self._fd, 64 * 1024)
            except BlockingIOError:
                return got
            if not chunk:
                return got
            got = True
