"""ZDS codec: the fd rules, truncation, bad payloads, and snapshot reconciliation (no root needed)."""

from __future__ import annotations

import os
import socket

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from meshcore._gen import zds_pb2
from ztunnel.inpod.protocol import (
    MAX_MESSAGE_SIZE,
    AddWorkload,
    DelWorkload,
    KeepWorkload,
    Packet,
    SnapshotSent,
    SnapshotTracker,
    WorkloadInfo,
    ZdsProtocolError,
    decode_ack,
    decode_hello,
    decode_request,
    encode_ack,
    encode_add,
    encode_del,
    encode_hello,
    encode_keep,
    encode_snapshot_sent,
    receive_packet,
    send_packet,
)

INFO = WorkloadInfo(name="reviews-v1-7d9f", namespace="bookinfo", service_account="bookinfo-reviews")


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.fixture
def netns_fd():
    """An fd like the agent sends (our own netns: opening it needs no privileges)."""
    fd = os.open("/proc/self/ns/net", os.O_RDONLY)
    yield fd
    if is_open(fd):
        os.close(fd)


def test_add_with_one_fd_decodes_to_the_pod_and_keeps_the_fd(netns_fd: int):
    message = decode_request(Packet(data=encode_add("uid-1", INFO), fds=(netns_fd,), flags=0))
    assert message == AddWorkload(uid="uid-1", info=INFO, netns_fd=netns_fd)
    assert is_open(netns_fd)


def test_other_requests_round_trip():
    assert decode_request(Packet(data=encode_del("uid-1"), fds=(), flags=0)) == DelWorkload(uid="uid-1")
    assert decode_request(Packet(data=encode_keep("uid-2"), fds=(), flags=0)) == KeepWorkload(uid="uid-2")
    assert decode_request(Packet(data=encode_snapshot_sent(), fds=(), flags=0)) == SnapshotSent()


def test_messages_are_wire_compatible_with_istio_field_numbers():
    # AddWorkload{uid=1, workload_info=2}, WorkloadRequest.add=1, del=2 carrying DelWorkload.uid=2.
    request = zds_pb2.WorkloadRequest.FromString(encode_add("u", INFO))
    assert request.add.workload_info.service_account == "bookinfo-reviews"
    assert encode_del("u") == bytes([0x12, 0x03, 0x12, 0x01]) + b"u"
    assert encode_hello() == bytes([0x08, 0x01])


def test_add_without_fd_is_an_error():
    with pytest.raises(ZdsProtocolError, match="uid 'uid-1' carries no netns fd"):
        decode_request(Packet(data=encode_add("uid-1", INFO), fds=(), flags=0))


def test_fd_on_anything_but_add_is_closed_and_an_error(netns_fd: int):
    with pytest.raises(ZdsProtocolError, match="WorkloadRequest.del: only add may carry an fd"):
        decode_request(Packet(data=encode_del("uid-1"), fds=(netns_fd,), flags=0))
    assert not is_open(netns_fd)


def test_more_than_one_fd_closes_them_all(netns_fd: int):
    second = os.dup(netns_fd)
    with pytest.raises(ZdsProtocolError, match="expected at most 1 fd.*got 2"):
        decode_request(Packet(data=encode_add("uid-1", INFO), fds=(netns_fd, second), flags=0))
    assert not is_open(netns_fd) and not is_open(second)


@pytest.mark.parametrize("flag", [socket.MSG_TRUNC, socket.MSG_CTRUNC])
def test_truncation_is_an_error_and_closes_fds(netns_fd: int, flag: int):
    with pytest.raises(ZdsProtocolError, match="truncated"):
        decode_request(Packet(data=encode_add("uid-1", INFO), fds=(netns_fd,), flags=flag))
    assert not is_open(netns_fd)


def test_add_missing_workload_info_names_the_field(netns_fd: int):
    data = zds_pb2.WorkloadRequest(add=zds_pb2.AddWorkload(uid="uid-1")).SerializeToString()
    with pytest.raises(ZdsProtocolError, match="add.workload_info is missing"):
        decode_request(Packet(data=data, fds=(netns_fd,), flags=0))
    assert not is_open(netns_fd)


def test_empty_uid_and_empty_payload_are_errors():
    with pytest.raises(ZdsProtocolError, match="del.uid is empty"):
        decode_request(Packet(data=encode_del(""), fds=(), flags=0))
    with pytest.raises(ZdsProtocolError, match="payload is empty"):
        decode_request(Packet(data=b"", fds=(), flags=0))


@given(st.binary(max_size=64))
def test_garbage_never_escapes_as_anything_but_a_protocol_error(data: bytes):
    try:
        decode_request(Packet(data=data, fds=(), flags=0))
    except ZdsProtocolError:
        pass


def test_hello_and_ack():
    assert decode_hello(Packet(data=encode_hello(), fds=(), flags=0)) == zds_pb2.V1
    with pytest.raises(ZdsProtocolError, match="version is 0"):
        decode_hello(Packet(data=zds_pb2.ZdsHello().SerializeToString(), fds=(), flags=0))
    assert decode_ack(Packet(data=encode_ack(), fds=(), flags=0)) == ""
    assert decode_ack(Packet(data=encode_ack("no workload"), fds=(), flags=0)) == "no workload"
    with pytest.raises(ZdsProtocolError, match="ack is missing"):
        decode_ack(Packet(data=b"", fds=(), flags=0))


def test_snapshot_tracker_deletes_what_a_new_snapshot_does_not_mention():
    tracker = SnapshotTracker()
    tracker.connected()
    for uid in ("a", "b", "c"):
        tracker.added(uid)
    assert tracker.snapshot_complete() == []
    tracker.deleted("c")
    tracker.connected()  # reconnect: the agent replays "a", keeps "b" (no fd), forgot "c"
    tracker.added("a")
    tracker.kept("b")
    tracker.added("d")
    assert tracker.snapshot_complete() == []
    tracker.connected()
    tracker.added("d")
    assert tracker.snapshot_complete() == ["a", "b"]


def test_keep_outside_a_snapshot_and_a_second_snapshot_sent_are_errors():
    tracker = SnapshotTracker()
    tracker.connected()
    assert tracker.snapshot_complete() == []
    with pytest.raises(ZdsProtocolError, match="keep .* after snapshot_sent"):
        tracker.kept("a")
    with pytest.raises(ZdsProtocolError, match="twice"):
        tracker.snapshot_complete()


async def test_fd_travels_over_a_real_seqpacket_socket_and_oversized_messages_are_truncation(netns_fd: int):
    agent, ztunnel = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with agent, ztunnel:
        agent.setblocking(False)
        ztunnel.setblocking(False)
        await send_packet(agent, encode_add("uid-1", INFO), fd=netns_fd)
        message = decode_request(await receive_packet(ztunnel))
        assert isinstance(message, AddWorkload)
        assert os.fstat(message.netns_fd).st_ino == os.fstat(netns_fd).st_ino
        os.close(message.netns_fd)

        oversized = encode_add("u" * MAX_MESSAGE_SIZE, INFO)
        await send_packet(agent, oversized)
        with pytest.raises(ZdsProtocolError, match="truncated ZDS message"):
            decode_request(await receive_packet(ztunnel))

        agent.close()
        with trio.fail_after(1):
            assert await receive_packet(ztunnel) is None
