"""Mesh mTLS: who is accepted and refused (over real loopback sockets), what each side is
told, the sans-IO engine, and TlsStream's conformance to trio's stream contract.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import pytest
import trio
import trio.testing
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from OpenSSL import SSL
from OpenSSL._util import lib as openssl

from meshcore.identity.certs import WorkloadCertificate
from meshcore.identity.spiffe import Identity
from meshcore.testing.pki import MeshPki, make_intermediate_ca, make_mesh_pki, with_extra_roots
from meshcore.tls.context import (
    client_context,
    server_context,
    verify_client_peer,
    verify_server_peer,
)
from meshcore.tls.engine import TlsEngine
from meshcore.tls.errors import PeerIdentityError, TlsClosed, TlsError
from meshcore.tls.stream import TlsStream, TlsStreamBroken

TRUST_DOMAIN = "cluster.local"


@pytest.fixture(scope="module")
def pki() -> MeshPki:
    return make_mesh_pki()


# --- handshakes over loopback TCP ---


@dataclass
class Outcome:
    client_saw: Identity | None = None
    server_saw: Identity | None = None
    client_error: TlsError | None = None
    server_error: TlsError | None = None
    client_received: bytes | None = None
    server_received: bytes | None = None


async def connect(
    client_ctx: SSL.Context,
    server_ctx: SSL.Context,
    *,
    expected_server: Collection[Identity],
    trust_domain: str = TRUST_DOMAIN,
) -> Outcome:
    """One connection: handshake, identity checks, server greets, client answers."""
    outcome = Outcome()
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]

    async def serve() -> None:
        stream = TlsStream(await listener.accept(), server_ctx, server_side=True)
        try:
            await stream.do_handshake()
            outcome.server_saw = verify_client_peer(stream.engine.ssl_connection, trust_domain)
            await stream.send_all(b"hello")
            outcome.server_received = await stream.receive_some()
        except TlsError as exc:
            outcome.server_error = exc
        finally:
            await stream.aclose()

    async def dial() -> None:
        stream = TlsStream(
            await trio.open_tcp_stream("127.0.0.1", port), client_ctx, server_side=False
        )
        try:
            await stream.do_handshake()
            outcome.client_saw = verify_server_peer(stream.engine.ssl_connection, expected_server)
            outcome.client_received = await stream.receive_some()
            await stream.send_all(b"bye")
        except TlsError as exc:
            outcome.client_error = exc
        finally:
            await stream.aclose()

    with trio.fail_after(10):
        async with listener, trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            nursery.start_soon(dial)
    return outcome


def custom_client_context(
    cert: WorkloadCertificate,
    *,
    alpn: list[bytes] | None,
    present_certificate: bool = True,
    tls_versions: tuple[int, int] = (SSL.TLS1_3_VERSION, SSL.TLS1_3_VERSION),
) -> SSL.Context:
    """A client that breaks one of the mesh's rules (the server must refuse or notice)."""
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(tls_versions[0])
    context.set_max_proto_version(tls_versions[1])
    if alpn is not None:
        context.set_alpn_protos(alpn)
    if present_certificate:
        context.use_certificate(x509.load_pem_x509_certificate(cert.chain_pem[0]))
        context.use_privatekey(load_pem_private_key(cert.key_pem, None))  # type: ignore[arg-type]
    return context


async def test_mutual_tls_succeeds_and_both_sides_see_the_peer(pki: MeshPki) -> None:
    outcome = await connect(
        client_context(pki.client),
        server_context(pki.server),
        expected_server=[pki.server.identity],
    )
    assert outcome == Outcome(
        client_saw=pki.server.identity,
        server_saw=pki.client.identity,
        client_received=b"hello",
        server_received=b"bye",
    )


async def test_server_identity_may_be_any_of_the_expected(pki: MeshPki) -> None:
    waypoint = Identity(TRUST_DOMAIN, "default", "waypoint")
    outcome = await connect(
        client_context(pki.client),
        server_context(pki.server),
        expected_server={waypoint, pki.server.identity},
    )
    assert outcome.client_saw == pki.server.identity


