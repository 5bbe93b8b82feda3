"""The registrar terminating IPIP join-proxy traffic in namespaces, on the real kernel.

The lab's proxy namespace plays the stateless proxy (fd4a:5044::1 on the backbone): it sends
scapy-built IPv6-in-IPv6 packets (protocol 41 and 98) to the registrar (fd4a:5044::100)
through raw sockets and captures the encapsulated answers on its backbone interface. The
registrar runs as an operator would (`brski-registrar --config ... --ipip`), listening on
[::]:8443, its IPIP link-local address defaulted from its backbone interface (fe80::b:2).
Last, a real TLS handshake and HTTPS exchange run through the IPIP path: a "pledge" on a TUN
device in the proxy namespace whose packets a small user-space relay encapsulates.
"""

import json
import re
import subprocess
import sys
import textwrap

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from brski import grasp
from lab import Lab, Topology, wait_for
from lab.registrar_setup import wait_ready, write_configs

pytestmark = pytest.mark.netns
PY = sys.executable
PORT = 8443
SERIAL = "00-D0-E5-F2-00-02"
REGISTRAR = "fd4a:5044::100"
PROXY = "fd4a:5044::1"
STRANGER = "fd4a:5044::99"  # a second address in the proxy namespace, not allowlisted
REGISTRAR_LL = "fe80::b:2"


