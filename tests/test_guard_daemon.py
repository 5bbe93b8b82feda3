"""The XDP join-port guard run by the real joinproxyd, in a lab (issue 6 acceptance).

    pledge0 (flooder) ─┐
    pledge1 (enrolls) ─┴─ [join0] ─ proxy: jp_guard (XDP) ─ circuit ─ bb0 ─ registrar0

- One pledge floods the join port at full speed while the other enrolls: the enrollment
  succeeds, the flood is cut to the guard's rate, and the drops show in the guard's counter
  (joinproxyd_bpf_packets_total{program="jp_guard",action="drop"}), in
  joinproxyd_drops_total{mode="guard",reason="rate-limit"} and in joinproxyctl status.
- SIGHUP changes the rate and burst in the kernel's map; turning the guard off detaches it
  and unloads the BPF data plane; turning it on again attaches it again.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_ipip_daemon import bpffs, bpftool_net, map_dump, show, xdp_progs

from lab import Lab, Topology, wait_for
from lab.brski_services import REGISTRAR_PORT, Services, enroll, ldevid_verifies, make_pki
from lab.proxyd import ProxyDaemon, base_config

pytestmark = pytest.mark.netns

__all__ = ["bpffs"]  # the fixture, shared with test_ipip_daemon

PROXY = f"[fe80::1%eth0]:{REGISTRAR_PORT}"
FLOOD_SECONDS = 4.0

# Sends UDP datagrams to the proxy's join port as fast as one process can, for a bounded
# time, and prints how many it sent. (UDP, so the flood needs no handshake and no raw
# socket; the guard counts TCP and UDP to the join ports alike.)
BLASTER = """
import socket, sys, time
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setblocking(False)
dst = ("fe80::1", int(sys.argv[2]), 0, socket.if_nametoindex("eth0"))
end, sent, payload = time.monotonic() + float(sys.argv[1]), 0, b"x" * 32
while time.monotonic() < end:
    for _ in range(256):
        try:
            s.sendto(payload, dst)
            sent += 1
        except BlockingIOError:
            pass
