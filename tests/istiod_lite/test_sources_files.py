"""The files source: a directory of Kubernetes YAML becomes upserts, deletes and SyncComplete."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import prometheus_client
import pytest
import trio

from istiod_lite.sources.base import ObjectEvent, SourceEvent, SyncComplete
from istiod_lite.sources.files import FilesSource, FilesSourceError

POLL = 0.02  # seconds between scans in these tests
QUIET = 10 * POLL  # long enough for several scans: "nothing happened" is a real observation

NAMESPACE = """\
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels: {istio.io/dataplane-mode: ambient}
"""
POD = """\
apiVersion: v1
kind: Pod
metadata:
  {name: web-1, namespace: shop, labels: {app: web}, creationTimestamp: 2024-05-01T10:00:00Z}
spec: {serviceAccountName: web, containers: [{name: web, image: web}]}
"""
SERVICE = """\
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}
"""
POLICY = """\
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: deny-all}
spec: {action: DENY, rules: [{}]}
"""


class Directory:
    """A config directory plus a running FilesSource over it."""

    def __init__(self, path: Path, source: FilesSource, registry, receive) -> None:
        self.path = path
        self.source = source
        self.registry = registry
        self.receive: trio.MemoryReceiveChannel[SourceEvent] = receive

    def write(self, name: str, text: str) -> None:
        target = self.path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)

    async def events(self, count: int) -> list[SourceEvent]:
        with trio.fail_after(5):
            return [await self.receive.receive() for _ in range(count)]

    async def initial(self) -> list[ObjectEvent]:
        """Everything up to SyncComplete."""
        events = []
        with trio.fail_after(5):
            while not isinstance(event := await self.receive.receive(), SyncComplete):
                events.append(event)
        return events

    async def assert_quiet(self) -> None:
        await trio.sleep(QUIET)
        with pytest.raises(trio.WouldBlock):
            event = self.receive.receive_nowait()
            pytest.fail(f"unexpected event {event}")

    def rejected(self) -> float:
        return self.registry.get_sample_value("istiod_lite_files_rejected_total")


@asynccontextmanager
async def running(path: Path) -> AsyncIterator[Directory]:
    registry = prometheus_client.CollectorRegistry()
    source = FilesSource(path, registry=registry, poll_interval=POLL)
    send, receive = trio.open_memory_channel[SourceEvent](math.inf)
    async with trio.open_nursery() as nursery:
        await nursery.start(source.run, send)
        yield Directory(path, source, registry, receive)
        nursery.cancel_scope.cancel()


def summary(events: list[SourceEvent]) -> set[tuple[str, str, str, str]]:
    return {(e.action, e.kind, e.namespace, e.name) for e in events}


async def test_initial_load_reads_every_file_and_document_then_sync_complete(tmp_path):
    (tmp_path / "apps").mkdir()
    (tmp_path / "mesh.yaml").write_text(NAMESPACE + "---\n" + POLICY + "---\n")
    (tmp_path / "apps" / "web.yml").write_text(POD + "---\n" + SERVICE)
    (tmp_path / "apps" / "config.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: unwatched}\n"
    )
    (tmp_path / "notes.txt").write_text(POD)  # not YAML by name
    (tmp_path / ".web.yaml.swp").write_text(SERVICE)  # an editor's temporary file

    async with running(tmp_path) as directory:
        events = await directory.initial()
        assert summary(events) == {
            ("upsert", "Namespace", "", "shop"),
            ("upsert", "AuthorizationPolicy", "default", "deny-all"),
            ("upsert", "Pod", "shop", "web-1"),
            ("upsert", "Service", "shop", "web"),
        }
        by_kind = {e.kind: e.obj for e in events}
        assert by_kind["Pod"]["spec"]["serviceAccountName"] == "web"
        # Plain JSON values, as the API server would send them (not a datetime).
        assert by_kind["Pod"]["metadata"]["creationTimestamp"] == "2024-05-01T10:00:00Z"
        assert by_kind["Namespace"]["metadata"]["labels"] == {"istio.io/dataplane-mode": "ambient"}
        # The namespace a manifest left out is filled in, as the API server stores it.
        policy_metadata = by_kind["AuthorizationPolicy"]["metadata"]
        assert policy_metadata == {"name": "deny-all", "namespace": "default"}
        assert directory.source.problems() == []
        await directory.assert_quiet()


async def test_empty_directory_still_reports_sync_complete(tmp_path):
    async with running(tmp_path) as directory:
        assert await directory.initial() == []


async def test_missing_directory_is_a_clear_error(tmp_path):
    source = FilesSource(tmp_path / "nope", poll_interval=POLL)
    send, _ = trio.open_memory_channel[SourceEvent](math.inf)
    with pytest.raises(FilesSourceError, match="nope does not exist"):
        await source.run(send)


async def test_added_modified_and_deleted_files_produce_upserts_and_deletes(tmp_path):
    (tmp_path / "ns.yaml").write_text(NAMESPACE)
    async with running(tmp_path) as directory:
        await directory.initial()

        directory.write("web.yaml", POD + "---\n" + SERVICE)
        assert summary(await directory.events(2)) == {
            ("upsert", "Pod", "shop", "web-1"),
            ("upsert", "Service", "shop", "web"),
        }

        # Only the document whose content changed is sent again.
        directory.write("web.yaml", POD.replace("app: web", "app: web2") + "---\n" + SERVICE)
        [event] = await directory.events(1)
        assert (event.action, event.kind, event.name) == ("upsert", "Pod", "web-1")
        assert event.obj["metadata"]["labels"] == {"app": "web2"}
        await directory.assert_quiet()

        # Rewriting the same content is no change.
        directory.write("web.yaml", POD.replace("app: web", "app: web2") + "---\n" + SERVICE)
        await directory.assert_quiet()

        # A document dropped from a file is deleted.
        directory.write("web.yaml", SERVICE)
        [event] = await directory.events(1)
        assert event == ObjectEvent("Pod", "delete", "shop", "web-1", None)

        (tmp_path / "web.yaml").unlink()
        [event] = await directory.events(1)
        assert event == ObjectEvent("Service", "delete", "shop", "web", None)

        # An object moving to another file is not deleted on the way.
        directory.write("moved/namespace.yaml", NAMESPACE)
        (tmp_path / "ns.yaml").unlink()
        await directory.assert_quiet()


async def test_invalid_yaml_keeps_the_last_good_objects_of_that_file(tmp_path):
    (tmp_path / "web.yaml").write_text(POD + "---\n" + SERVICE)
    async with running(tmp_path) as directory:
        await directory.initial()
        assert directory.rejected() == 0

        directory.write("web.yaml", POD + "---\n" + "kind: Service\nmetadata: {name: [unclosed\n")
        await directory.assert_quiet()  # nothing deleted, the pod unchanged
        [problem] = directory.source.problems()
        assert problem.path == tmp_path / "web.yaml"
        assert problem.document_index == 1
        assert "not valid YAML" in problem.message
        assert directory.rejected() == 1

        # The rest of the directory keeps loading meanwhile.
        directory.write("ns.yaml", NAMESPACE)
        assert summary(await directory.events(1)) == {("upsert", "Namespace", "", "shop")}

        # Fixed (and the pod removed from it): now the file's state is what it says.
        directory.write("web.yaml", SERVICE.replace("port: 80", "port: 81"))
        events = await directory.events(2)
        assert summary(events) == {
            ("upsert", "Service", "shop", "web"),
            ("delete", "Pod", "shop", "web-1"),
        }
        assert directory.source.problems() == []


async def test_document_without_kind_or_name_is_reported_and_the_others_load(tmp_path):
    (tmp_path / "web.yaml").write_text(POD)
    async with running(tmp_path) as directory:
        await directory.initial()

        directory.write(
            "web.yaml",
            SERVICE + "---\napiVersion: v1\nmetadata: {name: no-kind}\n"
            "---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {namespace: shop}\n"
            "---\n- just\n- a list\n",
        )
        # The new Service loads; the Pod that vanished from the file is kept while the
        # file has problems.
        assert summary(await directory.events(1)) == {("upsert", "Service", "shop", "web")}
        await directory.assert_quiet()
        problems = directory.source.problems()
        assert [(p.document_index, p.message) for p in problems] == [
            (1, "kind: required (a string)"),
            (2, "ServiceAccount: metadata.name: required (a non-empty string)"),
            (3, "expected a Kubernetes object (a mapping), got list"),
        ]
        assert str(problems[0]) == f"{tmp_path / 'web.yaml'} document 1: kind: required (a string)"
        assert directory.rejected() == 3


async def test_the_same_object_in_two_files_keeps_the_first_and_reports_the_second(tmp_path):
    (tmp_path / "a.yaml").write_text(SERVICE)
    (tmp_path / "b.yaml").write_text(SERVICE.replace("port: 80", "port: 9999"))
    async with running(tmp_path) as directory:
        [event] = await directory.initial()
        assert event.obj["spec"]["ports"] == [{"port": 80, "targetPort": 8080}]
        [problem] = directory.source.problems()
        assert problem.path == tmp_path / "b.yaml"
        assert "also defined in" in problem.message

        # The first definition goes away: the second one takes over.
        (tmp_path / "a.yaml").unlink()
        [event] = await directory.events(1)
        assert event.action == "upsert"
        assert event.obj["spec"]["ports"] == [{"port": 9999, "targetPort": 8080}]
        assert directory.source.problems() == []


@asynccontextmanager
async def running_slow_poll(path: Path) -> AsyncIterator[Directory]:
    """A source that polls only every 60 s: anything seen sooner came from inotify."""
    registry = prometheus_client.CollectorRegistry()
    source = FilesSource(path, registry=registry, poll_interval=60)
    send, receive = trio.open_memory_channel[SourceEvent](math.inf)
    async with trio.open_nursery() as nursery:
        await nursery.start(source.run, send)
        yield Directory(path, source, registry, receive)
        nursery.cancel_scope.cancel()


async def test_writes_renames_deletes_and_new_folders_are_seen_without_waiting_for_a_poll(tmp_path):
    async with running_slow_poll(tmp_path) as directory:
        assert await directory.initial() == []
        directory.write("ns.yaml", NAMESPACE)
        assert summary(await directory.events(1)) == {("upsert", "Namespace", "", "shop")}

        # An atomic replace, as editors and `kubectl`-style tools write.
        (tmp_path / ".svc.tmp").write_text(SERVICE)
        (tmp_path / ".svc.tmp").rename(tmp_path / "svc.yaml")
        assert summary(await directory.events(1)) == {("upsert", "Service", "shop", "web")}

        # A file in a folder that did not exist when the source started.
        directory.write("apps/pod.yaml", POD)
        assert summary(await directory.events(1)) == {("upsert", "Pod", "shop", "web-1")}

        (tmp_path / "ns.yaml").unlink()
        assert summary(await directory.events(1)) == {("delete", "Namespace", "", "shop")}


def pod(name: str, version: str = "v1") -> str:
    return POD.replace("web-1", name).replace("app: web}", f"app: web, version: {version}}}")


async def test_editing_one_document_of_a_large_file_emits_just_that_object(tmp_path):
    names = [f"web-{i}" for i in range(50)]
    (tmp_path / "pods.yaml").write_text("---\n".join(pod(name) for name in names))
    async with running(tmp_path) as directory:
        initial = await directory.initial()
        assert [e.name for e in initial] == names  # in document order
        (tmp_path / "pods.yaml").write_text("---\n".join(pod(name, "v2" if name == "web-7" else "v1") for name in names))
        [event] = await directory.events(1)
        assert (event.action, event.name, event.obj["metadata"]["labels"]["version"]) == ("upsert", "web-7", "v2")
        await directory.assert_quiet()


async def test_document_markers_inside_block_scalars_and_explicit_document_ends_parse_as_yaml_says(tmp_path):
    config_map_like_pod = POD.replace(
        "spec: {", "spec:\n  note: |\n    ---\n    not a new document\n  extra: {"
    ).replace("containers: [{name: web, image: web}]}", "a: b}\n  containers: [{name: web, image: web}]")
    (tmp_path / "block.yaml").write_text(config_map_like_pod)
    (tmp_path / "ends.yaml").write_text(NAMESPACE + "...\n---\n" + SERVICE + "...\n")
    async with running(tmp_path) as directory:
        events = await directory.initial()
        assert summary(events) == {
            ("upsert", "Pod", "shop", "web-1"),
            ("upsert", "Namespace", "", "shop"),
            ("upsert", "Service", "shop", "web"),
        }
        by_kind = {e.kind: e.obj for e in events}
        assert by_kind["Pod"]["spec"]["note"] == "---\nnot a new document\n"
        assert directory.source.problems() == []
