"""`make demo` (joinproxy-lab demo): five HTTPS enrollments through the circuit proxy, three
constrained ones through each of coaps and jpy, four 6TiSCH CoJP joins (three PSK, one
EDHOC) through cojp, tables, relay counters, exit status, no leftovers."""

from __future__ import annotations

import re
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


def test_demo_enrolls_through_three_modes_and_leaves_nothing(as_root):
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
    # ...and the constrained pledges, through joinproxyd in coaps and in jpy mode, found by
    # CoRE discovery on their join links, each mode in its own table.
    assert out.count("3 enrolled, 0 failed") == 2, out
    for mode in ("coaps", "jpy"):
        assert f"through joinproxyd in {mode} mode:" in out
        assert f"openssl verify against the domain CA: 3/3 {mode} LDevIDs OK" in out
        for i in range(3):
            line = next(line for line in out.splitlines() if line.startswith(f"demo-{mode}{i} "))
            assert line.rstrip().endswith(" ok") and f"serialNumber=demo-{mode}{i}" in line
            assert line.split()[1:3] == ["[fe80::1%eth0]:5684", "coap"], line
    # ...and the relay counters per mode at the end: both ways, every flow, no drop.
    counters = {m.group(1): m for m in re.finditer(
        r"^  (\w+) +datagrams (\d+) up / (\d+) down, bytes (\d+) up / (\d+) down, "
        r"flows (\d+), drops: (.*)$", out, re.M)}
    # ...and the 6TiSCH pledges on join3, through the cojp mode to the JRC it learned by GRASP
    assert "through joinproxyd in cojp mode" in out
    assert "4 joined, 0 failed" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("020000000000de0")]
    assert [r[2] for r in rows] == ["psk", "psk", "psk", "edhoc"], out
    assert all(r[-1] == "ok" for r in rows) and len({r[3] for r in rows}) == 4, rows
    assert "cojp open via [fe80::b:2]:5686" in out  # joinproxyctl status: the GRASP JRC
    assert re.search(r"^cojp://\[fe80::b:2\]:5686 +grasp +yes", out, re.M), out
    cojp = counters.pop("cojp")
    # one datagram each way per PSK join, three (EDHOC 1, 3, join) for the EDHOC pledge
    assert (cojp.group(2), cojp.group(3), cojp.group(6)) == ("6", "6", "0"), cojp.group(0)
    assert cojp.group(7) == "none", cojp.group(0)
    assert set(counters) == {"coaps", "jpy"}, out
    for mode, m in counters.items():
        up, down, flows = int(m.group(2)), int(m.group(3)), int(m.group(6))
        # a DTLS handshake and four requests each way per pledge, at least
        assert up >= 3 * 6 and down >= 3 * 6, m.group(0)
        # one flow per DTLS attempt in coaps (a retry is one more); jpy keeps none
        assert (flows >= 3) if mode == "coaps" else flows == 0, m.group(0)
        assert m.group(7) == "none", m.group(0)
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
