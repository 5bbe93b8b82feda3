"""Status must be true (issue 11, defect 2): with the join port taken by another process the
daemon does not say READY=1, does not announce the link to pledges, says in
`joinproxyctl status` and STATUS= which link is not served and why, counts the failed binds
and retries them with backoff; once the port is free the bind follows, then READY=1, the
announcements and relayed circuits. The real daemon in a namespace lab."""

import signal
import time

import pytest

from brski import grasp
from lab import Lab, Topology, wait_for
from lab.netns import LabError
from lab.proxyd import PYTHON, ProxyDaemon, base_config, echo_registrar, talk
from lab.sniffers import GRASP_SNIFFER, heard

pytestmark = pytest.mark.netns


# Holds a TCP port on the proxy's join address (no SO_REUSEPORT: nobody can share it).
PORT_HOLDER = """
import socket, sys, time
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.bind(("fe80::1", int(sys.argv[1]), 0, socket.if_nametoindex("join0")))
s.listen(1)
print("holding", flush=True)
time.sleep(600)
"""


@pytest.fixture
def lab(as_root, tmp_path):
    with Lab(Topology(pledges=1, registrars=1), log_dir=tmp_path / "logs") as lab:
        yield lab


def status_when(daemon: ProxyDaemon, predicate, what: str):  # type: ignore[no-untyped-def]
    """The daemon's status once `predicate` holds (the control socket may not be up yet)."""
    def probe():  # type: ignore[no-untyped-def]
        try:
            status = daemon.ctl()
        except LabError:
            return None
        return status if predicate(status) else None
    return wait_for(probe, 15, what)


def floods(sniffer) -> list[grasp.Flood]:  # type: ignore[no-untyped-def]
    return [grasp.Flood.decode(data) for _, data in heard(sniffer.log())]


def test_a_taken_join_port_is_not_ready_not_announced_then_retried(lab, tmp_path):
    echo_registrar(lab.registrars[0], "r0")
    holder = lab.proxy.spawn([PYTHON, "-c", PORT_HOLDER, "8443"], name="port-holder")
    wait_for(lambda: "holding" in holder.log(), 5, "the port holder")
    sniffer = lab.pledges[0].spawn([PYTHON, "-c", GRASP_SNIFFER], name="grasp-sniffer")
    daemon = ProxyDaemon(lab, tmp_path / "proxy", base_config(tmp_path / "proxy"))
    daemon.start(wait_ready=False)
    assert daemon.notify is not None

    # The registrar is healthy, but join0 is not served: joining is not open.
    status = status_when(daemon, lambda s: s["registrars"] and s["registrars"][0]["healthy"],
                         "a healthy registrar")
    assert status["joining"] is False
    assert status["joining_reason"] == "no join link served"
    time.sleep(2)  # announce interval 1 s: a flood would have come by now
    assert not any(m.startswith("READY=1") for m in daemon.notify.poll()), daemon.notify.seen
    assert floods(sniffer) == [], "an AN_Proxy flood for a port nobody listens on"
    (unserved,) = status["unserved"]
    assert unserved["name"] == "join0"
    assert "Address already in use" in unserved["reason"]
    assert status["interfaces"] == [] and status["ready"] is False
    wait_for(lambda: daemon.sample("joinproxyd_listener_errors_total", interface="join0",
                                   mode="circuit", reason="address-in-use") >= 3, 15,
             "three failed binds (1 s, then 2 s of backoff)")
    assert daemon.sample("joinproxyd_listeners_unbound") == 1
    text = daemon.host.run([PYTHON, "-m", "joinproxyd.ctl", "--socket",
                            daemon.config["daemon"]["control_socket"], "status"]).stdout
    assert "NOT READY" in text and "join0 (circuit): NOT SERVED" in text
    assert "joining CLOSED (no join link served)" in text
    assert "joining open" not in daemon.log()
    seen = daemon.notify.poll()
    assert not any(m.startswith("READY=1") for m in seen), seen
    assert any("NOT SERVING: join0 circuit: cannot listen on [fe80::1%join0]:8443" in m
               for m in seen), seen
    assert daemon.sample("joinproxyd_announcements_total", method="grasp",
                         interface="join0") == 0
    assert floods(sniffer) == [], "an AN_Proxy flood for a port nobody listens on"
    assert daemon.sample("joinproxyd_join_interfaces") == 0
    # the retries are logged once, at error level, not once per attempt
    assert daemon.log().count("ERROR joinproxyd: circuit: cannot listen on") == 1

    # A reload meanwhile does not say READY=1 either (it ends a reload only once ready).
    daemon.signal(signal.SIGHUP)
    wait_for(lambda: "configuration reloaded" in daemon.log(), 10, "the reload")
    assert not any(m.startswith(("READY=1", "RELOADING=1")) for m in daemon.notify.poll())

    holder.stop()
    freed = time.monotonic()
    ready = daemon.notify.wait("READY=1", timeout=35)
    assert "STATUS=serving join0(circuit)" in ready and "NOT SERVING" not in ready
    assert time.monotonic() - freed <= 31  # the backoff never exceeds 30 s
    flood = wait_for(lambda: floods(sniffer), 5, "an AN_Proxy flood after the bind")[0]
    (locator,) = flood.locators_for("AN_Proxy")
    assert (str(locator.address), locator.port) == ("fe80::1", 8443)
    assert talk(lab.pledges[0], "ClientHello") == "r0\nClientHello\n"
    status = daemon.ctl()
    assert status["ready"] is True and status["unserved"] == [] and status["joining"]
    assert "joining open on join0 via registrar [fd4a:5044::100]:8443" in daemon.log()
    assert [i["name"] for i in status["interfaces"]] == ["join0"]
    assert daemon.sample("joinproxyd_listeners_unbound") == 0
    assert "circuit: listening on [fe80::1%join0]:8443 after" in daemon.log()
    assert daemon.stop() == 0


