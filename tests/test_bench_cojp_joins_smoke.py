"""bench/cojp_joins.py runs end to end with its smallest settings (a smoke test: it checks the
lab, both kinds of pledges and the printed lines, never how fast anything is)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.netns


def test_cojp_joins_bench_quick(as_root: None) -> None:
    done = subprocess.run([sys.executable, str(REPO / "bench" / "cojp_joins.py"), "--quick"],
                          capture_output=True, text=True, timeout=300, check=False, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    for kind in ("psk", "edhoc"):
        assert re.search(rf"^{kind} +[0-9.]+ joins/s  \(5 in ", done.stdout, re.M), done.stdout
    assert re.search(r"^ratio edhoc/psk \d+\.\d\d", done.stdout, re.M), done.stdout
