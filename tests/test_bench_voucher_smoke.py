"""bench/voucher_sign_verify.py and bench/masa_vouchers.py run end to end with tiny settings.

A smoke test only: every case runs and the ratio and breakdown lines are printed, never how
fast anything is (this machine is shared and noisy).
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(REPO / "bench" / script), *args],
                          capture_output=True, text=True, timeout=300, check=False, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.parametrize("clock", ["wall", "cpu"])
def test_voucher_sign_verify_quick(clock):
    out = run("voucher_sign_verify.py", "--seconds", "0.1", "--clock", clock)
    for case in ("CMS voucher", "COSE voucher", "pycose-native"):
        assert re.search(rf"^{case}.* +\d+ +\d+\.\d{{3}} \(", out, re.M), out


def test_masa_vouchers_quick():
    out = run("masa_vouchers.py", "--pledges", "4", "--seconds", "0.3", "--concurrency", "2",
              "--clock", "cpu")
    for case in ("CMS one by one", "COSE one by one", "CMS served", "COSE served"):
        assert re.search(rf"^{case} +vouchers/CPU-s +[\d,]+ +x baseline \d\.\d{{3}}", out,
                         re.M), out
    assert re.search(r"^CMS in C \(OpenSSL\): [\d,]+ vouchers/CPU-s +x baseline \d\.\d{3}; "
                     r"CMS one by one x\d\.\d{3} of it", out, re.M), out
    assert re.search(r"^group commit: \d+\.\d vouchers per commit", out, re.M), out
    for step in ("parse \\+ verify", "owner check", "sign voucher", "store \\+ log"):
        assert re.search(rf"^  cms: {step}.* +\d+ us$", out, re.M), out


def test_the_c_reference_does_the_voucher_work():
    """The OpenSSL reference is only a fair reference if it checks what the MASA checks: its
    voucher verifies, and it refuses an altered RVR and a PVR that does not chain."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import masa_vouchers as bench
        from _openssl_cms import OpenSslError, OpenSslMasa
    finally:
        sys.path.remove(str(REPO / "bench"))
    from brski.signed_voucher import verify_voucher_cms

    pki, rvrs, _ = bench.requests(2)
    anchors, signer, pem, domain_ca = bench.reference_material(pki)
    masa = OpenSslMasa(anchors, signer, pem, domain_ca)
    voucher, _ = verify_voucher_cms(masa.voucher(rvrs[1], bench.NOW_TEXT),
                                    [pki.masa_ca.cert], bench.NOW)
    assert voucher.serial_number == "BENCH-00001"
    assert voucher.pinned_domain_cert == domain_ca
    altered = bytearray(rvrs[0])
    altered[-10] ^= 1  # in the signature
    with pytest.raises(OpenSslError, match="CMS_verify"):
        masa.voucher(bytes(altered), bench.NOW_TEXT)
    elsewhere = OpenSslMasa([domain_ca], signer, pem, domain_ca)
    with pytest.raises(OpenSslError, match="certificate verify error"):
        elsewhere.voucher(rvrs[0], bench.NOW_TEXT)
