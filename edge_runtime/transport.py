"""Broker transport pieces both sides use: the device uplink (edge_runtime.uplink) and the hub's collectors
(edge_hub): broker URL parsing, the plaintext/TLS checks, and reconnect backoff with jitter."""
from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from edge_runtime.errors import ConfigError

SCHEMES = {"mqtt": False, "tcp": False, "mqtts": True, "ssl": True, "tls": True}


@dataclass(frozen=True)
class BrokerTarget:
    host: str
    port: int
    tls: bool


def parse_broker_url(url: str, where: str, key: str = "mqtt.broker") -> BrokerTarget:
    """mqtt://host[:1883] | mqtts://host[:8883] (also tcp://, ssl://, tls://)."""
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES or not parts.hostname:
        raise ConfigError(where, f"key '{key}' must look like mqtts://host:8883 or mqtt://host:1883; got {url!r}")
    if parts.path not in ("", "/") or parts.query or parts.username:
        raise ConfigError(where, f"key '{key}' must be scheme://host:port only (credentials go in mqtt.username / "
                                 f"mqtt.password_file); got {url!r}")
    tls = SCHEMES[parts.scheme]
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError:
        raise ConfigError(where, f"key '{key}' has an invalid port; got {url!r}") from None
    return BrokerTarget(parts.hostname, port, tls)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_transport(target: BrokerTarget, allow_insecure: bool, where: str, cert_files: dict[str, str],
                    insecure_key: str = "mqtt.allow_insecure", url_key: str = "mqtt.broker") -> None:
    """Plaintext only to loopback unless explicitly allowed; TLS files must exist and need TLS."""
    if not target.tls:
        given = [k for k, v in cert_files.items() if v]
        if given:
            raise ConfigError(where, f"key '{given[0]}' is set but '{url_key}' is plaintext; use mqtts://")
        if not is_loopback(target.host) and not allow_insecure:
            raise ConfigError(where, f"key '{url_key}' is plaintext MQTT to {target.host}, which would expose findings "
                                     f"and credentials on the network; use mqtts:// or set {insecure_key} = true")
    for key, value in cert_files.items():
        if value and not Path(value).is_file():
            raise ConfigError(where, f"key '{key}': no such file {value!r}")
    key_file = cert_files.get("mqtt.key_file") or cert_files.get("key_file")
    cert_file = cert_files.get("mqtt.cert_file") or cert_files.get("cert_file")
    if key_file and not cert_file:
        raise ConfigError(where, "a client key is set without a client certificate (mqtt.cert_file)")


def backoff_delay(attempt: int, lo: float, hi: float, rng: random.Random = random) -> float:  # type: ignore[assignment]
    """Exponential backoff with equal jitter: in [d/2, d], d = min(hi, lo * 2**attempt)."""
    d = min(hi, lo * (2 ** min(attempt, 30)))
    return d / 2 + rng.random() * d / 2
