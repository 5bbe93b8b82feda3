"""The real daemon finds the real registrar's CoAPS endpoint by CoRE discovery, GRASP, mDNS and
its static configuration, shows it healthy by DTLS probe in joinproxyctl status, and marks it
unhealthy when the registrar stops. Network namespaces, real processes."""

import subprocess
import sys

import pytest

from lab import Lab, Topology
from lab.proxyd import ProxyDaemon, base_config
from lab.registrar_setup import wait_ready, write_configs
from lab.topology import wait_for

PY = sys.executable
PORT = 8443
COAPS = 5684
SERIAL = "00-D0-E5-F2-00-03"
REGISTRAR = "fd4a:5044::100"


@pytest.fixture
def lab(as_root, tmp_path):
    pki = tmp_path / "pki"
    done = subprocess.run([PY, "-m", "brski.cli.pki", "init", str(pki), "--serial", SERIAL],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    with Lab(Topology(pledges=1), log_dir=tmp_path / "logs") as lab:
        host = lab.registrars[0]
        registrar_toml, masa_toml = write_configs(
            pki, tmp_path / "cfg", registrar_listen=[f"[::]:{PORT}"], masa_listen=["[::1]:9443"],
            announce_interfaces=["eth0"], grasp_period=1.0, coaps_listen=f"[::]:{COAPS}")
        masa = host.spawn([PY, "-m", "registrar.masa_cli", "--config", str(masa_toml)],
                          name="masa")
        wait_ready(masa.log, alive=masa.alive)
        registrar = host.spawn([PY, "-m", "registrar.cli", "--config", str(registrar_toml),
                                "--metrics", "[::1]:9466"], name="registrar")
        wait_ready(registrar.log, alive=registrar.alive)
        lab.registrar = registrar  # type: ignore[attr-defined]
        yield lab


def _wait(daemon: ProxyDaemon, predicate, timeout: float, what: str):  # type: ignore[no-untyped-def]
    try:
        return wait_for(predicate, timeout, what)
    except Exception:
        raise AssertionError(f"{what}: status {_endpoints(daemon)}\n{daemon.log()[-6000:]}")\
            from None


def _endpoints(daemon: ProxyDaemon) -> list[dict]:
    return daemon.ctl("status")["constrained_registrars"]["endpoints"]


def _coaps_at(daemon: ProxyDaemon, address: str) -> dict | None:
    return next((e for e in _endpoints(daemon) if e["kind"] == "coaps"
                 and e["address"] == address and e["port"] == COAPS), None)


def test_daemon_learns_probes_and_loses_the_registrars_coaps_endpoint(lab, tmp_path):
    config = base_config(
        tmp_path / "run",
        registrars={"discovery": ["static", "grasp", "mdns", "coap"], "core_interval": 1,
                    "static": [{"address": REGISTRAR, "port": PORT, "preference": 10,
                                "coaps_port": COAPS}]},
        announce={"interval": 1, "mdns": False})
    daemon = ProxyDaemon(lab, tmp_path / "run", config).start()
    try:
        # The registrar's ULA endpoint, vouched for by all four sources and DTLS-healthy.
        want = {"static", "grasp", "mdns", "coap"}
        entry = _wait(daemon, lambda: (e := _coaps_at(daemon, REGISTRAR)) and e["healthy"]
                      and want <= set(e["sources"]) and e, 30,
                      "the CoAPS endpoint from static, GRASP, mDNS and CoRE, healthy")
        assert entry["last_error"] is None
        info = daemon.ctl("status")["constrained_registrars"]
        assert info["mode"] == "coaps"  # the registrar offers no JPY port
        assert info["chosen"]["address"] == REGISTRAR
        assert info["chosen"]["coaps_port"] == COAPS and info["chosen"]["jpy_port"] is None
        text = lab.proxy.run([PY, "-m", "joinproxyd.ctl", "--socket",
                              config["daemon"]["control_socket"], "status"]).stdout
        assert "constrained registrars (mode coaps, setting auto):" in text, text
        assert f"coaps://[{REGISTRAR}]:{COAPS}" in text
        # The probe reached the registrar's DTLS service: its HelloVerifyRequest was sent.
        lab.registrar.stop()
        entry = _wait(daemon, lambda: (e := _coaps_at(daemon, REGISTRAR))
                      and e["healthy"] is False and e, 15, "the CoAPS endpoint marked down")
        assert entry["last_error"] in ("Connection refused", "no DTLS answer within 0.3 s")
        assert daemon.ctl("status")["constrained_registrars"]["chosen"] is None
        assert "constrained registrar [fd4a:5044::100] chosen for coaps" in daemon.log()
        assert "no healthy constrained registrar" in daemon.log()
    finally:
        daemon.stop()
    assert "Traceback" not in daemon.log(), daemon.log()


# The daemon's join-link CoRE answer, with the real coaps mode: the gate (window open, a
# DTLS-healthy constrained registrar) and the answer are the daemon's own.


def _ask_join_port(pledge) -> str:
    done = pledge.run(["coap-client-openssl", "-N", "-v", "3", "-m", "get", "-B", "2",
                       "coap://[ff02::fd%eth0]/.well-known/core?brski-jp=*"],
                      timeout=30, check=False)
    return (done.stdout + done.stderr).strip()


def test_join_link_core_answer_follows_joining(lab, tmp_path):
    config = base_config(
        tmp_path / "run",
        join=[{"interfaces": ["join*"], "modes": ["coaps"], "port": PORT}],
        registrars={"discovery": ["static"],
                    "static": [{"address": REGISTRAR, "port": PORT, "preference": 10,
                                "coaps_port": COAPS}]})
    daemon = ProxyDaemon(lab, tmp_path / "run", config).start()
    pledge = lab.pledges[0]
    socket_path = config["daemon"]["control_socket"]

    def window(state: str) -> None:
        lab.proxy.run([PY, "-m", "joinproxyd.ctl", "--socket", socket_path, "window", state])

    try:
        _wait(daemon, lambda: daemon.ctl("status")["core_join_discovery"]["serving"], 15,
              "join-port discovery serving")
        assert _ask_join_port(pledge) == f"<>;brski-jp={PORT}"
        status = daemon.ctl("status")["core_join_discovery"]
        assert status["links"] == [{"interface": "join0", "port": PORT}]
        window("close")
        _wait(daemon, lambda: not daemon.ctl("status")["core_join_discovery"]["serving"], 10,
              "join-port discovery stopped with the window closed")
        assert _ask_join_port(pledge) == ""
        window("open")
        _wait(daemon, lambda: daemon.ctl("status")["core_join_discovery"]["serving"], 10,
              "join-port discovery back with the window open")
        assert _ask_join_port(pledge) == f"<>;brski-jp={PORT}"
        lab.registrar.stop()  # no DTLS answer: no constrained registrar, no answer
        _wait(daemon, lambda: not daemon.ctl("status")["core_join_discovery"]["serving"], 15,
              "join-port discovery stopped with the registrar gone")
        assert _ask_join_port(pledge) == ""
        assert "CoRE join-port discovery: no longer answering" in daemon.log()
    finally:
        daemon.stop()
    assert "Traceback" not in daemon.log(), daemon.log()
