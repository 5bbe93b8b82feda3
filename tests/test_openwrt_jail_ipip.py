"""The ipip mode under OpenWrt's procd jail: the capabilities of the shipped
/etc/capabilities/joinproxyd.json are enough for it too.

The daemon runs as procd runs it (a non-root uid, only those capabilities, no_new_privs;
emulated with setpriv, as in test_ipk_payload.py), with what the init script prepares (its
run directory and pin directory, the user's own) and a static registrar that terminates IPIP:
it programs the join link (sysctls, proxy ND, the backbone address, tc and XDP programs),
a pledge enrolls through it, and a stop undoes it all.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from test_ipip_daemon import (
    ONE_EACH,
    backbone_address,
    hooks,
    ipip_config,
    ipip_services,
    lab,
    proxy_entries,
    relaying,
    show,
)
from test_ipk_payload import JAIL_UID, jail_argv, jail_dir

from lab import Lab, wait_for
from lab.brski_services import enroll, make_pki
from lab.proxyd import PYTHON, ProxyDaemon

__all__ = ["jail_dir", "lab"]  # fixtures


def test_the_ipip_mode_serves_jailed(lab: Lab, jail_dir: Path, tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki", ["jail-0"])
    run_dir, pin_dir = jail_dir / "run", jail_dir / "bpffs/joinproxyd"
    for directory in (run_dir, pin_dir):  # what start_service makes
        directory.mkdir()
        os.chown(directory, JAIL_UID, JAIL_UID)
    services = ipip_services(lab, pki, tmp_path / "r0", grasp=False)
    daemon = ProxyDaemon(lab, run_dir, ipip_config(run_dir, pin_dir, static=True),
                         command=[*jail_argv(), PYTHON, "-m", "joinproxyd"])
    daemon.config_path.chmod(0o644)
    try:
        services.start()
        daemon.start(wait_ready=False)  # its notify socket is root's

        def ready() -> dict | None:
            assert daemon.process and daemon.process.popen.poll() is None, daemon.log()
            return relaying(daemon) if (run_dir / "control.sock").exists() else None

        status = wait_for(ready, 20, "the ipip mode relaying")
        proc = Path(f"/proc/{status['pid']}/status").read_text()
        assert re.search(rf"^Uid:\s+{JAIL_UID}\s", proc, re.M), proc
        assert "fe80::1234 dev join0 proxy" in proxy_entries(lab.proxy)
        assert backbone_address(lab.proxy) in lab.proxy.run(
            ["ip", "-6", "addr", "show", "dev", "bb0"]).stdout
        assert hooks(lab.proxy) == ONE_EACH
        run = enroll(lab.pledges[0], pki, tmp_path / "out", "--serial", "jail-0",
                     "--discover", "grasp", "--deadline", "30", timeout=60)
        assert run.ok, run.stderr[-3000:]
        assert daemon.stop() == 0
        log = daemon.log()
        assert "Traceback" not in log and "ERROR" not in log, log
        assert proxy_entries(lab.proxy) == ""
        assert backbone_address(lab.proxy) not in lab.proxy.run(
            ["ip", "-6", "addr", "show", "dev", "bb0"]).stdout
        assert not pin_dir.exists()  # removed by the daemon; start_service makes it again
    finally:
        show(services, daemon)
