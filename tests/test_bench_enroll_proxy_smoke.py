"""bench/enroll_proxy.py runs end to end with its smallest settings.

A smoke test only: every path (direct, through joinproxyd, through the reference relay HAProxy)
enrolls every pledge, the table has a row per run with the registrar's loop lag, and the ratio
lines are printed; how fast anything is stays unchecked (this machine is shared and noisy).
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.netns


def test_enroll_proxy_compares_direct_the_proxy_and_the_reference_relay(as_root: None) -> None:
    done = subprocess.run([sys.executable, str(REPO / "bench" / "enroll_proxy.py"),
                           "--pledges", "3", "--concurrency", "3", "--rounds", "2",
                           "--warmup", "1"],
                          capture_output=True, text=True, timeout=300, check=False, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    rows = re.findall(r"^ +(\d) (direct|proxy|haproxy) +3/3 +\d+\.\d.* (\d+) *$", out, re.M)
    assert sorted(r[:2] for r in rows) == [(r, p) for r in "12"
                                           for p in ("direct", "haproxy", "proxy")], out
    assert all(int(r[2]) >= 1 for r in rows), out  # the registrar's kept-alive MASA connections
    assert re.search(r"^ratio proxy/direct \d+\.\d\d  \(\d+\.\d\d-\d+\.\d\d\) \(target >= 0\.95\)$",
                     out, re.M), out
    for ratio in ("haproxy/direct", "proxy/haproxy"):
        assert re.search(rf"^ratio {ratio} \d+\.\d\d  \(\d+\.\d\d-\d+\.\d\d\)$", out, re.M), out


def test_enroll_proxy_refuses_nonsense_in_one_line() -> None:
    for args in (["--rounds", "0"], ["--warmup", "-1"]):
        done = subprocess.run([sys.executable, str(REPO / "bench" / "enroll_proxy.py"), *args],
                              capture_output=True, text=True, timeout=60, check=False, cwd=REPO)
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
