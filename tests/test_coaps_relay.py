"""The coaps relay mode (issue 14 item 1, draft-ietf-anima-constrained-join-proxy §4.3) in
namespaces: the real daemon, a UDP registrar stand-in that says which source port it saw, and
pledge-side probes that also capture ICMPv6 with a raw socket. The real registrar and libcoap
through the relay are at the end."""

import ipaddress
import json
import shutil
import time
from pathlib import Path

import pytest

from brski import grasp
from lab import Lab, Topology, wait_for
from lab.brski_services import Services, make_pki
from lab.proxyd import PYTHON, ProxyDaemon, base_config, echo_registrar

pytestmark = pytest.mark.netns

PROBE = str(Path(__file__).with_name("coaps_probe.py"))
COAP_CLIENT = shutil.which("coap-client-openssl")
REGISTRAR = "fd4a:5044::100"


@pytest.fixture
def lab(as_root, tmp_path):
    with Lab(Topology(pledges=2, registrars=1), log_dir=tmp_path / "logs") as lab:
        yield lab


def coaps_config(tmp_path: Path, coaps_port: int = 5684, **sections):  # type: ignore[no-untyped-def]
    return base_config(
        tmp_path / "proxy",
        join=[{"interfaces": ["join*"], "modes": ["coaps"]}],
        registrars={"static": [{"address": REGISTRAR, "port": 8443, "preference": 10,
                                "coaps_port": coaps_port}]},
        **sections)


def start(lab: Lab, tmp_path: Path, coaps_port: int = 5684, health_interval: float = 0.3,  # type: ignore[no-untyped-def]
          **sections) -> ProxyDaemon:
    echo_registrar(lab.registrars[0], "r0")  # TCP: what the health probe connects to
    config = coaps_config(tmp_path, coaps_port, **sections)
    config["registrars"]["health_interval"] = health_interval
    daemon = ProxyDaemon(lab, tmp_path / "proxy", config).start()
    # joining on a coaps link needs the registrar's CoAPS port to answer the DTLS probe
    wait_for(lambda: daemon.ctl()["joining"], 10, "a DTLS-healthy registrar")
    return daemon


def probe(pledge, *payloads: str, wait: float = 1.5) -> dict:  # type: ignore[no-untyped-def]
    done = pledge.run([PYTHON, PROBE, "pledge", "fe80::1", "5684", str(wait), *payloads],
                      timeout=wait + 30)
    return json.loads(done.stdout)


def udp_echo(lab: Lab, port: int = 5684):  # type: ignore[no-untyped-def]
    return lab.registrars[0].spawn([PYTHON, PROBE, "echo", "r0", str(port)], name="udp-echo")


def test_each_pledge_port_gets_its_own_flow_and_source_port(lab, tmp_path):
    udp_echo(lab)
    daemon = start(lab, tmp_path)
    out = probe(lab.pledges[0], "hello-a", "hello-b")
    assert [r.split(" ", 2)[2] for r in out["replies"]] == ["hello-a", "hello-b"], out
    seen_ports = {r.split(" ")[1] for r in out["replies"]}
    assert len(seen_ports) == 2, out  # a fresh source port towards the registrar per flow
    assert out["icmp"] == []
    flows = [c for c in daemon.ctl("circuits") if c["mode"] == "coaps"]
    assert len(flows) == 2
    assert {str(f["local_port"]) for f in flows} == seen_ports
    assert all(f["registrar"] == f"[{REGISTRAR}]:5684" for f in flows)
    assert daemon.sample("joinproxyd_circuits_total", mode="coaps") == 2
    assert daemon.sample("joinproxyd_circuits_active", interface="join0", mode="coaps") == 2
    wait_for(lambda: daemon.sample("joinproxyd_relayed_datagrams_total", mode="coaps",
                                   direction="downstream") == 2, 5, "datagram counters")
    assert daemon.sample("joinproxyd_relayed_bytes_total", mode="coaps",
                         direction="upstream") == 14
    status = daemon.ctl()
    assert status["relays"]["coaps"]["listeners"] == [
        {"interface": "join0", "address": "fe80::1", "port": 5684, "protocol": "udp"}]
    assert status["ready"] is True
    assert status["registrars"][0]["coaps_port"] == 5684
    text = daemon.host.run([PYTHON, "-m", "joinproxyd.ctl", "--socket",
                            daemon.config["daemon"]["control_socket"], "circuits"]).stdout
    assert text.count(" coaps ") == 2 and "[fd4a:5044::100]:5684" in text, text
    text = daemon.host.run([PYTHON, "-m", "joinproxyd.ctl", "--socket",
                            daemon.config["daemon"]["control_socket"], "status"]).stdout
    assert "[fd4a:5044::100]:8443 coaps 5684" in text, text
    daemon.stop()


