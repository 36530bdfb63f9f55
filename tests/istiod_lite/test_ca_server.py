"""The CA service over real gRPC + TLS on loopback, with node tokens and the ztunnel's client."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import grpc
import prometheus_client
import pytest
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store
from google.protobuf import struct_pb2
from structlog.testing import capture_logs

from istiod_lite.ca.authn import AuthenticatorUnavailable, Caller, NodeTokenAuthenticator
from istiod_lite.ca.root import issue_serving_certificate
from istiod_lite.ca.server import CaService
from istiod_lite.ca.tokens import NodeTokens
from meshcore._gen import ca_pb2, ca_pb2_grpc
from meshcore.identity.ca import CertificateAuthority, generate_key_and_csr
from meshcore.identity.caclient import CaRequestError, RemoteCaProvider
from meshcore.identity.spiffe import Identity
from meshcore.metrics import new_registry

REVIEWS = Identity("cluster.local", "default", "reviews")  # a pod on node-a
RATINGS = Identity("cluster.local", "default", "ratings")  # a pod on node-b only
PODS_BY_NODE = {"node-a": {REVIEWS}, "node-b": {RATINGS}}


@dataclass
class CaServer:
    target: str
    ca: CertificateAuthority
    tokens: NodeTokens
    registry: prometheus_client.CollectorRegistry

    def requests(self, result: str) -> float:
        return self.registry.get_sample_value("istiod_ca_requests_total", {"result": result}) or 0

    def channel(self) -> grpc.Channel:
        credentials = grpc.ssl_channel_credentials(root_certificates=self.ca.roots_pem[0])
        return grpc.secure_channel(self.target, credentials)

    def provider(self, node: str, *, ttl: timedelta = timedelta(hours=24)) -> RemoteCaProvider:
        return RemoteCaProvider(
            self.target,
            root_pem=self.ca.roots_pem[0],
            token=lambda: self.tokens.token_for(node),
            ttl=ttl,
        )


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.generate()


def _serve(service: CaService, ca: CertificateAuthority) -> tuple[grpc.Server, str]:
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    ca_pb2_grpc.add_IstioCertificateServiceServicer_to_server(service, server)
    serving = issue_serving_certificate(
        ca, dns_names=["istiod.istio-system.svc"], ip_addresses=["127.0.0.1"]
    )
    port = server.add_secure_port(
        "127.0.0.1:0", grpc.ssl_server_credentials([(serving.key_pem, serving.chain_pem)])
    )
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
def ca_server(tmp_path: Path, ca: CertificateAuthority) -> Iterator[CaServer]:
    tokens = NodeTokens(tmp_path / "tokens")
    registry = new_registry()
    service = CaService(
        ca,
        NodeTokenAuthenticator(tokens),
        lambda node: PODS_BY_NODE.get(node, set()),
        registry=registry,
    )
    server, target = _serve(service, ca)
    yield CaServer(target=target, ca=ca, tokens=tokens, registry=registry)
    server.stop(None)


def _request(
    csr_pem: bytes, identity: str | None, *, validity_seconds: int = 0
) -> ca_pb2.IstioCertificateRequest:
    metadata = struct_pb2.Struct()
    if identity is not None:
        metadata.update({"ImpersonatedIdentity": identity})
    return ca_pb2.IstioCertificateRequest(
        csr=csr_pem.decode(), validity_duration=validity_seconds, metadata=metadata
    )


def _call(
    server: CaServer, request: ca_pb2.IstioCertificateRequest, *, token: str | None
) -> ca_pb2.IstioCertificateResponse:
    metadata = () if token is None else (("authorization", f"Bearer {token}"),)
    with server.channel() as channel:
        stub = ca_pb2_grpc.IstioCertificateServiceStub(channel)
        return stub.CreateCertificate(request, metadata=metadata, timeout=10)


def _refusal(
    server: CaServer, request: ca_pb2.IstioCertificateRequest, *, token: str | None
) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        _call(server, request, token=token)
    return caught.value


# --- issuing ---


async def test_node_gets_a_verifiable_chain_for_a_pod_on_its_node(ca_server: CaServer) -> None:
    provider = ca_server.provider("node-a")
    try:
        cert = await provider.fetch(REVIEWS)
    finally:
        provider.close()

    assert cert.identity == REVIEWS
    assert cert.not_after - cert.not_before == timedelta(hours=24, minutes=1)
    leaf, *intermediates = (x509.load_pem_x509_certificate(p) for p in cert.chain_pem)
    roots = Store([x509.load_pem_x509_certificate(r) for r in ca_server.ca.roots_pem])
    chain = PolicyBuilder().store(roots).build_client_verifier().verify(leaf, intermediates).chain
    assert chain[-1] == x509.load_pem_x509_certificate(ca_server.ca.cert_pem)
    assert ca_server.requests("success") == 1


def test_response_is_leaf_then_root_one_pem_per_element(ca_server: CaServer) -> None:
    _, csr_pem = generate_key_and_csr(REVIEWS)
    response = _call(
        ca_server, _request(csr_pem, REVIEWS.uri), token=ca_server.tokens.token_for("node-a")
    )
    assert len(response.cert_chain) == 2
    assert all(pem.count("BEGIN CERTIFICATE") == 1 for pem in response.cert_chain)
    assert response.cert_chain[-1].encode() == ca_server.ca.roots_pem[0]


async def test_requested_validity_is_honoured(ca_server: CaServer) -> None:
    provider = ca_server.provider("node-a", ttl=timedelta(hours=1))
    try:
        cert = await provider.fetch(REVIEWS)
    finally:
        provider.close()
    assert cert.not_after - cert.not_before == timedelta(hours=1, minutes=1)


# --- refusals ---


async def test_wrong_token_is_unauthenticated(ca_server: CaServer) -> None:
    ca_server.tokens.token_for("node-a")
    provider = RemoteCaProvider(
        ca_server.target, root_pem=ca_server.ca.roots_pem[0], token=lambda: "not-a-node-token"
    )
    try:
        with pytest.raises(CaRequestError) as caught:
            await provider.fetch(REVIEWS)
    finally:
        provider.close()
    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert "not the token of any node" in caught.value.details
    assert ca_server.requests("unauthenticated") == 1
    assert ca_server.requests("success") == 0


def test_missing_token_is_unauthenticated_and_logged(ca_server: CaServer) -> None:
    _, csr_pem = generate_key_and_csr(REVIEWS)
    with capture_logs() as logs:
        error = _refusal(ca_server, _request(csr_pem, REVIEWS.uri), token=None)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "no bearer token" in error.details()
    refused = [e for e in logs if e["event"] == "certificate request refused"]
    assert refused[0]["result"] == "unauthenticated"
    assert "no bearer token" in refused[0]["reason"]


async def test_identity_of_a_pod_on_another_node_is_denied(ca_server: CaServer) -> None:
    provider = ca_server.provider("node-a")
    try:
        with pytest.raises(CaRequestError) as caught:
            await provider.fetch(RATINGS)
    finally:
        provider.close()
    assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert RATINGS.uri in caught.value.details
    assert "'node-a'" in caught.value.details
    assert ca_server.requests("permission_denied") == 1


def test_malformed_csr_is_invalid_argument(ca_server: CaServer) -> None:
    error = _refusal(
        ca_server,
        _request(b"-----BEGIN CERTIFICATE REQUEST-----\nnope\n", REVIEWS.uri),
        token=ca_server.tokens.token_for("node-a"),
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a PEM certificate signing request" in error.details()
    assert ca_server.requests("invalid_argument") == 1


def test_csr_for_another_trust_domain_is_invalid_argument(ca_server: CaServer) -> None:
    foreign = Identity("other.example", "default", "reviews")
    _, csr_pem = generate_key_and_csr(foreign)
    error = _refusal(
        ca_server, _request(csr_pem, foreign.uri), token=ca_server.tokens.token_for("node-a")
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "outside this CA's trust domain 'cluster.local'" in error.details()


def test_csr_naming_another_identity_than_requested_is_invalid_argument(
    ca_server: CaServer,
) -> None:
    _, csr_pem = generate_key_and_csr(RATINGS)
    error = _refusal(
        ca_server, _request(csr_pem, REVIEWS.uri), token=ca_server.tokens.token_for("node-a")
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"csr asks for {RATINGS.uri}" in error.details()


def test_missing_impersonated_identity_is_invalid_argument(ca_server: CaServer) -> None:
    _, csr_pem = generate_key_and_csr(REVIEWS)
    error = _refusal(ca_server, _request(csr_pem, None), token=ca_server.tokens.token_for("node-a"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ImpersonatedIdentity" in error.details()


def test_validity_beyond_the_maximum_is_invalid_argument(ca_server: CaServer) -> None:
    _, csr_pem = generate_key_and_csr(REVIEWS)
    error = _refusal(
        ca_server,
        _request(csr_pem, REVIEWS.uri, validity_seconds=91 * 24 * 3600),
        token=ca_server.tokens.token_for("node-a"),
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "exceeds the maximum 7776000s" in error.details()


def test_authenticator_outage_is_unavailable(ca: CertificateAuthority) -> None:
    class KubeApiDown:
        def authenticate(self, bearer_token: str) -> Caller:
            raise AuthenticatorUnavailable("TokenReview failed: HTTP 503 Service Unavailable")

    registry = new_registry()
    server, target = _serve(CaService(ca, KubeApiDown(), lambda node: set(), registry=registry), ca)
    try:
        _, csr_pem = generate_key_and_csr(REVIEWS)
        state = CaServer(target=target, ca=ca, tokens=NodeTokens(Path("unused")), registry=registry)
        error = _refusal(state, _request(csr_pem, REVIEWS.uri), token="any")
    finally:
        server.stop(None)
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "HTTP 503" in error.details()
    assert state.requests("unavailable") == 1


def test_client_with_another_root_does_not_trust_the_server(ca_server: CaServer) -> None:
    other_root = CertificateAuthority.generate().roots_pem[0]
    credentials = grpc.ssl_channel_credentials(root_certificates=other_root)
    _, csr_pem = generate_key_and_csr(REVIEWS)
    with grpc.secure_channel(ca_server.target, credentials) as channel:
        stub = ca_pb2_grpc.IstioCertificateServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.CreateCertificate(_request(csr_pem, REVIEWS.uri), timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert ca_server.requests("success") == 0
