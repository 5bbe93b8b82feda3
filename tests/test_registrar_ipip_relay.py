"""The registrar's IPIP termination without root: which packets pass (registrar.ipip_packet),
the proxy table with fake TUN devices and a fake sender (registrar.ipip_relay), the [ipip]
configuration and --ipip switch, and what the GRASP flood announces. The real kernel path is in
test_registrar_ipip.py."""

import subprocess
import sys
from ipaddress import IPv6Address, IPv6Network
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import TCP, UDP
from scapy.layers.inet6 import ICMPv6MLReport2, IPv6, IPv6ExtHdrHopByHop
from scapy.packet import Raw, raw

from brski import grasp
from lab.registrar_setup import write_configs
from registrar import cli
from registrar.announce import Announcer
from registrar.config import load_registrar_config
from registrar.ipip import resolve_link_local
from registrar.ipip_config import IpipConfig
from registrar.ipip_packet import Drop, check_inbound, check_outbound, outer_source_ok
from registrar.ipip_relay import IpipRelay
from registrar.tomlconfig import ConfigError

LL = IPv6Address("fe80::b:2")
PROXY = IPv6Address("fd4a:5044::1")
OTHER = IPv6Address("fd4a:5044::99")
LOCAL = IPv6Address("fd4a:5044::100")


def syn(src: str = "fe80::1:1", dst: str = str(LL), **ip: object) -> bytes:
    return raw(IPv6(src=src, dst=dst, **ip) / TCP(sport=40000, dport=8443, flags="S"))


def reply(dst: str = "fe80::1:1", src: str = str(LL)) -> bytes:
    return raw(IPv6(src=src, dst=dst) / TCP(sport=8443, dport=40000, flags="SA"))


# -- packet rules -----------------------------------------------------------------------------
def test_a_pledges_packet_to_the_announced_address_passes():
    assert check_inbound(syn(), LL) is None
    assert check_inbound(raw(IPv6(src="fe80::1:1", dst=str(LL)) / UDP(dport=5684)), LL) is None
    assert check_inbound(raw(IPv6(src="fe80::1:1", dst=str(LL), nh=59)), LL) is None  # bare


@pytest.mark.parametrize(("packet", "reason"), [
    (b"", Drop.TRUNCATED),
    (syn()[:39], Drop.TRUNCATED),
    (syn()[:50], Drop.TRUNCATED),  # shorter than its payload length says
    (syn() + b"\0", Drop.BAD_LENGTH),  # longer
    (raw(IPv6(src="fe80::1:1", dst=str(LL), plen=0) / TCP()), Drop.BAD_LENGTH),  # "jumbo"
    (b"\x45" + syn()[1:], Drop.NOT_IPV6),
    (syn(src="fd4a:5044:0:100::5"), Drop.BAD_INNER_SOURCE),
    (syn(src="::"), Drop.BAD_INNER_SOURCE),
    (syn(src="ff02::1"), Drop.BAD_INNER_SOURCE),
    (syn(dst="fe80::b:3"), Drop.BAD_INNER_DESTINATION),
    (syn(dst="ff02::1"), Drop.BAD_INNER_DESTINATION),
    (raw(IPv6(src="fe80::1:1", dst=str(LL)) / IPv6(src="fe80::1:1", dst=str(LL))),
     Drop.NESTED),
    (raw(IPv6(src="fe80::1:1", dst=str(LL), nh=98) / Raw(b"x" * 40)), Drop.NESTED),
    (raw(IPv6(src="fe80::1:1", dst=str(LL), nh=4) / Raw(b"x" * 20)), Drop.NESTED),
])
def test_inbound_drops_name_their_reason(packet, reason):
    assert check_inbound(packet, LL) is reason


def test_only_replies_to_pledges_leave_through_a_tunnel():
    assert check_outbound(reply(), LL) is None
    mld = raw(IPv6(src=str(LL), dst="ff02::16") / IPv6ExtHdrHopByHop() / ICMPv6MLReport2())
    assert check_outbound(mld, LL) is Drop.NOT_TUNNELLED
    assert check_outbound(reply(src="fe80::99"), LL) is Drop.NOT_TUNNELLED
    assert check_outbound(reply(dst="fd4a:5044::1"), LL) is Drop.NOT_TUNNELLED
    assert check_outbound(b"\x60" * 10, LL) is Drop.NOT_TUNNELLED


