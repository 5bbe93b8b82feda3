"""bench/coaps_relay.py runs end to end with its smallest settings (a smoke test: it checks
the lab is built, both relays carry the load and every figure line is printed, never how
fast anything is on this shared machine)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.netns


def test_coaps_relay_bench_quick(as_root: None) -> None:
    done = subprocess.run([sys.executable, str(REPO / "bench" / "coaps_relay.py"), "--quick"],
                          capture_output=True, text=True, timeout=240, check=False, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    for name in ("joinproxyd", "bare"):
        match = re.search(rf"^{name} +echoes/s +median +(\d+\.\d)", out, re.M)
        assert match and float(match.group(1)) > 0, out
    assert re.search(r"^ratio joinproxyd/bare datagrams/s +\d+\.\d\d", out, re.M), out
    assert re.search(r"^joinproxyd RSS per flow +\d+ bytes", out, re.M), out
    assert "hold client saw 500" in out, out
