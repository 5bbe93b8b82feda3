"""SZTP (RFC 8572) devices bootstrap through joinproxyd's circuit mode and call home (RFC 8071).

    pledge0: 3 devices ─┐                                         ┌ registrar0: brski-sztp
    pledge1: 4 devices ─┼─ [join0] ─ fe80::1 proxy bb0 ─ [backbone] ┤  [fd4a:5044::100]:8443
    pledge2: 3 devices ─┘            │                             └  MASA [::1]:9443
                                     ├ dnsmasq: DHCPv6 option 136 -> https://[fe80::1]:8444
                                     ├ brski-sztp redirect server [fe80::1%join0]:8443+1
                                     └ brski-sztp manager (call home) [fe80::1%join0]:4336

The devices have link-local addresses only; the proxy does not route. The bootstrap server is
configured in joinproxyd as its (static) registrar: every RESTCONF exchange with it is a
circuit. Three sets:

* A (pledge0): the server preconfigured with its trust anchor (the domain CA): trusted, all
  inputs sent, unsigned onboarding from a per-model record, with a boot image (installed,
  rebooted into) and pre/post scripts;
* B (pledge1): the server preconfigured without trust anchor: signed-data-preferred + nonce,
  signed onboarding (owner certificate + a voucher the MASA bound to that nonce);
* C (pledge2): no server configured: DHCPv6 gives the redirect server (on the proxy, standing
  for a manufacturer's redirect service), whose unsigned redirect names the join proxy; the
  second server answers with signed data.

Each device ends with a call home to the manager, which checks its IDevID and reads the
platform resource; every device's progress is in the bootstrap server's store, sent from the
proxy's backbone address (through the circuits).

The call-home manager and the redirect server sit on the join link (in the proxy's
namespace): the proxy relays only the bootstrap port, and nothing else on the join link can
reach the backbone.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sztp_lab import Bootstrap, call_homes, manager, onboarding, redirect, run_devices

from brski import sztp
from lab import Lab, Topology, wait_for
from lab.brski_services import make_pki
from lab.proxyd import ProxyDaemon, base_config

pytestmark = pytest.mark.netns

SERVER = "[fd4a:5044::100]:8443"
VIA_PROXY = "https://[fe80::1%eth0]:8443"
REDIRECT_PORT = 8444
MANAGER = "[fe80::1%join0]:4336"
SETS = {"A": [f"sztp-a{i}" for i in range(3)], "B": [f"sztp-b{i}" for i in range(4)],
        "C": [f"sztp-c{i}" for i in range(3)]}
ALL = [s for serials in SETS.values() for s in serials]


@pytest.fixture
def lab(as_root: None, tmp_path: Path) -> Iterator[Lab]:
    with Lab(Topology(pledges=3, registrars=1), log_dir=tmp_path / "logs") as lab:
        yield lab


def test_ten_devices_bootstrap_through_the_circuit_proxy_and_call_home(
        lab: Lab, tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki", ALL)
    (tmp_path / "boot").mkdir()
    (tmp_path / "redirect").mkdir()
    image = tmp_path / "simos-2.0.img"
    image.write_bytes(b"SimOS 2.0 boot image\n" * 1000)
    config = {"hostname": "edge", "call-home": {"address": "fe80::1%eth0", "port": 4336}}

    boot = Bootstrap(lab.registrars[0], pki, tmp_path / "boot", listen=SERVER)
    redirector = Bootstrap(lab.proxy, pki, tmp_path / "redirect",
                           listen=f"[fe80::1%join0]:{REDIRECT_PORT}", redirect_only=True,
                           with_masa=False)
    daemon = ProxyDaemon(lab, tmp_path / "proxy", base_config(tmp_path / "proxy"))
    option = sztp.encode_dhcpv6_uris([f"https://[fe80::1]:{REDIRECT_PORT}"]).hex(":")
    try:
        boot.start()
        redirector.start()
        # set A by model: boot image, scripts; everyone else: the default record
        boot.record(onboarding(config=config, image=image, pre="echo pre > pre.flag\n",
                               post="echo post > post.flag\n"), model="router-a", verbose=True)
        boot.record(onboarding(config=config))
        redirector.record(redirect(("fe80::1%eth0", 8443, None)))
        dhcp = lab.proxy.spawn(["dnsmasq", "--no-daemon", "--port=0", "--interface=join0",
                                "--bind-interfaces", "--dhcp-range=::,static", "--log-dhcp",
                                f"--dhcp-option=option6:136,{option}", "--no-resolv",
                                "--no-hosts", f"--pid-file={tmp_path}/dnsmasq.pid",
                                f"--dhcp-leasefile={tmp_path}/leases"], name="dnsmasq")
        nms = manager(lab.proxy, pki, tmp_path / "boot", MANAGER, ALL, len(ALL))
        daemon.start()
        wait_for(lambda: "DHCP, sockets bound" in dhcp.log(), 10, "dnsmasq on join0")
        wait_for(lambda: "listening on" in nms.log(), 10, "the call-home manager")
        wait_for(lambda: any(r["active"] for r in daemon.ctl()["registrars"]), 15,
                 "joinproxyd to see the bootstrap server")
        before = daemon.sample("joinproxyd_circuits_total", mode="circuit")

        anchor = str(pki / "domain" / "ca.crt")
        runs = [
            (lab.pledges[0], SETS["A"], ["--trusted-server", VIA_PROXY, "--server-ca", anchor,
                                         "--hw-model", "router-a"]),
            (lab.pledges[1], SETS["B"], ["--server", VIA_PROXY]),
            (lab.pledges[2], SETS["C"], ["--dhcpv6", "eth0", "--encoding", "xml"]),
        ]
        with ThreadPoolExecutor(3) as pool:
            done = list(pool.map(lambda r: run_devices(r[0], pki, tmp_path / f"state-{r[0].name}",
                                                       r[1], *r[2]), runs))
        devices = {k: v for run in done for k, v in run.devices.items()}
        assert sorted(devices) == sorted(ALL), [run.stderr[-3000:] for run in done]
        for d in devices.values():
            assert d["ok"] and d["callhome"]["ok"], json.dumps(d, indent=1)
            assert d["callhome"]["manager"] == MANAGER.replace("join0", "eth0")
        for serial in SETS["A"]:
            d = devices[serial]
            assert not d["signed"] and d["path"] == ["[fe80::1%eth0]:8443"] * 2, d
            assert d["os_version"] == "2.0"  # the image was installed and booted
            assert d["reports"][:2] == ["bootstrap-initiated", "boot-image-initiated"], d
            assert "boot-image-installed-rebooting" in d["reports"]
            assert d["reports"][-1] == "bootstrap-complete"
            home = tmp_path / "state-pledge0" / serial
            assert (home / "pre.flag").read_text() == "pre\n"
            assert (home / "post.flag").read_text() == "post\n"
            assert (home / "boot-image").read_bytes() == image.read_bytes()
        for serial in SETS["B"]:
            d = devices[serial]
            assert d["signed"] and d["source"] == "configured", d
            assert d["reports"] == ["bootstrap-initiated", "bootstrap-complete"], d
        for serial in SETS["C"]:
            d = devices[serial]
            assert d["signed"] and d["source"] == "dhcpv6", d
            assert d["path"] == [f"[fe80::1%eth0]:{REDIRECT_PORT}", "[fe80::1%eth0]:8443"], d
        for run, (host, serials, _) in zip(done, runs, strict=True):
            state = tmp_path / f"state-{host.name}"
            for serial in serials:
                applied = json.loads((state / serial / "config.json").read_text())
                assert applied == config
            assert run.rc == 0, run.stderr[-2000:]

        # the manager: ten call homes, each naming its IDevID's serial, the resource read
        wait_for(lambda: len([c for c in call_homes(nms) if c["ok"]]) >= len(ALL), 10,
                 "ten call homes")
        seen = {c["serial"]: c for c in call_homes(nms) if c["ok"]}
        assert sorted(seen) == sorted(ALL)
        assert seen["sztp-a0"]["resource"]["ietf-system:platform"]["os-version"] == "2.0"
        assert seen["sztp-b0"]["resource"]["ietf-system:platform"]["os-version"] == "1.0"

        # the server's store: every device's reports, all through the proxy's circuits
        progress = boot.progress()
        by_serial: dict[str, list[str]] = {}
        for row in progress:
            by_serial.setdefault(row["serial"], []).append(row["progress_type"])
        assert sorted(by_serial) == sorted(ALL)
        for serial in ALL:
            assert by_serial[serial][0] == "bootstrap-initiated"
            assert by_serial[serial][-1] == "bootstrap-complete"
        assert {row["peer"].rsplit(":", 1)[0] for row in progress} == {"[fd4a:5044::1]"}
        # one circuit per device and server connection (a reboot opens a new one)
        assert daemon.sample("joinproxyd_circuits_total", mode="circuit") - before >= len(ALL)
        assert redirector.progress() == []  # an untrusted redirect server gets no reports
        assert daemon.stop() == 0
    finally:
        print(boot.log()[-6000:])
        print(redirector.log()[-3000:])
        print(daemon.log()[-3000:])
