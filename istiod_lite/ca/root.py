"""The mesh CA's signing key: a self-signed root persisted on disk, or an operator's plug-in CA.

Self-signed (istiod's default): on first start a root is generated into `root_dir` as
`ca-cert.pem` and `ca-key.pem` (the names of Istio's `istio-ca-secret`); later starts load
the same files, so certificates issued before a restart keep verifying. The key file is
created 0600 and refused when group or others can read it: whoever reads it can mint any
identity in the mesh.

With the kube source the self-signed root lives in the Secret `istio-ca-secret` of istiod's
namespace instead (Istio's name, type and keys: ca-cert.pem, ca-key.pem, cert-chain.pem,
root-cert.pem), so every replica and every restart uses the same root. The first istiod to
find no Secret creates it; one that loses that race (409) loads the winner's. The root
certificate (never the key) is published in the ConfigMap `istio-ca-root-cert` of that
namespace, which ztunnel mounts to verify istiod's TLS certificate, as in Istio.

Plug-in (Istio's `cacerts`): the operator's signing cert, key and chain to their root
(`--ca-cert/--ca-key/--ca-chain`). Their permissions are left to the operator, because a
Kubernetes Secret volume mounts files 0644 by default and is protected by its directory.

`issue_serving_certificate` makes istiod_lite's own TLS certificate for the 15012 port
(DNS/IP SANs, which `CertificateAuthority.sign_csr` deliberately never issues).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import kubernetes.client
import urllib3
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID

from kubernetes.client.exceptions import ApiException

from istiod_lite.kube.api import describe_api_error
from meshcore.identity.ca import CLOCK_SKEW_ALLOWANCE, CertificateAuthority
from meshcore.identity.certs import CertificateError, is_issued_by, is_self_signed
from meshcore.log import get_logger

CA_CERT_FILE = "ca-cert.pem"
CA_KEY_FILE = "ca-key.pem"
CERT_CHAIN_FILE = "cert-chain.pem"
ROOT_CERT_FILE = "root-cert.pem"
CA_SECRET_NAME = "istio-ca-secret"
CA_SECRET_TYPE = "istio.io/ca-root"
ROOT_CERT_CONFIGMAP = "istio-ca-root-cert"
_API_TIMEOUT = (10, 30)  # connect, read seconds
KEY_FILE_MODE = 0o600
# The serving certificate is issued once per start and not rotated while the gRPC server
# runs, so it must outlive any realistic uptime; the CA's own expiry still caps it.
SERVING_CERT_TTL = timedelta(days=365)

_log = get_logger("ca")


class RootError(Exception):
    """The CA root cannot be created, loaded or trusted; the message names the file and a fix."""


def load_or_create_root(
    root_dir: Path, trust_domain: str = "cluster.local"
) -> CertificateAuthority:
    """The persisted self-signed root in `root_dir`, generated there on first start."""
    cert_path, key_path = root_dir / CA_CERT_FILE, root_dir / CA_KEY_FILE
    present = [p for p in (cert_path, key_path) if p.exists()]
    if len(present) == 2:
        ca = _load_persisted(cert_path, key_path, trust_domain)
        _log.info("loaded CA root", cert=str(cert_path), expires=_expiry(ca).isoformat())
        return ca
    if present:
        (missing,) = {cert_path, key_path} - set(present)
        raise RootError(
            f"{root_dir} holds {present[0].name} but not {missing.name}: refusing to replace a "
            "half-present CA root; restore the missing file, or remove both to generate a new "
            "root (every proxy then needs the new root)"
        )
    return _create(root_dir, cert_path, key_path, trust_domain)


def load_or_create_root_secret(
    api_client: kubernetes.client.ApiClient, namespace: str, trust_domain: str = "cluster.local"
) -> CertificateAuthority:
    """The self-signed root in Secret `istio-ca-secret` of `namespace`, created there if absent.

    Raises RootError naming the Secret when it cannot be read, created or used.
    """
    core = kubernetes.client.CoreV1Api(api_client)
    where = f"Secret {namespace}/{CA_SECRET_NAME}"
    secret = _read_secret(core, namespace, where)
    if secret is not None:
        ca = _ca_from_secret(secret, where, trust_domain)
        _log.info("loaded CA root", secret=where, expires=_expiry(ca).isoformat())
        return ca
    ca = CertificateAuthority.generate(trust_domain)
    body = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": CA_SECRET_NAME, "namespace": namespace},
        "type": CA_SECRET_TYPE,
        "data": {
            key: base64.b64encode(value).decode()
            for key, value in (
                (CA_CERT_FILE, ca.cert_pem),
                (CA_KEY_FILE, ca.key_pem),
                (CERT_CHAIN_FILE, b""),  # self-signed: nothing between the root and leaves
                (ROOT_CERT_FILE, ca.cert_pem),
            )
        },
    }
    try:
        core.create_namespaced_secret(namespace, body, _request_timeout=_API_TIMEOUT)
    except ApiException as exc:
        if exc.status != 409:
            raise RootError(f"cannot create {where}: {describe_api_error(exc)}") from None
        # Another replica created it between our read and our create: use theirs.
        secret = _read_secret(core, namespace, where)
        if secret is None:
            raise RootError(f"{where} was created and deleted again while istiod started; restart it") from None
        ca = _ca_from_secret(secret, where, trust_domain)
        _log.info("loaded CA root another istiod created", secret=where)
        return ca
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise RootError(f"cannot create {where}: {type(exc).__name__}: {exc}") from None
    _log.info("generated CA root", secret=where, trust_domain=trust_domain)
    return ca


def publish_root_cert(api_client: kubernetes.client.ApiClient, namespace: str, root_pem: bytes) -> None:
    """Create or update ConfigMap `istio-ca-root-cert` (key root-cert.pem) in `namespace`.

    Raises RootError naming the ConfigMap and what the API server said.
    """
    core = kubernetes.client.CoreV1Api(api_client)
    where = f"ConfigMap {namespace}/{ROOT_CERT_CONFIGMAP}"
    body = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": ROOT_CERT_CONFIGMAP, "namespace": namespace},
        "data": {ROOT_CERT_FILE: root_pem.decode()},
    }
    try:
        try:
            response = core.read_namespaced_config_map(
                ROOT_CERT_CONFIGMAP, namespace, _preload_content=False, _request_timeout=_API_TIMEOUT
            )
        except ApiException as exc:
            if exc.status != 404:
                raise
            core.create_namespaced_config_map(namespace, body, _request_timeout=_API_TIMEOUT)
            _log.info("published the CA root", configmap=where)
            return
        current = json.loads(response.data)
        response.release_conn()
        if (current.get("data") or {}).get(ROOT_CERT_FILE) == body["data"][ROOT_CERT_FILE]:
            return
        # Replace with the version read: a concurrent writer makes this fail (409), not vanish.
        body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        core.replace_namespaced_config_map(ROOT_CERT_CONFIGMAP, namespace, body, _request_timeout=_API_TIMEOUT)
        _log.info("published the CA root", configmap=where, replaced=True)
    except ApiException as exc:
        raise RootError(f"cannot publish the CA root in {where}: {describe_api_error(exc)}") from None
    except (urllib3.exceptions.HTTPError, OSError, ValueError, KeyError) as exc:
        raise RootError(f"cannot publish the CA root in {where}: {type(exc).__name__}: {exc}") from None


def load_plugin_ca(
    cert_file: Path,
    key_file: Path,
    chain_file: Path | None = None,
    *,
    trust_domain: str = "cluster.local",
) -> CertificateAuthority:
    """An operator-provided CA (`--ca-cert/--ca-key[/--ca-chain]`); raises RootError."""
    cert_pem = _read(cert_file, "CA certificate")
    key_pem = _read(key_file, "CA key")
    chain_pem = b"" if chain_file is None else _read(chain_file, "CA chain")
    try:
        ca = CertificateAuthority.load(
            cert_pem, key_pem, chain_pem=chain_pem, trust_domain=trust_domain
        )
    except CertificateError as exc:
        files = ", ".join(str(f) for f in (cert_file, key_file, chain_file) if f is not None)
        raise RootError(f"plug-in CA ({files}) is unusable: {exc}") from None
    _check_not_expired(ca, cert_file)
    _log.info("loaded plug-in CA", cert=str(cert_file), expires=_expiry(ca).isoformat())
    return ca


@dataclass(frozen=True)
class ServingCertificate:
    """A TLS server certificate in the shape `grpc.ssl_server_credentials` takes."""

    key_pem: bytes
    chain_pem: bytes  # leaf, then any intermediate, concatenated; never the root


def issue_serving_certificate(
    ca: CertificateAuthority,
    *,
    dns_names: Sequence[str],
    ip_addresses: Sequence[str] = (),
    ttl: timedelta = SERVING_CERT_TTL,
) -> ServingCertificate:
    """istiod_lite's TLS certificate (e.g. `istiod.istio-system.svc` and 127.0.0.1).

    Raises ValueError naming a bad IP address, RootError if the CA's chain cannot be sent.
    """
    sans: list[x509.GeneralName] = [x509.DNSName(name) for name in dns_names]
    for address in ip_addresses:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(address)))
        except ValueError:
            raise ValueError(f"serving certificate IP address {address!r} is invalid") from None
    if not sans:
        raise ValueError("a serving certificate needs at least one DNS name or IP address")

    signer = x509.load_pem_x509_certificate(ca.cert_pem)
    # The chain a client needs between our leaf and the root it trusts.
    if is_self_signed(signer):
        above_leaf: list[bytes] = []
    elif is_issued_by(signer, x509.load_pem_x509_certificate(ca.roots_pem[0])):
        above_leaf = [ca.cert_pem]
    else:
        raise RootError(
            "the plug-in CA is more than one level below its root; istiod_lite cannot build "
            "its serving certificate chain from it: sign with an intermediate issued directly "
            "by the root"
        )

    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(signer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW_ALLOWANCE)
        .not_valid_after(min(now + ttl, signer.not_valid_after_utc))
        # The subject is empty, so RFC 5280 requires the SAN to be critical.
        .add_extension(x509.SubjectAlternativeName(sans), critical=True)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(_authority_key_id(signer), critical=False)
        # EdDSA keys hash internally and must be given no digest.
        .sign(
            ca_key,  # type: ignore[arg-type]
            None
            if isinstance(ca_key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey)
            else hashes.SHA256(),
        )
    )
    return ServingCertificate(
        key_pem=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        chain_pem=b"".join([leaf.public_bytes(serialization.Encoding.PEM), *above_leaf]),
    )


# --- internals ---


def _load_persisted(cert_path: Path, key_path: Path, trust_domain: str) -> CertificateAuthority:
    mode = stat.S_IMODE(key_path.stat().st_mode)
    if mode & 0o077:
        raise RootError(
            f"CA key {key_path} has mode {mode:04o}: it must not be accessible to group or "
            f"others (anyone who reads it can mint any identity); run `chmod 600 {key_path}`"
        )
    cert_pem = _read(cert_path, "CA certificate")
    key_pem = _read(key_path, "CA key")
    try:
        ca = CertificateAuthority.load(cert_pem, key_pem, trust_domain=trust_domain)
    except CertificateError as exc:
        raise RootError(f"persisted CA root in {cert_path.parent} is unusable: {exc}") from None
    _check_not_expired(ca, cert_path)
    return ca


def _create(
    root_dir: Path, cert_path: Path, key_path: Path, trust_domain: str
) -> CertificateAuthority:
    ca = CertificateAuthority.generate(trust_domain)
    try:
        root_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Key first: a crash between the two writes leaves a key without a cert, which the
        # next start reports instead of silently generating a second root.
        _write_new(key_path, ca.key_pem, KEY_FILE_MODE)
        _write_new(cert_path, ca.cert_pem, 0o644)
    except OSError as exc:
        raise RootError(f"cannot persist the CA root in {root_dir}: {exc.strerror}") from None
    _log.info("generated CA root", cert=str(cert_path), trust_domain=trust_domain)
    return ca


def _read_secret(core: kubernetes.client.CoreV1Api, namespace: str, where: str) -> dict | None:
    """The Secret as the API server's JSON, or None if it does not exist."""
    try:
        response = core.read_namespaced_secret(
            CA_SECRET_NAME, namespace, _preload_content=False, _request_timeout=_API_TIMEOUT
        )
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise RootError(f"cannot read {where}: {describe_api_error(exc)}") from None
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise RootError(f"cannot read {where}: {type(exc).__name__}: {exc}") from None
    try:
        return json.loads(response.data)
    except ValueError as exc:
        raise RootError(f"cannot read {where}: the API server sent no JSON: {exc}") from None
    finally:
        response.release_conn()


