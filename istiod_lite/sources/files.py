"""The `files` source: a directory of Kubernetes YAML, watched with inotify and by polling.

Every `*.yaml` / `*.yml` file under the directory (recursively; names starting with "." are
skipped, as editors and atomic writers use them for temporary files) may hold several
documents separated by `---`, each one Kubernetes object, as `kubectl apply -f DIR` reads
them. Objects of kinds outside `KINDS` are ignored (logged at debug level).

Change detection: a scan compares each file's (mtime, size, inode) with the last scan and
re-reads only changed files. Scans run when inotify reports a write, rename or delete under
the directory (within milliseconds), and every `poll_interval` seconds regardless (inotify may
be unavailable or out of watches). Within a changed file only the documents whose text
changed are parsed again. The objects of all files are merged (the first definition of a
kind/namespace/name in path order wins; a later one is reported) and diffed by (kind,
namespace, name) and content against what was last emitted, for the keys of changed files
only, so an edit produces exactly the upserts and deletes it implies at a cost proportional
to the files it touched.

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
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import prometheus_client
import trio
import yaml

from istiod_lite.sources.base import KINDS, ObjectEvent, SourceEvent, SyncComplete
from istiod_lite.sources.inotify import DirectoryWatcher
from meshcore.log import get_logger

POLL_INTERVAL = 0.5  # seconds; the reaction time when inotify says nothing

_SUFFIXES = (".yaml", ".yml")
# Coarser than any filesystem's timestamp granularity we expect (ext4: ~4 ms; FAT: 2 s).
_RACY_WINDOW_NS = 2_000_000_000

_log = get_logger("sources.files")

_Key = tuple[str, str, str]  # kind, namespace, name
_Signature = tuple[int, int, int]  # mtime_ns, size, inode

# Where a new YAML document starts: "---" at the start of a line. libyaml treats such a line
# as a document marker wherever it appears, so splitting there matches its own parse.
_DOCUMENT_START = re.compile(r"^---(?=[ \t\r\n]|$)", re.MULTILINE)
# Directives ("%YAML") and document ends ("...") tie documents together: parse whole files.
_NOT_SPLITTABLE = re.compile(r"^(?:%|\.\.\.(?:[ \t\r\n]|$))", re.MULTILINE)


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


# What one document's text turned into: (key, object), None (a kind we do not watch, or an
# empty document) or the reason it is unusable.
_Outcome = tuple[_Key, Mapping[str, Any]] | str | None


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
    # Each document's text -> what it parsed to, so an edit re-parses only what it changed.
    parsed: dict[str, list[_Outcome]] = field(default_factory=dict)


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
        # key -> the files defining it, in path order: the first one's definition wins.
        self._defined_in: dict[_Key, list[Path]] = {}
        self._merge_problems: dict[_Key, list[FileProblem]] = {}
        self._directories: list[Path] = []
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
        watcher = DirectoryWatcher.open()
        try:
            first = True
            while True:
                # Reading and parsing in a worker thread keeps a large directory from stalling
                # the controller's event loop; this task is the only one touching the state.
                for event in await trio.to_thread.run_sync(self._poll):
                    await send_channel.send(event)
                if first:
                    await send_channel.send(SyncComplete())
                    first = False
                if watcher is None:
                    await trio.sleep(self._poll_interval)
                # A folder watched only now may have been written to before: scan it at once.
                elif not watcher.watch_tree(self._directories):
                    with trio.move_on_after(self._poll_interval):
                        await watcher.wait_changed()
        finally:
            if watcher is not None:
                watcher.close()

    # --- scanning (worker thread) ---

    def _poll(self) -> list[ObjectEvent]:
        try:
            directories: list[Path] = []
            found = dict(_scan(self._directory, directories))
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
        self._directories = directories

        # path -> its objects before this scan, for every file added, changed or removed.
        changed: dict[Path, dict[_Key, _Document]] = {}
        for path in [p for p in self._files if p not in found]:
            changed[path] = self._files.pop(path).objects
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
            changed[path] = previous.objects if previous is not None else {}
        events = self._merge(changed) if changed else []
        if events:
            upserts = sum(1 for e in events if e.action == "upsert")
            _log.info(
                "config directory changed",
                directory=str(self._directory),
                upserts=upserts,
                deletes=len(events) - upserts,
            )
        file_problems = [p for path in sorted(self._files) for p in self._files[path].problems]
        merge_problems = sorted(
            (p for problems in self._merge_problems.values() for p in problems),
            key=lambda p: (p.path, p.document_index or 0),
        )
        self._problems = (*file_problems, *merge_problems)
        return events

    def _load(self, path: Path, state: _FileState, previous: _FileState | None) -> _FileState:
        if not state.problems:
            try:
                text = state.data.decode("utf-8")
            except UnicodeDecodeError as exc:
                state.problems = [FileProblem(path, None, f"not UTF-8 text ({exc.reason})")]
            else:
                cache = previous.parsed if previous is not None else {}
                state.objects, state.problems, state.parsed = _parse(path, text, cache)
        for problem in state.problems:
            self._reject(problem)
        if state.problems and previous is not None:
            # Keep what the file defined until it loads cleanly again; new or changed
            # documents that are valid still take effect.
            state.objects = {**previous.objects, **state.objects}
        state.data = b""  # parsed: only the digest is needed from now on
        return state

    def _merge(self, changed: Mapping[Path, Mapping[_Key, _Document]]) -> list[ObjectEvent]:
        """Events for the keys that the `changed` files (path -> objects before) define or
        defined; updates what was emitted and the duplicate-definition problems."""
        affected: set[_Key] = set()
        for path, before in changed.items():
            state = self._files.get(path)
            after = state.objects if state is not None else {}
            for key in before.keys() - after.keys():
                paths = self._defined_in[key]
                paths.remove(path)
                if not paths:
                    del self._defined_in[key]
            for key in after.keys() - before.keys():
                paths = self._defined_in.setdefault(key, [])
                paths.append(path)
                paths.sort()
            affected.update(before.keys(), after.keys())
        upserts: list[tuple[Path, int, ObjectEvent]] = []
        deletes: list[ObjectEvent] = []
        for key in affected:
            paths = self._defined_in.get(key)
            previous = self._emitted.get(key)
            if not paths:
                self._merge_problems.pop(key, None)
                if previous is not None:
                    del self._emitted[key]
                    deletes.append(ObjectEvent(key[0], "delete", key[1], key[2], None))
                continue
            first = paths[0]
            problems = [
                FileProblem(path, self._files[path].objects[key].index, f"{_describe(key)} is also defined in {first}; ignored here")
                for path in paths[1:]
            ]
            known = self._merge_problems.get(key, [])
            for problem in problems:
                if problem not in known:
                    self._reject(problem)
            if problems:
                self._merge_problems[key] = problems
            else:
                self._merge_problems.pop(key, None)
            document = self._files[first].objects[key]
            # Unchanged documents keep their very dicts (see _parse): `is` skips comparing them.
            if previous is not document.obj and previous != document.obj:
                upserts.append((first, document.index, ObjectEvent(key[0], "upsert", key[1], key[2], document.obj)))
            self._emitted[key] = document.obj
        # Upserts in file and document order (a Namespace listed before its Pods stays so),
        # then deletes: a renamed object is never briefly missing.
        upserts.sort(key=lambda item: (item[0], item[1]))
        return [event for _, _, event in upserts] + sorted(deletes, key=lambda event: event.key)

    def _reject(self, problem: FileProblem) -> None:
        self._rejected.inc()
        _log.warning(
            "config rejected; the previous objects of this file keep serving",
            file=str(problem.path),
            document_index=problem.document_index,
            error=problem.message,
        )


def _scan(directory: Path, directories: list[Path]) -> Iterator[tuple[Path, _Signature]]:
    """The YAML files under `directory`; appends every folder walked to `directories`."""
    for root, dirs, files in os.walk(directory, onerror=_raise):
        directories.append(Path(root))
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


def _parse(
    path: Path, text: str, cache: Mapping[str, list[_Outcome]]
) -> tuple[dict[_Key, _Document], list[FileProblem], dict[str, list[_Outcome]]]:
    """The objects of known kinds in one file's text, the documents that were unusable, and
    the parse of each document's text for the next call (`cache` is the previous one's)."""
    parsed: dict[str, list[_Outcome]] = {}
    outcomes: list[_Outcome] = []
    failure: FileProblem | None = None
    if _NOT_SPLITTABLE.search(text):
        outcomes, failure = _parse_text(path, text, 0)
    else:
        starts = [match.start() for match in _DOCUMENT_START.finditer(text)]
        for begin, end in zip([0, *starts], [*starts, len(text)]):
            chunk = text[begin:end]
            if not chunk:
                continue
            known = cache.get(chunk)
            if known is None:
                known, failure = _parse_text(path, chunk, len(outcomes))
                if failure is not None:
                    outcomes += known
                    break  # the parser cannot resynchronise after a syntax error
            parsed[chunk] = known
            outcomes += known

    objects: dict[_Key, _Document] = {}
    problems: list[FileProblem] = []
    for index, outcome in enumerate(outcomes):
        if isinstance(outcome, str):
            problems.append(FileProblem(path, index, outcome))
        elif outcome is not None:
            key, obj = outcome
            if key in objects:
                first = objects[key].index
                message = f"{_describe(key)} is also document {first}; ignored here"
                problems.append(FileProblem(path, index, message))
            else:
                objects[key] = _Document(index, obj)
    if failure is not None:
        problems.append(failure)
    return objects, problems, parsed


def _parse_text(path: Path, text: str, first_index: int) -> tuple[list[_Outcome], FileProblem | None]:
    """Each document of `text` as an outcome, and the syntax error that ended it, if any
    (`first_index`: the position of the first document in the file, for the message)."""
    outcomes: list[_Outcome] = []
    documents = yaml.load_all(text, Loader=_Loader)  # noqa: S506 - a SafeLoader
    while True:
        index = first_index + len(outcomes)
        try:
            document = next(documents)
        except StopIteration:
            return outcomes, None
        except yaml.YAMLError as exc:
            return outcomes, FileProblem(path, index, f"not valid YAML: {_one_line(exc)}")
        except RecursionError:
            return outcomes, FileProblem(path, index, "not valid YAML: nested too deeply")
        if document is None:  # an empty document, e.g. a trailing "---"
            outcomes.append(None)
            continue
        try:
            outcomes.append(_object(document))
        except _InvalidDocument as exc:
            outcomes.append(str(exc))


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


def _describe(key: _Key) -> str:
    kind, namespace, name = key
    return f"{kind} {namespace}/{name}" if namespace else f"{kind} {name}"


def _one_line(exc: yaml.YAMLError) -> str:
    return " ".join(str(exc).split())