def test_proxies_have_routable_unicast_addresses():
    assert outer_source_ok(PROXY)
    assert outer_source_ok(IPv6Address("2001:db8::1"))
    for bad in ("fe80::1", "ff02::1", "::1", "::", "::ffff:192.0.2.1", "fec0::1"):
        assert not outer_source_ok(IPv6Address(bad)), bad


# -- the relay with fake devices --------------------------------------------------------------
class FakeTun:
    def __init__(self, name: str, index: int, fail_write: bool = False) -> None:
        self.name = name
        self.index = index
        self.written: list[bytes] = []
        self.closed = False
        self.fail_write = fail_write

    def write(self, packet: bytes) -> None:
        if self.fail_write:
            raise OSError(5, "Input/output error")
        self.written.append(packet)

    def close(self) -> None:
        self.closed = True


class Harness:
    def __init__(self, **config: object) -> None:
        self.now = 100.0
        self.tuns: dict[str, FakeTun] = {}
        self.sent: list[tuple[int, bytes, IPv6Address, IPv6Address | None]] = []
        self.fail_open: OSError | None = None
        self.fail_send: OSError | None = None
        self.existing: set[str] = set()
        self.relay = IpipRelay(IpipConfig(enabled=True, **config), LL,  # type: ignore[arg-type]
                               open_tun=self.open_tun, send=self.send, clock=lambda: self.now,
                               name_in_use=lambda name: name in self.existing)

    def open_tun(self, name: str, proxy: IPv6Address) -> FakeTun:
        if self.fail_open is not None:
            raise self.fail_open
        tun = self.tuns[name] = FakeTun(name, 100 + len(self.tuns))
        return tun

    def send(self, protocol: int, packet: bytes, proxy: IPv6Address,
             local: IPv6Address | None) -> None:
        if self.fail_send is not None:
            raise self.fail_send
        self.sent.append((protocol, packet, proxy, local))


def test_first_valid_packet_makes_the_proxys_tun_and_is_delivered():
    h = Harness()
    assert h.relay.from_proxy(syn(), PROXY, protocol=41, local=LOCAL) is None
    assert list(h.tuns) == ["ipip-0"]
    assert h.tuns["ipip-0"].written == [syn()]
    assert h.relay.from_proxy(syn(), PROXY, protocol=41, local=LOCAL) is None
    assert list(h.tuns) == ["ipip-0"]  # one device per proxy
    assert h.relay.from_proxy(syn(), OTHER, protocol=41) is None
    assert list(h.tuns) == ["ipip-0", "ipip-1"]
    status = h.relay.status()
    assert status["in"] == 3 and status["tunnels_opened"] == 2 and status["drops"] == {}
    assert status["proxies"][str(PROXY)] == {"interface": "ipip-0", "protocol": 41,
                                             "in": 2, "out": 0}


def test_replies_go_back_with_the_proxys_protocol_and_address():
    h = Harness(protocols=(41, 98))
    h.relay.from_proxy(syn(), PROXY, protocol=98, local=LOCAL)
    assert h.relay.from_tun(PROXY, reply()) is None
    assert h.sent == [(98, reply(), PROXY, LOCAL)]
    h.relay.from_proxy(syn(), PROXY, protocol=41, local=LOCAL)  # the proxy switched
    h.relay.from_tun(PROXY, reply())
    assert h.sent[-1][0] == 41
    assert h.relay.status()["out"] == 2


def test_kernel_chatter_on_a_tun_is_counted_not_sent():
    h = Harness()
    h.relay.from_proxy(syn(), PROXY, protocol=41)
    mld = raw(IPv6(src=str(LL), dst="ff02::16") / IPv6ExtHdrHopByHop() / ICMPv6MLReport2())
    assert h.relay.from_tun(PROXY, mld) is Drop.NOT_TUNNELLED
    assert h.sent == []
    assert h.relay.from_tun(OTHER, reply()) is None  # no such tunnel (closed): ignored


