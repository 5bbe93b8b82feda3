"""The MASA's configuration file (TOML), validated at start.

Every key, its default and its meaning. Relative paths are relative to the config file.

    [server]
    listen = ["[::]:9443"]        # HTTPS listen addresses: "[ipv6]:port", "[fe80::1%eth0]:port",
                                  # "ipv4:port" or "name:port"
    cert = "tls.crt"              # required. TLS server certificate (PEM, chain may follow)
    key = "tls.key"               # required

    [signer]
    cert = "signer.crt"           # required. voucher-signing certificate; certificates after the
                                  # first in the file (e.g. the MASA CA) go into every voucher
    key = "signer.key"            # required

    [pledges]
    manufacturer_cas = ["ca.crt"] # required. IDevID anchors: the signer of a prior-signed pledge
                                  # voucher-request must chain to one of them

    [ownership]
    mode = "table"                # "table": only the devices below, each to its domain;
                                  # "tofu": trust on first use: the first domain that asks for a
                                  # device owns it from then on (kept in the store)
    [ownership.devices]           # serial-number -> domain CA certificate file (PEM): vouchers
    "00-D0-E5-F2-00-02" = "domain-ca.crt"  # for this device pin that CA, and only registrars
                                  # whose certificate chains to it may ask
    # "*" = "domain-ca.crt"       # optional: every device of the manufacturer CAs

    [vouchers]
    assertion = "proximity"       # what a voucher asserts when the pledge's proximity proof
                                  # checks out: "proximity", "logged" or "verified"
    nonceless = false             # accept registrar requests without a nonce (and without a
                                  # prior-signed request); such vouchers assert "logged" and
                                  # carry expires-on
    lifetime = 1200               # seconds: expires-on of nonceless vouchers (RFC 8995 §5.6
                                  # recommends about 20 minutes)

    [store]
    path = "masa.db"              # SQLite file: audit log and first-use ownership
    # url = "postgresql://masa@db/brski_masa"  # or: PostgreSQL (registrar.store_config)

    [metrics]
    listen = ""                   # Prometheus /metrics, e.g. "[::1]:9467"; "" (default): off;
                                  # --metrics ADDRESS overrides it (registrar.metrics)

    [log]
    level = "info"
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from .metrics import load_metrics_listen
from .store_config import load_store_target
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

__all__ = ["ConfigError", "MasaConfig", "load_masa_config"]

OWNERSHIP_MODES = ("table", "tofu")
ASSERTIONS = ("proximity", "logged", "verified")
ANY_DEVICE = "*"


@dataclass
class MasaConfig:
    source: Path
    listen: list[ListenAddress]
    cert_file: Path
    key_file: Path
    signer_chain: list[x509.Certificate]  # [signer, certificates to include...]
    signer_key: PrivateKey
    manufacturer_cas: list[x509.Certificate]
    ownership: str
    devices: dict[str, x509.Certificate]  # serial (or "*") -> domain CA
    assertion: str
    nonceless: bool
    lifetime: int
    store_path: Path | str  # an SQLite file, or a postgresql:// URL
    log_level: int
    metrics_listen: tuple[str, int] | None = None  # [metrics] listen (registrar.metrics)


def load_masa_config(path: Path) -> MasaConfig:
    root = read_toml(path)
    server = root.table("server", required=True)
    listen = server.listen("listen", ["[::]:9443"])
    cert_file, key_file = server.file("cert"), server.file("key")
    check_key_matches(server, "key", load_key(server, "key", key_file),
                      load_certs(server, "cert", cert_file)[0])
    server.finish()

    signer = root.table("signer", required=True)
    chain = load_certs(signer, "cert", signer.file("cert"))
    key = load_key(signer, "key", signer.file("key"))
    check_key_matches(signer, "key", key, chain[0])
    require_ec(signer, "key", key, "vouchers are signed with it")
    signer.finish()

    pledges = root.table("pledges", required=True)
    files = pledges.files("manufacturer_cas")
    if not files:
        raise pledges.error("manufacturer_cas", "needs at least one CA certificate file")
    mfg = [c for i, f in enumerate(files) for c in load_certs(pledges, f"manufacturer_cas[{i}]", f)]
    pledges.finish()

    own = root.table("ownership")
    mode = own.string("mode", "table", choices=OWNERSHIP_MODES)
    devices_table = own.table("devices")
    devices: dict[str, x509.Certificate] = {}
    for serial in list(devices_table.data):
        cert_path = devices_table.file(serial)
        devices[serial] = load_certs(devices_table, serial, cert_path)[0]
    devices_table.finish()
    if mode == "table" and not devices:
        raise own.error("devices", 'empty: with mode = "table" every request would get 404')
    own.finish()

    vouchers = root.table("vouchers")
    assertion = vouchers.string("assertion", "proximity", choices=ASSERTIONS)
    nonceless = vouchers.boolean("nonceless", False)
    lifetime = vouchers.integer("lifetime", 1200, minimum=10, maximum=366 * 86400)
    vouchers.finish()

    store_path = load_store_target(root, "masa.db")

    level = log_level(root)
    metrics_listen = load_metrics_listen(root)
    root.finish()
    return MasaConfig(
        source=path, listen=listen, cert_file=cert_file, key_file=key_file,
        signer_chain=chain, signer_key=key, manufacturer_cas=mfg, ownership=mode,
        devices=devices, assertion=assertion, nonceless=nonceless, lifetime=lifetime,
        store_path=store_path, log_level=level, metrics_listen=metrics_listen,
    )