def test_third_flow_from_one_pledge_address_gets_icmp_admin_prohibited(lab, tmp_path):
    udp_echo(lab)
    daemon = start(lab, tmp_path)
    out = probe(lab.pledges[0], "one", "two", "three")
    assert out["replies"][0].endswith(" one") and out["replies"][1].endswith(" two"), out
    assert out["replies"][2] in (None, "error 13"), out  # EACCES is the kernel's reading
    refused = [e for e in out["icmp"] if e["type"] == 1 and e["code"] == 1]
    assert refused, out
    # The error quotes the pledge's own datagram: its source port, the join port, payload.
    assert refused[0] == {"type": 1, "code": 1, "from": "fe80::1", "sport": out["ports"][2],
                          "dport": 5684, "payload": "three"}
    assert daemon.drops("coaps", "flow-limit") >= 1
    assert daemon.sample("joinproxyd_circuits_total", mode="coaps") == 2
    # another pledge address still gets its flows
    other = probe(lab.pledges[1], "four")
    assert other["replies"][0].endswith(" four") and other["icmp"] == [], other
    refusals = daemon.ctl("refusals")
    assert any("flow-limit" in r["reasons"] and r["mode"] == "coaps" for r in refusals)
    daemon.stop()


def test_per_interface_limit_from_limits_table(lab, tmp_path):
    udp_echo(lab)
    daemon = start(lab, tmp_path, limits={"flows_per_interface": 1})
    assert probe(lab.pledges[0], "a")["replies"][0].endswith(" a")
    out = probe(lab.pledges[1], "b")
    assert out["replies"] == [None] or out["replies"] == ["error 13"], out
    assert [(e["type"], e["code"]) for e in out["icmp"]] == [(1, 1)], out
    assert daemon.drops("coaps", "flow-limit") == 1
    daemon.stop()


def test_idle_flows_expire_and_free_their_slots(lab, tmp_path):
    udp_echo(lab)
    daemon = start(lab, tmp_path, limits={"flow_idle_timeout": 1})
    assert all(probe(lab.pledges[0], "a", "b", wait=0.5)["replies"])
    wait_for(lambda: daemon.sample("joinproxyd_circuits_active", interface="join0",
                                   mode="coaps") == 0, 5, "idle flows to expire")
    assert daemon.ctl("circuits") == []
    assert "closed (idle 1 s)" in daemon.log()
    out = probe(lab.pledges[0], "c", "d", wait=0.5)
    assert out["icmp"] == [] and all(out["replies"]), out
    assert daemon.drops("coaps", "flow-limit") == 0
    daemon.stop()


def test_registrar_port_unreachable_is_reflected_to_the_pledge(lab, tmp_path):
    # The CoAPS port answers the DTLS probe once (probes 30 s apart), then closes: the flow's
    # datagrams meet port unreachable before the next probe says the registrar is down.
    echo = udp_echo(lab, 5999)
    daemon = start(lab, tmp_path, coaps_port=5999, health_interval=30)
    echo.stop()
    out = probe(lab.pledges[0], "knock", "knock-again", wait=2)
    unreachable = [e for e in out["icmp"] if (e["type"], e["code"]) == (1, 4)]
    assert unreachable, out
    assert unreachable[0]["payload"].startswith("knock") and unreachable[0]["dport"] == 5684
    assert unreachable[0]["sport"] in out["ports"] and unreachable[0]["from"] == "fe80::1"
    wait_for(lambda: daemon.drops("coaps", "registrar-unreachable") >= 1, 5, "the count")
    daemon.stop()