def test_allowlist_prefixes_and_addresses():
    h = Harness(proxies=(IPv6Network("fd4a:5044::1/128"), IPv6Network("2001:db8:1::/48")))
    assert h.relay.from_proxy(syn(), OTHER, protocol=41) is Drop.NOT_ALLOWED
    assert h.relay.from_proxy(syn(), IPv6Address("2001:db8:1::7"), protocol=41) is None
    assert h.relay.from_proxy(syn(), PROXY, protocol=41) is None
    assert h.relay.status()["drops"] == {"not-allowed": 1}
    assert len(h.tuns) == 2


def test_junk_from_an_allowed_proxy_makes_no_tun():
    h = Harness(proxies=(IPv6Network("fd4a:5044::1/128"),))
    for junk in (b"", syn()[:30], syn(src="fd00::1"), syn(dst="fe80::9")):
        assert h.relay.from_proxy(junk, PROXY, protocol=41) is not None
    assert h.tuns == {}
    assert h.relay.status()["drops"] == {"bad-inner-destination": 1, "bad-inner-source": 1,
                                         "truncated": 2}


def test_the_number_of_proxies_is_capped():
    h = Harness(max_proxies=1)
    assert h.relay.from_proxy(syn(), PROXY, protocol=41) is None
    assert h.relay.from_proxy(syn(), OTHER, protocol=41) is Drop.TOO_MANY_PROXIES
    assert h.relay.from_proxy(syn(), PROXY, protocol=41) is None  # the first still works
    assert len(h.tuns) == 1


def test_packets_from_our_own_tun_or_a_link_local_proxy_are_refused():
    h = Harness()
    h.relay.from_proxy(syn(), PROXY, protocol=41)
    ours = h.tuns["ipip-0"].index
    assert h.relay.from_proxy(syn(), OTHER, protocol=41, ifindex=ours) is Drop.BAD_OUTER_SOURCE
    assert h.relay.from_proxy(syn(), IPv6Address("fe80::1:1"), protocol=41) \
        is Drop.BAD_OUTER_SOURCE
    assert len(h.tuns) == 1


def test_tun_failures_are_counted_and_retried():
    h = Harness()
    h.fail_open = OSError(1, "Operation not permitted")
    assert h.relay.from_proxy(syn(), PROXY, protocol=41) is Drop.TUN_ERROR
    h.fail_open = None
    assert h.relay.from_proxy(syn(), PROXY, protocol=41) is None
    h.tuns["ipip-0"].fail_write = True
    assert h.relay.from_proxy(syn(), PROXY, protocol=41) is Drop.TUN_ERROR
    h.fail_send = BlockingIOError(11, "Resource temporarily unavailable")
    assert h.relay.from_tun(PROXY, reply()) is Drop.SEND_ERROR
    assert h.relay.status()["drops"] == {"send-error": 1, "tun-error": 2}


def test_interface_names_skip_those_already_taken():
    h = Harness(ifname_prefix="jp")
    h.existing = {"jp0", "jp2"}
    h.relay.from_proxy(syn(), PROXY, protocol=41)
    h.relay.from_proxy(syn(), OTHER, protocol=41)
    assert list(h.tuns) == ["jp1", "jp3"]


def test_silent_proxies_lose_their_tun_and_come_back_with_a_new_one():
    h = Harness(idle_timeout=60.0)
    h.relay.from_proxy(syn(), PROXY, protocol=41)
    h.now += 30
    h.relay.from_proxy(syn(), OTHER, protocol=41)
    h.relay.from_tun(PROXY, reply())  # replies do not keep a proxy alive
    h.now += 40
    assert h.relay.expire() == [PROXY]
    assert h.tuns["ipip-0"].closed and not h.tuns["ipip-1"].closed
    assert h.relay.from_proxy(syn(), PROXY, protocol=41) is None
    assert h.relay.status()["proxies"][str(PROXY)]["interface"] == "ipip-0"  # name reused
    assert (h.relay.tunnels_opened, h.relay.tunnels_closed) == (3, 1)
    h.relay.close_all()
    assert h.relay.tunnels == {} and all(t.closed for t in h.tuns.values())


