"""Optional capabilities, and what to install for them on the system the daemon runs on.

The daemon needs pyroute2 and the standard library for everything; the rest is per feature,
imported or loaded only when the configuration uses that feature:

    feature                     needs                      Debian            OpenWrt
    nat66                       the libnftables Python     python3-nftables  (no feed ships
                                binding (module nftables)                     the binding)
                                libnftables with JSON      libnftables1      nftables-json
    ipip, the join-port guard   libbpf.so.1                libbpf1           libbpf
    coaps, jpy, CoRE discovery  aiocoap                    python3-aiocoap   (no feed ships it)
                                pyOpenSSL                  python3-openssl   python3-pyopenssl
                                cryptography               python3-crypto-   python3-crypto-
                                                           graphy            graphy

A missing piece is named in the package system's own words. Which system: the package says so
first (the .ipk and the .deb ship joinproxyd/PACKAGED_FOR, so an OpenWrt package run anywhere
names OpenWrt packages), then /etc/openwrt_release, then /etc/debian_version.

``missing_for(modes)`` is what a start (and a reload) asks: the one line that says why the
configured relay modes cannot run here, or None. The guard is protection, not a relay: without
libbpf it is reported as not running (guard.py) while the relays serve on.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Iterable
from pathlib import Path

OPENWRT = "openwrt"
DEBIAN = "debian"
OTHER = "linux"
MARKER = Path(__file__).resolve().parent.parent / "PACKAGED_FOR"
ETC = Path("/etc")

# feature -> platform -> package (None: no package of that system provides it)
PACKAGES: dict[str, dict[str, str | None]] = {
    "libbpf": {DEBIAN: "libbpf1", OPENWRT: "libbpf"},
    "nftables-binding": {DEBIAN: "python3-nftables", OPENWRT: None},
    "libnftables": {DEBIAN: "libnftables1", OPENWRT: "nftables-json"},
    "aiocoap": {DEBIAN: "python3-aiocoap", OPENWRT: None},
    "OpenSSL": {DEBIAN: "python3-openssl", OPENWRT: "python3-pyopenssl"},
    "cryptography": {DEBIAN: "python3-cryptography", OPENWRT: "python3-cryptography"},
}
WHAT = {"libbpf": "libbpf.so.1",
        "nftables-binding": "the libnftables Python binding (module nftables)",
        "libnftables": "libnftables with JSON support",
        "aiocoap": "the CoAP library aiocoap", "OpenSSL": "pyOpenSSL (module OpenSSL)",
        "cryptography": "the Python module cryptography"}
INSTALL = {DEBIAN: "apt install", OPENWRT: "opkg install"}
LABEL = {DEBIAN: "Debian", OPENWRT: "OpenWrt"}


def detect(marker: Path = MARKER, etc: Path = ETC) -> str:
    try:
        declared = marker.read_text().strip()
    except OSError:
        declared = ""
    if declared in (OPENWRT, DEBIAN):
        return declared
    if (etc / "openwrt_release").exists():
        return OPENWRT
    if (etc / "debian_version").exists():
        return DEBIAN
    return OTHER


def install_hint(feature: str, platform: str | None = None) -> str:
    """'libbpf.so.1 is missing: install the OpenWrt package libbpf (opkg install libbpf)'."""
    platform = platform or detect()
    what = WHAT[feature]
    if platform not in LABEL:
        return f"{what} is missing"
    package = PACKAGES[feature][platform]
    if package is None:
        extra = (" (OpenWrt's nftables-json is built without it); use the circuit mode"
                 if feature == "nftables-binding" else "")
        return f"{what} is missing and no {LABEL[platform]} package provides it{extra}"
    return (f"{what} is missing: install the {LABEL[platform]} package {package} "
            f"({INSTALL[platform]} {package})")


def nftables_binding() -> object | None:
    """The libnftables binding module, or None when it is not installed."""
    if importlib.util.find_spec("nftables") is None:
        return None
    try:
        return importlib.import_module("nftables")
    except ImportError:
        return None


def nftables_problem() -> str | None:
    """Why nftables cannot be programmed from here, or None."""
    binding = nftables_binding()
    if binding is None:
        return install_hint("nftables-binding")
    try:
        binding.Nftables()  # type: ignore[attr-defined]  # loads libnftables.so
    except OSError:
        return install_hint("libnftables")
    return None


def libbpf_problem() -> str | None:
    """Why libbpf.so.1 cannot be loaded, or None."""
    from . import KernelError
    from .libbpf import libbpf  # the module loads it lazily, once

    try:
        libbpf()
    except KernelError as exc:
        return str(exc)
    return None


def constrained_problem() -> str | None:
    """Why the constrained parts (coaps, jpy, CoRE discovery, the DTLS probe) cannot run
    here, or None: their Python modules, found without importing them."""
    for module in ("cryptography", "OpenSSL", "aiocoap"):
        if importlib.util.find_spec(module) is None:
            return install_hint(module)
    return None


def cryptography_problem() -> str | None:
    """Why the cojp relay (AES-SIV sealed tokens) cannot run here, or None."""
    if importlib.util.find_spec("cryptography") is None:
        return install_hint("cryptography")
    return None


# relay mode -> the probes it needs
_NEEDS = {"nat66": (nftables_problem,), "ipip": (libbpf_problem,),
          "coaps": (constrained_problem,), "jpy": (constrained_problem,),
          "cojp": (cryptography_problem,)}


def missing_for(modes: Iterable[str]) -> str | None:
    """One line naming what the configured relay modes lack here, or None."""
    for mode in sorted(set(modes)):
        for probe in _NEEDS.get(mode, ()):
            problem = probe()
            if problem is not None:
                return f"the {mode} mode cannot run here: {problem}"
    return None
