"""The registrar's JPY endpoint behind the jpy relay mode, real processes in namespaces.

libcoap's coap-client-openssl with an IDevID on a pledge namespace GETs /.well-known/est/crts
from coaps://[fe80::1%eth0]:8443 (the proxy's join port); joinproxyd wraps its DTLS in JPY
messages to the registrar's [jpy] listener, which runs them as sessions of its CoAPS service
keyed by (proxy address, port, header). A datagram that is not a JPY message is dropped and
counted by the registrar. Unit part: rt=brski.rjp is offered only with a JPY port.
"""

from __future__ import annotations

import ipaddress
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import cbor2
import pytest

from brski import coap_formats, linkformat
from lab import Lab, Topology, netns, wait_for
from lab.proxyd import PYTHON, ProxyDaemon
from lab.registrar_setup import READY_MARK, write_configs
from registrar.coap_discovery import WellKnownCore
from tests.test_field_jpy_relay import DATAPATH, JOIN_PORT, jpy_config
from tests.test_masa import brski_pki

COAP_CLIENT = shutil.which("coap-client-openssl")
JPY_PORT = 5684  # the relay test's configuration: the registrar's JPY port
METRICS_PORT = 9466

METRIC = """
import re, sys, urllib.request
text = urllib.request.urlopen("http://[::1]:%d/metrics" % int(sys.argv[1]), timeout=5).read()
m = re.search(rb'^' + re.escape(sys.argv[2].encode()) + rb' (\\S+)$', text, re.M)
print(float(m.group(1)) if m else 0.0)
"""
MALFORMED = 'brski_registrar_refusals_total{endpoint="jpy",reason="malformed"}'
GARBAGE = 'brski_registrar_jpy_dtls_drops_total{reason="garbage"}'

SEND = """
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
for hexdata in sys.argv[2:]:
    s.sendto(bytes.fromhex(hexdata), ("::1", int(sys.argv[1])))
"""


@pytest.fixture
def lab(as_root: None, tmp_path: Path) -> Iterator[Lab]:
    with Lab(Topology(pledges=1), log_dir=tmp_path / "logs") as lab:
        yield lab


@pytest.fixture(params=["auto", "xdp", "user"])
def datapath(request: pytest.FixtureRequest) -> Iterator[str]:
    """libcoap through the kernel path (auto, on this kernel: tc, as the lab's backbone takes
    no XDP-redirected frames), through it with the pledge side's wrap in XDP (xdp: auto, with
    GRO on the backbone's far end, forwarding on, and the pledge finishing its checksums as a
    radio's frame arrives) and through the user-space relay (forced)."""
    DATAPATH["mode"] = "auto" if request.param == "xdp" else request.param
    yield request.param
    DATAPATH["mode"] = "auto"


