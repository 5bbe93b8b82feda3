"""bench/relay_throughput.py runs end to end with its smallest settings.

A smoke test only: it checks that the benchmark builds its lab, drives every path and prints
its table and ratio lines, never how fast anything is (this machine is shared and noisy).
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.netns


def test_relay_throughput_quick(as_root: None) -> None:
    done = subprocess.run([sys.executable, str(REPO / "bench" / "relay_throughput.py"),
                           "--quick"], capture_output=True, text=True, timeout=180,
                          check=False, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    for test in ("stream up", "stream down", "connections"):
        assert re.search(rf"^ratio joinproxyd/socat +{test} +\d+\.\d\d", out, re.M), out
    for test in ("stream up", "stream down"):
        assert re.search(rf"^ratio joinproxyd/socat-b64k +{test} +\d+\.\d\d", out, re.M), out
    assert re.search(r"^joinproxyd RSS per circuit +-?\d+ bytes", out, re.M), out
    assert "open-file limit" in out
