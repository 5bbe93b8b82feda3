"""The registrar's discovery for constrained join proxies ([announce] coaps_port): CoRE
discovery on ff02::fd / ff05::fd answered to libcoap and aiocoap in another namespace, the GRASP
flood's UDP locator, mDNS _brski-registrar._udp, and garbage on UDP 5683."""

import json
import subprocess
import sys
import textwrap
from ipaddress import IPv6Address
from pathlib import Path

import pytest

from brski import grasp, linkformat
from brski.errors import UsageError
from lab import Lab, Topology
from lab.registrar_setup import wait_ready, write_configs
from registrar import coap_discovery
from registrar.config import load_registrar_config
from registrar.tomlconfig import ConfigError

PY = sys.executable
PORT = 8443
COAPS = 5684
SERIAL = "00-D0-E5-F2-00-02"
ULA = IPv6Address("fd00::52")


# --- pure parts ---------------------------------------------------------------------------


def _links() -> list[linkformat.DiscoveryLink]:
    return [linkformat.RegistrarLink(linkformat.RegistrarKind.STATEFUL, ULA, COAPS,
                                     "/.well-known/brski"),
            linkformat.JoinPortLink(COAPS)]


@pytest.mark.parametrize(("queries", "expected"), [
    (["rt=brski"], ["<coaps://[fd00::52]/.well-known/brski>;rt=brski"]),
    (["rt=brski*"], ["<coaps://[fd00::52]/.well-known/brski>;rt=brski"]),
    (["rt=brsk"], []),  # no '*': an exact match
    (["rt=brski.rjp"], []),
    (["rt=ace.est*"], []),
    (["brski-jp=*"], ["<>;brski-jp=5684"]),
    (["href=coaps*"], ["<coaps://[fd00::52]/.well-known/brski>;rt=brski"]),
    (["rt=brski*", "href=jpy*"], []),  # several filters: all must match
    ([], ["<coaps://[fd00::52]/.well-known/brski>;rt=brski", "<>;brski-jp=5684"]),
])
def test_filter_queries_as_rfc6690_says(queries, expected):
    assert [x.to_link() for x in linkformat.filter_links(_links(), queries)] == expected


def test_rt_matches_any_item_of_a_space_separated_list():
    link = linkformat.JoinPortLink(COAPS, None, (("rt", "core.rd brski.x"),))
    assert linkformat.link_matches(link, "rt=brski.x")
    assert linkformat.link_matches(link, "rt=core*")
    assert not linkformat.link_matches(link, "rt=core.rd brski.x")


def test_registrar_flood_names_dtls_at_the_udp_locator():
    ll = IPv6Address("fe80::1")
    flood = grasp.registrar_flood(lambda n: b"\x00\x00\x00\x07", ll, [
        grasp.IPv6Locator(ULA, grasp.IPPROTO_TCP, PORT),
        grasp.IPv6Locator(ULA, grasp.IPPROTO_UDP, COAPS)])
    back = grasp.Flood.decode(flood.encode())
    assert [(e.objective.value, e.locator.protocol, e.locator.port) for e in back.entries] == [
        ("EST-TLS", 6, PORT), ("BRSKI_JP", 17, COAPS)]
    assert {e.objective.name for e in back.entries} == {"AN_join_registrar"}
    with pytest.raises(UsageError):
        grasp.registrar_flood(lambda n: b"\x00" * 4, ll, [])


def test_registrar_flood_names_the_jpy_port_brski_rjp():
    ll = IPv6Address("fe80::1")
    flood = grasp.registrar_flood(lambda n: b"\x00\x00\x00\x07", ll, [
        grasp.IPv6Locator(ULA, grasp.IPPROTO_TCP, PORT),
        grasp.IPv6Locator(ULA, grasp.IPPROTO_UDP, COAPS)],
        jpy_locators=[grasp.IPv6Locator(ULA, grasp.IPPROTO_UDP, 7634)])
    back = grasp.Flood.decode(flood.encode())
    assert [(e.objective.value, e.locator.protocol, e.locator.port) for e in back.entries] == [
        ("EST-TLS", 6, PORT), ("BRSKI_JP", 17, COAPS), ("BRSKI_RJP", 17, 7634)]
    with pytest.raises(UsageError, match="UDP"):
        grasp.registrar_flood(lambda n: b"\x00" * 4, ll, [
            grasp.IPv6Locator(ULA, grasp.IPPROTO_TCP, PORT)],
            jpy_locators=[grasp.IPv6Locator(ULA, grasp.IPPROTO_TCP, 7634)])


