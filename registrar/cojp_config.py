"""The ``[cojp]`` table of the registrar's configuration: the 6TiSCH Join Registrar/Coordinator
(JRC) of RFC 9031, which answers CoJP Join Requests over OSCORE (registrar.cojp_jrc).

    [cojp]
    enabled = false               # turn the JRC on (off by default: no UDP port opens unasked)
    listen = "[::]:5683"          # UDP address of the CoJP /j resource (CoAP, OSCORE inside);
                                  # not 5683 when the registrar also runs CoAP discovery
                                  # (registrar.coap_discovery binds it): refused
    network_id = ""               # hex; when set, Join Requests naming another network
                                  # identifier (label 5) get a 4.00 diagnostic; "": any
    jrc_address = ""              # IPv6 address sent as the JRC address (label 4); "": omitted
                                  # (RFC 9031: the JRC is then on the 6LBR)
    short_id_lease = 0            # hours of the short identifier lease (label 3); 0: no lease
                                  # (infinite); every pledge gets a short ID unique in the store
    blacklist = []                # pledge IDs (hex) sent as the blacklist (label 6); the JRC
                                  # also refuses their Join Requests
    join_rate = -1                # bytes/s sent as the join rate (label 7); -1: omitted
    response_partial_iv = true    # protect Join Responses with a Partial IV of the JRC's own
                                  # (RFC 8613 §8.3) instead of reusing the request's nonce:
                                  # the JRC's sequence number, persisted ahead of use, then
                                  # guarantees a fresh nonce whatever the replay state

    edhoc_private_key = ""        # file: the JRC's EDHOC static DH key (P-256, 32 bytes, hex);
                                  # with edhoc_credential, pledges may use EDHOC (method 3,
                                  # suite 2) instead of a PSK; "": PSK only
    edhoc_credential = ""         # file: the JRC's CCS (hex), whose key is that private key

    [[cojp.link_layer_key]]       # the link-layer key set (label 2); none: label omitted
    key_id = 1                    # 0..254
    key = "e6bf4287c2d7618d6a9687445ffd33e6"   # 16 bytes, hex
    usage = 0                     # RFC 9031 key usage (0 = 6TiSCH-K1K2-ENC-MIC32); optional

Pledges and their PSKs are not configuration but state: ``brski-registrar cojp add-pledge``
puts them in the store (registrar.cojp_cli).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from brski import cojp
from brski.errors import UsageError

from .metrics import metrics_address
from .tomlconfig import Table

DEFAULT_LISTEN = "[::]:5683"
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


@dataclass(frozen=True)
class CojpConfig:
    enabled: bool = False
    listen: tuple[str, int] = ("::", 5683)
    network_id: bytes | None = None
    jrc_address: bytes | None = None
    short_id_lease: int = 0
    blacklist: tuple[bytes, ...] = ()
    join_rate: int | None = None
    response_partial_iv: bool = True
    link_layer_keys: tuple[cojp.LinkLayerKey, ...] = ()
    edhoc_private_key: bytes | None = None  # P-256 scalar, 32 bytes
    edhoc_credential: bytes | None = None  # the JRC's CCS (RFC 9528 §3.5.2)


def parse_hex_id(text: str) -> bytes:
    """A pledge or network identifier written as hex, with optional ``-``/``:`` separators."""
    cleaned = text.replace("-", "").replace(":", "").strip()
    try:
        value = bytes.fromhex(cleaned)
    except ValueError as exc:
        raise ValueError(f"{text!r} is not hex ({exc})") from None
    if not value:
        raise ValueError("empty")
    return value


def load_cojp_config(root: Table) -> CojpConfig:
    table = root.table("cojp")
    for name in ("network_id", "jrc_address", "edhoc_private_key", "edhoc_credential"):
        if table.data.get(name) == "":
            del table.data[name]  # "" is "not set", as in [coaps] listen
    enabled = table.boolean("enabled", False)
    text = table.string("listen", DEFAULT_LISTEN)
    try:
        listen = metrics_address(text)
    except ValueError as exc:
        raise table.error("listen", f"{text!r}: {exc}") from exc
    if listen is None:
        raise table.error("listen", "empty: give an address, e.g. \"[::]:5683\" "
                                    "(enabled = false turns the JRC off)")
    network_id = _hex(table, "network_id", cojp.MAX_NETWORK_ID)
    jrc_text = table.string("jrc_address", None)
    jrc_address = None
    if jrc_text:
        try:
            jrc_address = ipaddress.IPv6Address(jrc_text).packed
        except ValueError as exc:
            raise table.error("jrc_address", f"not an IPv6 address ({exc})") from exc
    lease = table.integer("short_id_lease", 0, minimum=0, maximum=2**32 - 1)
    blacklist = tuple(table.each("blacklist", table.strings("blacklist", []), parse_hex_id))
    if len(blacklist) > cojp.MAX_BLACKLIST:
        raise table.error("blacklist", f"at most {cojp.MAX_BLACKLIST} pledge IDs")
    join_rate = table.integer("join_rate", -1, minimum=-1, maximum=2**32 - 1)
    response_piv = table.boolean("response_partial_iv", True)
    keys = []
    for key_table in table.tables("link_layer_key"):
        key_id = key_table.integer("key_id", None, minimum=0, maximum=cojp.MAX_KEY_ID)
        if key_id is None:
            raise key_table.error("key_id", "missing (required)")
        value = _hex(key_table, "key", 64, required=True)
        usage = key_table.integer("usage", None, minimum=-(2**31), maximum=2**31 - 1)
        key_table.finish()
        try:
            keys.append(cojp.LinkLayerKey(key_id, value, key_usage=usage))
        except UsageError as exc:
            raise key_table.error("key", str(exc).removeprefix("CoJP: ")) from None
    edhoc_key, edhoc_cred = _edhoc(table)
    table.finish()
    return CojpConfig(
        enabled=enabled, listen=listen, network_id=network_id, jrc_address=jrc_address,
        short_id_lease=lease, blacklist=blacklist,
        join_rate=None if join_rate < 0 else join_rate, response_partial_iv=response_piv,
        link_layer_keys=tuple(keys), edhoc_private_key=edhoc_key, edhoc_credential=edhoc_cred)


def _edhoc(table: Table) -> tuple[bytes | None, bytes | None]:
    key_file = table.file("edhoc_private_key", None)
    cred_file = table.file("edhoc_credential", None)
    if (key_file is None) != (cred_file is None):
        missing = "edhoc_credential" if cred_file is None else "edhoc_private_key"
        raise table.error(missing, "missing: EDHOC needs both the key and the credential")
    if key_file is None:
        return None, None
    key = _hex_file(table, "edhoc_private_key", key_file)
    cred = _hex_file(table, "edhoc_credential", cred_file)
    if len(key) != 32:
        raise table.error("edhoc_private_key", f"{len(key)} bytes: a P-256 key is 32")
    try:
        import lakers  # only when EDHOC is configured

        public_x = lakers.Credential(cred).public_key()
    except Exception as exc:  # lakers raises plain ValueError/TypeError for bad CBOR
        raise table.error("edhoc_credential", f"not a CCS credential ({exc})") from None
    scalar = int.from_bytes(key, "big")
    if not 0 < scalar < P256_ORDER:
        raise table.error("edhoc_private_key", "not a P-256 private key")
    x = ec.derive_private_key(scalar, ec.SECP256R1()).public_key().public_numbers().x
    if x.to_bytes(32, "big") != bytes(public_x):
        raise table.error("edhoc_private_key", "does not match the key in edhoc_credential")
    return key, cred


def _hex_file(table: Table, name: str, path: Path) -> bytes:
    try:
        return bytes.fromhex(path.read_text())
    except OSError as exc:
        raise table.error(name, f"{path}: {exc.strerror}") from None
    except ValueError as exc:
        raise table.error(name, f"{path}: not hex ({exc})") from None


def _hex(table: Table, name: str, limit: int, *, required: bool = False) -> bytes | None:
    text = table.string(name, None)
    if not text:
        if required:
            raise table.error(name, "missing")
        return None
    try:
        value = parse_hex_id(text)
    except ValueError as exc:
        raise table.error(name, str(exc)) from None
    if len(value) > limit:
        raise table.error(name, f"{len(value)} bytes, at most {limit}")
    return value
