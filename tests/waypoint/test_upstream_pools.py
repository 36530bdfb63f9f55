"""Upstream connection pools follow Cluster updates, on loopback with the component mesh.

Envoy drains the connection pools of a cluster that CDS replaced; a DestinationRule edit
(here: connection-pool limits) therefore applies to the very next requests, not only once
the connections opened under the old config have gone away, and a stream open across the
change finishes on its old connection.
"""

from __future__ import annotations

import trio

from meshcore._gen import workload_pb2
from waypoint.http2 import Http2ClientConnection
from waypoint.messages import BufferedBody, Request

from .test_waypoint_component import HOST, PORT, VIP, QueueBody, get, requests_total, route, running_mesh


async def test_new_pool_limits_apply_although_connections_were_opened_without_them():
    async with running_mesh() as mesh:
        mesh.configure(route(clusters={"v1": 1}))
        mesh.v1.delay = 0.3

        async def burst() -> list[int]:
            statuses: list[int] = []

            async def one() -> None:
                statuses.append((await get(await mesh.http1()))[0])

            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    nursery.start_soon(one)
            return sorted(statuses)

        assert await burst() == [200] * 4  # no limits: four upstream connections, idle now
        mesh.configure(route(clusters={"v1": 1}), max_connections=1, max_pending=1)
        assert await burst() == [200, 200, 503, 503]  # one in flight, one waiting for it
        assert requests_total(mesh.waypoint, response_code="503", response_flags="UO") == 2
        assert mesh.waypoint.upstreams.connection_count() <= 1


async def test_a_stream_open_across_a_cluster_change_finishes_while_new_requests_use_new_connections():
    async with running_mesh() as mesh:
        mesh.configure(route(clusters={"v1": 1}), app_protocol=workload_pb2.GRPC)
        conn = await mesh.client()
        h2 = Http2ClientConnection(await conn.open_tunnel(f"{VIP}:{PORT}"))
        await mesh.nursery.start(h2.run)
        grpc = (("content-type", "application/grpc"),)
        body = QueueBody()
        await body.send.send(b"\x00\x00\x00\x00\x03one")
        with trio.fail_after(5):
            stream = await h2.send(Request("POST", f"{HOST}:{PORT}", "/grpc.Echo/Stream", grpc, body, "HTTP/2"))
            assert await stream.body.read() == b"\x00\x00\x00\x00\x03one"
            tunnels_before = len(mesh.v1.tunnel_peers)

            mesh.configure(route(clusters={"v1": 1}), app_protocol=workload_pb2.GRPC, max_connections=10)
            unary = await h2.send(Request("POST", f"{HOST}:{PORT}", "/grpc.Echo/Say", grpc, BufferedBody(b"\x00\x00\x00\x00\x02hi"), "HTTP/2"))
            assert unary.status == 200 and await unary.body.read() == b"\x00\x00\x00\x00\x02hi"
            assert len(mesh.v1.tunnel_peers) == tunnels_before + 1  # not multiplexed on the drained connection

            await body.send.send(b"\x00\x00\x00\x00\x03two")  # the drained connection still carries the open stream
            assert await stream.body.read() == b"\x00\x00\x00\x00\x03two"
            await body.send.aclose()
            assert await stream.body.read() == b""
        assert dict(stream.body.trailers)["grpc-status"] == "0"