def test_a_taken_metrics_port_holds_ready_back_and_is_retried(lab, tmp_path):
    holder = lab.proxy.spawn(["socat", "TCP6-LISTEN:9465,bind=[::1]", "SYSTEM:true"],
                             name="metrics-holder")
    wait_for(lambda: "9465" in lab.proxy.run(["ss", "-Htln"]).stdout, 5, "the holder")
    daemon = ProxyDaemon(lab, tmp_path / "proxy", base_config(tmp_path / "proxy"))
    daemon.start(wait_ready=False)
    assert daemon.notify is not None
    status = status_when(daemon, lambda s: s["listener_errors"],
                         "the metrics port's bind error in status")
    (error,) = status["listener_errors"]
    assert (error["mode"], error["address"], error["reason"]) == (
        "metrics", "[::1]:9465", "address-in-use")
    time.sleep(1.5)
    assert not any(m.startswith("READY=1") for m in daemon.notify.poll())
    holder.stop()
    daemon.notify.wait("READY=1", timeout=35)
    assert daemon.sample("joinproxyd_listener_errors_total", interface="", mode="metrics",
                         reason="address-in-use") >= 1
    assert daemon.stop() == 0


def test_a_missing_backbone_is_said_once_in_the_log_and_in_status(lab, tmp_path):
    echo_registrar(lab.registrars[0], "r0")
    config = base_config(tmp_path / "proxy", backbone={"interface": "bbx"},
                         registrars={"discovery": ["static", "grasp"]})
    daemon = ProxyDaemon(lab, tmp_path / "proxy", config).start()
    status = daemon.ctl()
    assert status["backbone"]["problem"] == "missing"
    assert any("grasp" in s for s in status["backbone"]["stops"])
    time.sleep(1.5)  # several reconciles (health probes change state)
    lines = [line for line in daemon.log().splitlines() if "backbone interface bbx" in line]
    assert len(lines) == 1, lines
    assert "WARNING" in lines[0] and "missing" in lines[0] and "grasp" in lines[0]
    text = daemon.host.run([PYTHON, "-m", "joinproxyd.ctl", "--socket",
                            daemon.config["daemon"]["control_socket"], "status"]).stdout
    assert "bbx (NOT READY: missing" in text
    assert daemon.stop() == 0


def test_a_control_socket_that_cannot_be_made_is_one_line_and_exit_1(lab, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    config = base_config(tmp_path / "proxy", daemon={
        "log_level": "info", "control_socket": str(blocker / "control.sock"),
        "drain_seconds": 1})
    daemon = ProxyDaemon(lab, tmp_path / "proxy", config)
    daemon.start(wait_ready=False)
    assert daemon.process is not None
    assert daemon.process.popen.wait(20) == 1
    log = daemon.log()
    assert "joinproxyd: control socket" in log and "Traceback" not in log, log
    assert not any(m.startswith("READY=1") for m in daemon.notify.poll())


def test_links_down_without_address_or_missing_are_listed_with_why(lab, tmp_path):
    echo_registrar(lab.registrars[0], "r0")
    config = base_config(tmp_path / "proxy", join=[
        {"interfaces": ["join*", "lan7"], "modes": ["circuit"], "port": 8443}])
    daemon = ProxyDaemon(lab, tmp_path / "proxy", config).start()
    status = daemon.ctl()
    assert [(u["name"], u["reason"]) for u in status["unserved"]] == [("lan7", "missing")]
    lab.proxy.run(["ip", "link", "set", "join0", "down"])
    status = status_when(daemon, lambda s: len(s["unserved"]) == 2, "join0 not served")
    assert [(u["name"], u["reason"]) for u in status["unserved"]] == [
        ("join0", "link down"), ("lan7", "missing")]
    assert (status["joining"], status["joining_reason"]) == (False, "no join link served")
    lab.proxy.run(["ip", "link", "set", "join0", "up"])
    lab.proxy.run(["ip", "-6", "addr", "flush", "dev", "join0", "scope", "link"])
    status = status_when(daemon, lambda s: any(u["reason"] == "no link-local address"
                                               for u in s["unserved"]), "no link-local")
    assert status["interfaces"] == []
    text = daemon.host.run([PYTHON, "-m", "joinproxyd.ctl", "--socket",
                            config["daemon"]["control_socket"], "status"]).stdout
    assert "join0 (circuit): NOT SERVED: no link-local address" in text
    assert "lan7 (circuit): NOT SERVED: missing" in text
    assert daemon.stop() == 0
