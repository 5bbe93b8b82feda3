"""joinproxyd as a whole, in namespaces: the real daemon, real kernel, real sockets.

Registrars here are stand-ins (socat echo servers that say their name) so that every test
isolates one behaviour of the daemon; BRSKI enrollments through the daemon, with the real
registrar and pledge simulator, are in test_enroll_via_proxy.py.
"""

import ipaddress
import json
import signal
import socket
import time

import pytest

from brski import grasp
from lab import Lab, Topology, wait_for
from lab.proxyd import PYTHON, ProxyDaemon, base_config, echo_registrar, hold_circuit, talk
from lab.sniffers import GRASP_SNIFFER, heard

pytestmark = pytest.mark.netns


@pytest.fixture
def lab(as_root, tmp_path):
    with Lab(Topology(pledges=2, registrars=2), log_dir=tmp_path / "logs") as lab:
        yield lab


def started(lab: Lab, tmp_path, **sections) -> ProxyDaemon:  # type: ignore[no-untyped-def]
    return ProxyDaemon(lab, tmp_path / "proxy", base_config(tmp_path / "proxy", **sections)
                       ).start()


def test_ready_status_watchdog_and_clean_stop(lab, tmp_path):
    echo_registrar(lab.registrars[0], "r0")
    daemon = ProxyDaemon(lab, tmp_path / "proxy", base_config(tmp_path / "proxy"))
    daemon.start(watchdog_usec=200_000)
    assert daemon.notify is not None
    ready = next(m for m in daemon.notify.poll() if m.startswith("READY=1"))
    assert "STATUS=serving join0(circuit)" in ready
    daemon.notify.wait("WATCHDOG=1")
    wait_for(lambda: daemon.ctl()["joining"], 10, "a healthy registrar")
    status = daemon.ctl()
    assert status["interfaces"][0]["name"] == "join0"
    assert status["interfaces"][0]["link_local"] == "fe80::1"
    assert status["registrars"][0]["healthy"] is True
    assert daemon.stop() == 0
    assert any(m.startswith("STOPPING=1") for m in daemon.notify.poll())
    assert not (tmp_path / "proxy" / "control.sock").exists()
    assert "joinproxyd 0.1.0 started" in daemon.log()


def test_circuit_relays_and_metrics_parse(lab, tmp_path):
    echo_registrar(lab.registrars[0], "r0")
    daemon = started(lab, tmp_path)
    wait_for(lambda: daemon.ctl()["joining"], 10, "a healthy registrar")
    assert talk(lab.pledges[0], "ClientHello") == "r0\nClientHello\n"
    wait_for(lambda: daemon.sample("joinproxyd_relayed_bytes_total", mode="circuit",
                                   direction="upstream") == 12, 5, "byte counters")
    assert daemon.sample("joinproxyd_circuits_total", mode="circuit") == 1
    assert daemon.sample("joinproxyd_relayed_bytes_total", mode="circuit",
                         direction="downstream") == 15
    assert daemon.sample("joinproxyd_registrar_active", registrar="[fd4a:5044::100]:8443") == 1
    assert daemon.sample("joinproxyd_build_info", version="0.1.0") == 1
    assert daemon.sample("joinproxyd_announcements_total", method="grasp",
                         interface="join0") >= 1
    metrics = daemon.metrics()
    reasons = {dict(labels)["reason"] for name, labels in metrics
               if name == "joinproxyd_drops_total" and dict(labels)["mode"] == "circuit"}
    assert {"rate-limit", "no-registrar", "limit-pledge", "idle-timeout"} <= reasons
    daemon.stop()


def test_pledges_are_still_isolated_from_the_backbone(lab, tmp_path):
    echo_registrar(lab.registrars[0], "r0")
    daemon = started(lab, tmp_path)
    pledge = lab.pledges[0]
    pledge.run(["ip", "-6", "route", "add", "fd4a:5044::/64", "via", "fe80::1", "dev", "eth0"])
    done = pledge.run(["ping", "-6", "-c1", "-W1", "fd4a:5044::100"], check=False)
    assert done.returncode != 0, "the daemon must not turn the proxy into a router"
    daemon.stop()


def test_failover_to_the_second_registrar_and_back(lab, tmp_path):
    first = echo_registrar(lab.registrars[0], "r0")
    echo_registrar(lab.registrars[1], "r1")
    daemon = started(lab, tmp_path, registrars={"static": [
        {"address": "fd4a:5044::100", "port": 8443, "preference": 10},
        {"address": "fd4a:5044::101", "port": 8443, "preference": 20}]})
    wait_for(lambda: talk(lab.pledges[0]).startswith("r0"), 10, "circuits to r0")
    first.stop()
    killed = time.monotonic()
    wait_for(lambda: talk(lab.pledges[0], timeout=1).startswith("r1"), 10,
             "circuits to fail over to r1")
    assert time.monotonic() - killed < 10
    echo_registrar(lab.registrars[0], "r0")
    wait_for(lambda: talk(lab.pledges[1], timeout=1).startswith("r0"), 10,
             "circuits to fail back to r0")
    daemon.stop()


