"""RemoteCaProvider against a scripted CreateCertificate server on loopback (plaintext).

The real CA service, over TLS, is exercised with this client in tests/istiod_lite.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta

import grpc
import pytest
import trio
from cryptography import x509

from meshcore._gen import ca_pb2, ca_pb2_grpc
from meshcore.identity.ca import CertificateAuthority
from meshcore.identity.caclient import CaRequestError, RemoteCaProvider
from meshcore.identity.certs import CertificateError
from meshcore.identity.manager import CertificateManager
from meshcore.identity.spiffe import Identity

REVIEWS = Identity("cluster.local", "default", "reviews")
RATINGS = Identity("cluster.local", "default", "ratings")

Answer = Callable[
    [ca_pb2.IstioCertificateRequest, grpc.ServicerContext], ca_pb2.IstioCertificateResponse
]


@dataclass
class ScriptedCa(ca_pb2_grpc.IstioCertificateServiceServicer):
    """Signs with `ca` as `sign_as` (default: the requested identity), or replies `answer`."""

    ca: CertificateAuthority
    sign_as: Identity | None = None
    answer: Answer | None = None
    seen: list[tuple[ca_pb2.IstioCertificateRequest, dict[str, str]]] = field(default_factory=list)

    def CreateCertificate(self, request, context):  # noqa: N802
        self.seen.append((request, dict(context.invocation_metadata())))
        if self.answer is not None:
            return self.answer(request, context)
        identity = self.sign_as or Identity.parse(
            request.metadata.fields["ImpersonatedIdentity"].string_value
        )
        chain = self.ca.sign_csr(
            request.csr.encode(), identity, ttl=timedelta(seconds=request.validity_duration)
        )
        return ca_pb2.IstioCertificateResponse(cert_chain=[pem.decode() for pem in chain])


@dataclass
class Running:
    servicer: ScriptedCa
    target: str


@pytest.fixture
def scripted_ca() -> Iterator[Running]:
    servicer = ScriptedCa(CertificateAuthority.generate())
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    ca_pb2_grpc.add_IstioCertificateServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield Running(servicer, f"127.0.0.1:{port}")
    server.stop(None)


async def test_fetch_sends_csr_token_and_impersonated_identity(scripted_ca: Running) -> None:
    tokens = iter(["token-1", "token-2"])  # a rotated token file is re-read per request
    provider = RemoteCaProvider(
        scripted_ca.target, root_pem=None, token=lambda: next(tokens), ttl=timedelta(hours=2)
    )
    try:
        first = await provider.fetch(REVIEWS)
        await provider.fetch(REVIEWS)
    finally:
        provider.close()

    assert first.identity == REVIEWS
    assert first.roots_pem == scripted_ca.servicer.ca.roots_pem
    assert first.not_after - first.not_before == timedelta(hours=2, minutes=1)
    (request, metadata), (_, second_metadata) = scripted_ca.servicer.seen
    assert metadata["authorization"] == "Bearer token-1"
    assert second_metadata["authorization"] == "Bearer token-2"
    assert request.metadata.fields["ImpersonatedIdentity"].string_value == REVIEWS.uri
    assert request.validity_duration == 7200
    csr = x509.load_pem_x509_csr(request.csr.encode())
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [REVIEWS.uri]
    leaf = x509.load_pem_x509_certificate(first.chain_pem[0])
    assert leaf.public_key() == csr.public_key()  # the key made locally is the one certified


async def test_certificate_for_another_identity_is_rejected(scripted_ca: Running) -> None:
    scripted_ca.servicer.sign_as = RATINGS
    provider = RemoteCaProvider(scripted_ca.target, root_pem=None, token=lambda: "t")
    try:
        with pytest.raises(CertificateError, match=f"for {RATINGS.uri} instead of {REVIEWS.uri}"):
            await provider.fetch(REVIEWS)
    finally:
        provider.close()


async def test_refusal_carries_the_status_and_the_ca_message(scripted_ca: Running) -> None:
    def deny(request, context):
        context.abort(grpc.StatusCode.PERMISSION_DENIED, "no pod with that identity on node-a")

    scripted_ca.servicer.answer = deny
    provider = RemoteCaProvider(scripted_ca.target, root_pem=None, token=lambda: "t")
    try:
        with pytest.raises(CaRequestError) as caught:
            await provider.fetch(REVIEWS)
    finally:
        provider.close()
    assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert str(caught.value) == (
        f"CA {scripted_ca.target} did not issue a certificate for {REVIEWS}: "
        "PERMISSION_DENIED: no pod with that identity on node-a"
    )


async def test_empty_chain_is_a_certificate_error(scripted_ca: Running) -> None:
    scripted_ca.servicer.answer = lambda request, context: ca_pb2.IstioCertificateResponse()
    provider = RemoteCaProvider(scripted_ca.target, root_pem=None, token=lambda: "t")
    try:
        with pytest.raises(CertificateError, match="chain is empty"):
            await provider.fetch(REVIEWS)
    finally:
        provider.close()


async def test_unreachable_ca_is_unavailable() -> None:
    with trio.socket.socket() as unused:  # a port nobody listens on
        await unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    provider = RemoteCaProvider(f"127.0.0.1:{port}", root_pem=None, token=lambda: "t")
    try:
        with pytest.raises(CaRequestError) as caught:
            await provider.fetch(REVIEWS)
    finally:
        provider.close()
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE


async def test_hung_ca_hits_the_deadline_and_cancellation_does_not_wait(
    scripted_ca: Running,
) -> None:
    release = threading.Event()

    def hang(request, context):
        release.wait(5)
        return ca_pb2.IstioCertificateResponse()

    scripted_ca.servicer.answer = hang
    provider = RemoteCaProvider(
        scripted_ca.target, root_pem=None, token=lambda: "t", timeout=timedelta(seconds=0.2)
    )
    try:
        with pytest.raises(CaRequestError) as caught:
            await provider.fetch(REVIEWS)
        assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED

        start = trio.current_time()
        with trio.move_on_after(0.05):
            await provider.fetch(REVIEWS)
        assert trio.current_time() - start < 0.15
    finally:
        release.set()
        provider.close()


async def test_certificate_manager_gets_certificates_through_the_remote_ca(
    scripted_ca: Running,
) -> None:
    provider = RemoteCaProvider(scripted_ca.target, root_pem=None, token=lambda: "t")
    try:
        manager = CertificateManager(provider)
        cert = await manager.get(REVIEWS)
        assert await manager.get(REVIEWS) is cert
    finally:
        provider.close()
    assert len(scripted_ca.servicer.seen) == 1