@pytest.mark.parametrize(
    ("client", "server", "server_says", "client_says"),
    [
        pytest.param(
            "foreign",
            "server",
            "certificate verify failed: peer's certificate does not chain to a trusted root",
            "peer rejected our certificate: it does not chain to a root the peer trusts",
            id="client-from-another-trust-domain",
        ),
        pytest.param(
            "expired",
            "server",
            "certificate verify failed: certificate has expired",
            "peer rejected our certificate: certificate has expired",
            id="expired-client",
        ),
        pytest.param(
            "client",
            "expired",
            "peer rejected our certificate: certificate has expired",
            "certificate verify failed: certificate has expired",
            id="expired-server",
        ),
    ],
)
async def test_handshake_refusals_tell_both_sides_why(
    pki: MeshPki, client: str, server: str, server_says: str, client_says: str
) -> None:
    outcome = await connect(
        client_context(getattr(pki, client)),
        server_context(getattr(pki, server)),
        expected_server=[pki.server.identity, pki.expired.identity],
    )
    assert outcome.server_error is not None and outcome.client_error is not None
    assert outcome.server_error.reason.startswith(server_says)
    assert outcome.client_error.reason.startswith(client_says)
    assert outcome.server_error.response_flag == "TLS_FAILURE"
    assert outcome.server_saw is None and outcome.server_received is None


async def test_client_without_certificate_is_refused(pki: MeshPki) -> None:
    outcome = await connect(
        custom_client_context(pki.client, alpn=[b"h2"], present_certificate=False),
        server_context(pki.server),
        expected_server=[pki.server.identity],
    )
    assert outcome.server_error is not None and outcome.client_error is not None
    assert outcome.server_error.reason == "peer presented no client certificate"
    assert outcome.client_error.reason == "peer requires a client certificate and we sent none"


async def test_client_of_a_federated_trust_domain_is_refused_after_the_handshake(
    pki: MeshPki,
) -> None:
    # The server trusts the foreign root, so the chain verifies; the trust domain does not.
    federated_server = with_extra_roots(pki.server, pki.foreign_ca)
    outcome = await connect(
        client_context(pki.foreign),
        server_context(federated_server),
        expected_server=[pki.server.identity],
    )
    assert isinstance(outcome.server_error, PeerIdentityError)
    assert outcome.server_error.response_flag == "IDENTITY_ERROR"
    assert outcome.server_error.reason == (
        "peer identity spiffe://other.example/ns/default/sa/client is not in trust domain "
        "'cluster.local'"
    )
    assert outcome.client_received == b""  # the server closed cleanly without a word


async def test_server_with_an_unexpected_identity_is_refused_by_the_client(pki: MeshPki) -> None:
    reviews = Identity(TRUST_DOMAIN, "default", "reviews")
    ratings = Identity(TRUST_DOMAIN, "default", "ratings")
    outcome = await connect(
        client_context(pki.client),
        server_context(pki.server),
        expected_server=[reviews, ratings],
    )
    assert isinstance(outcome.client_error, PeerIdentityError)
    assert outcome.client_error.reason == (
        "peer identity spiffe://cluster.local/ns/default/sa/server is not one of the expected "
        "[spiffe://cluster.local/ns/default/sa/reviews, spiffe://cluster.local/ns/default/sa/ratings]"
    )
    assert outcome.server_received == b""  # nothing was sent to the wrong server


@pytest.mark.parametrize(
    ("alpn", "server_says", "client_says"),
    [
        (
            [b"http/1.1"],
            "peer offered no ALPN protocol we accept (h2 required)",
            "peer refused the handshake: no ALPN protocol in common (h2 required)",
        ),
        (
            [b"h2c", b"spdy/3"],
            "peer offered no ALPN protocol we accept",
            "no ALPN protocol in common",
        ),
    ],
)
async def test_client_without_h2_in_alpn_is_refused(
    pki: MeshPki, alpn: list[bytes], server_says: str, client_says: str
) -> None:
    outcome = await connect(
        custom_client_context(pki.client, alpn=alpn),
        server_context(pki.server),
        expected_server=[pki.server.identity],
    )
    assert outcome.server_error is not None and server_says in outcome.server_error.reason
    assert outcome.client_error is not None and client_says in outcome.client_error.reason


