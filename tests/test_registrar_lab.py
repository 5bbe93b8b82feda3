"""The registrar in a namespace lab: link-local listening with a zone, the GRASP flood seen on
the wire by another namespace, and its mDNS record resolved from another namespace."""

import datetime
import json
import subprocess
import sys
import textwrap
from ipaddress import IPv6Address

import pytest
from cryptography import x509

from brski import grasp
from brski.signed_voucher import verify_voucher_cms
from lab import Lab, Topology
from lab.registrar_setup import wait_ready, write_configs
from registrar.announce import GraspFlooder, InterfaceAddresses

pytestmark = pytest.mark.netns
PY = sys.executable
PORT = 8443
VCJ = "application/voucher-cms+json"
SERIAL = "00-D0-E5-F2-00-02"


@pytest.fixture(scope="module")
def lab(as_root, tmp_path_factory):
    """One registrar host (with its MASA on loopback) and two pledges on its link."""
    work = tmp_path_factory.mktemp("reglab")
    pki = work / "pki"
    done = subprocess.run([PY, "-m", "brski.cli.pki", "init", str(pki), "--serial", SERIAL],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    with Lab(Topology(pledges=2, pledges_on_backbone=True), log_dir=work / "logs") as lab:
        host = lab.registrars[0]
        ll = host.address("eth0", link_local=True)
        ula = host.address("eth0", link_local=False)
        registrar_toml, masa_toml = write_configs(
            pki, work / "cfg",
            registrar_listen=[f"[{ll}%eth0]:{PORT}", f"[{ula}]:{PORT}"],
            masa_listen=["[::1]:9443"], announce_interfaces=["eth0"], grasp_period=1.0)
        masa = host.spawn([PY, "-m", "registrar.masa_cli", "--config", str(masa_toml)],
                          name="masa")
        wait_ready(masa.log, alive=masa.alive)
        registrar = host.spawn([PY, "-m", "registrar.cli", "--config", str(registrar_toml)],
                               name="registrar")
        wait_ready(registrar.log, alive=registrar.alive)
        lab.work = work  # type: ignore[attr-defined]
        lab.pki = pki  # type: ignore[attr-defined]
        lab.registrar_log = registrar.log  # type: ignore[attr-defined]
        yield lab
        registrar.stop()
        assert "Traceback" not in registrar.log(), registrar.log()


def run_python(host, script: str, timeout: float = 30) -> str:
    done = host.run([PY, "-c", textwrap.dedent(script)], timeout=timeout, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


PLEDGE = """
    import datetime, json, sys
    from pathlib import Path
    from lab.registrar_testing import call, client_context, load_issued, make_pvr
    pki, serial, host = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    d = pki / "manufacturer/idevid"
    ctx = client_context(d / f"{serial}.crt", d / f"{serial}.key")
    seen = call(host, 8443, "GET", "/.well-known/est/cacerts", ctx=ctx).server_cert
    pvr = make_pvr(load_issued(d / f"{serial}.crt", d / f"{serial}.key"), serial, seen,
                   datetime.datetime.now(datetime.UTC))
    answer = call(host, 8443, "POST", "/.well-known/brski/requestvoucher", body=pvr,
                  content_type="application/voucher-cms+json", ctx=ctx)
    Path(sys.argv[4]).write_bytes(answer.body)
    print(json.dumps({"status": answer.status, "type": answer.headers.get("content-type")}))
"""


def test_pledge_gets_a_voucher_through_the_link_local_listener(lab):
    host = lab.registrars[0]
    ll = host.address("eth0", link_local=True)
    out = lab.work / "voucher.cms"
    done = lab.pledges[0].run([PY, "-c", textwrap.dedent(PLEDGE), str(lab.pki), SERIAL,
                               f"{ll}%eth0", str(out)], timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout)
    assert result == {"status": 200, "type": VCJ}
    masa_ca = x509.load_pem_x509_certificate((lab.pki / "masa/ca.crt").read_bytes())
    verify_voucher_cms(out.read_bytes(), [masa_ca], datetime.datetime.now(datetime.UTC),
                       serial_number=SERIAL)


GRASP_LISTENER = """
    import json, socket, struct, sys, time
    idx = socket.if_nametoindex("eth0")
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::", 7017))
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP,
                 socket.inet_pton(socket.AF_INET6, "ff02::13") + struct.pack("@I", idx))
    s.settimeout(5)
    got = []
    deadline = time.monotonic() + 5
    while len(got) < 2 and time.monotonic() < deadline:
        data, addr = s.recvfrom(4096)
        got.append({"data": data.hex(), "source": addr[0], "at": time.monotonic()})
    print(json.dumps(got))
"""


def test_grasp_flood_is_seen_on_the_wire_in_another_namespace(lab):
    got = json.loads(run_python(lab.pledges[1], GRASP_LISTENER))
    assert len(got) == 2, "expected two periodic floods within 5 s (period 1 s)"
    registrar_ll = lab.registrars[0].address("eth0", link_local=True)
    for packet in got:
        flood = grasp.Flood.decode(bytes.fromhex(packet["data"]))
        assert packet["source"].split("%")[0] == registrar_ll
        assert str(flood.initiator) == registrar_ll
        assert flood.ttl_ms == grasp.DEFAULT_TTL_MS
        [entry] = flood.entries
        assert entry.objective.name == "AN_join_registrar"
        assert entry.objective.flags == grasp.F_SYNCH
        assert entry.objective.loop_count == 255
        assert entry.objective.value == "EST-TLS"
        [locator] = flood.locators_for("AN_join_registrar")
        assert str(locator.address) == registrar_ll  # the listen address on eth0
        assert (locator.protocol, locator.port) == (grasp.IPPROTO_TCP, PORT)
    first, second = (grasp.Flood.decode(bytes.fromhex(p["data"])) for p in got)
    assert first.session_id != second.session_id
    assert 0.5 < got[1]["at"] - got[0]["at"] < 2.5


MDNS_BROWSER = """
    import json, socket, time
    from zeroconf import IPVersion, ServiceBrowser, Zeroconf
    TYPE = "_brski-registrar._tcp.local."
    zc = Zeroconf(interfaces=[socket.if_nametoindex("eth0")], ip_version=IPVersion.V6Only)
    found = []
    class Listener:
        def add_service(self, zc, type_, name): found.append(name)
        def update_service(self, zc, type_, name): pass
        def remove_service(self, zc, type_, name): pass
    ServiceBrowser(zc, TYPE, Listener())
    deadline = time.monotonic() + 8
    while not found and time.monotonic() < deadline:
        time.sleep(0.1)
    result = {"names": found}
    if found:
        info = zc.get_service_info(TYPE, found[0], timeout=3000)
        result.update(port=info.port, addresses=info.parsed_scoped_addresses(),
                      server=info.server, text=(info.text or b"").hex())
    zc.close()
    print(json.dumps(result))
"""


def test_mdns_record_is_resolvable_from_another_namespace(lab):
    result = json.loads(run_python(lab.pledges[0], MDNS_BROWSER, timeout=40))
    assert len(result["names"]) == 1, result
    assert result["names"][0].endswith("._brski-registrar._tcp.local.")
    assert result["port"] == PORT
    assert result["text"] == "00"  # RFC 6763 §6.1: one empty string, not an empty RDATA
    registrar_ll = lab.registrars[0].address("eth0", link_local=True)
    assert any(a.split("%")[0] == registrar_ll for a in result["addresses"]), result


def test_announcements_are_logged(lab):
    log = lab.registrar_log()
    assert "GRASP: flooding AN_join_registrar on eth0 every 1 s" in log
    assert "mDNS: " in log
    assert "below the 60 s RFC 8995 §4.3 recommends" in log


def test_flooding_needs_a_link_local_source_address():
    # DULL GRASP is link-local: an interface without a link-local address cannot flood.
    iface = InterfaceAddresses("lo", 1, [], [IPv6Address("::1")], [])
    with pytest.raises(OSError, match="no link-local address"):
        GraspFlooder(iface, IPv6Address("::1"), PORT, 60.0)
