"""Real processes for containers and node services, and stopping them again, also after a crash.

Each process runs in its own session (so it, and anything it forks, can be signalled as one
process group), inside a named network namespace via `ip netns exec` (which execs, so the
pid stays the process's own), with stdout and stderr appended to its log file.

Stopping is SIGTERM to the group, a grace period, then SIGKILL. After a crash the run
state holds a `ProcessRecord` per process; a pid is only signalled if the process's start
time (field 22 of /proc/PID/stat) is still the recorded one. That check identifies the very
process we started even though its command line changed when `ip netns exec` and
interpreter shims exec'ed, and it never matches an unrelated process that reused the pid.
Processes that outlived their recorded leader are found by the network namespace they
are in (`pids_in_netns`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import trio

DEFAULT_GRACE_SECONDS = 5.0


class ProcessStartError(Exception):
    """A process could not be started (program missing, bad working directory)."""


@dataclass(frozen=True, kw_only=True)
class ProcessSpec:
    """What to run and where."""

    name: str  # for logs and messages, e.g. "bookinfo/frontend-7c9f-x2kqz/frontend"
    argv: tuple[str, ...]
    env: Mapping[str, str]
    log_path: Path
    netns: str | None = None  # a named network namespace; None: the caller's
    cwd: Path | None = None


@dataclass(frozen=True, kw_only=True)
class ProcessRecord:
    """Enough to find a process again after a crash, and to be sure it is the same one."""

    name: str
    pid: int
    start_time: int  # clock ticks after boot, /proc/PID/stat field 22

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "pid": self.pid, "start_time": self.start_time}

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> ProcessRecord:
        return cls(name=str(data["name"]), pid=int(data["pid"]), start_time=int(data["start_time"]))  # type: ignore[call-overload]

    def is_alive(self) -> bool:
        """The recorded process (not a namesake that reused its pid) still exists."""
        return start_time_of(self.pid) == self.start_time


def start_time_of(pid: int) -> int | None:
    """When `pid` started (clock ticks after boot), or None if there is no such live process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] == "Z":  # exited, only waiting to be reaped
        return None
    return int(fields[19])  # field 22 of proc(5)


def record_of(name: str, pid: int) -> ProcessRecord:
    start_time = start_time_of(pid)
    return ProcessRecord(name=name, pid=pid, start_time=start_time if start_time is not None else -1)


async def run_process(
    spec: ProcessSpec,
    *,
    on_spawn: Callable[[ProcessRecord], None],
    grace: float = DEFAULT_GRACE_SECONDS,
    task_status: trio.TaskStatus[ProcessRecord] = trio.TASK_STATUS_IGNORED,
) -> int:
    """Run `spec` until it exits and return its exit status (negative: killed by that signal).

    `on_spawn` gets the record first (the caller writes it to the run state). Cancelling the
    caller stops the process: SIGTERM to its group, `grace` seconds, then SIGKILL.
    """
    argv = ["ip", "netns", "exec", spec.netns, *spec.argv] if spec.netns else list(spec.argv)
    spec.log_path.parent.mkdir(parents=True, exist_ok=True)
    with spec.log_path.open("ab") as log:
        try:
            process = await trio.lowlevel.open_process(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(spec.env),
                cwd=spec.cwd,
                start_new_session=True,
            )
        except OSError as exc:
            raise ProcessStartError(f"{spec.name}: cannot start {spec.argv[0]!r}: {exc}") from exc
    record = record_of(spec.name, process.pid)
    on_spawn(record)
    task_status.started(record)
    try:
        return await process.wait()
    finally:
        if process.returncode is None:
            with trio.CancelScope(shield=True):
                _signal_group(process.pid, signal.SIGTERM)
                with trio.move_on_after(grace):
                    await process.wait()
                if process.returncode is None:
                    _signal_group(process.pid, signal.SIGKILL)
                    await process.wait()


def terminate(records: Iterable[ProcessRecord], *, netns_paths: Iterable[Path], grace: float = DEFAULT_GRACE_SECONDS) -> list[int]:
    """Stop, from outside, the recorded processes that still live and every process inside
    the given network namespaces; return the pids that were signalled. Blocking."""
    groups = {record.pid: record for record in records if record.is_alive()}
    members = {pid: start for pid in pids_in_netns(netns_paths) if (start := start_time_of(pid)) is not None}
    for pid in groups:
        _signal_group(pid, signal.SIGTERM)
    for pid in members:
        _signal(pid, signal.SIGTERM)

    def survivors() -> list[int]:
        alive = [pid for pid, record in groups.items() if record.is_alive()]
        return alive + [pid for pid, start in members.items() if start_time_of(pid) == start and pid not in groups]

    deadline = time.monotonic() + grace
    while survivors() and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in survivors():
        if pid in groups:
            _signal_group(pid, signal.SIGKILL)
        else:
            _signal(pid, signal.SIGKILL)
    return sorted(set(groups) | set(members))


def pids_in_netns(netns_paths: Iterable[Path]) -> set[int]:
    """Every process whose network namespace is one of `netns_paths` (bind-mounted netns files)."""
    wanted = set()
    for path in netns_paths:
        try:
            info = path.stat()
        except FileNotFoundError:
            continue
        wanted.add((info.st_dev, info.st_ino))
    if not wanted:
        return set()
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            info = (entry / "ns" / "net").stat()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if (info.st_dev, info.st_ino) in wanted:
            found.add(int(entry.name))
    found.discard(os.getpid())
    return found


def _signal_group(pid: int, signum: int) -> None:
    # Each process leads its own session, so its process group id is its pid.
    try:
        os.killpg(pid, signum)
    except ProcessLookupError:
        pass


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass
