"""`make demo DEMO_REGISTRARS=2` (joinproxy-lab demo --registrars 2): two registrars of one
domain share a PostgreSQL store behind two join proxies; registrar0 is SIGKILLed after its
third LDevID and every pledge still enrolls. Nothing is left behind: no namespace, no
PostgreSQL cluster directory, no postmaster."""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from lab import netns

pytestmark = pytest.mark.netns


def leftovers() -> set[Path]:
    tmp = Path(tempfile.gettempdir())
    return set(tmp.glob("joinproxy-demo2-*")) | set(tmp.glob("brski-pg-*"))


def test_two_registrar_demo_fails_over_and_leaves_nothing(as_root):
    before = leftovers()
    done = subprocess.run([sys.executable, "-m", "lab.cli", "demo", "--registrars", "2"],
                          capture_output=True, text=True, timeout=240)
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "enrolled 20/20;" in out and "openssl verify: 20/20 OK" in out
    killed = re.search(r"registrar0 killed \(SIGKILL\) after (\d+) LDevIDs", out)
    assert killed and 3 <= int(killed.group(1)) < 10, out
    by_second = re.search(r"by registrar1 (\d+) \(of them from join0: (\d+)\)", out)
    assert by_second and int(by_second.group(2)) > 0, out  # join0's pledges failed over
    assert "postgresql registrar store, schema version 2; pledges 20," in out
    assert "certificates 20," in out
    run_id = out.splitlines()[1].split()[1].rstrip(":")
    assert not [ns for ns in netns.list_namespaces() if run_id in ns]
    assert leftovers() <= before
