"""pledge-sim sztp with removable media (RFC 8572 §4.2, an untrusted source): signed
onboarding information is checked and applied; unsigned onboarding information, or data
signed for another device, is refused with its reason. No network: the media is a directory."""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from brski import sztp
from brski.cli.pki import load_issued
from brski.signed_voucher import sign_voucher_cms
from brski.voucher import Assertion, Voucher
from lab.brski_services import make_pki

NOW = datetime.datetime.now(datetime.UTC).replace(microsecond=0)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pki(tmp_path_factory.mktemp("media") / "pki", ["m-1"])


def media(tmp: Path, pki: Path, *, serial: str = "m-1", signed: bool = True) -> Path:
    owner = load_issued(pki / "domain", "registrar")
    masa = load_issued(pki / "masa", "signer")
    domain = load_issued(pki / "domain", "ca").cert
    info = sztp.OnboardingInformation(configuration_handling="replace",
                                      configuration=json.dumps({"hostname": "m"}).encode())
    data = sztp.encode_conveyed(info, "json")
    directory = tmp / f"media-{serial}-{signed}"
    directory.mkdir()
    if not signed:
        (directory / "conveyed-information.cms").write_bytes(sztp.wrap_unsigned(data, "json"))
        return directory
    (directory / "conveyed-information.cms").write_bytes(
        sztp.sign_conveyed(data, "json", owner.key, [owner.cert], NOW))  # type: ignore[arg-type]
    (directory / "owner-certificate.cms").write_bytes(sztp.degenerate_certs([owner.cert]))
    # media cannot carry a nonce: a nonceless voucher, which expires
    voucher = Voucher(assertion=Assertion.LOGGED, created_on=NOW, serial_number=serial,
                      expires_on=NOW + datetime.timedelta(hours=1),
                      pinned_domain_cert=domain.public_bytes(serialization.Encoding.DER))
    (directory / "ownership-voucher.cms").write_bytes(sign_voucher_cms(
        voucher, masa.key, [masa.cert], NOW))  # type: ignore[arg-type]
    return directory


def run(pki: Path, state: Path, directory: Path) -> dict:
    done = subprocess.run([sys.executable, "-m", "pledge_sim.cli", "sztp", "--json", "--pki",
                           str(pki), "--serial", "m-1", "--state", str(state), "--media",
                           str(directory)], capture_output=True, text=True, timeout=60,
                          check=False)
    (device,) = json.loads(done.stdout)["devices"]
    assert done.returncode == (0 if device["ok"] else 1), done.stderr
    return device


def test_signed_onboarding_from_media(pki: Path, tmp_path: Path) -> None:
    d = run(pki, tmp_path / "state", media(tmp_path, pki))
    assert d["ok"] and d["signed"] and d["source"] == "media", d
    assert d["reports"] == []  # nowhere to report to
    assert json.loads((tmp_path / "state/m-1/config.json").read_text()) == {"hostname": "m"}


def test_unsigned_onboarding_from_media_is_refused(pki: Path, tmp_path: Path) -> None:
    d = run(pki, tmp_path / "state", media(tmp_path, pki, signed=False))
    assert (d["ok"], d["code"]) == (False, "unsigned-onboarding"), d
    assert not (tmp_path / "state/m-1/config.json").exists()


def test_media_for_another_device_is_refused(pki: Path, tmp_path: Path) -> None:
    d = run(pki, tmp_path / "state", media(tmp_path, pki, serial="m-2"))
    assert (d["ok"], d["code"]) == (False, "voucher-serial"), d
    assert "'m-2'" in d["reason"]
