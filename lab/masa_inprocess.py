"""A MASA in this process (``registrar.masa.Masa``) over a test PKI, for tests and benchmarks
that call its request path directly: trust on first use, proximity vouchers with nonces, the
PKI's MASA signer, its SQLite store in a directory of the caller's."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cryptography import x509

from brski.pki import TestPki
from registrar.masa import Masa
from registrar.masa_config import MasaConfig
from registrar.store import Store
from registrar.store_commit import GroupCommitter


def in_process_masa(pki: TestPki, root: Path, *,
                    manufacturer_cas: Sequence[x509.Certificate] | None = None,
                    committer: GroupCommitter | None = None, log_level: int = 30) -> Masa:
    """The MASA of ``pki`` with its store at ``root/masa.db``; it trusts ``pki``'s
    manufacturer CA unless ``manufacturer_cas`` says otherwise."""
    config = MasaConfig(
        source=root / "masa.toml", listen=[], cert_file=root / "c", key_file=root / "k",
        signer_chain=[pki.masa_signer.cert, pki.masa_ca.cert], signer_key=pki.masa_signer.key,
        manufacturer_cas=list(manufacturer_cas if manufacturer_cas is not None
                              else [pki.manufacturer_ca.cert]),
        ownership="tofu", devices={}, assertion="proximity", nonceless=False, lifetime=600,
        store_path=root / "masa.db", log_level=log_level)
    return Masa(config, Store(root / "masa.db", "masa"), committer)
