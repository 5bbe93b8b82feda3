"""`make test-vm` from `make test`: the ipip mode's kernel datapath (ip6ip6 tunnels, which
this machine kind's kernel lacks) checked in Debian's stock kernel under QEMU/TCG
(tools/vm/, tests/vm/): the datapath itself, the relay mode on it and, in the mode's boot, a
whole enrollment (MASA, registrar, joinproxyd, pledge-sim) through its tunnel. About four
minutes with the rootfs cached in /var/tmp/joinproxyd-vm (VM_ROOTFS), a few more on a fresh
machine (debootstrap)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(1200)
def test_ipip_kernel_datapath_in_the_stock_debian_kernel(as_root: None) -> None:
    done = subprocess.run([str(REPO / "tools" / "vm" / "test-vm.sh")], capture_output=True,
                          text=True, timeout=1190)
    checks = [line for line in done.stdout.splitlines() if line.startswith("CHECK")]
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert checks and all(": PASS" in line for line in checks), checks
    assert any(line.startswith("CHECK pledge_udp_tcp_through_tunnel: PASS") for line in checks)
    assert any(line.startswith("CHECK enroll_pledge_enrolled: PASS") for line in checks)