@pytest.fixture(scope="module")
def lab(as_root, tmp_path_factory):
    work = tmp_path_factory.mktemp("ipiplab")
    pki = work / "pki"
    done = subprocess.run([PY, "-m", "brski.cli.pki", "init", str(pki), "--serial", SERIAL],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    with Lab(Topology(pledges=0, registrars=1), log_dir=work / "logs") as lab:
        lab.proxy.run(["ip", "-6", "addr", "add", f"{STRANGER}/64", "dev", "bb0", "nodad"])
        # [ipip] is written disabled: the --ipip switch turns it on.
        registrar_toml, _ = write_configs(
            pki, work / "cfg", registrar_listen=[f"[::]:{PORT}"], announce_interfaces=["eth0"],
            grasp_period=0.5, mdns=False,
            ipip={"enabled": False, "protocols": [41, 98], "proxies": [PROXY],
                  "stats_period": 0.1})
        registrar = lab.registrars[0].spawn(
            [PY, "-m", "registrar.cli", "--config", str(registrar_toml), "--ipip"],
            name="registrar")
        wait_ready(registrar.log, alive=registrar.alive)
        lab.pki = pki  # type: ignore[attr-defined]
        lab.registrar_process = registrar  # type: ignore[attr-defined]
        yield lab
        assert registrar.stop() == 0
        log = registrar.log()
        assert "Traceback" not in log, log
        assert "ipip: proxy fd4a:5044::1: ipip-0 removed (stopping)" in log
        tables = lab.registrars[0].run(["nft", "list", "tables"]).stdout
        assert "brski_registrar_ipip" not in tables, tables


def run_python(host, script: str, *args: str, timeout: float = 30) -> str:
    done = host.run([PY, "-c", textwrap.dedent(script), *args], timeout=timeout, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def stats(lab) -> dict:
    """The registrar's latest ``ipip: stats`` line."""
    lines = re.findall(r"ipip: stats (\{.*\})$", lab.registrar_process.log(), re.M)
    return json.loads(lines[-1]) if lines else {"in": 0, "out": 0, "drops": {}, "proxies": {}}


def test_startup_is_logged_with_the_defaults(lab):
    log = lab.registrar_process.log()
    assert "ipip: accepting protocol 41/98 on any address from fd4a:5044::1; pledges reach " \
           "fe80::b:2 on a TUN device per proxy (ipip-<n>, MTU 1460)" in log


GRASP_LISTENER = """
    import socket, struct
    idx = socket.if_nametoindex("bb0")
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::", 7017))
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP,
                 socket.inet_pton(socket.AF_INET6, "ff02::13") + struct.pack("@I", idx))
    s.settimeout(5)
    print(s.recvfrom(4096)[0].hex())
"""


def test_flood_announces_the_ipip_locators_and_the_backbone_initiator(lab):
    flood = grasp.Flood.decode(bytes.fromhex(run_python(lab.proxy, GRASP_LISTENER)))
    assert str(flood.initiator) == REGISTRAR  # where proxies encapsulate to
    assert [(str(x.address), x.protocol, x.port)
            for x in flood.locators_for("AN_join_registrar")] == [
        (REGISTRAR, 6, PORT), (REGISTRAR_LL, 41, None), (REGISTRAR_LL, 98, None)]


# Sends one encapsulated packet from the proxy namespace and prints, as JSON, every
# encapsulated packet the registrar sends back within `wait` seconds, captured on bb0 (the
# whole outer header) and decoded with scapy. Then resets the half-open connection.
PROBE = """
    import json, socket, sys, time
    from scapy.layers.inet import TCP
    from scapy.layers.inet6 import IPv6
    from scapy.packet import raw
    proto, src, inner_hex, wait = int(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4])
    cap = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x86DD))
    cap.bind(("bb0", 0))
    cap.settimeout(0.1)
    out = socket.socket(socket.AF_INET6, socket.SOCK_RAW, proto)
    out.bind((src, 0))
    out.sendto(bytes.fromhex(inner_hex), ("fd4a:5044::100", 0))
    seen, deadline = [], time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            frame = cap.recv(65535)
        except TimeoutError:
            continue
        outer = IPv6(frame[14:54])
        if outer.src != "fd4a:5044::100" or outer.nh not in (41, 98):
            continue
        inner = IPv6(frame[54:54 + outer.plen])
        tcp = inner[TCP]
        sent_sum = tcp.chksum
        del tcp.chksum
        seen.append({
            "outer": {"src": outer.src, "dst": outer.dst, "nh": outer.nh, "plen": outer.plen,
                      "hlim": outer.hlim},
            "inner": {"src": inner.src, "dst": inner.dst, "len": 40 + inner.plen,
                      "sport": tcp.sport, "dport": tcp.dport, "flags": str(tcp.flags),
                      "ack": tcp.ack, "mss": dict(tcp.options).get("MSS"),
                      "checksum_ok": IPv6(raw(inner))[TCP].chksum == sent_sum}})
        rst = IPv6(src=inner.dst, dst=inner.src) / TCP(sport=tcp.dport, dport=tcp.sport,
                                                       flags="R", seq=tcp.ack)
        out.sendto(raw(rst), ("fd4a:5044::100", 0))
        break
    print(json.dumps(seen))
"""


def syn_hex(sport: int, src: str = "fe80::1:1", dst: str = REGISTRAR_LL, cut: int = 0,
            extra: bytes = b"", nh: int | None = None) -> str:
    from scapy.layers.inet import TCP
    from scapy.layers.inet6 import IPv6
    from scapy.packet import raw

    ip = IPv6(src=src, dst=dst, hlim=255)
    if nh is not None:
        ip.nh = nh
    packet = raw(ip / TCP(sport=sport, dport=PORT, flags="S", seq=1000))
    return (packet[:len(packet) - cut] + extra).hex()


def probe(lab, proto: int, inner_hex: str, *, src: str = PROXY, wait: float = 3.0) -> list:
    return json.loads(run_python(lab.proxy, PROBE, str(proto), src, inner_hex, str(wait)))


@pytest.mark.parametrize("proto", [41, 98])
def test_a_syn_gets_an_encapsulated_syn_ack_with_the_same_protocol(lab, proto):
    sport = 40000 + proto
    [answer] = probe(lab, proto, syn_hex(sport))
    assert answer["outer"] == {"src": REGISTRAR, "dst": PROXY, "nh": proto,
                               "plen": answer["inner"]["len"], "hlim": 64}
    assert answer["inner"] == {"src": REGISTRAR_LL, "dst": "fe80::1:1",
                               "len": answer["inner"]["len"], "sport": PORT, "dport": sport,
                               "flags": "SA", "ack": 1001, "checksum_ok": True,
                               "mss": 1400}  # TUN MTU 1460 − 60: the outer packet fits 1500
    # One TUN device for the proxy, whatever protocol it uses; replies follow its latest.
    link = json.loads(lab.registrars[0].run(["ip", "-j", "-6", "addr", "show", "ipip-0"]).stdout)
    assert [(a["local"], a["prefixlen"]) for a in link[0]["addr_info"]] == [(REGISTRAR_LL, 64)]
    assert link[0]["mtu"] == 1460
    current = wait_for(lambda: stats(lab)["proxies"].get(PROXY, {}).get("protocol") == proto
                       and stats(lab), 5, "the stats to show the proxy")
    assert current["proxies"][PROXY]["interface"] == "ipip-0"
    assert current["tunnels_opened"] == 1


def test_bad_packets_are_dropped_and_counted_and_the_registrar_keeps_answering(lab):
    before = stats(lab)["drops"]
    cases = [
        ("not-allowed", 41, syn_hex(41001), STRANGER),
        ("truncated", 41, syn_hex(41002)[:60], PROXY),  # 30 bytes: not even a header
        ("truncated", 98, syn_hex(41003, cut=4), PROXY),  # shorter than its payload length
        ("bad-length", 41, syn_hex(41004, extra=b"junk"), PROXY),
        ("bad-inner-source", 41, syn_hex(41005, src="fd4a:5044:0:100::5"), PROXY),
        ("bad-inner-destination", 41, syn_hex(41006, dst="fe80::b:3"), PROXY),
        ("nested-encapsulation", 41, syn_hex(41007, nh=41), PROXY),
        ("not-ipv6", 41, "45" + syn_hex(41008)[2:], PROXY),
    ]
    for reason, proto, inner, src in cases:
        assert probe(lab, proto, inner, src=src, wait=0.3) == [], reason
    expected = dict(before)
    for reason, *_ in cases:
        expected[reason] = expected.get(reason, 0) + 1
    wait_for(lambda: stats(lab)["drops"] == expected, 5, f"drop counters {expected}")
    assert lab.registrar_process.alive()
    [answer] = probe(lab, 41, syn_hex(41009))
    assert answer["inner"]["flags"] == "SA"
    assert "ipip: dropped a packet from fd4a:5044::99: not-allowed" in \
        lab.registrar_process.log()
    links = lab.registrars[0].run(["ip", "-o", "link", "show"]).stdout
    assert "ipip-1" not in links  # neither the stranger nor junk got a TUN device


# The proxy side emulated in user space: a TUN device "pj0" holding the pledge's address
# fe80::1:1; every packet the pledge sends to the registrar's link-local address is
# encapsulated (protocol 41) to the registrar, every encapsulated packet from the registrar is
# decapsulated into pj0. The pledge is Python's ssl with an IDevID: it fetches /cacerts, then
# posts a large voucher_status report.
TLS_PLEDGE = """
    import json, select, socket, sys, threading
    from ipaddress import IPv6Address
    from pathlib import Path
    from registrar.ipip_tun import TunDevice
    from lab.registrar_testing import call, client_context
    pki, serial = Path(sys.argv[1]), sys.argv[2]
    registrar_ll = IPv6Address("fe80::b:2").packed
    tun = TunDevice.create("pj0", IPv6Address("fe80::1:1"), mtu=1460)
    raw = socket.socket(socket.AF_INET6, socket.SOCK_RAW, 41)
    raw.bind(("fd4a:5044::1", 0))
    counts = {"encapsulated": 0, "decapsulated": 0}
    stop = threading.Event()

    def relay():
        while not stop.is_set():
            ready, _, _ = select.select([tun.fd, raw], [], [], 0.1)
            if tun.fd in ready:
                while (packet := tun.read()) is not None:
                    if packet[24:40] == registrar_ll:  # only what goes to the registrar
                        raw.sendto(packet, ("fd4a:5044::100", 0))
                        counts["encapsulated"] += 1
            if raw in ready:
                packet, source = raw.recvfrom(65535)
                if source[0] == "fd4a:5044::100":
                    tun.write(packet)
                    counts["decapsulated"] += 1

    threading.Thread(target=relay, daemon=True).start()
    d = pki / "manufacturer/idevid"
    ctx = client_context(d / f"{serial}.crt", d / f"{serial}.key")
    answer = call("fe80::b:2%pj0", 8443, "GET", "/.well-known/est/cacerts", ctx=ctx)
    # Then full-size segments: a 60 kB status report (the limit is 64 KiB) goes up in ~45.
    report = json.dumps({"version": 1, "status": False, "reason": "x" * 60_000}).encode()
    status = call("fe80::b:2%pj0", 8443, "POST", "/.well-known/brski/voucher_status",
                  body=report, content_type="application/json", ctx=ctx)
    stop.set()
    print(json.dumps({"status": answer.status, "type": answer.headers.get("content-type"),
                      "server_cert": answer.server_cert.hex(), "body": len(answer.body),
                      "report_status": status.status, **counts}))
"""


def test_a_tls_handshake_and_https_exchange_complete_through_ipip(lab):
    before = stats(lab)["proxies"][PROXY]
    result = json.loads(run_python(lab.proxy, TLS_PLEDGE, str(lab.pki), SERIAL, timeout=60))
    assert (result["status"], result["report_status"]) == (200, 200)
    assert result["type"].startswith("application/pkcs7-mime")
    assert result["body"] > 100
    registrar_cert = x509.load_pem_x509_certificate(
        (lab.pki / "domain/registrar.crt").read_bytes())
    assert bytes.fromhex(result["server_cert"]) == registrar_cert.public_bytes(
        serialization.Encoding.DER)
    assert result["encapsulated"] >= 5 and result["decapsulated"] >= 5
    # Every packet the relay carried was counted by the registrar, in and out (the stats line
    # can lag by a period).
    wait_for(lambda: (s := stats(lab)["proxies"][PROXY])["in"]
             >= before["in"] + result["encapsulated"]
             and s["out"] >= before["out"] + result["decapsulated"], 5, "the relayed packets")
    assert stats(lab)["bytes_in"] > 60_000
    # The registrar saw the pledge itself, by its link-local address, not the proxy.
    assert re.search(r"fe80::1:1 \"GET /.well-known/est/cacerts HTTP/1.1\" 200",
                     lab.registrar_process.log())


def test_the_kernel_cannot_refuse_what_the_relay_accepts(lab):
    """Where the kernel has a protocol-41 handler (Debian's stock kernels, not this one), it
    answers each packet our raw socket also gets with ICMPv6 port unreachable, which a proxy's
    kernel tunnel turns into "no route to host" for its pledge (registrar/ipip_icmp.py). Our
    nftables table drops exactly such errors on output: crafted here from the registrar's
    namespace, one quoting protocol 41 is refused by the output hook, one quoting UDP leaves."""
    out = run_python(lab.registrars[0], """
        import errno, socket, struct, sys
        def error_quoting(next_header):
            quoted = struct.pack("!IHBB", 6 << 28, 20, next_header, 64) + bytes(32)
            return struct.pack("!BBHI", 1, 4, 0, 0) + quoted  # dest unreachable, port
        sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        for next_header in (41, 98, 17):
            try:
                sock.sendto(error_quoting(next_header), (sys.argv[1], 0))
                print(next_header, "sent")
            except OSError as exc:
                print(next_header, errno.errorcode[exc.errno])
    """, PROXY)
    assert out.split("\n")[:3] == ["41 EPERM", "98 EPERM", "17 sent"], out
    wait_for(lambda: (stats(lab).get("kernel_icmp_dropped") or 0) >= 2, 10,
             "the filter's counter in the stats line")
    assert stats(lab)["kernel_icmp_filter"] == "installed"
