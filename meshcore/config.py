"""meshcore/config: reading the proxies' YAML config files, with errors that name file and field.

Each program parses its file once into frozen dataclasses (ztunnel/config.py,
waypoint/settings.py); the shared shapes (addresses, the control-plane block, port maps) are
read here so that every program reports a bad value the same way.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file is unusable; the message names the file and the field."""


@dataclass(frozen=True, slots=True)
class ControlPlane:
    """istiod_lite: delta xDS and its CA, over TLS when `root_cert_path` is set."""

    address: str
    token_path: Path
    root_cert_path: Path | None = None

    def token(self) -> str:
        """The bearer token, re-read on every use so a rotated file takes effect."""
        try:
            return self.token_path.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"controlPlane.tokenFile: cannot read {self.token_path}: {exc.strerror}") from exc


def load_yaml_file(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc


class ConfigReader:
    """Typed access to a top-level mapping; every error names `source` and the field."""

    def __init__(self, raw: Any, *, source: str, base: Path, known: tuple[str, ...]) -> None:
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a mapping at the top level")
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise ConfigError(f"{source}: unknown field {unknown[0]!r} (known: {', '.join(known)})")
        self.raw = raw
        self.source = source
        self.base = base

    def fail(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {key}: {message}")

    def required(self, key: str) -> Any:
        if key not in self.raw:
            raise self.fail(key, "required")
        return self.raw[key]

    def text(self, key: str, value: Any) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(key, f"expected a non-empty string, got {value!r}")
        return value

    def path(self, key: str, value: Any) -> Path:
        return self.base / self.text(key, value)

    def ip_address(self, key: str) -> str:
        address = self.text(key, self.required(key))
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise self.fail(key, f"{address!r} is not an IP address") from None
        return address

    def mapping(self, key: str) -> Mapping[str, Any]:
        value = self.raw.get(key) or {}
        if not isinstance(value, dict):
            raise self.fail(key, f"expected a mapping, got {value!r}")
        return value

    def control_plane(self, key: str = "controlPlane") -> ControlPlane:
        cp = self.raw[key]
        if not isinstance(cp, dict) or not {"address", "tokenFile"} <= set(cp) or set(cp) - {"address", "tokenFile", "rootCert"}:
            raise self.fail(key, f"expected {{address: HOST:PORT, tokenFile: PATH, rootCert: PATH}}, got {cp!r}")
        host, _, port = self.text(f"{key}.address", cp["address"]).rpartition(":")
        if not host or not port.isdigit():
            raise self.fail(f"{key}.address", f"expected HOST:PORT, got {cp['address']!r}")
        return ControlPlane(
            address=cp["address"],
            token_path=self.path(f"{key}.tokenFile", cp["tokenFile"]),
            root_cert_path=self.path(f"{key}.rootCert", cp["rootCert"]) if "rootCert" in cp else None,
        )

    def ports(self, defaults: Mapping[str, int], key: str = "ports") -> dict[str, int]:
        ports = dict(defaults)
        for name, value in self.mapping(key).items():
            if name not in defaults:
                raise self.fail(f"{key}.{name}", f"unknown port (known: {', '.join(defaults)})")
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 65535:
                raise self.fail(f"{key}.{name}", f"expected a port number 0-65535, got {value!r}")
            ports[name] = value
        return ports

    def seconds(self, key: str, default: float) -> float:
        value = self.raw.get(key, default)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise self.fail(key, f"expected a non-negative number, got {value!r}")
        return float(value)