async def test_client_offering_no_alpn_at_all_is_refused_after_the_handshake(pki: MeshPki) -> None:
    outcome = await connect(
        custom_client_context(pki.client, alpn=None),
        server_context(pki.server),
        expected_server=[pki.server.identity],
    )
    assert type(outcome.server_error) is TlsError
    assert (
        outcome.server_error.reason == "peer negotiated ALPN protocol 'none'; the mesh requires h2"
    )


async def test_tls12_client_is_refused(pki: MeshPki) -> None:
    outcome = await connect(
        custom_client_context(
            pki.client, alpn=[b"h2"], tls_versions=(SSL.TLS1_2_VERSION, SSL.TLS1_2_VERSION)
        ),
        server_context(pki.server),
        expected_server=[pki.server.identity],
    )
    assert outcome.server_error is not None
    assert outcome.server_error.reason == "peer does not support TLS 1.3"


async def test_intermediate_ca_chains_are_presented_and_verified(pki: MeshPki) -> None:
    # A second cluster under the same root, signing through an intermediate: both sides must
    # send their intermediate for the other to verify them.
    cluster2 = make_intermediate_ca(pki.ca, name="cluster-2")
    server = cluster2.issue(Identity(TRUST_DOMAIN, "default", "server"))
    assert len(server.chain_pem) == 2
    outcome = await connect(
        client_context(pki.client), server_context(server), expected_server=[server.identity]
    )
    assert (outcome.client_saw, outcome.server_saw) == (server.identity, pki.client.identity)

    client = cluster2.issue(pki.client.identity)
    outcome = await connect(
        client_context(client), server_context(pki.server), expected_server=[pki.server.identity]
    )
    assert outcome.server_saw == client.identity


# --- contexts and the sans-IO engine ---


def handshake_in_memory(client: TlsEngine, server: TlsEngine) -> None:
    for _ in range(10):
        done = [engine.do_handshake() for engine in (client, server)]
        server.receive_ciphertext(client.ciphertext_to_send())
        client.receive_ciphertext(server.ciphertext_to_send())
        if all(done):
            return
    raise AssertionError("handshake did not complete")


def test_contexts_are_cached_per_certificate(pki: MeshPki) -> None:
    assert server_context(pki.server) is server_context(pki.server)
    assert client_context(pki.client) is client_context(pki.client)
    assert client_context(pki.client) is not client_context(pki.server)


def test_negotiates_tls13_aes_gcm_x25519_h2(pki: MeshPki) -> None:
    client = TlsEngine(client_context(pki.client), server_side=False)
    server = TlsEngine(server_context(pki.server), server_side=True)
    handshake_in_memory(client, server)
    for engine in (client, server):
        conn = engine.ssl_connection
        assert conn.get_protocol_version_name() == "TLSv1.3"
        assert conn.get_cipher_name() in ("TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384")
        assert conn.get_alpn_proto_negotiated() == b"h2"
        assert conn.get_group_name() == "x25519"


def test_sessions_are_never_resumed(pki: MeshPki) -> None:
    first = TlsEngine(client_context(pki.client), server_side=False)
    server = TlsEngine(server_context(pki.server), server_side=True)
    handshake_in_memory(first, server)
    server.write_plaintext(b"x")  # carries any session tickets along
    first.receive_ciphertext(server.ciphertext_to_send())
    assert first.read_plaintext() == b"x"
    session = first.ssl_connection.get_session()
    assert session is not None

    second = TlsEngine(client_context(pki.client), server_side=False)
    second.ssl_connection.set_session(session)
    handshake_in_memory(second, TlsEngine(server_context(pki.server), server_side=True))
    assert openssl.SSL_session_reused(second.ssl_connection._ssl) == 0


def test_engine_moves_bulk_data_and_respects_max_bytes(pki: MeshPki) -> None:
    client = TlsEngine(client_context(pki.client), server_side=False)
    server = TlsEngine(server_context(pki.server), server_side=True)
    handshake_in_memory(client, server)
    assert server.read_plaintext() == b""  # nothing yet

    payload = bytes(range(256)) * 4096  # 1 MiB, one write
    client.write_plaintext(memoryview(payload))
    server.receive_ciphertext(bytearray(client.ciphertext_to_send()))
    assert client.ciphertext_to_send() == b""
    first = server.read_plaintext(1000)
    assert first == payload[:1000]
    second = server.read_plaintext()
    assert len(second) == 256 * 1024  # many 16 KiB records per call, not one
    received = bytearray(first + second)
    while chunk := server.read_plaintext():
        assert len(chunk) <= 256 * 1024
        received += chunk
    assert received == payload


