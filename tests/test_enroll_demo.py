"""`make demo` (joinproxy-lab demo): five real enrollments, a table, exit status, no leftovers."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from lab import demo, netns

pytestmark = pytest.mark.netns


def demo_dirs() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("joinproxy-demo-*"))


def run_id(stdout: str) -> str:
    first = stdout.splitlines()[0]  # "lab <id>: 5 pledge(s), ..."
    assert first.startswith("lab "), stdout
    return first.split()[1].rstrip(":")


def test_demo_enrolls_five_pledges_and_leaves_nothing(as_root):
    before = demo_dirs()
    done = subprocess.run([sys.executable, "-m", "lab.cli", "demo"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "5 enrolled, 0 failed" in out
    assert "openssl verify against the domain CA: 5/5 LDevIDs OK" in out
    for i in range(5):
        line = next(line for line in out.splitlines() if line.startswith(f"demo-{i} "))
        assert line.rstrip().endswith(" ok") and " proximity " in line
        assert f"serialNumber=demo-{i}" in line
    # ...and the constrained pledges, directly over CoAPS, in their own table.
    assert "3 enrolled, 0 failed" in out
    assert "openssl verify against the domain CA: 3/3 constrained LDevIDs OK" in out
    for i in range(3):
        line = next(line for line in out.splitlines() if line.startswith(f"demo-c{i} "))
        assert line.rstrip().endswith(" ok") and f"serialNumber=demo-c{i}" in line
        assert ":5684 " in line and " static " in line
    rid = run_id(out)
    assert not [ns for ns in netns.list_namespaces() if ns.startswith(f"jpl{rid}-")]
    assert demo_dirs() == before


def test_demo_fails_when_a_pledge_cannot_enroll(as_root, monkeypatch, capsys):
    # demo-4 gets an IDevID of another manufacturer (same serial): the registrar refuses it.
    real_pki = demo._pki

    def pki_with_a_stranger(root: Path, serials: list[str]) -> Path:
        made = real_pki(root, serials)
        rogue = real_pki(root.parent / "rogue", ["demo-4"])
        for suffix in (".crt", ".key"):
            target = made / "manufacturer/idevid" / f"demo-4{suffix}"
            shutil.copyfile(rogue / "manufacturer/idevid" / f"demo-4{suffix}", target)
        return made

    monkeypatch.setattr(demo, "_pki", pki_with_a_stranger)
    before = demo_dirs()
    assert demo.run() == 1
    out = capsys.readouterr().out
    assert "4 enrolled, 1 failed" in out
    assert "demo-4: " in out and "FAILED (tls-refused)" in out
    assert "demo FAILED" in out
    rid = run_id(out)
    assert not [ns for ns in netns.list_namespaces() if ns.startswith(f"jpl{rid}-")]
    assert demo_dirs() == before
