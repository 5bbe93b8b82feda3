"""bench/enroll_rate.py runs end to end with its smallest settings.

A smoke test only: both transports enroll every pledge, the table has a row per run and the
ratio line is printed; how fast anything is stays unchecked (this machine is shared and noisy).
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.netns


def test_enroll_rate_compares_https_and_coaps(as_root: None) -> None:
    done = subprocess.run([sys.executable, str(REPO / "bench" / "enroll_rate.py"),
                           "--pledges", "3", "--concurrency", "3", "--rounds", "2"],
                          capture_output=True, text=True, timeout=300, check=False, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    rows = re.findall(r"^ +(\d) (https|coaps) +3/3 +\d+\.\d", out, re.M)
    assert sorted(rows) == [("1", "coaps"), ("1", "https"), ("2", "coaps"), ("2", "https")], out
    assert re.search(r"^ratio coaps/https \d+\.\d\d  \(\d+\.\d\d-\d+\.\d\d\)$", out, re.M), out


def test_enroll_rate_refuses_nonsense_in_one_line() -> None:
    done = subprocess.run([sys.executable, str(REPO / "bench" / "enroll_rate.py"),
                           "--rounds", "0"], capture_output=True, text=True, timeout=60,
                          check=False, cwd=REPO)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