def test_without_registrar_joining_closes_and_open_circuits_stay(lab, tmp_path):
    registrar = echo_registrar(lab.registrars[0], "r0")
    daemon = started(lab, tmp_path, limits={"idle_timeout": 60})
    wait_for(lambda: daemon.ctl()["joining"], 10, "a healthy registrar")
    holder = hold_circuit(lab.pledges[0])
    wait_for(lambda: daemon.ctl("circuits"), 5, "the held circuit")
    registrar.popen.send_signal(signal.SIGTERM)  # stop listening; the forked child serving
    # the held circuit stays, like a registrar that shuts its listener but finishes sessions
    wait_for(lambda: not daemon.ctl()["joining"], 10, "joining to close")
    floods = daemon.sample("joinproxyd_announcements_total", method="grasp", interface="join0")
    assert talk(lab.pledges[1], timeout=1) == ""
    wait_for(lambda: daemon.drops("circuit", "no-registrar") >= 1, 5, "the refusal count")
    time.sleep(2.5)  # more than two announce intervals
    assert daemon.sample("joinproxyd_announcements_total", method="grasp",
                         interface="join0") == floods
    assert holder.alive() and len(daemon.ctl("circuits")) == 1
    daemon.stop()





def test_a_join_interface_plugged_in_later_is_served_and_released(lab, tmp_path):
    echo_registrar(lab.registrars[0], "r0")
    daemon = started(lab, tmp_path)
    wait_for(lambda: daemon.ctl()["joining"], 10, "a healthy registrar")
    plugged = time.monotonic()
    ifname, (pledge,) = lab.add_join_link(pledges=1)
    wait_for(lambda: talk(pledge, timeout=1).startswith("r0"), 5, "relaying on the new link")
    assert time.monotonic() - plugged < 5
    assert ifname in [i["name"] for i in daemon.ctl()["interfaces"]]
    # The new link also gets AN_Proxy announcements.
    listener = pledge.spawn([PYTHON, "-c", GRASP_SNIFFER], name="grasp-listener")
    _, data = wait_for(lambda: heard(listener.log()), 5, "an AN_Proxy flood on the link")[0]
    flood = grasp.Flood.decode(data)
    (locator,) = flood.locators_for("AN_Proxy")
    assert (str(locator.address), locator.protocol, locator.port) == ("fe80::1", 6, 8443)
    lab.remove_join_link(ifname)
    wait_for(lambda: ifname not in [i["name"] for i in daemon.ctl()["interfaces"]], 5,
             "the unplugged link to be released")
    assert daemon.process is not None and daemon.process.alive()
    daemon.stop()


def test_per_pledge_limit_and_slowloris(lab, tmp_path):
    echo_registrar(lab.registrars[0], "r0")
    daemon = started(lab, tmp_path, limits={"circuits_per_pledge": 2, "idle_timeout": 1.5})
    wait_for(lambda: daemon.ctl()["joining"], 10, "a healthy registrar")
    holders = [hold_circuit(lab.pledges[0], f"hold{i}") for i in range(2)]
    wait_for(lambda: len(daemon.ctl("circuits")) == 2, 5, "two circuits")
    assert talk(lab.pledges[0], timeout=1) == ""  # circuit N+1 from the same address
    wait_for(lambda: daemon.drops("circuit", "limit-pledge") == 1, 5, "the refusal count")
    assert talk(lab.pledges[1], timeout=1).startswith("r0")  # another pledge is fine
    # The two held circuits say nothing: slowloris. They are cut after the idle timeout.
    wait_for(lambda: daemon.drops("circuit", "idle-timeout") == 2, 6, "the idle timeouts")
    wait_for(lambda: daemon.ctl("circuits") == [], 5, "the held circuits to close")
    assert all(h.alive() for h in holders)  # the pledges did not hang up: the proxy did
    daemon.stop()


def send_to_backbone_grasp(host, payload: bytes) -> None:  # type: ignore[no-untyped-def]
    host.run([PYTHON, "-c",
              "import socket,sys\n"
              "s=socket.socket(socket.AF_INET6,socket.SOCK_DGRAM)\n"
              "i=socket.if_nametoindex('eth0')\n"
              f"s.sendto(bytes.fromhex('{payload.hex()}'),('ff02::13',7017,0,i))\n"])


