"""The `istio.v1.auth.IstioCertificateService/CreateCertificate` servicer: CSR in, chain out.

Each request is decided in this order (Istio's security/pkg/server/ca/server.go, node
authorization from node_auth.go):

1. authenticate the `authorization: Bearer <token>` metadata -> the caller's node (a node
   proxy) or its ServiceAccount (a workload, e.g. a waypoint, asking for itself);
2. the requested identity is the request metadata's `ImpersonatedIdentity`, in this CA's
   trust domain, and some pod on the caller's node runs as it (`identities_on_node`), or it
   is the calling workload's own identity;
3. the validity is the requested one (0 = default) up to `max_ttl`;
4. the CSR parses and names no identity but the requested one (the proto requires the
   server to check every SAN the caller asks for); its key is all the leaf takes from it.

Every refusal is a gRPC status with a message naming the field, identity or node, a warning
log line and `istiod_ca_requests_total{result=<status>}`; success counts as "success".

The servicer runs in gRPC's thread pool and stays synchronous: signing is pure, the
authenticator may block on one HTTP call, and `identities_on_node` must read a thread-safe
snapshot (the controller replaces it, never mutates it in place).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import timedelta

import grpc
import prometheus_client
from cryptography import x509

from istiod_lite.ca.authn import (
    Authenticator,
    CaRequestRefused,
    Caller,
    PermissionDenied,
    Unauthenticated,
)
from meshcore._gen import ca_pb2, ca_pb2_grpc
from meshcore.identity.ca import CertificateAuthority, CsrError
from meshcore.identity.spiffe import Identity, InvalidIdentity
from meshcore.log import get_logger

DEFAULT_TTL = timedelta(hours=24)
MAX_TTL = timedelta(days=90)
IMPERSONATED_IDENTITY = "ImpersonatedIdentity"
SUCCESS = "success"

_log = get_logger("ca")


class InvalidRequest(CaRequestRefused):
    """The request itself is wrong (CSR, identity, validity), whoever sent it."""

    status = grpc.StatusCode.INVALID_ARGUMENT


class CaService(ca_pb2_grpc.IstioCertificateServiceServicer):
    """Issues workload certificates to node proxies for the pods on their node."""

    def __init__(
        self,
        ca: CertificateAuthority,
        authenticator: Authenticator,
        identities_on_node: Callable[[str], set[Identity]],
        *,
        registry: prometheus_client.CollectorRegistry,
        default_ttl: timedelta = DEFAULT_TTL,
        max_ttl: timedelta = MAX_TTL,
    ) -> None:
        self._ca = ca
        self._authenticator = authenticator
        self._identities_on_node = identities_on_node
        self._default_ttl = default_ttl
        self._max_ttl = max_ttl
        self._requests = prometheus_client.Counter(
            "istiod_ca_requests",
            "Certificate requests by outcome: success or the gRPC status of the refusal",
            ("result",),
            registry=registry,
        )

    def CreateCertificate(  # noqa: N802 - the gRPC method name
        self, request: ca_pb2.IstioCertificateRequest, context: grpc.ServicerContext
    ) -> ca_pb2.IstioCertificateResponse:
        try:
            caller, identity, ttl = self._authorize(request, context.invocation_metadata())
            chain = self._sign(request.csr, identity, ttl)
        except CaRequestRefused as exc:
            result = exc.status.name.lower()
            self._requests.labels(result).inc()
            _log.warning(
                "certificate request refused", result=result, reason=str(exc), peer=context.peer()
            )
            context.abort(exc.status, str(exc))  # raises: ends the RPC with that status
        self._requests.labels(SUCCESS).inc()
        _log.info(
            "certificate issued",
            identity=identity.uri,
            node=caller.node,
            caller=caller.identity,
            ttl_seconds=int(ttl.total_seconds()),
        )
        return ca_pb2.IstioCertificateResponse(cert_chain=[pem.decode() for pem in chain])

    # --- decisions ---

    def _authorize(
        self,
        request: ca_pb2.IstioCertificateRequest,
        metadata: Sequence[tuple[str, str | bytes]] | None,
    ) -> tuple[Caller, Identity, timedelta]:
        caller = self._authenticator.authenticate(_bearer_token(metadata or ()))
        identity = self._requested_identity(request)
        if caller.node is None:
            assert caller.service_account is not None
            own = Identity(self._ca.trust_domain, *caller.service_account)
            if identity != own:
                raise PermissionDenied(
                    f"caller {caller.identity} may only obtain a certificate for its own "
                    f"identity {own}, not {identity}"
                )
        elif identity not in self._identities_on_node(caller.node):
            raise PermissionDenied(
                f"caller {caller.identity} may not obtain a certificate for {identity}: "
                f"no pod with that identity runs on its node {caller.node!r}"
            )
        return caller, identity, self._ttl(request.validity_duration)

    def _requested_identity(self, request: ca_pb2.IstioCertificateRequest) -> Identity:
        field = request.metadata.fields.get(IMPERSONATED_IDENTITY)
        if field is None or field.WhichOneof("kind") != "string_value":
            raise InvalidRequest(
                f"request metadata {IMPERSONATED_IDENTITY} (a SPIFFE identity string) is "
                "required: this CA issues certificates to node proxies for their pods"
            )
        try:
            identity = Identity.parse(field.string_value)
        except InvalidIdentity as exc:
            raise InvalidRequest(f"{IMPERSONATED_IDENTITY}: {exc}") from None
        if identity.trust_domain != self._ca.trust_domain:
            raise InvalidRequest(
                f"{IMPERSONATED_IDENTITY} {identity} is outside this CA's trust domain "
                f"{self._ca.trust_domain!r}"
            )
        return identity

    def _ttl(self, validity_seconds: int) -> timedelta:
        # Like istiod, a missing (0) or negative validity means the default.
        if validity_seconds <= 0:
            return self._default_ttl
        requested = timedelta(seconds=validity_seconds)
        if requested > self._max_ttl:
            raise InvalidRequest(
                f"validity_duration {validity_seconds}s exceeds the maximum "
                f"{int(self._max_ttl.total_seconds())}s"
            )
        return requested

    def _sign(self, csr: str, identity: Identity, ttl: timedelta) -> list[bytes]:
        csr_pem = csr.encode()
        try:
            requested = x509.load_pem_x509_csr(csr_pem)
            san = requested.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            uris = san.value.get_values_for_type(x509.UniformResourceIdentifier)
        except x509.ExtensionNotFound:
            uris = []
        except ValueError as exc:
            raise InvalidRequest(
                f"csr for {identity} is not a PEM certificate signing request: {exc}"
            ) from None
        if any(uri != identity.uri for uri in uris):
            raise InvalidRequest(
                f"csr asks for {', '.join(uris)} but {IMPERSONATED_IDENTITY} is {identity}"
            )
        try:
            return self._ca.sign_csr(csr_pem, identity, ttl=ttl)
        except CsrError as exc:
            raise InvalidRequest(str(exc)) from None


def _bearer_token(metadata: Sequence[tuple[str, str | bytes]]) -> str:
    values = [v for k, v in metadata if k == "authorization" and isinstance(v, str)]
    if not values:
        raise Unauthenticated("no bearer token: send `authorization: Bearer <token>` metadata")
    scheme, _, token = values[0].partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("authorization metadata is not `Bearer <token>`")
    return token.strip()
