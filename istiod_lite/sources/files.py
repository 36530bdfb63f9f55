"""The `files` source: a directory of Kubernetes YAML, watched by polling.

Every `*.yaml` / `*.yml` file under the directory (recursively; names starting with "." are
skipped, as editors and atomic writers use them for temporary files) may hold several
documents separated by `---`, each one Kubernetes object, as `kubectl apply -f DIR` reads
them. Objects of kinds outside `KINDS` are ignored (logged at debug level).

Change detection: every `poll_interval` seconds each file's (mtime, size, inode) is compared
with the last scan; only changed files are re-read. The objects of all files are merged
(the first definition of a kind/namespace/name in path order wins; a later one is reported)
and diffed by (kind, namespace, name) and content against what was last emitted, so an
edit produces exactly the upserts and deletes it implies.

Bad input: a document that is not valid YAML or not an object with `kind`, `apiVersion` and
`metadata.name` is logged with its file and document index, counted, and listed by
`problems()` until its file changes. The file's other documents still load, and nothing
that file defined before is deleted while it has problems: a half-finished edit never
removes live configuration.

Namespaced kinds without `metadata.namespace` are in "default"; emitted objects carry the
namespace (and cluster-scoped ones none), as the API server would store them.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import prometheus_client
import trio
import yaml

from istiod_lite.sources.base import KINDS, ObjectEvent, SourceEvent, SyncComplete
from meshcore.log import get_logger

POLL_INTERVAL = 0.5  # seconds; the reaction time of `ambientctl apply`

_SUFFIXES = (".yaml", ".yml")
# Coarser than any filesystem's timestamp granularity we expect (ext4: ~4 ms; FAT: 2 s).
_RACY_WINDOW_NS = 2_000_000_000

_log = get_logger("sources.files")

_Key = tuple[str, str, str]  # kind, namespace, name
_Signature = tuple[int, int, int]  # mtime_ns, size, inode


class FilesSourceError(Exception):
    """The configuration directory cannot be used at all (it does not exist)."""


class _InvalidDocument(Exception):
    """A YAML document that is not a usable Kubernetes object; the message says why."""


# libyaml's parser when PyYAML has it: 8x faster than the pure-Python one on large files.
_BaseLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Loader(_BaseLoader):  # type: ignore[misc, valid-type]
    """SafeLoader that keeps timestamps as strings, as Kubernetes' YAML-to-JSON does, so
    objects from files are plain JSON values like the API server's."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


@dataclass(frozen=True, slots=True)
class FileProblem:
    """Part of a file the source could not use; listed until the file changes."""

    path: Path
    document_index: int | None  # 0-based position of the YAML document; None: the whole file
    message: str

    def __str__(self) -> str:
        where = "" if self.document_index is None else f" document {self.document_index}"
        return f"{self.path}{where}: {self.message}"


@dataclass(slots=True)
class _Document:
    index: int
    obj: Mapping[str, Any]


@dataclass(slots=True)
class _FileState:
    signature: _Signature
    # Modified within a timestamp tick of being read: a later write may leave mtime and
    # size unchanged (git's "racy clean" problem), so the file is re-read until it is older.
    racy: bool
    digest: bytes
    data: bytes
    objects: dict[_Key, _Document] = field(default_factory=dict)
    problems: list[FileProblem] = field(default_factory=list)