def test_idle_timeout_zero_keeps_tunnels():
    h = Harness(idle_timeout=0.0)
    h.relay.from_proxy(syn(), PROXY, protocol=41)
    h.now += 10**9
    assert h.relay.expire() == []


addresses = st.one_of(
    st.sampled_from([PROXY, OTHER, IPv6Address("fe80::1"), IPv6Address("ff02::1")]),
    st.builds(IPv6Address, st.integers(0, 2**128 - 1)))


@settings(max_examples=400, deadline=None)
@given(packets=st.lists(st.tuples(st.binary(max_size=120), addresses,
                                  st.sampled_from([41, 98]), st.integers(0, 200),
                                  st.booleans()), max_size=20))
def test_no_packet_sequence_raises_and_every_packet_is_accounted_for(packets):
    h = Harness(max_proxies=3, proxies=(IPv6Network("::/0"),))
    fed_in = 0
    for data, proxy, protocol, ifindex, valid in packets:
        packet = syn() if valid else data
        h.relay.from_proxy(packet, proxy, protocol=protocol, ifindex=ifindex)
        h.relay.from_tun(proxy, data)
        fed_in += 1
    status = h.relay.status()
    inbound_drops = sum(n for r, n in status["drops"].items()
                        if r not in ("not-tunnelled", "send-error"))
    assert status["in"] + inbound_drops == fed_in
    assert len(h.tuns) <= 3


