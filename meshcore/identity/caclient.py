"""A CertificateProvider that asks a remote CA (istiod_lite, or istiod) for certificates.

Mirrors ztunnel's CaClient (src/identity/caclient.rs): the key and CSR are made here and
never leave the node; the CSR goes to `istio.v1.auth.IstioCertificateService/CreateCertificate`
with `authorization: Bearer <token>` and the request metadata
`{"ImpersonatedIdentity": <identity>}` (the node proxy asks on behalf of a pod), and the
returned leaf must carry exactly the identity asked for.

The call is a single blocking unary gRPC call, run in a worker thread with
`trio.to_thread.run_sync` under a gRPC deadline. It does not go through
`meshcore.xds.grpc_bridge` because there is no stream to bridge: one request, one answer.
If the trio caller is cancelled the thread is abandoned and ends at the deadline at most.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import grpc
import trio
from google.protobuf import struct_pb2

from meshcore._gen import ca_pb2, ca_pb2_grpc
from meshcore.identity.ca import generate_key_and_csr
from meshcore.identity.certs import CertificateError, WorkloadCertificate
from meshcore.identity.spiffe import Identity

IMPERSONATED_IDENTITY = "ImpersonatedIdentity"
DEFAULT_TTL = timedelta(hours=24)
DEFAULT_TIMEOUT = timedelta(seconds=10)


class CaRequestError(Exception):
    """The CA refused the request or could not be reached; `code` is the gRPC status."""

    def __init__(self, target: str, identity: Identity, code: grpc.StatusCode, details: str):
        super().__init__(
            f"CA {target} did not issue a certificate for {identity}: {code.name}: {details}"
        )
        self.code = code
        self.details = details


class RemoteCaProvider:
    """Certificates from the CA at `target` (host:port).

    `root_pem` verifies the CA's TLS certificate (port 15012); None speaks plaintext (15010,
    development only). `token` is called for every request, so a rotated token file is
    picked up. Call `close()` when done.
    """

    def __init__(
        self,
        target: str,
        *,
        root_pem: bytes | None,
        token: Callable[[], str],
        ttl: timedelta = DEFAULT_TTL,
        timeout: timedelta = DEFAULT_TIMEOUT,
    ) -> None:
        self._target = target
        self._roots = () if root_pem is None else (root_pem,)
        self._token = token
        self._ttl = ttl
        self._timeout = timeout
        if root_pem is None:
            self._channel = grpc.insecure_channel(target)
        else:
            credentials = grpc.ssl_channel_credentials(root_certificates=root_pem)
            self._channel = grpc.secure_channel(target, credentials)
        self._stub = ca_pb2_grpc.IstioCertificateServiceStub(self._channel)

    async def fetch(self, identity: Identity) -> WorkloadCertificate:
        """A new certificate for `identity`; raises CaRequestError or CertificateError."""
        key_pem, csr_pem = generate_key_and_csr(identity)
        chain = await trio.to_thread.run_sync(
            self._create_certificate, identity, csr_pem, abandon_on_cancel=True
        )
        cert = WorkloadCertificate.from_pem(key_pem, chain, self._roots)
        if cert.identity != identity:
            raise CertificateError(
                f"CA {self._target} issued a certificate for {cert.identity} "
                f"instead of {identity}"
            )
        return cert

    def close(self) -> None:
        self._channel.close()

    def _create_certificate(self, identity: Identity, csr_pem: bytes) -> list[bytes]:
        """The blocking call (worker thread): the chain as returned, one PEM per element."""
        metadata = struct_pb2.Struct()
        metadata.update({IMPERSONATED_IDENTITY: identity.uri})
        request = ca_pb2.IstioCertificateRequest(
            csr=csr_pem.decode(),
            validity_duration=int(self._ttl.total_seconds()),
            metadata=metadata,
        )
        try:
            response = self._stub.CreateCertificate(
                request,
                timeout=self._timeout.total_seconds(),
                metadata=(("authorization", f"Bearer {self._token()}"),),
            )
        except grpc.RpcError as exc:
            raise CaRequestError(self._target, identity, exc.code(), exc.details()) from None
        return [pem.encode() for pem in response.cert_chain]