def test_malformed_and_oversized_grasp_are_counted_and_ignored(lab, tmp_path):
    echo_registrar(lab.registrars[0], "r0")
    daemon = started(lab, tmp_path, registrars={"discovery": ["static", "grasp"]})
    send_to_backbone_grasp(lab.registrars[1], b"\x85\x09garbage")
    send_to_backbone_grasp(lab.registrars[1], b"\x85" + b"\x00" * 3000)
    wait_for(lambda: daemon.drops("discovery", "malformed") >= 1, 5, "the malformed count")
    wait_for(lambda: daemon.drops("discovery", "oversized") >= 1, 5, "the oversized count")
    assert [r["source"] for r in daemon.ctl()["registrars"]] == ["static"]
    assert daemon.process is not None and daemon.process.alive()
    daemon.stop()


def test_registrar_learned_from_grasp_is_used(lab, tmp_path):
    echo_registrar(lab.registrars[1], "r1")
    daemon = started(lab, tmp_path, registrars={"discovery": ["grasp"], "static": []})
    assert not daemon.ctl()["joining"]
    address = ipaddress.IPv6Address("fd4a:5044::101")
    flood = grasp.registrar_flood(lambda n: b"\x01" * n, address,
                                  [grasp.IPv6Locator(address, 6, 8443)])
    send_to_backbone_grasp(lab.registrars[1], flood.encode())
    wait_for(lambda: daemon.ctl()["joining"], 10, "the GRASP-learned registrar")
    assert talk(lab.pledges[0]).startswith("r1")
    assert daemon.ctl()["registrars"][0]["source"] == "grasp"
    daemon.stop()


def test_sighup_applies_a_new_limit_without_closing_circuits(lab, tmp_path):
    echo_registrar(lab.registrars[0], "r0")
    daemon = started(lab, tmp_path, limits={"circuits_per_pledge": 4, "idle_timeout": 60})
    wait_for(lambda: daemon.ctl()["joining"], 10, "a healthy registrar")
    holder = hold_circuit(lab.pledges[0])
    wait_for(lambda: len(daemon.ctl("circuits")) == 1, 5, "the held circuit")
    config = json.loads(json.dumps(daemon.config))
    config["limits"]["circuits_per_pledge"] = 1
    daemon.reload(config)
    assert holder.alive() and len(daemon.ctl("circuits")) == 1
    assert talk(lab.pledges[0], timeout=1) == ""
    wait_for(lambda: daemon.drops("circuit", "limit-pledge") == 1, 5, "the new limit")
    assert daemon.sample("joinproxyd_config_reloads_total", result="ok") == 1
    # A broken file is refused and the running configuration stays.
    daemon.config_path.write_text("[limits]\ncircuits_per_pledge = 0\n")
    daemon.signal(signal.SIGHUP)
    wait_for(lambda: daemon.sample("joinproxyd_config_reloads_total", result="error") == 1, 5,
             "the refused reload")
    assert len(daemon.ctl("circuits")) == 1
    assert "reload refused, keeping the running configuration" in daemon.log()
    daemon.stop()


def test_sigterm_drains_and_exits_zero(lab, tmp_path):
    echo_registrar(lab.registrars[0], "r0")
    daemon = started(lab, tmp_path)
    wait_for(lambda: daemon.ctl()["joining"], 10, "a healthy registrar")
    assert daemon.stop() == 0
    with socket.socket(socket.AF_UNIX) as sock, pytest.raises(OSError):
        sock.connect(str(tmp_path / "proxy" / "control.sock"))
    listening = lab.proxy.run(["ss", "-Htlnp"]).stdout
    assert ":8443" not in listening


def test_nat66_links_announce_their_ula_and_a_killed_nat66_run_is_cleaned_up(as_root,
                                                                              tmp_path):
    with Lab(Topology(pledges=1, registrars=1, join_ula=True), log_dir=tmp_path / "l") as lab:
        echo_registrar(lab.registrars[0], "r0")
        daemon = started(lab, tmp_path, join=[{"interfaces": ["join*"], "port": 8443,
                                               "modes": ["nat66", "circuit"]}])
        wait_for(lambda: daemon.ctl()["joining"], 10, "a healthy registrar")
        listener = lab.pledges[0].spawn([PYTHON, "-c", GRASP_SNIFFER], name="grasp-listener")
        flood = grasp.Flood.decode(
            wait_for(lambda: heard(listener.log()), 5, "an AN_Proxy flood")[0][1])
        assert [str(loc.address) for loc in flood.locators_for("AN_Proxy")] == [
            "fe80::1", "fd4a:5044:0:100::1"]
        forwarding = "sysctl", "-n", "net.ipv6.conf.all.forwarding"
        assert lab.proxy.run(forwarding).stdout.strip() == "1"
        daemon.kill()
        # The next run serves circuits only: the dead run's table and forwarding must go.
        daemon = started(lab, tmp_path / "again")
        tables = json.loads(lab.proxy.run(["nft", "-j", "list", "tables"]).stdout)
        assert [t for t in tables["nftables"] if "table" in t] == []
        assert lab.proxy.run(forwarding).stdout.strip() == "0"
        assert "left by an earlier run (nat66 is not configured now)" in daemon.log()
        daemon.stop()