def test_closed_window_refuses_new_flows_and_no_registrar_port_is_not_served(lab, tmp_path):
    udp_echo(lab)
    daemon = start(lab, tmp_path)
    daemon.host.run([PYTHON, "-m", "joinproxyd.ctl", "--socket",
                     daemon.config["daemon"]["control_socket"], "window", "close"])
    out = probe(lab.pledges[0], "late", wait=0.8)
    assert out["replies"] == [None] and out["icmp"] == [], out
    assert daemon.drops("coaps", "window-closed") == 1
    daemon.stop()
    # A registrar without a CoAPS port: coaps joining is closed, saying why, and the link is
    # not announced, though its registrar is healthy on TCP.
    config = coaps_config(tmp_path)
    del config["registrars"]["static"][0]["coaps_port"]
    daemon = ProxyDaemon(lab, tmp_path / "proxy2", config).start()
    wait_for(lambda: daemon.ctl()["registrars"][0]["healthy"], 10, "a healthy registrar")
    status = daemon.ctl()
    assert status["joining"] is False
    assert status["joining_modes"]["coaps"]["reason"] == \
        "no constrained registrar answers the DTLS probe", status
    time.sleep(1.5)  # an announcement interval
    assert daemon.sample("joinproxyd_announcements_total", method="grasp",
                         interface="join0") == 0
    daemon.stop()


def test_grasp_announces_a_udp_locator_and_the_guard_covers_the_port(lab, tmp_path):
    udp_echo(lab)
    daemon = start(lab, tmp_path, guard={"enabled": True})
    listen = ("import socket,struct,sys; s=socket.socket(socket.AF_INET6,socket.SOCK_DGRAM);"
              "s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1); s.bind(('::',7017));"
              "i=socket.if_nametoindex('eth0');"
              "s.setsockopt(socket.IPPROTO_IPV6,socket.IPV6_JOIN_GROUP,"
              "socket.inet_pton(socket.AF_INET6,'ff02::13')+struct.pack('@I',i));"
              "s.settimeout(5); sys.stdout.buffer.write(s.recv(2048).hex().encode())")
    done = lab.pledges[0].run([PYTHON, "-c", listen], timeout=20)
    flood = grasp.Flood.decode(bytes.fromhex(done.stdout))
    [locator] = flood.locators_for(grasp.AN_PROXY)
    assert (locator.address, locator.protocol, locator.port) == (
        ipaddress.IPv6Address("fe80::1"), 17, 5684)
    assert 5684 in daemon.ctl()["guard"]["ports"]
    # 300 datagrams at once from one pledge: the guard's bucket (burst 40) drops most in XDP
    flood = ("import socket; s=socket.socket(socket.AF_INET6,socket.SOCK_DGRAM);"
             "d=('fe80::1',5684,0,socket.if_nametoindex('eth0'));"
             "[s.sendto(b'x',d) for _ in range(300)]")
    lab.pledges[1].run([PYTHON, "-c", flood])
    wait_for(lambda: daemon.drops("guard", "rate-limit") >= 200, 10, "the guard dropping")
    upstream = daemon.sample("joinproxyd_relayed_datagrams_total", mode="coaps",
                             direction="upstream")
    assert upstream <= 100, upstream  # what got through the guard, at most burst + rate
    daemon.stop()


# --- the real registrar's CoAPS front door through the relay -----------------------------------


