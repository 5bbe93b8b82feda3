"""The cojp mode's JRC: learned from the registrar's GRASP flood, health-checked by CoAP ping.

Real processes in namespaces. brski-registrar with its JRC floods ``["AN_join_registrar", 4,
255, "6TiSCH-JRC"]`` with the JRC's UDP locator; joinproxyd, with GRASP as its only discovery,
learns the JRC from it (no ``cojp_port`` configured anywhere), probes it with CoAP pings (an
empty CON, answered with a Reset: RFC 7252 §4.3) and opens cojp joining only while it answers.
A JRC that stops answering closes cojp joining even while the registrar's TCP port still
answers (the TCP probe was all the cojp mode had before).
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_cojp_jrc_lab import cli
from test_cojp_relay import JRC, cojp_config, pledge, start_jrc

from lab import Lab, Topology, wait_for
from lab.proxyd import PYTHON, ProxyDaemon, base_config
from lab.registrar_setup import READY_MARK, write_configs
from lab.topology import PROXY_LL
from tests.test_masa import brski_pki

pytestmark = pytest.mark.netns

REGISTRAR = "fd4a:5044::100"
JRC_PORT = 5683


@pytest.fixture
def lab(as_root: None, tmp_path: Path) -> Iterator[Lab]:
    with Lab(Topology(pledges=2), log_dir=tmp_path / "logs") as lab:
        yield lab


def cojp_state(daemon: ProxyDaemon) -> dict[str, Any]:
    return daemon.ctl()["joining_modes"]["cojp"]


def jrc_endpoints(daemon: ProxyDaemon) -> list[dict[str, Any]]:
    return [e for e in daemon.ctl()["constrained_registrars"]["endpoints"]
            if e["kind"] == "cojp"]


def test_jrc_learned_from_grasp_and_joining_follows_its_coap_ping(lab: Lab,
                                                                   tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    brski_pki("init", str(pki), "--serial", "SN-G")
    registrar_toml, _ = write_configs(
        pki, tmp_path / "svc", masa_listen=["[::1]:9443"],
        registrar_listen=[f"[{REGISTRAR}]:8443"], masa_timeout=5, mdns=False,
        announce_interfaces=["eth0"], announce_address=REGISTRAR, grasp_period=1.0)
    with registrar_toml.open("a") as toml:
        toml.write('\n[cojp]\nenabled = true\nnetwork_id = "cafe"\n')
    added = cli("add-pledge", "--config", str(registrar_toml), "--id", "02-00-00-00-00-00-00-01",
                "--generate-psk")
    assert added.returncode == 0, added.stderr
    psk = added.stdout.split("psk ")[1].split()[0]
    pledges = tmp_path / "pledges.txt"
    pledges.write_text(f"02-00-00-00-00-00-00-01 {psk}\n")
    registrar = lab.registrars[0].spawn(
        [PYTHON, "-m", "registrar.cli", "--config", str(registrar_toml)], name="registrar")
    wait_for(lambda: READY_MARK in registrar.log(), 30, "the registrar")
    assert "UDP (CoJP JRC) port 5683" in registrar.log()

    config = base_config(tmp_path / "proxy", join=[{"interfaces": ["join*"], "modes": ["cojp"]}],
                         registrars={"discovery": ["grasp"], "health_interval": 0.3,
                                     "health_timeout": 0.3})
    daemon = ProxyDaemon(lab, tmp_path / "proxy", config).start()
    wait_for(lambda: cojp_state(daemon)["open"], 15, "cojp joining to open on the GRASP JRC")
    assert cojp_state(daemon)["registrar"] == f"[{REGISTRAR}]:{JRC_PORT}"
    assert daemon.ctl()["relays"]["cojp"]["jrc"] == f"[{REGISTRAR}]:{JRC_PORT}"
    [endpoint] = jrc_endpoints(daemon)
    assert endpoint["sources"] == ["grasp"] and endpoint["healthy"] is True
    assert endpoint["port"] == JRC_PORT and endpoint["address"] == REGISTRAR

    done = lab.pledges[0].run(
        [PYTHON, "-m", "pledge_sim.cli", "cojp", "--jrc", f"[{PROXY_LL}%eth0]:{JRC_PORT}",
         "--via-proxy", "--pledges", str(pledges), "--count", "1", "--state",
         str(tmp_path / "state"), "--json"], check=False, timeout=60)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-2000:])
    assert json.loads(done.stdout)["joined"] == 1

    # A frozen JRC answers no ping: cojp joining closes (the GRASP entry lives on for its
    # 180 s ttl, so only the probe can tell), and opens again when it answers.
    registrar.signal(signal.SIGSTOP)
    try:
        wait_for(lambda: not cojp_state(daemon)["open"], 10, "cojp joining to close")
        state = cojp_state(daemon)
        assert state["reason"] == "no JRC answers the CoAP ping", state
        [endpoint] = jrc_endpoints(daemon)
        assert endpoint["healthy"] is False
        assert "no CoAP ping answer" in endpoint["last_error"]
        assert "no JRC answers the CoAP ping (cojp)" in daemon.ctl()["joining_reason"]
    finally:
        registrar.signal(signal.SIGCONT)
    wait_for(lambda: cojp_state(daemon)["open"], 10, "cojp joining to open again")
    daemon.stop()
    registrar.stop()
    assert "Traceback" not in registrar.log() + daemon.log()


def test_a_silent_jrc_closes_cojp_joining_while_the_registrar_answers_tcp(
        lab: Lab, tmp_path: Path) -> None:
    jrc = start_jrc(lab)  # the stand-in JRC (aiocoap) and a TCP listener on 8443
    daemon = ProxyDaemon(lab, tmp_path / "proxy", cojp_config(tmp_path / "proxy")).start()
    wait_for(lambda: cojp_state(daemon)["open"], 10, "cojp joining to open")
    [endpoint] = jrc_endpoints(daemon)
    assert endpoint["sources"] == ["static"] and endpoint["healthy"] is True
    assert "answer ACK" in pledge(lab, 0, "con:01:join-a")
    endpoint = {"endpoint": f"cojp://[fd4a:5044::100]:{JRC_PORT}", "kind": "cojp"}
    assert daemon.sample("joinproxyd_constrained_registrar_up", **endpoint) == 1
    assert daemon.sample("joinproxyd_mode_joining", mode="cojp") == 1

    jrc.stop()
    wait_for(lambda: not cojp_state(daemon)["open"], 10, "cojp joining to close")
    assert cojp_state(daemon)["reason"] == "no JRC answers the CoAP ping"
    assert daemon.sample("joinproxyd_constrained_registrar_up", **endpoint) == 0
    assert daemon.metrics().get(("joinproxyd_mode_joining", frozenset({("mode", "cojp")}))) == 0
    # The registrar itself is still healthy on TCP: only the JRC's ping tells.
    assert [r["healthy"] for r in daemon.ctl()["registrars"]] == [True]
    # Refused while closed, and counted as such (nothing to relay to).
    pledge(lab, 1, "con:02:join-b", timeout=0.5)
    assert daemon.sample("joinproxyd_drops_total", mode="cojp", reason="no-registrar") >= 1

    lab.registrars[0].spawn([PYTHON, "-c", JRC], name="jrc-again")
    wait_for(lambda: cojp_state(daemon)["open"], 10, "cojp joining to open again")
    assert "answer ACK" in pledge(lab, 0, "con:03:join-c")
    daemon.stop()
    assert "Traceback" not in daemon.log()
