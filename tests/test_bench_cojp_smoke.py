"""bench/cojp_relay.py runs end to end with its smallest settings (a smoke test: it checks the
lab, both paths and the printed lines, never how fast anything is)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.netns


def test_cojp_relay_bench_quick(as_root: None) -> None:
    done = subprocess.run([sys.executable, str(REPO / "bench" / "cojp_relay.py"), "--quick"],
                          capture_output=True, text=True, timeout=180, check=False, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    for path in ("joinproxyd", "bare"):
        assert re.search(rf"^{path} +[1-9]\d* datagrams/s", out, re.M), out
    assert re.search(r"^ratio joinproxyd/bare \d+\.\d\d", out, re.M), out
    assert "'cojp-forged': 0.0" in out, out
