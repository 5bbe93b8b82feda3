"""pledge-sim sztp devices against real brski-sztp servers that hand them bad bootstrapping
data: each device refuses with the exact reason, reports it to a trusted server, keeps its
previous configuration, and does not call home. Loopback of one lab namespace."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from sztp_lab import Bootstrap, onboarding, redirect, run_devices

from lab import Lab, Topology
from lab.brski_services import make_pki

pytestmark = pytest.mark.netns

FIRST, SECOND, OTHER_OWNER = "[::1]:8443", "[::1]:8444", "[::1]:8445"
SERIALS = ["bad-hash", "loop-self", "loop-two", "wrong-owner", "good", "wrong-owner-t"]


@pytest.fixture
def lab(as_root: None, tmp_path: Path) -> Iterator[Lab]:
    with Lab(Topology(pledges=0, registrars=1), log_dir=tmp_path / "logs") as lab:
        yield lab


def test_devices_refuse_bad_bootstrapping_data(lab: Lab, tmp_path: Path) -> None:
    host = lab.registrars[0]
    pki = make_pki(tmp_path / "pki", SERIALS)
    other = make_pki(tmp_path / "other", [], "--domain", "Other Domain")
    for name in ("first", "second", "owner"):
        (tmp_path / name).mkdir()
    image = tmp_path / "image.bin"
    image.write_bytes(b"an image\n" * 100)
    wrong = hashlib.sha256(b"another image").digest()
    config = {"hostname": "h", "call-home": {"address": "::1", "port": 4336}}
    first = Bootstrap(host, pki, tmp_path / "first", listen=FIRST)
    second = Bootstrap(host, pki, tmp_path / "second", listen=SECOND, with_masa=False,
                       redirect_only=True)
    # an owner certificate of another domain: its key signs, but the voucher pins ours
    owner = Bootstrap(host, pki, tmp_path / "owner", listen=OTHER_OWNER, with_masa=False,
                      owner=(other / "domain/registrar.crt", other / "domain/registrar.key"))
    ta = first.trust_anchor_cms()
    try:
        first.start()
        second.start()
        owner.start()
        first.record(onboarding(config=config, image=image, image_sha256=wrong),
                     serial="bad-hash")
        first.record(redirect(("::1", 8443, ta)), serial="loop-self")
        first.record(redirect(("::1", 8444, ta)), serial="loop-two")
        second.record(redirect(("::1", 8443, ta)))
        first.record(onboarding(config={"hostname": "good"}), serial="good")
        owner.record(onboarding(config=config), sign="always")

        state = tmp_path / "state"
        for serial in SERIALS:  # a configuration from before, which must survive
            (state / serial).mkdir(parents=True)
            (state / serial / "config.json").write_text('{"hostname": "old"}')
        anchor = str(pki / "domain/ca.crt")
        trusted = run_devices(host, pki, state, [*SERIALS[:3], "good"], "--trusted-server",
                              f"https://{FIRST}", "--server-ca", anchor)
        untrusted = run_devices(host, pki, state, ["wrong-owner"], "--server",
                                f"https://{OTHER_OWNER}")
        # the same server, trusted by its TLS certificate: signed data refused, and said so
        trusted_owner = run_devices(host, pki, state, ["wrong-owner-t"], "--trusted-server",
                                    f"https://{OTHER_OWNER}", "--server-ca", anchor)
        got = {**trusted.devices, **untrusted.devices, **trusted_owner.devices}
        assert sorted(got) == sorted(SERIALS), trusted.stderr[-3000:]
        assert trusted.rc == 1 and untrusted.rc == 1  # some failed

        d = got["bad-hash"]
        assert (d["ok"], d["code"]) == (False, "boot-image-error")
        assert f"sha-256 mismatch: image has {hashlib.sha256(image.read_bytes()).hexdigest()}" \
            f", image-verification says {wrong.hex()}" in d["reason"]
        assert d["callhome"] is None and d["os_version"] == "1.0"
        reports = [(r["progress_type"], r["message"]) for r in first.progress("bad-hash")]
        assert reports[0] == ("bootstrap-initiated", None)
        assert reports[-1][0] == "boot-image-error" and "sha-256 mismatch" in reports[-1][1]

        d = got["loop-self"]
        assert d["code"] == "redirect-loop", d
        assert d["reason"] == "redirected back to [::1]:8443 (path: [::1]:8443 -> [::1]:8443)"
        d = got["loop-two"]
        assert d["code"] == "redirect-loop", d
        assert "[::1]:8443 -> [::1]:8444 -> [::1]:8443" in d["reason"]
        assert d["path"] == ["[::1]:8443", "[::1]:8444"]

        d = got["wrong-owner"]
        assert (d["code"], d["signed"]) == ("owner-certificate", False), d
        assert "does not chain to the voucher's pinned-domain-cert" in d["reason"]
        d = got["wrong-owner-t"]
        assert (d["code"], d["signed"]) == ("owner-certificate", False), d
        # untrusted and not authenticated: no reports; trusted: a parsing-error (RFC 8572 §7.3)
        assert [(r["serial"], r["progress_type"]) for r in owner.progress()] == [
            ("wrong-owner-t", "parsing-error")]
        assert "owner-certificate: owner certificate does not chain" in \
            owner.progress()[0]["message"]

        assert got["good"]["ok"] and got["good"]["code"] == "ok"
        for serial in SERIALS:
            applied = json.loads((state / serial / "config.json").read_text())
            assert applied == ({"hostname": "good"} if serial == "good"
                               else {"hostname": "old"}), serial
        # one line per failed device on stderr, naming it and the reason
        assert "pledge-sim: wrong-owner failed: owner-certificate:" in untrusted.stderr
    finally:
        print(first.log()[-4000:])
        print(owner.log()[-2000:])