class FilesSource:
    """Kubernetes objects from the YAML files under `directory`, re-read when they change."""

    def __init__(
        self,
        directory: Path,
        *,
        registry: prometheus_client.CollectorRegistry | None = None,
        poll_interval: float = POLL_INTERVAL,
    ) -> None:
        """`registry` None: a private one (tests); `poll_interval`: tests shorten it."""
        self._directory = Path(directory)
        self._poll_interval = poll_interval
        self._rejected = prometheus_client.Counter(
            "istiod_lite_files_rejected",
            "YAML documents or files the files source could not load "
            "(the previous objects of that file keep serving)",
            registry=registry if registry is not None else prometheus_client.CollectorRegistry(),
        )
        self._files: dict[Path, _FileState] = {}
        self._emitted: dict[_Key, Mapping[str, Any]] = {}
        self._merge_problems: list[FileProblem] = []
        self._directory_problem: FileProblem | None = None
        # Published whole at the end of each scan: `problems()` runs on the event loop while
        # the scan mutates the state above in a worker thread.
        self._problems: tuple[FileProblem, ...] = ()

    def problems(self) -> list[FileProblem]:
        """What could not be loaded at the last scan, in path order."""
        return list(self._problems)

    async def run(
        self,
        send_channel: trio.MemorySendChannel[SourceEvent],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Send every object, then SyncComplete, then the changes; raises FilesSourceError
        (before reporting started) if the directory does not exist."""
        if not self._directory.is_dir():
            raise FilesSourceError(f"config directory {self._directory} does not exist")
        task_status.started()
        first = True
        while True:
            # Reading and parsing in a worker thread keeps a large directory from stalling
            # the controller's event loop; this task is the only one touching the state.
            for event in await trio.to_thread.run_sync(self._poll):
                await send_channel.send(event)
            if first:
                await send_channel.send(SyncComplete())
                first = False
            await trio.sleep(self._poll_interval)

    # --- scanning (worker thread) ---

    def _poll(self) -> list[ObjectEvent]:
        try:
            found = dict(_scan(self._directory))
        except OSError as exc:
            # A vanished or unreadable directory is far more likely a mistake than a wish to
            # delete the whole mesh configuration: keep serving what was loaded.
            problem = FileProblem(self._directory, None, f"cannot list: {exc.strerror}")
            if problem != self._directory_problem:
                self._reject(problem)
            self._directory_problem = problem
            self._problems = (problem,)
            return []
        self._directory_problem = None

        changed = False
        for path in [p for p in self._files if p not in found]:
            del self._files[path]
            changed = True
        for path, signature in found.items():
            previous = self._files.get(path)
            if previous is not None and previous.signature == signature and not previous.racy:
                continue
            try:
                state = _read(path, signature)
            except FileNotFoundError:
                continue  # removed since the scan: the next scan deletes its objects
            except OSError as exc:  # permissions, I/O errors: a problem of this file only
                problem = FileProblem(path, None, f"cannot read: {exc.strerror}")
                state = _FileState(signature, True, b"", b"", problems=[problem])
            if previous is not None and previous.digest == state.digest:
                previous.signature, previous.racy = state.signature, state.racy
                continue
            self._files[path] = self._load(path, state, previous)
            changed = True
        events: list[ObjectEvent] = []
        if changed:
            merged, merge_problems = self._merge()
            for problem in merge_problems:
                if problem not in self._merge_problems:
                    self._reject(problem)
            self._merge_problems = merge_problems
            events = _diff(self._emitted, merged)
            self._emitted = merged
        if events:
            upserts = sum(1 for e in events if e.action == "upsert")
            _log.info(
                "config directory changed",
                directory=str(self._directory),
                upserts=upserts,
                deletes=len(events) - upserts,
            )
        file_problems = [p for path in sorted(self._files) for p in self._files[path].problems]
        self._problems = (*file_problems, *self._merge_problems)
        return events

    def _load(self, path: Path, state: _FileState, previous: _FileState | None) -> _FileState:
        if not state.problems:
            try:
                text = state.data.decode("utf-8")
            except UnicodeDecodeError as exc:
                state.problems = [FileProblem(path, None, f"not UTF-8 text ({exc.reason})")]
            else:
                state.objects, state.problems = _parse(path, text)
        for problem in state.problems:
            self._reject(problem)
        if state.problems and previous is not None:
            # Keep what the file defined until it loads cleanly again; new or changed
            # documents that are valid still take effect.
            state.objects = {**previous.objects, **state.objects}
        state.data = b""  # parsed: only the digest is needed from now on
        return state

    def _merge(self) -> tuple[dict[_Key, Mapping[str, Any]], list[FileProblem]]:
        merged: dict[_Key, Mapping[str, Any]] = {}
        defined_in: dict[_Key, Path] = {}
        problems = []
        for path in sorted(self._files):
            for key, document in self._files[path].objects.items():
                first = defined_in.setdefault(key, path)
                if first != path:
                    message = f"{_describe(key)} is also defined in {first}; ignored here"
                    problems.append(FileProblem(path, document.index, message))
                    continue
                merged[key] = document.obj
        return merged, problems

    def _reject(self, problem: FileProblem) -> None:
        self._rejected.inc()
        _log.warning(
            "config rejected; the previous objects of this file keep serving",
            file=str(problem.path),
            document_index=problem.document_index,
            error=problem.message,
        )


def _scan(directory: Path) -> Iterator[tuple[Path, _Signature]]:
    for root, dirs, files in os.walk(directory, onerror=_raise):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith(".") or not name.endswith(_SUFFIXES):
                continue
            path = Path(root, name)
            try:
                st = path.stat()
            except FileNotFoundError:
                continue  # removed between listing and stat: it is gone
            yield path, (st.st_mtime_ns, st.st_size, st.st_ino)


def _raise(error: OSError) -> None:
    raise error


def _read(path: Path, signature: _Signature) -> _FileState:
    read_ns = time.time_ns()
    data = path.read_bytes()
    racy = signature[0] >= read_ns - _RACY_WINDOW_NS
    return _FileState(signature, racy, hashlib.sha256(data).digest(), data)


# --- parsing (pure) ---


def _parse(path: Path, text: str) -> tuple[dict[_Key, _Document], list[FileProblem]]:
    """The objects of known kinds in one file's text, and the documents that were unusable."""
    objects: dict[_Key, _Document] = {}
    problems: list[FileProblem] = []
    index = 0
    documents = yaml.load_all(text, Loader=_Loader)  # noqa: S506 - a SafeLoader
    while True:
        try:
            document = next(documents)
        except StopIteration:
            break
        except yaml.YAMLError as exc:
            # The parser cannot resynchronise after a syntax error: the rest is lost too.
            problems.append(FileProblem(path, index, f"not valid YAML: {_one_line(exc)}"))
            break
        except RecursionError:
            problems.append(FileProblem(path, index, "not valid YAML: nested too deeply"))
            break
        if document is not None:  # an empty document, e.g. a trailing "---"
            try:
                parsed = _object(document)
            except _InvalidDocument as exc:
                problems.append(FileProblem(path, index, str(exc)))
            else:
                if parsed is not None:
                    key, obj = parsed
                    if key in objects:
                        first = objects[key].index
                        message = f"{_describe(key)} is also document {first}; ignored here"
                        problems.append(FileProblem(path, index, message))
                    else:
                        objects[key] = _Document(index, obj)
        index += 1
    return objects, problems


def _object(document: Any) -> tuple[_Key, Mapping[str, Any]] | None:
    """(key, normalized object) of one document; None for kinds we do not watch."""
    if not isinstance(document, Mapping):
        got = type(document).__name__
        raise _InvalidDocument(f"expected a Kubernetes object (a mapping), got {got}")
    kind = document.get("kind")
    api_version = document.get("apiVersion")
    if not isinstance(kind, str) or not kind:
        raise _InvalidDocument("kind: required (a string)")
    if not isinstance(api_version, str) or not api_version:
        raise _InvalidDocument(f"{kind}: apiVersion: required (a string)")
    info = KINDS.get(kind)
    group, _, _ = api_version.rpartition("/")
    # Versions of one group share a schema (security.istio.io v1beta1 and v1): accept any.
    if info is None or group != info.group:
        _log.debug("ignoring object of an unwatched kind", kind=kind, api_version=api_version)
        return None
    metadata = document.get("metadata")
    if not isinstance(metadata, Mapping):
        raise _InvalidDocument(f"{kind}: metadata: required (a mapping with a name)")
    name = metadata.get("name")
    if not isinstance(name, str) or not name:
        raise _InvalidDocument(f"{kind}: metadata.name: required (a non-empty string)")
    metadata = dict(metadata)
    if info.namespaced:
        namespace = metadata.get("namespace") or "default"
        if not isinstance(namespace, str):
            message = f"metadata.namespace: expected a string, got {namespace!r}"
            raise _InvalidDocument(f"{kind} {name}: {message}")
        metadata["namespace"] = namespace
    else:
        namespace = ""
        metadata.pop("namespace", None)
    return (kind, namespace, name), {**document, "metadata": metadata}


def _diff(
    before: Mapping[_Key, Mapping[str, Any]], after: Mapping[_Key, Mapping[str, Any]]
) -> list[ObjectEvent]:
    # Objects of unchanged files are the very same dicts: `is` skips comparing them.
    events = [
        ObjectEvent(key[0], "upsert", key[1], key[2], obj)
        for key, obj in after.items()
        if (previous := before.get(key)) is not obj and previous != obj
    ]
    events += [
        ObjectEvent(key[0], "delete", key[1], key[2], None) for key in before if key not in after
    ]
    return events


def _describe(key: _Key) -> str:
    kind, namespace, name = key
    return f"{kind} {namespace}/{name}" if namespace else f"{kind} {name}"


def _one_line(exc: yaml.YAMLError) -> str:
    return " ".join(str(exc).split())
