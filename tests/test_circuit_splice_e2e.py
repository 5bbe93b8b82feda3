"""BRSKI enrollments and curl through the real joinproxyd with its circuits spliced in the
kernel ([circuit] splice = on) and forced off: issue 19 item 2's acceptance, all real.

Same topology and static-registrar case as test_enroll_via_proxy.py: pledge-sim enrolls two
pledges, then curl (with a pledge's IDevID, TLS end to end) fetches the domain CA through the
proxy. With splice on, the daemon's status must say every circuit ran spliced and the byte
counters must come from the program; forced off, none.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab import Lab, Topology, wait_for
from lab.brski_services import REGISTRAR_PORT, Services, enroll_each, make_pki
from lab.proxyd import ProxyDaemon, base_config, echo_registrar, hold_circuit, talk

pytestmark = pytest.mark.netns

REGISTRAR = "fd4a:5044::100"


@pytest.fixture
def two_pledges(as_root: None, tmp_path: Path) -> Iterator[Lab]:
    with Lab(Topology(pledges=2, registrars=1), log_dir=tmp_path / "logs") as lab:
        yield lab


@pytest.mark.parametrize("splice", ["on", "off"])
def test_enroll_and_curl_through_the_spliced_circuit_proxy(two_pledges: Lab, tmp_path: Path,
                                                          splice: str) -> None:
    lab = two_pledges
    serials = [f"splice-{splice}-{i}" for i in range(len(lab.pledges))]
    pki = make_pki(tmp_path / "pki", serials)
    services = Services(lab.registrars[0], pki, tmp_path / "r0",
                        registrar_listen=[f"[{REGISTRAR}]:{REGISTRAR_PORT}"],
                        announce_interfaces=[])
    daemon = ProxyDaemon(lab, tmp_path / "proxy", base_config(
        tmp_path / "proxy", circuit={"splice": splice},
        registrars={"static": [{"address": REGISTRAR, "port": REGISTRAR_PORT,
                                "preference": 10}]}))
    try:
        services.start()
        daemon.start()
        wait_for(lambda: daemon.ctl()["joining"], 15, "a healthy registrar")
        state = daemon.ctl()["relays"]["circuit"]["splice"]
        assert state["setting"] == splice
        assert state["running"] is (splice == "on"), state

        results = enroll_each(lab.pledges, pki, tmp_path / "out", serials,
                              "--discover", "grasp", "--deadline", "40")
        for r in results:
            assert r["ok"], json.dumps(r, indent=1)

        # curl, an independent TLS client, through the proxy with a pledge's IDevID
        idevid = pki / "manufacturer" / "idevid"
        done = lab.pledges[0].run(
            ["curl", "-sS", "-k", "--max-time", "20", "--cert", str(idevid / f"{serials[0]}.crt"),
             "--key", str(idevid / f"{serials[0]}.key"), "-o", "/dev/null", "-w",
             "%{http_code} %{size_download}",
             f"https://[fe80::1%eth0]:{REGISTRAR_PORT}/.well-known/est/cacerts"], check=False)
        code, size = done.stdout.split()
        assert code == "200" and int(size) > 100, (done.stdout, done.stderr)

        state = wait_for(lambda: (s := daemon.ctl()["relays"]["circuit"]["splice"])
                         and s["spliced_now"] == 0 and s, 10, "circuits closed")
        opened = daemon.sample("joinproxyd_circuits_total", mode="circuit")
        assert opened >= 2 * len(serials) + 1
        if splice == "on":
            assert state["spliced"] == opened and state["refused"] == 0, state
        else:
            assert state["spliced"] == 0, state
        # byte counters (the program's when spliced) reach the metrics
        wait_for(lambda: daemon.sample("joinproxyd_relayed_bytes_total", mode="circuit",
                                       direction="downstream") > 1000, 5, "byte counters")
        assert daemon.sample("joinproxyd_relayed_bytes_total", mode="circuit",
                             direction="upstream") > 1000
        assert daemon.drops("circuit", "registrar-unreachable") == 0
        assert daemon.stop() == 0
    finally:
        print(services.logs())
        print(f"--- joinproxyd:\n{daemon.log()[-6000:]}")


def test_spliced_half_close_and_idle_timeout_in_namespaces(as_root: None, tmp_path: Path
                                                           ) -> None:
    """socat sends a line and half-closes; the stand-in registrar (socat + cat) answers,
    then closes when it sees end of file: through the splice the answer arrives whole. A
    silent circuit is still ended by the idle timeout."""
    with Lab(Topology(pledges=1, registrars=1), log_dir=tmp_path / "logs") as lab:
        echo_registrar(lab.registrars[0], "r0")
        daemon = ProxyDaemon(lab, tmp_path / "proxy", base_config(
            tmp_path / "proxy", circuit={"splice": "on"},
            limits={"idle_timeout": 1.5, "new_circuits_per_second": 100,
                    "new_circuits_burst": 100})).start()
        try:
            wait_for(lambda: daemon.ctl()["joining"], 10, "a healthy registrar")
            # half-closed at once, the pledge would be refused by the kernel (asyncio then)
            done = lab.pledges[0].run(["sh", "-c", "(echo ClientHello; sleep 1) | socat -t3 "
                                       "-T3 - 'TCP6:[fe80::1%eth0]:8443'"], timeout=15)
            assert done.stdout == "r0\nClientHello\n", done
            # asyncio if the FIN came before the registrar connected, else spliced
            assert talk(lab.pledges[0], "at once") == "r0\nat once\n"
            state = wait_for(lambda: (s := daemon.ctl()["relays"]["circuit"]["splice"])
                             and s["spliced"] + s["refused"] == 2 and s["spliced_now"] == 0
                             and s, 5, "the circuits closed by the half-closes")
            assert state["spliced"] >= 1  # the first; the second races its FIN
            assert daemon.drops("circuit", "idle-timeout") == 0
            holder = hold_circuit(lab.pledges[0])
            (circuit,) = wait_for(lambda: daemon.ctl("circuits"), 5, "held circuit")
            assert circuit["datapath"] == "splice"
            wait_for(lambda: daemon.drops("circuit", "idle-timeout") == 1, 6, "the idle timeout")
            holder.stop()
            assert daemon.stop() == 0
        finally:
            print(f"--- joinproxyd:\n{daemon.log()[-6000:]}")
