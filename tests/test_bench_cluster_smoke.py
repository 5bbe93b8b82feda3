"""bench/enroll_cluster.py runs end to end with its smallest settings: a row per
configuration (SQLite and PostgreSQL, one and two registrars), every pledge enrolled; how fast
stays unchecked (this machine is shared and noisy)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.netns


def test_enroll_cluster_compares_the_engines(as_root: None) -> None:
    done = subprocess.run([sys.executable, str(REPO / "bench" / "enroll_cluster.py"),
                           "--pledges", "2", "--concurrency", "2"],
                          capture_output=True, text=True, timeout=400, check=False, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = re.findall(r"^(sqlite|postgresql) +([12]) +4/4 +\d+\.\d\d +\d+\.\d$", done.stdout,
                      re.M)
    assert rows == [("sqlite", "1"), ("postgresql", "1"), ("sqlite", "2"),
                    ("postgresql", "2")], done.stdout


def test_enroll_cluster_refuses_nonsense_in_one_line() -> None:
    done = subprocess.run([sys.executable, str(REPO / "bench" / "enroll_cluster.py"),
                           "--pledges", "0"], capture_output=True, text=True, timeout=60,
                          check=False, cwd=REPO)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
