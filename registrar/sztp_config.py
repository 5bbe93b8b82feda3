"""The SZTP bootstrap server's configuration file (TOML), validated at start.

    [sztp]
    registrar = "registrar.toml"  # required. The registrar this server belongs to: its TLS
                                  # certificate and key (also the RVR signer toward the MASA),
                                  # manufacturer CAs (IDevID client authentication), MASA
                                  # routes and store (SZTP records and progress live there)
    listen = ["[::]:8443"]        # RESTCONF over HTTPS; behind joinproxyd's circuit mode this is
                                  # the port configured as the registrar's
    owner_cert = ""               # PEM: the owner certificate first, then its chain up to (not
                                  # necessarily including) the domain CA the MASA pins; it
                                  # signs conveyed information. Default: the registrar's chain
    owner_key = ""                # its private key (ECDSA); default: the registrar's key
    encoding = "json"             # conveyed-information encoding inside the CMS: json | xml
    redirect_only = false         # a redirect server: serves redirect-information only and
                                  # asks no MASA (onboarding records are refused at start)
    [log]
    level = "info"

Relative paths are relative to this file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from .config import RegistrarConfig, load_registrar_config
from .tomlconfig import (
    ConfigError,
    ListenAddress,
    PrivateKey,
    check_key_matches,
    load_certs,
    load_key,
    log_level,
    read_toml,
    require_ec,
)

__all__ = ["ConfigError", "SztpConfig", "load_sztp_config"]


@dataclass
class SztpConfig:
    source: Path
    registrar: RegistrarConfig
    listen: list[ListenAddress]
    owner_chain: list[x509.Certificate]
    owner_key: PrivateKey
    encoding: str
    redirect_only: bool
    log_level: int
    metrics_listen: tuple[str, int] | None = None

    @property
    def store_path(self) -> Path:
        return self.registrar.store_path


def load_sztp_config(path: Path) -> SztpConfig:
    root = read_toml(path)
    table = root.table("sztp", required=True)
    registrar_file = table.file("registrar")
    try:
        registrar = load_registrar_config(registrar_file)
    except ConfigError as exc:
        raise table.error("registrar", str(exc)) from exc
    listen = table.listen("listen", ["[::]:8443"])
    if table.has("owner_cert") != table.has("owner_key"):
        raise table.error("owner_cert" if not table.has("owner_cert") else "owner_key",
                          "owner_cert and owner_key go together")
    if table.has("owner_cert"):
        cert_file = table.file("owner_cert")
        chain = load_certs(table, "owner_cert", cert_file)
        key = load_key(table, "owner_key", table.file("owner_key"))
        check_key_matches(table, "owner_key", key, chain[0])
    else:
        chain, key = registrar.tls_chain, registrar.tls_key
    require_ec(table, "owner_key", key, "conveyed information is signed with it")
    encoding = table.string("encoding", "json", choices=("json", "xml"))
    redirect_only = table.boolean("redirect_only", False)
    table.finish()
    level = log_level(root)
    root.finish()
    return SztpConfig(path, registrar, listen, chain, key, encoding, redirect_only, level)