IGMP6 = """\
1    lo              ff020000000000000000000000000001     1 0000000C 0
7    eth0            ff0200000000000000000000000000fd     1 00000004 0
7    eth0            ff020000000000000000000000000001     1 0000000C 0
17   eth1            ff0500000000000000000000000000fd     1 00000004 0
"""
UDP6 = """\
  sl  local_address                         remote_address                        st tx_queue
 1: 00000000000000000000000000000000:1633 00000000000000000000000000000000:0000 07 00000000
 2: 000080FE000000000B00000001000000:1634 00000000000000000000000000000000:0000 07 00000000
"""


def test_kernel_tables_are_read_for_groups_and_ports():
    assert coap_discovery.joined_groups(IGMP6, 7) == {IPv6Address("ff02::fd"),
                                                      IPv6Address("ff02::1")}
    assert coap_discovery.joined_groups(IGMP6, 17) == {IPv6Address("ff05::fd")}
    assert coap_discovery.joined_groups(IGMP6, 1) == {IPv6Address("ff02::1")}
    assert coap_discovery.joined_groups("", 7) == set()
    assert coap_discovery.udp_ports_bound(UDP6) == {5683, 5684}
    assert coap_discovery.udp_ports_bound("") == set()


def _config(tmp_path: Path, extra: str) -> Path:
    pki = tmp_path / "pki"
    done = subprocess.run([PY, "-m", "brski.cli.pki", "init", str(pki), "--serial", SERIAL],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    registrar_toml, _ = write_configs(pki, tmp_path / "cfg")
    text = registrar_toml.read_text().replace("[announce]\n", f"[announce]\n{extra}\n", 1)
    registrar_toml.write_text(text)
    return registrar_toml


def test_coaps_port_is_read_and_unset_by_default(tmp_path):
    assert load_registrar_config(_config(tmp_path / "a", "")).announce_coaps_port is None
    assert load_registrar_config(_config(tmp_path / "b", "coaps_port = 5684")
                                 ).announce_coaps_port == COAPS
    with pytest.raises(ConfigError, match="coaps_port"):
        load_registrar_config(_config(tmp_path / "c", "coaps_port = 70000"))


# --- in namespaces, against a real registrar process --------------------------------------


@pytest.fixture(scope="module")
def lab(as_root, tmp_path_factory):
    """A registrar announcing CoAPS port 5684 on eth0, and two hosts on its link."""
    work = tmp_path_factory.mktemp("coapdisc")
    pki = work / "pki"
    done = subprocess.run([PY, "-m", "brski.cli.pki", "init", str(pki), "--serial", SERIAL],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    with Lab(Topology(pledges=2, pledges_on_backbone=True), log_dir=work / "logs") as lab:
        host = lab.registrars[0]
        registrar_toml, masa_toml = write_configs(
            pki, work / "cfg", registrar_listen=[f"[::]:{PORT}"], masa_listen=["[::1]:9443"],
            announce_interfaces=["eth0"], grasp_period=1.0)
        text = registrar_toml.read_text().replace("[announce]\n",
                                                  f"[announce]\ncoaps_port = {COAPS}\n", 1)
        registrar_toml.write_text(text)
        masa = host.spawn([PY, "-m", "registrar.masa_cli", "--config", str(masa_toml)],
                          name="masa")
        wait_ready(masa.log, alive=masa.alive)
        registrar = host.spawn([PY, "-m", "registrar.cli", "--config", str(registrar_toml),
                                "--metrics", "[::1]:9466"], name="registrar")
        wait_ready(registrar.log, alive=registrar.alive)
        lab.registrar = registrar  # type: ignore[attr-defined]
        yield lab
        registrar.stop()
        assert "Traceback" not in registrar.log(), registrar.log()


def run_python(host, script: str, *args: str, timeout: float = 30) -> str:
    done = host.run([PY, "-c", textwrap.dedent(script), *args], timeout=timeout, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def registrar_ula(lab) -> str:
    return lab.registrars[0].address("eth0", link_local=False)


def expected_link(lab) -> str:
    return f"<coaps://[{registrar_ula(lab)}]/.well-known/brski>;rt=brski"


def libcoap_get(host, uri: str, wait: int = 2, verbosity: int = 3) -> str:
    # -N: multicast requests are NON; -B: how long to wait for answers. libcoap exits 0 on
    # many failures, so the output is what is checked.
    done = host.run(["coap-client-openssl", "-N", "-v", str(verbosity), "-m", "get",
                     "-B", str(wait), uri], timeout=30, check=False)
    return done.stdout + done.stderr


def test_libcoap_finds_the_registrar_on_ff02_fd(lab):
    out = libcoap_get(lab.pledges[0], "coap://[ff02::fd%eth0]/.well-known/core?rt=brski")
    assert out.strip() == expected_link(lab)
    [link] = linkformat.parse_registrars(out.strip())
    assert (str(link.address), link.port) == (registrar_ula(lab), COAPS)


def test_libcoap_gets_no_answer_for_another_resource_type(lab):
    for query in ("rt=brski.rjp", "rt=ace.est*", "rt=core.rd"):
        # At debug level libcoap logs every datagram it sends and receives.
        out = libcoap_get(lab.pledges[0], f"coap://[ff02::fd%eth0]/.well-known/core?{query}",
                          verbosity=7)
        assert "sent" in out and "c:GET" in out, out
        assert "received" not in out and "c:2." not in out, (query, out)


AIOCOAP_CLIENT = """
    import asyncio, json, sys
    import aiocoap
    async def ask(ctx, uri):
        msg = aiocoap.Message(code=aiocoap.GET, mtype=aiocoap.NON, uri=uri)
        try:
            answer = await asyncio.wait_for(ctx.request(msg).response, 3)
        except asyncio.TimeoutError:
            return None
        return {"code": str(answer.code), "cf": answer.opt.content_format,
                "payload": answer.payload.decode(), "source": answer.remote.hostinfo}
    async def main():
        ctx = await aiocoap.Context.create_client_context()
        out = {uri: await ask(ctx, uri) for uri in sys.argv[1:]}
        await ctx.shutdown()
        print(json.dumps(out))
    asyncio.run(main())
"""


def test_aiocoap_finds_the_registrar_on_both_groups_and_a_pledge_its_join_port(lab):
    uris = ["coap://[ff02::fd%eth0]/.well-known/core?rt=brski",
            "coap://[ff05::fd%eth0]/.well-known/core?rt=brski",
            "coap://[ff02::fd%eth0]/.well-known/core?brski-jp=*",
            "coap://[ff05::fd%eth0]/.well-known/core?rt=brski.rjp"]
    got = json.loads(run_python(lab.pledges[1], AIOCOAP_CLIENT, *uris))
    for uri in uris[:2]:
        assert got[uri]["code"].startswith("2.05"), got
        assert got[uri]["cf"] == 40
        assert got[uri]["payload"] == expected_link(lab)
    assert got[uris[2]]["payload"] == f"<>;brski-jp={COAPS}"
    assert got[uris[3]] is None  # no JPY port: multicast without a match gets no answer


def test_unicast_query_without_a_match_gets_an_empty_document(lab):
    ll = lab.registrars[0].address("eth0", link_local=True)
    uri = f"coap://[{ll}%eth0]/.well-known/core?rt=brski.rjp"
    got = json.loads(run_python(lab.pledges[1], AIOCOAP_CLIENT, uri))[uri]
    assert got["code"].startswith("2.05") and got["payload"] == "", got
    uri = f"coap://[{ll}%eth0]/.well-known/core"
    got = json.loads(run_python(lab.pledges[1], AIOCOAP_CLIENT, uri))[uri]
    assert got["payload"] == f"{expected_link(lab)},<>;brski-jp={COAPS}", got


GRASP_LISTENER = """
    import json, socket, struct
    idx = socket.if_nametoindex("eth0")
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::", 7017))
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP,
                 socket.inet_pton(socket.AF_INET6, "ff02::13") + struct.pack("@I", idx))
    s.settimeout(5)
    data, addr = s.recvfrom(4096)
    print(json.dumps({"data": data.hex(), "ifindex": idx}))
"""


def test_grasp_flood_carries_the_udp_locator_beside_the_tcp_one(lab):
    from joinproxyd.discovery.grasp import registrars_in_flood

    got = json.loads(run_python(lab.pledges[0], GRASP_LISTENER))
    data = bytes.fromhex(got["data"])
    flood = grasp.Flood.decode(data)
    ula = IPv6Address(registrar_ula(lab))
    assert [(e.objective.name, e.objective.value, e.locator) for e in flood.entries] == [
        ("AN_join_registrar", "EST-TLS", grasp.IPv6Locator(ula, grasp.IPPROTO_TCP, PORT)),
        ("AN_join_registrar", "BRSKI_JP", grasp.IPv6Locator(ula, grasp.IPPROTO_UDP, COAPS))]
    # joinproxyd's own decoder still takes the TCP locator only (its relays are TCP).
    endpoints, _ = registrars_in_flood(data, got["ifindex"])
    assert [(e.address, e.port) for e in endpoints] == [(str(ula), PORT)]


MDNS_BROWSER = """
    import json, socket, time
    from zeroconf import IPVersion, ServiceBrowser, Zeroconf
    TYPE = "_brski-registrar._udp.local."
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
                      text=(info.text or b"").hex())
    zc.close()
    print(json.dumps(result))
"""


def test_mdns_udp_service_resolves_from_another_namespace(lab):
    result = json.loads(run_python(lab.pledges[0], MDNS_BROWSER, timeout=40))
    assert len(result["names"]) == 1, result
    assert result["names"][0].endswith("._brski-registrar._udp.local.")
    assert result["port"] == COAPS
    assert result["text"] == "00"  # RFC 6763 §6.1: one empty string, not an empty RDATA
    assert any(a.split("%")[0] == registrar_ula(lab) for a in result["addresses"]), result


GARBAGE = [b"", b"\x00\x01\x02\x03", b"\xff" * 64, b"\x40", b"\x40\x01\x00\x01\xf0",
           b"\x48\x01\x00\x01", bytes(range(256)) * 4]


def test_garbage_datagrams_do_not_stop_it_and_are_logged_once(lab):
    sender = """
        import socket, sys
        s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        for _ in range(20):
            for d in sys.argv[2:]:
                s.sendto(bytes.fromhex(d), (sys.argv[1], 5683))
                s.sendto(bytes.fromhex(d), ("ff02::fd%eth0", 5683))
    """
    ll = lab.registrars[0].address("eth0", link_local=True)
    run_python(lab.pledges[1], sender, f"{ll}%eth0", *(d.hex() for d in GARBAGE))
    uri = "coap://[ff02::fd%eth0]/.well-known/core?rt=brski"
    got = json.loads(run_python(lab.pledges[1], AIOCOAP_CLIENT, uri))[uri]
    assert got is not None and got["payload"] == expected_link(lab)
    assert lab.registrar.alive()
    log = lab.registrar.log()
    assert log.count("Ignoring unparsable message") == 1, log
    assert "further ones are counted only" in log
    metrics = run_python(lab.registrars[0], """
        import urllib.request
        print(urllib.request.urlopen("http://[::1]:9466/metrics", timeout=5).read().decode())
    """)
    [line] = [x for x in metrics.splitlines() if x.startswith(
        'brski_registrar_refusals_total{endpoint="coap-discovery",reason="unparsable"}')]
    assert float(line.split()[-1]) >= 100, line  # 280 sent, all of them unparsable


def test_discovery_is_logged(lab):
    log = lab.registrar.log()
    assert f"UDP (CoAPS) port {COAPS}" in log
    assert "_brski-registrar._udp.local. on eth0, port 5684" in log
    assert "CoAP discovery: answering /.well-known/core?rt=brski on UDP 5683" in log
    assert "not in group" not in log  # the kernel lists both groups on eth0



TIMED_CLIENT = """
    import asyncio, json, time
    import aiocoap
    async def main():
        ctx = await aiocoap.Context.create_client_context()
        delays = []
        for _ in range(8):
            msg = aiocoap.Message(code=aiocoap.GET, mtype=aiocoap.NON,
                                  uri="coap://[ff02::fd%eth0]/.well-known/core?rt=brski")
            start = time.monotonic()
            await asyncio.wait_for(ctx.request(msg).response, 3)
            delays.append(time.monotonic() - start)
        await ctx.shutdown()
        print(json.dumps(delays))
    asyncio.run(main())
"""


def test_multicast_answers_wait_a_random_leisure(lab):
    # RFC 7252 §8.2: not at once, at a random point within the Leisure (0.5 s here).
    delays = json.loads(run_python(lab.pledges[0], TIMED_CLIENT))
    assert max(delays) < 1.0, delays
    assert max(delays) > 0.05 and max(delays) - min(delays) > 0.02, delays