@pytest.mark.parametrize("learned", ["static", "grasp"])
def test_libcoap_gets_crts_through_the_jpy_relay(lab: Lab, tmp_path: Path, learned: str,
                                                 datapath: str) -> None:
    """grasp: the proxy knows no registrar but the one whose flood carries its JPY port as a
    BRSKI_RJP UDP locator (the flood once had only the CoAPS port, and jpy links stayed
    unserved)."""
    assert COAP_CLIENT, "coap-client-openssl missing: make setup installs libcoap3-bin"
    pki = tmp_path / "pki"
    brski_pki("init", str(pki), "--serial", "SN-J")
    registrar_toml, masa_toml = write_configs(
        pki, tmp_path / "svc", masa_listen=["[::1]:9443"],
        registrar_listen=["[fd4a:5044::100]:8443"], masa_timeout=5, mdns=False,
        grasp=learned == "grasp", announce_interfaces=["eth0"] if learned == "grasp" else (),
        grasp_period=1.0)
    with registrar_toml.open("a") as toml:
        toml.write(f'\n[jpy]\nlisten = "[::]:{JPY_PORT}"\n')
    host = lab.registrars[0]
    masa = host.spawn([PYTHON, "-m", "registrar.masa_cli", "--config", str(masa_toml)],
                      name="masa")
    registrar = host.spawn([PYTHON, "-m", "registrar.cli", "--config", str(registrar_toml),
                            "--metrics", f"[::1]:{METRICS_PORT}"], name="registrar")
    wait_for(lambda: READY_MARK in registrar.log() and READY_MARK in masa.log(), 30,
             "the registrar and MASA")
    assert "JPY (CoAPS behind stateless join proxies) on udp [::]:5684" in registrar.log()
    config = jpy_config(tmp_path / "proxy")
    if datapath == "xdp":
        lab.proxy.run(["sysctl", "-qw", "net.ipv6.conf.bb0.forwarding=1"])
        netns.run(["ip", "netns", "exec", lab.ns_name("bb"), "ethtool", "-K", "proxy", "gro",
                   "on"])
        lab.pledges[0].run(["ethtool", "-K", "eth0", "tx", "off"])
        config["guard"] = {"enabled": True, "rate": 1000, "burst": 1000}
    if learned == "grasp":
        config["registrars"] = {**config["registrars"], "discovery": ["grasp"], "static": []}
    daemon = ProxyDaemon(lab, tmp_path / "proxy", config).start()
    wait_for(lambda: daemon.ctl()["joining"], 10, "a healthy registrar")
    assert daemon.ctl()["registrars"][0]["source"] == learned
    assert daemon.ctl()["relays"]["jpy"]["datapath"] == \
        ("user" if datapath == "user" else "kernel")
    if datapath == "xdp":
        wait_for(lambda: daemon.ctl()["relays"]["jpy"]["kernel"]["xdp"], 5, "the XDP wrap")

    idevid = pki / "manufacturer/idevid"
    out = tmp_path / "crts.bin"
    done = lab.pledges[0].run(
        [COAP_CLIENT, "-B", "20", "-c", str(idevid / "SN-J.crt"), "-j", str(idevid / "SN-J.key"),
         "-C", str(pki / "domain/ca.crt"), "-o", str(out), "-m", "get", "-A", "281",
         f"coaps://[fe80::1%eth0]:{JOIN_PORT}/.well-known/est/crts"], check=False, timeout=60)
    text = done.stdout + done.stderr
    assert out.exists(), text + daemon.log()[-3000:] + registrar.log()[-3000:]
    ca = (pki / "domain/ca.crt").read_bytes()
    from cryptography import x509
    assert coap_formats.decode_certs(out.read_bytes(), 281) == [
        x509.load_pem_x509_certificate(ca)], text
    assert daemon.sample("joinproxyd_relayed_bytes_total", mode="jpy",
                         direction="downstream") > 0
    if datapath != "user":
        counts = daemon.ctl()["relays"]["jpy"]["kernel"]["counts"]
        assert counts["up"] > 0 and counts["down"] > 0, counts
        # with the XDP wrap on, every pledge datagram took it; without, none did
        assert (counts["xdp_up"] == counts["up"]) if datapath == "xdp" \
            else counts["xdp_up"] == 0, counts

    # Not JPY messages: a map, one element, a text header. Dropped and counted, no answer.
    bad = [cbor2.dumps({1: 2}), cbor2.dumps([b"h"]), cbor2.dumps(["h", b"c"]), b"\xff"]
    host.run([PYTHON, "-c", SEND, str(JPY_PORT), *(b.hex() for b in bad)])

    def metric(name: str) -> float:
        return float(host.run([PYTHON, "-c", METRIC, str(METRICS_PORT), name]).stdout)

    def malformed() -> float:
        return metric(MALFORMED)
    wait_for(lambda: malformed() == len(bad), 5, "the malformed count")
    # Three elements, the third ignored: a JPY message (a DTLS record that is not a
    # ClientHello, so the DTLS layer drops it), not counted as malformed.
    host.run([PYTHON, "-c", SEND, str(JPY_PORT), cbor2.dumps([b"h", b"c", 1]).hex()])
    wait_for(lambda: metric(GARBAGE) == 1, 5, "the DTLS drop of the 3-element message")
    assert malformed() == len(bad)
    daemon.stop()
    registrar.stop()
    masa.stop()
    assert "Traceback" not in registrar.log(), registrar.log()


def test_rjp_link_only_with_a_jpy_port() -> None:
    locator = {3: ipaddress.IPv6Address("fd4a:5044::100")}
    without = WellKnownCore(locator, 5684)
    assert not [link for link in without.links(3)
                if isinstance(link, linkformat.RegistrarLink)
                and link.kind is linkformat.RegistrarKind.STATELESS]
    with_jpy = WellKnownCore(locator, 5684, jpy_port=7634)
    text = linkformat.format_links(with_jpy.links(3))
    assert "<jpy://[fd4a:5044::100]:7634>;rt=brski.rjp" in text, text
    only = WellKnownCore(locator, None, jpy_port=7634)
    assert linkformat.format_links(only.links(3)) == \
        "<jpy://[fd4a:5044::100]:7634>;rt=brski.rjp"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
