"""The coaps relay's pure parts: configuration, what discovery learns of a registrar's CoAPS
port, the announcement's transports, the guard's ports, and the ICMPv6 errors it builds
(checked with scapy, an independent decoder)."""

from ipaddress import IPv6Address

import pytest
from scapy.layers.inet import UDP
from scapy.layers.inet6 import ICMPv6DestUnreach, IPerror6, IPv6, UDPerror

from brski import grasp, icmpv6
from brski.errors import UsageError
from joinproxyd.config import ConfigError, Limits, parse
from joinproxyd.daemon import guarded_ports
from joinproxyd.discovery.grasp import registrars_in_flood
from joinproxyd.discovery.registry import RegistrarTable
from joinproxyd.discovery.target import AnnounceTarget
from joinproxyd.model import JoinInterface, RegistrarEndpoint

ULA = IPv6Address("fd4a:5044::100")


def config(**tables):  # type: ignore[no-untyped-def]
    data = {"backbone": {"interface": "bb0"}, "join": [{"interfaces": ["join*"],
                                                        "modes": ["coaps"]}]}
    data.update(tables)
    return parse(data)


def test_coaps_join_port_defaults_to_5684_and_limits_to_the_draft():
    c = config()
    assert c.joins[0].port == 5684 and c.joins[0].modes == ("coaps",)
    assert (c.limits.flows_per_pledge, c.limits.flows_per_interface,
            c.limits.flow_idle_timeout) == (2, 10, 30.0)
    mixed = parse({"backbone": {"interface": "bb0"},
                   "join": [{"interfaces": ["j*"], "modes": ["circuit", "coaps"]}]})
    assert mixed.joins[0].port == 8443  # one port for both transports, BRSKI's
    assert config(limits={"flows_per_pledge": 5}).limits == Limits(flows_per_pledge=5)


def test_static_registrar_coaps_port():
    c = config(registrars={"static": [{"address": str(ULA), "coaps_port": 5684}]})
    assert c.static_registrars[0].coaps_port == 5684
    assert config(registrars={"static": [{"address": str(ULA)}]}
                  ).static_registrars[0].coaps_port is None


@pytest.mark.parametrize(("tables", "message"), [
    ({"registrars": {"static": [{"address": str(ULA), "coaps_port": 0}]}},
     "registrars.static[0].coaps_port: must be an integer between 1 and 65535 (got 0)"),
    ({"registrars": {"static": [{"address": str(ULA), "coaps_port": "5684"}]}},
     "registrars.static[0].coaps_port: must be an integer between 1 and 65535 (got '5684')"),
    ({"limits": {"flows_per_pledge": 0}},
     "limits.flows_per_pledge: must be an integer between 1 and 100000 (got 0)"),
    ({"limits": {"flows_per_interface": -1}},
     "limits.flows_per_interface: must be an integer between 1 and 1000000 (got -1)"),
    ({"limits": {"flow_idle_timeout": 0}},
     "limits.flow_idle_timeout: must be a number between 0.1 and 86400 (got 0)"),
])
def test_bad_coaps_keys_are_named(tables, message):
    with pytest.raises(ConfigError) as info:
        config(**tables)
    assert str(info.value) == message


def flood(*locators: grasp.IPv6Locator) -> bytes:
    return grasp.registrar_flood(lambda n: b"\x01" * n, ULA, list(locators)).encode()


def test_grasp_udp_locator_is_the_registrars_coaps_port():
    data = flood(grasp.IPv6Locator(ULA, 6, 8443), grasp.IPv6Locator(ULA, 17, 5684))
    (endpoint,), _ = registrars_in_flood(data, ifindex=5)
    assert (endpoint.port, endpoint.coaps_port) == (8443, 5684)
    assert endpoint.coaps_sockaddr == (str(ULA), 5684, 0, 0)
    # a UDP locator elsewhere is not this registrar's
    other = flood(grasp.IPv6Locator(ULA, 6, 8443),
                  grasp.IPv6Locator(IPv6Address("fd4a:5044::200"), 17, 5684))
    (endpoint,), _ = registrars_in_flood(other, ifindex=5)
    assert endpoint.coaps_port is None


def test_registry_keeps_the_coaps_port_whichever_source_names_it():
    registry = RegistrarTable()
    registry.set_static([RegistrarEndpoint(10, str(ULA), 8443)])
    registry.offer(RegistrarEndpoint(50, str(ULA), 8443, source="grasp", coaps_port=5684),
                   30, 0.0)
    (state,) = registry.states()
    assert state.endpoint.coaps_port == 5684
    registry.expire(100.0)  # the flood lapses: static alone knows no CoAPS port
    (state,) = registry.states()
    assert state.endpoint.coaps_port is None


def iface(modes: tuple[str, ...], port: int = 5684) -> JoinInterface:
    return JoinInterface("join0", 3, "fe80::1", (), modes, port, ("fe80::1",))


def test_announcement_transports_follow_the_modes():
    assert AnnounceTarget.of(iface(("coaps",))).protocols == (17,)
    assert AnnounceTarget.of(iface(("circuit",))).protocols == (6,)
    assert AnnounceTarget.of(iface(("circuit", "coaps"))).protocols == (6, 17)


def test_guard_watches_the_coaps_join_port():
    c = config()
    # and CoAP's 5683, where the link answers CoRE discovery
    assert guarded_ports(c, [iface(("coaps",))], None) == [5683, 5684]


PLEDGE, PROXY = IPv6Address("fe80::2"), IPv6Address("fe80::1")


def test_admin_prohibited_quotes_the_pledges_datagram_scapy_agrees():
    invoking = icmpv6.udp_packet(PLEDGE, PROXY, 40000, 5684, b"\x16\xfe\xfd hello")
    packet = IPv6(invoking)
    assert packet[UDP].sport == 40000 and packet[UDP].dport == 5684
    checked = packet[UDP].chksum
    del packet[UDP].chksum
    assert IPv6(bytes(packet))[UDP].chksum == checked  # scapy computes the same checksum
    message = icmpv6.admin_prohibited(invoking)
    error = ICMPv6DestUnreach(message)
    assert (error.type, error.code) == (1, 1)
    assert error[IPerror6].src == str(PLEDGE) and error[UDPerror].dport == 5684
    assert bytes(error[UDPerror].payload) == b"\x16\xfe\xfd hello"


def test_error_fits_the_minimum_mtu_and_rejects_non_errors():
    invoking = icmpv6.udp_packet(PLEDGE, PROXY, 1, 2, b"x" * 2000)
    assert 40 + len(icmpv6.error_message(1, 4, invoking)) == 1280
    with pytest.raises(UsageError):
        icmpv6.error_message(128, 0, invoking)  # echo request: not an error
    with pytest.raises(UsageError):
        icmpv6.udp_packet(PLEDGE, PROXY, 70000, 2, b"")
