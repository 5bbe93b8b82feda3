"""tshark decodes the plain CoAP of registrar discovery on the link (issue 13 acceptance,
"CoAP messages on the link"): a capture on the registrar's eth0, in the namespaces the
discovery tests build, of libcoap's GET coap://[ff02::fd]/.well-known/core?rt=brski and the
registrar's link-format answer."""

import signal
import subprocess

from lab.capture import settle
from tests.test_registrar_coap_discovery import (
    expected_link,
    lab,  # noqa: F401 - the fixture
    libcoap_get,
)
from tests.test_registrar_coaps_capture import TCPDUMP, TSHARK

FIELDS = ["ipv6.src", "ipv6.dst", "udp.dstport", "coap.type", "coap.code", "coap.mid",
          "coap.token", "coap.opt.uri_path", "coap.opt.uri_query", "coap.opt.ctype",
          "coap.payload_length", "udp.payload"]


def test_tshark_decodes_the_discovery_get_and_its_link_format_answer(lab, tmp_path):  # noqa: F811
    assert TCPDUMP and TSHARK, "tcpdump/tshark missing: make setup installs them"
    registrar = lab.registrars[0]
    cap = tmp_path / "discovery.pcap"
    dump = subprocess.Popen(registrar.cmd([TCPDUMP, "-Z", "root", "-i", "eth0",
                                           "--immediate-mode", "-U", "-w", str(cap),
                                           "udp port 5683"]),
                            stderr=subprocess.PIPE, text=True)
    try:
        assert dump.stderr is not None
        first = dump.stderr.readline()
        assert "listening on eth0" in first, first
        out = libcoap_get(lab.pledges[0], "coap://[ff02::fd%eth0]/.well-known/core?rt=brski")
        settle(cap)
    finally:
        dump.send_signal(signal.SIGINT)  # ip netns exec has exec'd tcpdump: this PID is it
        try:
            dump.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            dump.kill()
            dump.communicate()
    assert out.strip() == expected_link(lab), out
    args = [TSHARK, "-r", str(cap), "-T", "fields", "-E", "separator=|", "-E", "aggregator=;",
            "-E", "occurrence=a"]
    for field in FIELDS:
        args += ["-e", field]
    done = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    rows = [dict(zip(FIELDS, line.split("|"), strict=True))
            for line in done.stdout.splitlines() if line]
    requests = [r for r in rows if r["coap.code"] == "1"]
    answers = [r for r in rows if r["coap.code"] == "69"]
    assert requests and answers, rows
    (request,) = requests  # one multicast GET
    assert request["ipv6.dst"] == "ff02::fd" and request["coap.type"] == "1"  # NON
    assert request["coap.opt.uri_path"] == ".well-known;core"
    assert request["coap.opt.uri_query"] == "rt=brski"
    (answer,) = answers
    assert answer["coap.token"] == request["coap.token"], (request, answer)
    assert answer["ipv6.src"].startswith("fe80:") and answer["coap.type"] == "1", answer
    assert answer["coap.opt.ctype"] == "application/link-format", answer
    # tshark names the payload's format and length (it has no link-format dissector); the
    # bytes after the payload marker are the link itself.
    assert int(answer["coap.payload_length"]) == len(expected_link(lab)), answer
    datagram = bytes.fromhex(answer["udp.payload"])
    assert datagram[-len(expected_link(lab)) - 1:] == b"\xff" + expected_link(lab).encode()
