"""bench/ipip_pps.py runs end to end with its smallest settings.

A smoke test only: the benchmark builds its namespaces, drives all five paths and prints its
table and ratio lines, and leaves no namespace behind. How fast anything is stays unchecked
(this machine is shared and noisy).
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.netns


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    return {line.split()[0] for line in out.stdout.splitlines() if line.startswith("jpb")}


def test_ipip_pps_quick(as_root: None) -> None:
    before = namespaces()
    done = subprocess.run([sys.executable, str(REPO / "bench" / "ipip_pps.py"), "--quick"],
                          capture_output=True, text=True, timeout=180, check=False, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    for label in ("bare XDP redirect", "push 40 bytes", "XDP encap", "tc encap",
                  "user-space relay"):
        assert re.search(rf"^{label}.* [\d,]+$", out, re.M), out
    for pair in ("xdp-encap/bare-redirect", "xdp-encap/userspace", "tc-encap/userspace",
                 "push-floor/bare-redirect", "xdp-encap/push-floor"):
        assert re.search(rf"^ratio {pair} +\d+\.\d\d", out, re.M), out
    assert namespaces() == before