def test_engine_reports_close_notify_after_the_last_data(pki: MeshPki) -> None:
    client = TlsEngine(client_context(pki.client), server_side=False)
    server = TlsEngine(server_context(pki.server), server_side=True)
    handshake_in_memory(client, server)
    client.write_plaintext(b"last words")
    client.send_close_notify()
    server.receive_ciphertext(client.ciphertext_to_send())
    assert server.read_plaintext() == b"last words"
    for _ in range(2):
        with pytest.raises(TlsClosed):
            server.read_plaintext()


def test_engine_refuses_corrupt_records(pki: MeshPki) -> None:
    client = TlsEngine(client_context(pki.client), server_side=False)
    server = TlsEngine(server_context(pki.server), server_side=True)
    handshake_in_memory(client, server)
    client.write_plaintext(b"important")
    record = bytearray(client.ciphertext_to_send())
    record[-1] ^= 0xFF
    server.receive_ciphertext(record)
    with pytest.raises(TlsError, match=r"^corrupt TLS record"):
        server.read_plaintext()


@pytest.mark.parametrize(
    ("garbage", "reason"),
    [
        (b"GET / HTTP/1.1\r\nHost: reviews\r\n\r\n", "peer sent plaintext HTTP instead of TLS"),
        (b"\x16\x03\x01\x00\x05hello", "TLS failure: "),
    ],
)
def test_engine_refuses_non_tls_input(pki: MeshPki, garbage: bytes, reason: str) -> None:
    server = TlsEngine(server_context(pki.server), server_side=True)
    server.receive_ciphertext(garbage)
    with pytest.raises(TlsError) as raised:
        server.do_handshake()
    assert raised.value.reason.startswith(reason)


def test_engine_refuses_plaintext_before_the_handshake(pki: MeshPki) -> None:
    client = TlsEngine(client_context(pki.client), server_side=False)
    with pytest.raises(RuntimeError, match="before the TLS handshake"):
        client.write_plaintext(b"too early")


# --- TlsStream ---


def stream_pair(
    pki: MeshPki, transports: tuple[trio.abc.Stream, trio.abc.Stream]
) -> tuple[TlsStream, TlsStream]:
    client_transport, server_transport = transports
    return (
        TlsStream(client_transport, client_context(pki.client), server_side=False),
        TlsStream(server_transport, server_context(pki.server), server_side=True),
    )


async def test_tls_stream_is_a_conforming_trio_stream(pki: MeshPki) -> None:
    async def memory_pair() -> tuple[TlsStream, TlsStream]:
        return stream_pair(pki, trio.testing.memory_stream_pair())

    async def clogged_pair() -> tuple[TlsStream, TlsStream]:
        client, server = stream_pair(pki, trio.testing.lockstep_stream_pair())
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.do_handshake)
            nursery.start_soon(server.do_handshake)
        return client, server

    with trio.fail_after(10):
        await trio.testing.check_two_way_stream(memory_pair, clogged_pair)


async def test_tls_stream_reports_truncation_as_a_tls_failure(pki: MeshPki) -> None:
    client, server = stream_pair(pki, trio.testing.memory_stream_pair())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.do_handshake)
        nursery.start_soon(server.do_handshake)
    await client.send_all(b"partial")
    await client.transport_stream.aclose()  # no close_notify
    assert await server.receive_some() == b"partial"
    with pytest.raises(TlsStreamBroken) as raised:
        await server.receive_some()
    assert raised.value.reason == "peer closed the connection without TLS close_notify"
    assert isinstance(raised.value, trio.BrokenResourceError)
    with pytest.raises(trio.BrokenResourceError):
        await server.send_all(b"anyone there?")


async def test_tls_stream_handshake_eof_is_a_tls_failure(pki: MeshPki) -> None:
    client, server = stream_pair(pki, trio.testing.memory_stream_pair())
    await client.transport_stream.aclose()
    with pytest.raises(
        TlsStreamBroken, match="peer closed the connection during the TLS handshake"
    ):
        await server.do_handshake()
