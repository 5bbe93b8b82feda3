"""tshark decodes CoJP on both links: the pledge's join link (ordinary tokens) and the backbone,
where the cojp relay's sealed state rides in RFC 8974 extended tokens.

tshark 4.0 (Debian 12) reads the TKL nibble 13/14 as the token's length, so on the backbone it
shows a 13-byte token and malformed options. The project's dissector
(packaging/wireshark/joinproxyd.lua, coap_ext_token) shows the token and hands the rest to the
built-in CoAP dissector, which then decodes the options, OSCORE's among them.

- Offline (scapy writes the pcap): a sealed 40-byte token (TKL 13), a 300-byte one (TKL 14),
  TKL 15 and truncated tokens; with and without the dissector.
- In a namespace lab: a PSK pledge (pledge-sim cojp --via-proxy) joins the real JRC through
  joinproxyd; tcpdump on the join link and on the JRC's link; tshark shows the POST with
  Proxy-Scheme and Uri-Host and the OSCORE option (ID context = the pledge ID) on the join
  link, and the same POST without them, with the sealed token and the same OSCORE option, on
  the backbone; the responses carry the OSCORE option both ways.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from ipaddress import IPv6Address
from pathlib import Path

import pytest
from scapy.all import UDP, Ether, IPv6, Raw, wrpcap
from test_cojp_jrc_lab import cli
from test_cojp_relay import capture

from brski.coap_datagram import CoapDatagram, MessageType
from brski.cojp_token import TokenSealer, TokenState
from brski.jpy import PledgeEndpoint
from lab import Lab, Topology, wait_for
from lab.proxyd import PYTHON, ProxyDaemon, base_config
from lab.registrar_setup import READY_MARK, write_configs
from lab.topology import PROXY_LL
from tests.test_masa import brski_pki

ROOT = Path(__file__).resolve().parent.parent
DISSECTOR = ROOT / "packaging" / "wireshark" / "joinproxyd.lua"
REGISTRAR = "fd4a:5044::100"
PLEDGE_ID = "0200000000000001"
FIELDS = ["frame.number", "udp.srcport", "udp.dstport", "coap.type", "coap.code",
          "coap.token_len", "coap.token", "coap_ext_token.tkl", "coap_ext_token.length",
          "coap_ext_token.token", "coap.opt.proxy_scheme", "coap.opt.uri_host",
          "coap.opt.object_security_kid_context", "coap.opt.object_security_piv",
          "coap.opt.name", "_ws.malformed", "_ws.expert.message"]
# OSCORE option (RFC 8613 §6.1): flags h (ID context) and k (kid), a 1-byte Partial IV 05,
# ID context = the pledge ID, empty kid (the pledge's Sender ID, RFC 9031 §8.1.1)
OSCORE = bytes([0x19, 0x05, 0x08]) + bytes.fromhex(PLEDGE_ID)


def tshark(pcap: Path, *, dissector: bool = True) -> list[dict[str, list[str]]]:
    if shutil.which("tshark") is None:
        pytest.fail("tshark is missing: `make setup` installs it")
    argv = ["tshark", *(["-X", f"lua_script:{DISSECTOR}"] if dissector else []), "-r",
            str(pcap), "-n", "-T", "json"]
    names = [n for n in FIELDS if dissector or not n.startswith("coap_ext_token.")]
    for name in names:
        argv += ["-e", name]
    done = subprocess.run(argv, capture_output=True, text=True, errors="replace", timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert "lua" not in done.stderr.lower(), done.stderr
    return [{n: p["_source"]["layers"].get(n, []) for n in FIELDS}
            for p in json.loads(done.stdout)]


def sealed_token() -> bytes:
    pledge = PledgeEndpoint(IPv6Address("fe80::1:2"), 40000, 7)
    return TokenSealer(bytes(32), 1).seal(TokenState(pledge, 0x1234, b"\x01\x02", True), 100)


def write(path: Path, datagrams: list[bytes]) -> Path:
    wrpcap(str(path), [Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
                       / IPv6(src="fd4a:5044::1", dst=REGISTRAR)
                       / UDP(sport=50000, dport=5683) / Raw(d) for d in datagrams])
    return path


def test_extended_tokens_offline(tmp_path: Path) -> None:
    token = sealed_token()
    assert 13 <= len(token) <= 268  # TKL 13: one extension byte
    forwarded = CoapDatagram(MessageType.NON, 2, 0x2222, token, ((9, OSCORE), (11, b"j")),
                             bytes(20)).encode()
    long = CoapDatagram(MessageType.NON, 0x44, 0x3333, bytes(range(256)) + bytes(44),
                        ((9, b""),), b"\x11" * 12).encode()
    tkl15 = bytes([0x5F, 0x02, 0, 1]) + bytes(20)
    truncated = forwarded[:30]
    pcap = write(tmp_path / "x.pcap", [forwarded, long, tkl15, truncated])

    f1, f2, f3, f4 = tshark(pcap)
    assert f1["coap_ext_token.tkl"] == ["13"]
    assert f1["coap_ext_token.length"] == [str(len(token))]
    assert f1["coap_ext_token.token"] == [token.hex()]
    assert f1["coap.type"] == ["1"] and f1["coap.code"] == ["2"]
    assert f1["coap.opt.object_security_kid_context"] == [PLEDGE_ID]
    assert f1["coap.opt.object_security_piv"] == ["05"]
    assert f1["coap.opt.proxy_scheme"] == [] and f1["_ws.malformed"] == []
    assert f2["coap_ext_token.tkl"] == ["14"] and f2["coap_ext_token.length"] == ["300"]
    assert f2["coap.code"] == ["68"] and f2["_ws.malformed"] == []  # 2.04 Changed
    assert any("OSCORE" in name for name in f2["coap.opt.name"]), f2
    for bad, why in ((f3, "TKL 15"), (f4, "token longer than the datagram")):
        assert bad["_ws.malformed"] and any(why in m for m in bad["_ws.expert.message"]), bad

    # What tshark 4.0 makes of them alone: a 13-byte token and malformed options.
    plain = tshark(pcap, dissector=False)
    assert plain[0]["coap.token_len"] == ["13"] and plain[0]["_ws.malformed"], plain[0]
    assert plain[0]["coap.opt.object_security_kid_context"] == []


@pytest.fixture
def lab(as_root: None, tmp_path: Path) -> Iterator[Lab]:
    with Lab(Topology(pledges=1), log_dir=tmp_path / "logs") as lab:
        yield lab


@pytest.mark.netns
def test_tshark_decodes_coap_and_oscore_on_both_links(lab: Lab, tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    brski_pki("init", str(pki), "--serial", "SN-T")
    registrar_toml, _ = write_configs(
        pki, tmp_path / "svc", masa_listen=["[::1]:9443"],
        registrar_listen=[f"[{REGISTRAR}]:8443"], masa_timeout=5, mdns=False, grasp=False)
    with registrar_toml.open("a") as toml:
        toml.write('\n[cojp]\nenabled = true\nnetwork_id = "cafe"\n')
    added = cli("add-pledge", "--config", str(registrar_toml), "--id", PLEDGE_ID,
                "--generate-psk")
    assert added.returncode == 0, added.stderr
    pledges = tmp_path / "pledges.txt"
    pledges.write_text(f"{PLEDGE_ID} {added.stdout.split('psk ')[1].split()[0]}\n")
    registrar = lab.registrars[0].spawn(
        [PYTHON, "-m", "registrar.cli", "--config", str(registrar_toml)], name="registrar")
    wait_for(lambda: READY_MARK in registrar.log(), 30, "the registrar")
    config = base_config(tmp_path / "proxy", join=[{"interfaces": ["join*"], "modes": ["cojp"]}],
                         registrars={"discovery": ["static"], "static": [
                             {"address": REGISTRAR, "port": 8443, "cojp_port": 5683}]})
    daemon = ProxyDaemon(lab, tmp_path / "proxy", config).start()
    wait_for(lambda: daemon.ctl()["joining_modes"]["cojp"]["open"], 15, "cojp joining")
    link = capture(lab, 0, tmp_path / "link.pcap")
    backbone = capture(lab, None, tmp_path / "backbone.pcap")
    done = lab.pledges[0].run(
        [PYTHON, "-m", "pledge_sim.cli", "cojp", "--jrc", f"[{PROXY_LL}%eth0]:5683",
         "--via-proxy", "--pledges", str(pledges), "--state", str(tmp_path / "state"),
         "--json"], check=False, timeout=60)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-2000:])

    def posts_and_answers(pcap: Path) -> tuple[list[dict], list[dict]]:
        frames = [f for f in tshark(pcap) if f["coap.code"] and f["coap.code"] != ["0"]]
        return ([f for f in frames if f["coap.code"] == ["2"]],
                [f for f in frames if f["coap.code"] == ["68"]])

    wait_for(lambda: all(posts_and_answers(tmp_path / p)[1] for p in ("link.pcap",
                                                                     "backbone.pcap")),
             10, "both captures to hold the join and its answer")
    link.stop()
    backbone.stop()
    # The join link: CON POST with Proxy-Scheme, Uri-Host, OSCORE; the answer an ACK 2.04
    # with the pledge's token and the OSCORE option.
    [post], [answer] = posts_and_answers(tmp_path / "link.pcap")
    assert post["coap.type"] == ["0"] and post["coap.opt.proxy_scheme"] == ["coap"]
    assert post["coap.opt.uri_host"] == ["6tisch.arpa"]
    assert post["coap.opt.object_security_kid_context"] == [PLEDGE_ID]
    assert post["coap_ext_token.length"] == [] and int(post["coap.token_len"][0]) <= 8
    assert answer["coap.type"] == ["2"] and answer["coap.token"] == post["coap.token"]
    assert any("OSCORE" in n for n in answer["coap.opt.name"]), answer
    # The backbone: the same POST as NON, without the proxy options, the pledge's return
    # address sealed in an extended token; the JRC's 2.04 echoes that token.
    [forwarded], [reply] = posts_and_answers(tmp_path / "backbone.pcap")
    assert forwarded["coap.type"] == ["1"] and forwarded["coap.opt.proxy_scheme"] == []
    assert forwarded["coap.opt.uri_host"] == []
    assert forwarded["coap.opt.object_security_kid_context"] == [PLEDGE_ID]
    assert forwarded["coap.opt.object_security_piv"] == post["coap.opt.object_security_piv"]
    assert 38 <= int(forwarded["coap_ext_token.length"][0]) <= 46
    assert reply["coap_ext_token.token"] == forwarded["coap_ext_token.token"]
    assert any("OSCORE" in n for n in reply["coap.opt.name"]), reply
    assert not [f for f in tshark(tmp_path / "link.pcap") + tshark(tmp_path / "backbone.pcap")
                if f["_ws.malformed"]]
    daemon.stop()
    registrar.stop()