def _ca_from_secret(secret: dict, where: str, trust_domain: str) -> CertificateAuthority:
    data = secret.get("data") or {}
    pems = {}
    for key in (CA_CERT_FILE, CA_KEY_FILE):
        try:
            pems[key] = base64.b64decode(data[key], validate=True)
        except KeyError:
            raise RootError(
                f"{where} has no {key}: restore it, or delete the Secret to generate a new root "
                "(every proxy then needs the new root)"
            ) from None
        except (binascii.Error, TypeError):
            raise RootError(f"{where}: {key} is not base64") from None
    try:
        ca = CertificateAuthority.load(pems[CA_CERT_FILE], pems[CA_KEY_FILE], trust_domain=trust_domain)
    except CertificateError as exc:
        raise RootError(f"{where} holds an unusable CA root: {exc}") from None
    _check_not_expired(ca, where)
    return ca


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Write via a temporary file, created with `mode` so the key is never readable by others."""
    temporary = path.with_name(path.name + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as file:
        os.fchmod(fd, mode)  # a leftover temporary file from a crash kept its old mode
        file.write(data)
        file.flush()
        os.fsync(fd)
    os.replace(temporary, path)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise RootError(f"cannot read {what} {path}: {exc.strerror}") from None


def _authority_key_id(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        public_key = issuer.public_key()
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key)  # type: ignore[arg-type]
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _expiry(ca: CertificateAuthority) -> datetime:
    return x509.load_pem_x509_certificate(ca.cert_pem).not_valid_after_utc


def _check_not_expired(ca: CertificateAuthority, where: Path | str) -> None:
    expiry = _expiry(ca)
    if expiry <= datetime.now(UTC):
        raise RootError(
            f"CA certificate {where} expired at {expiry.isoformat()}: replace it (every "
            "proxy then needs the new root)"
        )
