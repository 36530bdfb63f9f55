"""The ztunnel proxy's error hierarchy.

Every failure a proxied connection can meet is one of these classes. Each carries what the
boundary needs to report it without further thought: `status` (the HTTP status an HBONE
server answers the CONNECT with), `response_flag` (the `response_flags` metric label and
access-log field, spelled like Istio's ztunnel: "-", "DENY", "CONNECT", "TLS_FAILURE",
"H2_HANDSHAKE_FAILURE", "NETWORK_POLICY", "IDENTITY_ERROR") and an operator-facing message
that ends with a hint about where to look.

Statuses follow ztunnel's inbound: 400 malformed CONNECT, 401 policy denied, 503 for
everything else the server cannot serve.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from ztunnel.rbac import Decision


class ProxyError(Exception):
    """A proxied connection failed; subclasses say why."""

    status: ClassVar[int] = 503
    response_flag: ClassVar[str] = "CONNECT"
    hint: ClassVar[str] = ""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return f"{self.message} (hint: {self.hint})" if self.hint else self.message


class MalformedConnect(ProxyError):
    """The HBONE request was not a CONNECT to a valid "ip:port"."""

    status = 400
    hint = "HBONE peers must send CONNECT with :authority 'ip:port' ('[ipv6]:port')"


class UnknownDestination(ProxyError):
    """No workload or service is known for the requested destination."""

    hint = "check that the destination exists in this ztunnel's config (/config_dump)"


class NoLocalWorkload(UnknownDestination):
    """An inbound CONNECT names an IP that is not a workload on this node."""

    hint = (
        "the pod may have moved or not be enrolled yet; compare the authority with "
        "this node's workloads in /config_dump"
    )


class UnknownWaypoint(UnknownDestination):
    """A destination uses a waypoint that this ztunnel cannot resolve."""

    hint = "check that the waypoint's Service or pod is in /config_dump and has an address"


class SelfCall(ProxyError):
    """The target is one of ztunnel's own ports; forwarding would loop."""

    hint = "ports 15001/15006/15008/15080 are reserved for ztunnel inside enrolled pods"


class PolicyDenied(ProxyError):
    """An authorization policy rejected the connection."""

    status = 401
    response_flag = "DENY"
    hint = "see the AuthorizationPolicies that apply to the destination workload"

    def __init__(self, decision: Decision) -> None:
        where = f" by policy {decision.policy}" if decision.policy else ""
        super().__init__(f"connection denied{where}: {decision.reason}")
        self.decision = decision


class AuthorizationRevoked(ProxyError):
    """An open connection was closed because a policy change no longer allows it."""

    status = 401
    response_flag = "DENY"
    hint = "a policy update re-evaluated open connections; see the destination's policies"

    def __init__(self, policy: str | None) -> None:
        super().__init__(f"closed: no longer allowed by policy {policy or '-'}")
        self.policy = policy  # "ns/name" of the DENY policy that matched; None if no ALLOW did


class UpstreamConnectFailed(ProxyError):
    """The TCP connection to the next hop (app, peer ztunnel or waypoint) failed."""

    hint = "is the application listening on the target port?"


class NetworkPolicyBlocked(UpstreamConnectFailed):
    """Connecting to a peer's HBONE port timed out, as when a NetworkPolicy drops it."""

    response_flag = "NETWORK_POLICY"
    hint = "maybe a NetworkPolicy is blocking HBONE port 15008 between pods"


class NoHealthyUpstream(ProxyError):
    """A service was addressed but none of its endpoints can take the connection."""

    hint = "check that the service's pods are healthy, have capacity and expose the port"


class UnknownSource(ProxyError):
    """An outbound connection came from an IP that is not a known local workload."""

    hint = "the pod may not be enrolled yet or its Workload has not arrived from istiod"


class TlsFailure(ProxyError):
    """The mTLS handshake with the peer failed."""

    response_flag = "TLS_FAILURE"
    hint = "check that both sides trust the same mesh root and certificates are not expired"


class IdentityFailure(ProxyError):
    """A certificate for a workload identity could not be obtained, or the peer's was wrong."""

    response_flag = "IDENTITY_ERROR"
    hint = "check the CA (istiod) is reachable and the peer presents the expected SPIFFE ID"


class H2HandshakeFailure(ProxyError):
    """The HTTP/2 connection preface or settings exchange with the peer failed."""

    response_flag = "H2_HANDSHAKE_FAILURE"
    hint = "the peer on port 15008 must speak HTTP/2 over TLS with ALPN h2"


class HboneRejected(ProxyError):
    """The HBONE peer answered the CONNECT with a status other than 200."""

    hint = "401 means the destination's policy denied us, 503 that its upstream failed"

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        # Shadows the class-level status: this is the peer's answer, relayed as is.
        self.status = status  # type: ignore[misc]