# -- configuration, switch, announcement ------------------------------------------------------
@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ipipcfg")
    done = subprocess.run([sys.executable, "-m", "brski.cli.pki", "init", str(root / "pki"),
                           "--serial", "SN-1"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return root / "pki"


def config_file(pki: Path, tmp_path: Path, listen: str = "[::]:8443",
                **ipip: object) -> Path:
    return write_configs(pki, tmp_path, registrar_listen=[listen], ipip=ipip)[0]


def test_ipip_table_is_read(pki, tmp_path):
    path = config_file(pki, tmp_path, protocols=[98, 41], link_local="fe80::1234",
                       address="fd4a:5044::100", proxies=["fd4a:5044::1", "2001:db8::/32"],
                       max_proxies=8, ifname_prefix="jp-", mtu=1400, idle_timeout=0,
                       stats_period=5)
    cfg = load_registrar_config(path).ipip
    assert cfg == IpipConfig(
        enabled=True, protocols=(98, 41), link_local=IPv6Address("fe80::1234"),
        address=LOCAL, proxies=(IPv6Network("fd4a:5044::1/128"), IPv6Network("2001:db8::/32")),
        max_proxies=8, ifname_prefix="jp-", mtu=1400, idle_timeout=0.0, stats_period=5.0)
    assert cfg.allows(PROXY) and cfg.allows(IPv6Address("2001:db8::5"))
    assert not cfg.allows(OTHER)


def test_ipip_is_off_by_default_and_the_switch_turns_it_on(pki, tmp_path):
    path = write_configs(pki, tmp_path, registrar_listen=["[::]:8443"])[0]
    assert load_registrar_config(path).ipip == IpipConfig()
    assert load_registrar_config(path, ipip=True).ipip == IpipConfig(enabled=True)


@pytest.mark.parametrize(("keys", "message"), [
    ({"protocols": [6]}, "ipip.protocols[0]: 6 is not 41 (IPv6-in-IPv6) or 98"),
    ({"protocols": [41, 41]}, "ipip.protocols[1]: 41 is listed twice"),
    ({"protocols": []}, "ipip.protocols: needs at least one"),
    ({"protocols": "41"}, "ipip.protocols: must be a list of protocol numbers, not a string"),
    ({"link_local": "fd00::1"}, "ipip.link_local: fd00::1 is not a link-local"),
    ({"link_local": "fe80::zz"}, "ipip.link_local: not an IPv6 address"),
    ({"address": "fe80::1"}, "ipip.address: fe80::1 cannot be reached by proxies"),
    ({"proxies": ["fd4a:5044::1/64"]}, "ipip.proxies[0]: 'fd4a:5044::1/64': not an IPv6"),
    ({"proxies": ["10.0.0.1"]}, "ipip.proxies[0]: '10.0.0.1': not an IPv6 address or prefix"),
    ({"max_proxies": 0}, "ipip.max_proxies: 0 is below the minimum 1"),
    ({"ifname_prefix": "much-too-long"}, "ipip.ifname_prefix: 'much-too-long': at most 11"),
    ({"mtu": 1000}, "ipip.mtu: 1000 is below the minimum 1280"),
    ({"idle_timeout": -1}, "ipip.idle_timeout: -1 is below the minimum 0"),
    ({"stats": 1}, "ipip.stats: unknown key"),
])
def test_ipip_errors_name_the_key(pki, tmp_path, keys, message):
    with pytest.raises(ConfigError) as info:
        load_registrar_config(config_file(pki, tmp_path, **keys))
    assert message in str(info.value)


def test_ipip_needs_a_wildcard_listener(pki, tmp_path):
    path = config_file(pki, tmp_path, listen="[::1]:8443")
    with pytest.raises(ConfigError, match=r"server\.listen: IPIP needs a wildcard IPv6 listen"):
        load_registrar_config(path)
    off = config_file(pki, tmp_path / "off", listen="[::1]:8443", enabled=False)
    assert not load_registrar_config(off).ipip.enabled  # fine while off...
    with pytest.raises(ConfigError, match="wildcard"):
        load_registrar_config(off, ipip=True)  # ...but not with --ipip


def test_check_config_with_the_ipip_switch(pki, tmp_path, capsys):
    off = config_file(pki, tmp_path, listen="[::1]:8443", enabled=False)
    assert cli.main(["--config", str(off), "--check-config"]) == 0
    assert cli.main(["--ipip", "--config", str(off), "--check-config"]) == 78
    assert "server.listen: IPIP needs a wildcard" in capsys.readouterr().err
    good = config_file(pki, tmp_path / "good", enabled=False)
    assert cli.main(["--config", str(good), "--check-config", "--ipip"]) == 0


def test_link_local_default_needs_an_announce_interface(pki, tmp_path):
    cfg = load_registrar_config(config_file(pki, tmp_path))
    with pytest.raises(ConfigError, match=r"ipip\.link_local: missing"):
        resolve_link_local(cfg)
    explicit = load_registrar_config(config_file(pki, tmp_path / "x", link_local="fe80::b:2"))
    assert resolve_link_local(explicit) == LL


def test_flood_carries_an_ipip_locator_per_protocol_and_the_backbone_initiator(pki, tmp_path):
    cfg = load_registrar_config(config_file(pki, tmp_path, protocols=[41, 98],
                                            link_local="fe80::b:2"))
    extra, initiator = Announcer(cfg, ipip_link_local=LL)._ipip_announcement(LOCAL)
    assert extra == (grasp.IPv6Locator(LL, 41, None), grasp.IPv6Locator(LL, 98, None))
    assert initiator == LOCAL  # the TCP locator address, when [ipip] address is unset
    assert Announcer(cfg)._ipip_announcement(LOCAL) == ((), None)  # not resolved: nothing
    flood = grasp.registrar_flood(lambda n: b"\0" * n, initiator, [
        grasp.IPv6Locator(LOCAL, grasp.IPPROTO_TCP, 8443), *extra])
    decoded = grasp.Flood.decode(flood.encode())
    assert [(str(x.address), x.protocol, x.port)
            for x in decoded.locators_for("AN_join_registrar")] == [
        ("fd4a:5044::100", 6, 8443), ("fe80::b:2", 41, None), ("fe80::b:2", 98, None)]
    with_address = load_registrar_config(config_file(
        pki, tmp_path / "a", link_local="fe80::b:2", address="fd4a:5044::200"))
    assert Announcer(with_address, ipip_link_local=LL)._ipip_announcement(LOCAL)[1] \
        == IPv6Address("fd4a:5044::200")