print("sent", sent, flush=True)
"""


@pytest.fixture
def lab(as_root: None, tmp_path: Path) -> Iterator[Lab]:
    with Lab(Topology(pledges=2, registrars=1), log_dir=tmp_path / "logs") as lab:
        yield lab


def guard_config(run_dir: Path, pin_dir: Path, **guard: Any) -> dict[str, Any]:
    return base_config(run_dir, daemon={"bpf_pin_dir": str(pin_dir)},
                       guard={"enabled": True, **guard})


def static_services(lab: Lab, pki: Path, work: Path) -> Services:
    return Services(lab.registrars[0], pki, work,
                    registrar_listen=[f"[fd4a:5044::100]:{REGISTRAR_PORT}"],
                    announce_interfaces=[])


def guard_packets(daemon: ProxyDaemon, action: str) -> float:
    return daemon.sample("joinproxyd_bpf_packets_total", program="jp_guard", action=action)


def test_a_flooding_pledge_is_cut_off_while_another_enrolls(lab: Lab, bpffs: Path,
                                                            tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki", ["guarded-0"])
    services = static_services(lab, pki, tmp_path / "r0")
    daemon = ProxyDaemon(lab, tmp_path / "proxy",
                         guard_config(tmp_path / "proxy", bpffs / "joinproxyd", rate=20,
                                      burst=40))
    flooder = None
    try:
        services.start()
        daemon.start()
        wait_for(lambda: daemon.ctl()["joining"], 10, "a healthy registrar")
        assert xdp_progs(lab.proxy, "join0") == ["jp_guard"]
        # Exported at zero before anything happened.
        assert ("joinproxyd_drops_total", frozenset({("mode", "guard"),
                                                    ("reason", "rate-limit")})) \
            in daemon.metrics()

        flooder = lab.pledges[0].spawn([sys.executable, "-c", BLASTER, str(FLOOD_SECONDS),
                                        str(REGISTRAR_PORT)], name="blaster")
        wait_for(lambda: daemon.drops("guard", "rate-limit") > 1000, 10, "the guard dropping")
        run = enroll(lab.pledges[1], pki, tmp_path / "out", "--serial", "guarded-0",
                     "--registrar", PROXY, "--deadline", "40", timeout=60)
        assert flooder.popen.wait(FLOOD_SECONDS + 10) == 0
        sent = int(flooder.log().split()[-1])

        assert run.ok, run.stderr[-3000:]
        assert ldevid_verifies(pki, run.results[0]["ldevid_path"])
        drops = daemon.drops("guard", "rate-limit")
        allowed = guard_packets(daemon, "allow")
        # The flood got at most burst + rate * seconds through (plus the enrollment's own
        # packets and a tick of clock slack); everything else was dropped in XDP.
        assert drops > 0.9 * sent - 40 - 20 * (FLOOD_SECONDS + 2), (sent, drops)
        assert guard_packets(daemon, "drop") == drops
        assert allowed < 40 + 20 * (FLOOD_SECONDS + 15) + 500, allowed
        status = daemon.ctl()
        assert status["guard"]["interfaces"] == {"join0": status["guard"]["interfaces"]["join0"]}
        assert status["guard"]["ports"] == [REGISTRAR_PORT]
        assert status["counters"]['joinproxyd_drops_total{mode="guard",reason="rate-limit"}'] \
            == drops
        text = lab.proxy.run([sys.executable, "-m", "joinproxyd.ctl", "--socket",
                              daemon.config["daemon"]["control_socket"], "status"]).stdout
        assert ("guard: per source UDP 20 datagrams/s burst 40, TCP 10 SYNs/s burst 20, "
                "ports 8443 on join0") in text, text
        assert "jp_guard: " in text and "drop " in text, text
        assert daemon.stop() == 0
        assert bpftool_net(lab.proxy)["xdp"] == []
    finally:
        show(services, daemon, flooder)


def guard_map(pin_dir: Path) -> dict[str, Any]:
    (entry,) = map_dump(pin_dir, "jp_guard_cfg")
    value = entry["formatted"]["value"] if "formatted" in entry else entry["value"]
    return value if isinstance(value, dict) else {"raw": value}


def test_sighup_changes_the_guard(lab: Lab, bpffs: Path, tmp_path: Path) -> None:
    pin_dir = bpffs / "joinproxyd"
    config = guard_config(tmp_path / "proxy", pin_dir, rate=20, burst=40)
    daemon = ProxyDaemon(lab, tmp_path / "proxy", config)
    try:
        daemon.start()
        assert daemon.ctl()["guard"]["rate"] == 20
        assert daemon.ctl()["bpf"]["guard"] == {"rate_pps": 20, "burst": 40,
                                                "ports": [REGISTRAR_PORT],
                                                "syn_rate_pps": 10, "syn_burst": 20}
        cfg = guard_map(pin_dir)
        assert (cfg["rate_pps"], cfg["burst"]) == (20, 40), cfg
        first = daemon.ctl()["bpf"]["attached"]

        daemon.reload({**config, "guard": {"enabled": True, "rate": 500, "burst": 1000}})
        status = daemon.ctl()
        assert (status["guard"]["rate"], status["guard"]["burst"]) == (500, 1000)
        cfg = guard_map(pin_dir)
        assert (cfg["rate_pps"], cfg["burst"]) == (500, 1000), cfg
        # Same program on the hook: a new rate is a map write, not a re-attachment.
        assert status["bpf"]["attached"] == first

        daemon.reload({**config, "guard": {"enabled": False}})
        status = daemon.ctl()
        assert status["guard"]["enabled"] is False and status["bpf"] is None
        assert xdp_progs(lab.proxy, "join0") == []
        assert not pin_dir.exists(), "nothing runs in BPF: unloaded, pins removed"

        daemon.reload({**config, "guard": {"enabled": True, "rate": 7, "burst": 9}})
        assert xdp_progs(lab.proxy, "join0") == ["jp_guard"]
        cfg = guard_map(pin_dir)
        assert (cfg["rate_pps"], cfg["burst"]) == (7, 9), cfg

        # A reload with a bad rate is refused; the kernel keeps the running one.
        bad = {**config, "guard": {"enabled": True, "rate": 0}}
        daemon.write_config(bad)
        daemon.signal(1)  # SIGHUP
        wait_for(lambda: daemon.sample("joinproxyd_config_reloads_total", result="error") == 1,
                 10, "the refused reload")
        assert "guard.rate: must be an integer between 1 and 10000000 (got 0)" in daemon.log()
        cfg = guard_map(pin_dir)
        assert (cfg["rate_pps"], cfg["burst"]) == (7, 9), cfg
        assert daemon.stop() == 0
        assert json.loads(json.dumps(bpftool_net(lab.proxy)))["xdp"] == []
    finally:
        show(daemon)
