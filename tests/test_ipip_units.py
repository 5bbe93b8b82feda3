"""The ipip mode's pure parts, no kernel: its configuration keys, the IPIP offer in a GRASP
flood, what the registrar table keeps of it, what a join link announces, and the plan the
mode derives (backbone address per link, refusals)."""

from __future__ import annotations

import ipaddress
from ipaddress import IPv6Address
from pathlib import Path
from typing import Any

import pytest

from brski import grasp
from joinproxyd.config import ConfigError, GuardSettings, IpipSettings, parse
from joinproxyd.daemon import announced_addresses, desired_interfaces, guarded_ports
from joinproxyd.discovery.grasp import registrars_in_flood
from joinproxyd.discovery.registry import RegistrarTable
from joinproxyd.model import IpipTarget, JoinInterface, LinkState, RegistrarEndpoint
from joinproxyd.relays.ipip import backbone_address, make_plan, usable_target

MINIMAL: dict[str, Any] = {"backbone": {"interface": "bb0"},
                           "join": [{"interfaces": ["join*"], "modes": ["ipip"]}],
                           "ipip": {"backbone_prefix": "fd4a:5044::1:0/112"}}
ULA = IPv6Address("fd4a:5044::100")
RLL = IPv6Address("fe80::1234")
TARGET = IpipTarget("fe80::1234", "fd4a:5044::100", (41, 98), (8443,))


def with_(**tables: Any) -> dict[str, Any]:
    return {**MINIMAL, **tables}