@pytest.mark.parametrize("learned", ["static", "grasp"])
def test_libcoap_gets_crts_from_the_real_registrar_through_the_relay(lab, tmp_path, learned):
    assert COAP_CLIENT, "coap-client-openssl missing: make setup installs libcoap3-bin"
    pki = make_pki(tmp_path / "pki", ["p-0"])
    # grasp: the registrar's flood carries its UDP locator ("BRSKI_JP"), the proxy knows no
    # registrar otherwise
    services = Services(lab.registrars[0], pki, tmp_path / "r0",
                        registrar_listen=[f"[{REGISTRAR}]:8443"],
                        announce_interfaces=["eth0"] if learned == "grasp" else [],
                        coaps_listen=f"[{REGISTRAR}]:5684")
    services.start()
    try:
        config = coaps_config(tmp_path)
        if learned == "grasp":
            config["registrars"] = {**config["registrars"], "discovery": ["grasp"],
                                    "static": []}
        daemon = ProxyDaemon(lab, tmp_path / "proxy", config).start()
        wait_for(lambda: daemon.ctl()["joining"], 10, "a healthy registrar")
        idevid = pki / "manufacturer/idevid"
        out = tmp_path / "crts.bin"
        done = lab.pledges[0].run(
            [COAP_CLIENT, "-B", "20", "-c", str(idevid / "p-0.crt"), "-j",
             str(idevid / "p-0.key"), "-C", str(pki / "domain/ca.crt"), "-o", str(out),
             "-m", "get", "-A", "287", "coaps://[fe80::1%eth0]:5684/.well-known/est/crts"],
            check=False, timeout=60)
        assert out.exists(), done.stdout + done.stderr + daemon.log()
        from cryptography import x509

        from brski import coap_formats
        ca = x509.load_pem_x509_certificate((pki / "domain/ca.crt").read_bytes())
        assert coap_formats.decode_certs(out.read_bytes(), 287) == [ca]
        assert daemon.sample("joinproxyd_circuits_total", mode="coaps") == 1
        flows = daemon.ctl("circuits")
        assert len(flows) == 1 and flows[0]["datagrams_up"] >= 3
        assert daemon.ctl()["registrars"][0]["source"] == learned
        daemon.stop()
    finally:
        services.stop()


UDP_PORT_HOLDER = """
import socket, time
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.bind(("fe80::1", 5684, 0, socket.if_nametoindex("join0")))
print("holding", flush=True)
time.sleep(600)
"""


def test_a_taken_udp_join_port_holds_ready_back_until_it_binds(lab, tmp_path):
    echo_registrar(lab.registrars[0], "r0")
    udp_echo(lab)
    holder = lab.proxy.spawn([PYTHON, "-c", UDP_PORT_HOLDER], name="udp-port-holder")
    wait_for(lambda: "holding" in holder.log(), 5, "the port holder")
    daemon = ProxyDaemon(lab, tmp_path / "proxy", coaps_config(tmp_path))
    daemon.start(wait_ready=False)
    assert daemon.notify is not None

    def status():  # type: ignore[no-untyped-def]
        try:
            s = daemon.ctl()
        except Exception:  # the control socket is not up yet
            return None
        return s if s["registrars"] and s["registrars"][0]["healthy"] else None
    s = wait_for(status, 15, "a healthy registrar")
    assert s["joining"] is False and s["interfaces"] == []
    assert "5684" in json.dumps(s["listener_errors"])
    assert not any(m.startswith("READY=1") for m in daemon.notify.poll())
    holder.stop()
    daemon.notify.wait("READY=1", timeout=30)
    wait_for(lambda: daemon.ctl()["joining"], 10, "joining once the port is bound")
    assert probe(lab.pledges[0], "now")["replies"][0].endswith(" now")
    daemon.stop()


