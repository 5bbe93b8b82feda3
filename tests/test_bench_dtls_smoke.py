"""bench/dtls_handshake.py runs end to end with its smallest settings.

A smoke test only: it checks that every path completes handshakes and the benchmark prints its
table and ratio lines, never how fast anything is (this machine is shared and noisy).
"""

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_dtls_handshake_quick() -> None:
    done = subprocess.run([sys.executable, str(REPO / "bench" / "dtls_handshake.py"), "--quick"],
                          capture_output=True, text=True, timeout=120, check=False, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    for case in ("bare pyOpenSSL", "brski.dtls memory", "coaps_io UDP \\+ GET"):
        assert re.search(rf"^{case} +[\d,]+ handshakes/s$", out, re.M), out
    for case in ("brski.dtls memory", "coaps_io UDP \\+ GET"):
        assert re.search(rf"^ratio {case}/bare +\d+\.\d\d$", out, re.M), out
    assert "ECDHE-ECDSA-AES128-CCM8" in out


def test_dtls_handshake_refuses_bad_arguments() -> None:
    done = subprocess.run([sys.executable, str(REPO / "bench" / "dtls_handshake.py"),
                           "--rounds", "0"], capture_output=True, text=True, timeout=60,
                          check=False, cwd=REPO)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "dtls_handshake: --seconds must be > 0 and --rounds ≥ 1"]