def error(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        parse(data)
    return str(info.value)


# -- configuration ------------------------------------------------------------------------------

def test_defaults_of_the_new_keys() -> None:
    config = parse({"backbone": {"interface": "bb0"}, "join": [{"interfaces": ["join*"]}]})
    assert config.guard == GuardSettings(enabled=False, rate=20, burst=40)
    assert config.ipip == IpipSettings()
    assert config.bpf_pin_dir == Path("/sys/fs/bpf/joinproxyd")
    assert config.bpf_object_dir is None
    assert not config.needs_bpf, "a circuit-only proxy with the guard off loads no BPF"
    assert parse(with_(guard={"enabled": True})).guard.enabled


def test_ipip_keys_are_read() -> None:
    config = parse(with_(
        daemon={"bpf_pin_dir": "/sys/fs/bpf/jp-test", "bpf_object_dir": "/usr/lib/jp/ebpf"},
        guard={"enabled": True, "rate": 50, "burst": 80},
        ipip={"protocol": 98, "backbone_prefix": "fd4a:5044::1:0/112",
              "backbone_addresses": {"join0": "fd4a:5044::2:1", "lan.100": "fd4a:5044::2:2"}},
        registrars={"discovery": ["static"], "static": [
            {"address": "fd4a:5044::100", "port": 8443,
             "ipip": {"link_local": "fe80::1234", "protocols": [41, 98]}}]}))
    assert config.uses_ipip and config.needs_bpf
    assert config.bpf_pin_dir == Path("/sys/fs/bpf/jp-test")
    assert config.bpf_object_dir == Path("/usr/lib/jp/ebpf")
    assert config.guard == GuardSettings(True, 50, 80)
    assert config.ipip == IpipSettings(98, ipaddress.IPv6Network("fd4a:5044::1:0/112"),
                                       {"join0": "fd4a:5044::2:1", "lan.100": "fd4a:5044::2:2"})
    # the outer address defaults to the registrar's, the ports to its port
    assert config.static_registrars[0].ipip == IpipTarget("fe80::1234", "fd4a:5044::100",
                                                          (41, 98), (8443,))


@pytest.mark.parametrize(("data", "message"), [
    (with_(guard={"rate": 0}), "guard.rate: must be an integer between 1 and 10000000 (got 0)"),
    (with_(guard={"rate": 2.5}),
     "guard.rate: must be an integer between 1 and 10000000 (got 2.5)"),
    (with_(guard={"burst": 0}), "guard.burst: must be an integer between 1 and 1000000 (got 0)"),
    (with_(guard={"enabled": "yes"}), "guard.enabled: must be true or false (got 'yes')"),
    (with_(guard={"rat": 5}), "guard.rat: unknown key"),
    (with_(ipip={"protocol": 4, "backbone_prefix": "fd00::/64"}),
     "ipip.protocol: must be 41 (IPv6-in-IPv6) or 98 (ENCAP) (got 4)"),
    (with_(ipip={"backbone_prefix": "fd00::1/64"}),
     "ipip.backbone_prefix: must be an IPv6 prefix with no host bits set, e.g. fd00::1:0/112 "
     "(got 'fd00::1/64')"),
    (with_(ipip={"backbone_prefix": "fd00::/120"}),
     "ipip.backbone_prefix: /120 is too long: at most /112, each join link takes the address "
     "at its interface index"),
    (with_(ipip={"backbone_prefix": "fe80::/64"}),
     "ipip.backbone_prefix: must be a unicast ULA or global address (got fe80::)"),
    (with_(ipip={"backbone_addresses": {"join0": "fe80::1"}}),
     "ipip.backbone_addresses.join0: must be a unicast ULA or global address (got fe80::1)"),
    (with_(ipip={"backbone_addresses": {"join0": "nonsense"}}),
     "ipip.backbone_addresses.join0: must be an IPv6 address (got 'nonsense')"),
    (with_(ipip={"backbone_addresses": {"join0": "fd00::1", "join1": "fd00::1"}}),
     "ipip.backbone_addresses.join1: fd00::1 is given to two join links: one address per "
     "link"),
    (with_(ipip={"backbone_addresses": {"a-name-far-too-long": "fd00::1"}}),
     "ipip.backbone_addresses.a-name-far-too-long: is not an interface name"),
    (with_(ipip={}), "ipip.backbone_prefix: is required when a [[join]] uses ipip (or list "
                     "ipip.backbone_addresses): the proxy needs its own backbone address per "
                     "join link"),
    (with_(join=[{"interfaces": ["join*"], "modes": ["ipip", "circuit"]}]),
     "join[0].modes: ipip cannot share a join link with other modes: pledges there are sent "
     "to the registrar's own link-local address and port"),
    (with_(daemon={"bpf_pin_dir": "relative/dir"}),
     "daemon.bpf_pin_dir: must be an absolute path (got 'relative/dir')"),
    (with_(registrars={"static": [{"address": "fd00::10", "ipip": {}}]}),
     "registrars.static[0].ipip.link_local: is required"),
    (with_(registrars={"static": [{"address": "fd00::10",
                                   "ipip": {"link_local": "fd00::1234"}}]}),
     "registrars.static[0].ipip.link_local: must be a link-local (fe80::/10) address (got "
     "fd00::1234): pledges connect to it"),
    (with_(registrars={"static": [{"address": "fd00::10",
                                   "ipip": {"link_local": "fe80::1", "address": "ff02::1"}}]}),
     "registrars.static[0].ipip.address: must be a unicast ULA or global address (got ff02::1)"),
    (with_(registrars={"static": [{"address": "fd00::10",
                                   "ipip": {"link_local": "fe80::1", "protocols": [4]}}]}),
     "registrars.static[0].ipip.protocols: 4 is not 41 (IPv6-in-IPv6) or 98 (ENCAP)"),
    (with_(registrars={"static": [{"address": "fd00::10",
                                   "ipip": {"link_local": "fe80::1",
                                            "ports": [1, 2, 3, 4, 5]}}]}),
     "registrars.static[0].ipip.ports: must be a list of 1 to 4 integers between 1 and 65535 "
     "(got [1, 2, 3, 4, 5])"),
    (with_(registrars={"static": [{"address": "fd00::10",
                                   "ipip": {"link_local": "fe80::1", "mtu": 1400}}]}),
     "registrars.static[0].ipip.mtu: unknown key"),
])
def test_errors_name_the_key_and_the_reason(data: dict[str, Any], message: str) -> None:
    assert error(data) == message


def test_the_shipped_configuration_parses_and_turns_the_guard_on() -> None:
    import tomllib

    shipped = Path(__file__).resolve().parent.parent / "packaging" / "joinproxyd.toml"
    config = parse(tomllib.loads(shipped.read_text()))
    assert config.guard.enabled and config.guard.rate == 20 and config.guard.burst == 40
    assert config.ipip.protocol == 41
    assert config.ipip.xdp == "auto"


# -- the IPIP offer in a GRASP flood -------------------------------------------------------------

def flood(*locators: grasp.IPv6Locator, initiator: IPv6Address = ULA) -> bytes:
    return grasp.registrar_flood(lambda n: b"\x01" * n, initiator, list(locators)).encode()


def loc(address: IPv6Address, protocol: int, port: int | None) -> grasp.IPv6Locator:
    return grasp.IPv6Locator(address, protocol, port)


def test_an_ipip_locator_gives_the_tcp_endpoint_an_ipip_target() -> None:
    endpoints, _ = registrars_in_flood(flood(loc(ULA, 6, 8443), loc(RLL, 41, None),
                                             loc(RLL, 98, None), loc(ULA, 17, 5684)), 5)
    (endpoint,) = endpoints
    assert (endpoint.address, endpoint.port, endpoint.protocol) == ("fd4a:5044::100", 8443, 6)
    # the initiator is where to encapsulate to; the relayed ports are the TCP/UDP locators'
    assert endpoint.ipip == IpipTarget("fe80::1234", "fd4a:5044::100", (41, 98), (8443, 5684))


@pytest.mark.parametrize("locators,initiator", [
    ([loc(ULA, 6, 8443)], ULA),  # no IPIP locator
    ([loc(ULA, 6, 8443), loc(ULA, 41, None)], ULA),  # not a link-local locator
    ([loc(ULA, 6, 8443), loc(RLL, 41, None)], IPv6Address("fe80::b:2")),  # link-local outer
    ([loc(ULA, 6, 8443), loc(RLL, 41, None)], IPv6Address("::1")),  # loopback outer
    ([loc(ULA, 6, 8443), loc(RLL, 4, None)], ULA),  # IPv4-in-IP is not ours
])
def test_unusable_ipip_offers_are_ignored(locators: list[grasp.IPv6Locator],
                                          initiator: IPv6Address) -> None:
    endpoints, _ = registrars_in_flood(flood(*locators, initiator=initiator), 5)
    assert [e.ipip for e in endpoints] == [None]


def test_the_registrar_table_keeps_the_ipip_offer_of_its_sources() -> None:
    table = RegistrarTable()
    plain = RegistrarEndpoint(10, "fd4a:5044::100", 8443, source="static")
    table.set_static([plain])
    assert table.select() is None and table.states()[0].endpoint.ipip is None
    learned = RegistrarEndpoint(0, "fd4a:5044::100", 8443, source="grasp", ipip=TARGET)
    state, new = table.offer(learned, 60, now=0)
    assert state is not None and not new
    assert state.endpoint.ipip == TARGET, "a flood's offer is kept beside static settings"
    configured = IpipTarget("fe80::1", "fd4a:5044::100", (98,), (8443,))
    table.set_static([RegistrarEndpoint(10, "fd4a:5044::100", 8443, ipip=configured)])
    assert table.states()[0].endpoint.ipip == configured, "the configuration wins"
    table.set_static([])
    assert table.states()[0].endpoint.ipip == TARGET
    table.expire(now=61)
    assert table.states() == []


# -- announcements and the plan -------------------------------------------------------------------

def registrar(target: IpipTarget | None = TARGET) -> RegistrarEndpoint:
    return RegistrarEndpoint(10, "fd4a:5044::100", 8443, ipip=target)


def test_an_ipip_link_announces_the_registrars_link_local_address_and_port() -> None:
    assert announced_addresses(("ipip",), "fe80::1", (), "fe80::1234") == ("fe80::1234",)
    assert announced_addresses(("ipip",), "fe80::1", (), None) == ()
    assert announced_addresses(("circuit",), "fe80::1", (), "fe80::1234") == ("fe80::1",)
    config = parse(with_(join=[{"interfaces": ["join0"], "modes": ["ipip"], "port": 443},
                               {"interfaces": ["join1"]}]))
    links = {name: LinkState(name, i, True, ("fe80::1",)) for i, name in
             ((3, "join0"), (4, "join1"))}
    ipip, circuit = desired_interfaces(config, links, registrar(
        IpipTarget("fe80::1234", "fd4a:5044::100", (41,), (8443, 5684))))
    assert (ipip.port, ipip.announce) == (8443, ("fe80::1234",))
    assert (circuit.port, circuit.announce) == (8443, ("fe80::1",))
    assert guarded_ports(config, [ipip, circuit], registrar(
        IpipTarget("fe80::1234", "fd4a:5044::100", (41,), (8443, 5684)))) == [5684, 8443]
    # without an IPIP offer: the configured port, nothing announced
    ipip, _ = desired_interfaces(config, links, registrar(None))
    assert (ipip.port, ipip.announce) == (443, ())


def test_the_registrar_must_offer_the_configured_protocol() -> None:
    assert usable_target(registrar(), 98) == (TARGET, None)
    assert usable_target(None, 41) == (None, "no registrar is known")
    assert usable_target(registrar(None), 41)[1] == \
        "registrar [fd4a:5044::100]:8443 does not offer IPIP"
    only_41 = IpipTarget("fe80::1234", "fd4a:5044::100", (41,), (8443,))
    assert usable_target(registrar(only_41), 98)[1] == \
        "registrar [fd4a:5044::100]:8443 takes IPIP protocol 41, not 98 (ipip.protocol)"


def test_one_backbone_address_per_link_configured_or_derived() -> None:
    settings = IpipSettings(41, ipaddress.IPv6Network("fd4a:5044::1:0/112"),
                            {"join9": "fd4a:5044::9"})
    assert backbone_address(settings, "join0", 3) == "fd4a:5044::1:3"
    assert backbone_address(settings, "join9", 3) == "fd4a:5044::9"
    with pytest.raises(ValueError, match="ifindex 65536 does not fit"):
        backbone_address(settings, "join0", 65536)
    with pytest.raises(ValueError, match="no backbone address"):
        backbone_address(IpipSettings(), "join0", 3)


def join(name: str, index: int) -> JoinInterface:
    return JoinInterface(name, index, "fe80::1", (), ("ipip",), 8443, ("fe80::1234",))


BACKBONE = LinkState("bb0", 2, True, ("fe80::b:1",))


def test_the_plan_for_two_links() -> None:
    settings = IpipSettings(98, ipaddress.IPv6Network("fd4a:5044::1:0/112"))
    plan = make_plan([join("join1", 4), join("join0", 3)], registrar(), settings, BACKBONE)
    assert plan.relaying and plan.errors == {}
    joins = plan.joins(98)
    assert sorted(joins) == [3, 4]
    assert (joins[3].outer_src, joins[3].registrar, joins[3].registrar_ll, joins[3].proto,
            joins[3].ports, joins[3].backbone_ifindex) == \
        ("fd4a:5044::1:3", "fd4a:5044::100", "fe80::1234", 98, (8443,), 2)
    assert plan.proxies() == {(3, "fe80::1234"), (4, "fe80::1234")}
    assert plan.addresses() == {"fd4a:5044::1:3", "fd4a:5044::1:4"}


def test_the_plan_refuses_without_a_usable_registrar_or_backbone() -> None:
    settings = IpipSettings(41, ipaddress.IPv6Network("fd4a:5044::1:0/112"))
    for reg, backbone, why in ((None, BACKBONE, "no registrar is known"),
                               (registrar(), None, "the backbone interface is not up")):
        plan = make_plan([join("join0", 3)], reg, settings, backbone)
        assert not plan.relaying and plan.refusal == why
        assert plan.joins(41) == {} and plan.proxies() == set() and plan.addresses() == set()


def test_links_without_an_address_of_their_own_are_not_relayed() -> None:
    settings = IpipSettings(41, None, {"join0": "fd4a:5044::100", "join1": "fd4a:5044::7"})
    plan = make_plan([join("join0", 3), join("join1", 4), join("join2", 5)], registrar(),
                     settings, BACKBONE)
    assert [link.name for link in plan.links] == ["join1"]
    assert plan.errors == {
        "join0": "join0: backbone address fd4a:5044::100 is the registrar's",
        "join2": "join2: no backbone address (not in ipip.backbone_addresses, and no "
                 "ipip.backbone_prefix)"}