def test_aiocoap_pledge_gets_a_voucher_and_ldevid_through_the_relay(lab, tmp_path):
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    from brski.signed_voucher import verify_voucher_cose

    pki = make_pki(tmp_path / "pki", ["p-0"])
    services = Services(lab.registrars[0], pki, tmp_path / "r0",
                        registrar_listen=[f"[{REGISTRAR}]:8443"], announce_interfaces=[],
                        coaps_listen=f"[{REGISTRAR}]:5684")
    services.start()
    try:
        daemon = ProxyDaemon(lab, tmp_path / "proxy", coaps_config(tmp_path)).start()
        wait_for(lambda: daemon.ctl()["joining"], 10, "a healthy registrar")
        out = tmp_path / "pledge-out"
        out.mkdir()
        done = lab.pledges[0].run(
            [PYTHON, str(Path(__file__).with_name("coaps_voucher_client.py")), str(pki), "p-0",
             "coaps://[fe80::1%eth0]:5684", str(out)], check=False, timeout=90)
        assert done.returncode == 0, done.stdout + done.stderr + services.logs()
        assert json.loads(done.stdout) == {"rv": "2.04 Changed", "sen": "2.04 Changed"}
        signer = x509.load_pem_x509_certificates(
            (tmp_path / "r0" / "masa-signer-chain.pem").read_bytes())[0]
        voucher, _ = verify_voucher_cose(
            (out / "voucher.cose").read_bytes(), [signer], datetime.datetime.now(datetime.UTC),
            serial_number="p-0", nonce=(out / "nonce.bin").read_bytes())
        ca = x509.load_pem_x509_certificate((pki / "domain/ca.crt").read_bytes())
        assert voucher.pinned_domain_cert == ca.public_bytes(Encoding.DER)
        ldevid = x509.load_der_x509_certificate((out / "ldevid.der").read_bytes())
        assert ldevid.issuer == ca.subject
        with services.store("registrar") as store:
            assert store.vouchers("p-0")  # the registrar's record of this enrollment
        flows = daemon.ctl("circuits")
        assert len(flows) == 1 and flows[0]["datagrams_down"] >= 4, flows
        daemon.stop()
    finally:
        services.stop()


def test_after_kill_9_a_restarted_daemon_relays_again(lab, tmp_path):
    udp_echo(lab)
    daemon = start(lab, tmp_path)
    assert probe(lab.pledges[0], "before")["replies"][0].endswith(" before")
    daemon.kill()
    daemon.start()
    wait_for(lambda: daemon.ctl()["joining"], 10, "a healthy registrar")
    # the same pledge address gets its two flows again: nothing of the old run counts
    out = probe(lab.pledges[0], "after-1", "after-2")
    assert out["icmp"] == [] and all(r.endswith(" after-1") or r.endswith(" after-2")
                                     for r in out["replies"]), out
    daemon.stop()


def test_operator_drops_coaps_flows_by_id_and_by_pledge(lab, tmp_path):
    udp_echo(lab)
    daemon = start(lab, tmp_path)
    assert all(probe(lab.pledges[0], "a", "b", wait=0.5)["replies"])
    flows = daemon.ctl("circuits")
    assert [f["id"] for f in flows] == ["coaps-1", "coaps-2"]
    sock = daemon.config["daemon"]["control_socket"]
    done = daemon.host.run([PYTHON, "-m", "joinproxyd.ctl", "--socket", sock, "drop",
                            "coaps-2", "--json"])
    assert [f["id"] for f in json.loads(done.stdout)] == ["coaps-2"]
    assert [f["id"] for f in daemon.ctl("circuits")] == ["coaps-1"]
    pledge = flows[0]["pledge"].split("]")[0].lstrip("[").split("%")[0]
    done = daemon.host.run([PYTHON, "-m", "joinproxyd.ctl", "--socket", sock, "drop",
                            pledge, "--json"])
    assert [f["id"] for f in json.loads(done.stdout)] == ["coaps-1"]
    assert daemon.ctl("circuits") == []
    assert daemon.drops("coaps", "operator") == 2
    assert daemon.sample("joinproxyd_circuits_active", interface="join0", mode="coaps") == 0
    missing = daemon.host.run([PYTHON, "-m", "joinproxyd.ctl", "--socket", sock, "drop",
                               "coaps-9"], check=False)
    assert missing.returncode != 0 and "no open circuit 'coaps-9'" in missing.stderr
    daemon.stop()
