"""bench/jpy_kernel_pps.py runs end to end with its smallest settings (a smoke test: it checks
the namespaces, the six paths, the run-time costs and the printed lines, never how fast
anything is)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.netns


def test_jpy_kernel_bench_quick(as_root: None) -> None:
    done = subprocess.run([sys.executable, str(REPO / "bench" / "jpy_kernel_pps.py"), "--quick"],
                          capture_output=True, text=True, timeout=180, check=False, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    for label in ("kernel JPY wrap, XDP", "kernel JPY wrap, tc", "bare XDP redirect",
                  "bare tc redirect", "daemon's user-space relay", "its work in a plain loop"):
        label = re.escape(label)
        assert re.search(rf"^{label}.* +[1-9][\d,]*$", out, re.M), out
        assert re.search(rf"^{label}.* +[\d,]+ ns +[\d,]+ datagrams/s/CPU$", out, re.M), out
    for pair in ("kernel-xdp/daemon-jpy", "kernel-tc/daemon-jpy", "kernel-xdp/bare-xdp"):
        assert re.search(rf"^ratio {pair} +\d+\.\d\d", out, re.M), out
    assert re.search(r"^cost ratio daemon-jpy/kernel-xdp +\d+\.\d", out, re.M), out
    assert "kernel JPY counters besides up" not in done.stderr, done.stderr
