"""LinkTable: the watcher's picture of links and addresses, fed messages with no socket."""

import contextlib
import random
import socket
import struct

import pytest
from pyroute2.netlink.rtnl import RTM_DELADDR, RTM_DELLINK, RTM_NEWADDR, RTM_NEWLINK
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.marshal import MarshalRtnl

from joinproxyd.kernel.netlink import (
    IFA_F_DADFAILED,
    IFA_F_TENTATIVE,
    IFF_LOWER_UP,
    IFF_UP,
    LinkTable,
    MalformedMessage,
)
from joinproxyd.model import LinkState

IFA_F_PERMANENT = 0x80
RUNNING = IFF_UP | IFF_LOWER_UP | 0x1040  # UP, LOWER_UP, RUNNING, MULTICAST: as veth reports


def link(name: str, index: int, flags: int = RUNNING, operstate: str = "UP",
         kind: int = RTM_NEWLINK, family: int = socket.AF_UNSPEC) -> dict:
    return {"header": {"type": kind}, "family": family, "index": index, "flags": flags,
            "ifname": name, "operstate": operstate}


def addr(index: int, address: str, flags: int = IFA_F_PERMANENT, kind: int = RTM_NEWADDR,
         family: int = socket.AF_INET6) -> dict:
    return {"header": {"type": kind}, "family": family, "index": index, "flags": flags & 0xFF,
            "IFA_ADDRESS": address, "IFA_FLAGS": flags}


def table(*messages: dict) -> LinkTable:
    t = LinkTable()
    for msg in messages:
        t.apply(msg)
    return t


def test_link_with_a_usable_link_local_is_ready():
    t = table(link("join0", 5), addr(5, "fe80::1"), addr(5, "fd4a:5044:0:100::1"))
    assert t.snapshot() == {"join0": LinkState("join0", 5, True, ("fe80::1",),
                                               ("fd4a:5044:0:100::1",))}
    assert t.snapshot()["join0"].ready


@pytest.mark.parametrize(("flags", "operstate", "up"), [
    (RUNNING, "UP", True),
    (IFF_UP | IFF_LOWER_UP, "UNKNOWN", True),  # lo, tun: no operstate, carrier by LOWER_UP
    (IFF_UP, "LOWERLAYERDOWN", False),  # veth whose peer is down: no carrier
    (IFF_UP, "DOWN", False),
    (IFF_LOWER_UP, "UP", False),  # not administratively up
    (0, "DOWN", False),
    (IFF_UP, "DORMANT", False),
])
def test_up_means_admin_up_with_carrier(flags, operstate, up):
    assert table(link("x", 2, flags, operstate)).snapshot()["x"].up is up


def test_tentative_and_dadfailed_addresses_are_not_listed():
    t = table(link("join0", 5),
              addr(5, "fe80::1", IFA_F_PERMANENT | IFA_F_TENTATIVE),
              addr(5, "fe80::2", IFA_F_PERMANENT | IFA_F_DADFAILED | IFA_F_TENTATIVE),
              addr(5, "fd00::1", IFA_F_TENTATIVE))
    assert t.snapshot()["join0"].link_local == ()
    assert t.snapshot()["join0"].routable == ()
    # DAD finished: the kernel re-announces the address without the tentative flag.
    assert t.apply(addr(5, "fe80::1", IFA_F_PERMANENT)) is True
    assert t.snapshot()["join0"].link_local == ("fe80::1",)


def test_ifa_flags_attribute_wins_over_the_8_bit_field():
    msg = addr(5, "fe80::1")
    msg["flags"] = IFA_F_TENTATIVE  # stale byte; IFA_FLAGS says it is settled
    t = table(link("j", 5), msg)
    assert t.snapshot()["j"].link_local == ("fe80::1",)
    del msg["IFA_FLAGS"]
    t = table(link("j", 5), msg)
    assert t.snapshot()["j"].link_local == ()


def test_routable_means_ula_or_global_and_addresses_are_sorted():
    t = table(link("bb0", 3),
              addr(3, "2001:db8::2"), addr(3, "fd4a:5044::1"), addr(3, "2001:db8::10"),
              addr(3, "fec0::1"),  # deprecated site-local
              addr(3, "fe80::b:1"), addr(3, "fe80::a"))
    state = t.snapshot()["bb0"]
    assert state.routable == ("2001:db8::2", "2001:db8::10", "fd4a:5044::1")
    assert state.link_local == ("fe80::a", "fe80::b:1")


def test_addresses_are_normalised():
    t = table(link("j", 5), addr(5, "FE80:0:0::0001"))
    assert t.snapshot()["j"].link_local == ("fe80::1",)
    assert t.apply(addr(5, "fe80::1", kind=RTM_DELADDR)) is True
    assert t.snapshot()["j"].link_local == ()


def test_rename_keeps_index_and_addresses():
    t = table(link("join0", 5), addr(5, "fe80::1"))
    assert t.apply(link("pledges", 5)) is True
    assert t.snapshot() == {"pledges": LinkState("pledges", 5, True, ("fe80::1",), ())}


def test_link_update_without_a_name_keeps_the_old_name():
    t = table(link("join0", 5))
    msg = link("", 5, flags=IFF_UP, operstate="DOWN")
    del msg["ifname"]
    assert t.apply(msg) is True
    assert t.snapshot()["join0"].up is False


def test_delete_forgets_link_and_addresses():
    t = table(link("join0", 5), addr(5, "fe80::1"), link("bb0", 3))
    assert t.apply(link("join0", 5, kind=RTM_DELLINK)) is True
    assert list(t.snapshot()) == ["bb0"]
    assert 5 not in t.addresses
    # A new link reusing the index starts without the old addresses.
    t.apply(link("join0", 5))
    assert t.snapshot()["join0"].link_local == ()


def test_bridge_port_messages_do_not_touch_the_link():
    t = table(link("join0", 5), addr(5, "fe80::1"))
    assert t.apply(link("join0", 5, kind=RTM_DELLINK, family=socket.AF_BRIDGE)) is False
    assert t.apply(link("join0", 5, flags=0, family=socket.AF_BRIDGE)) is False
    assert t.snapshot()["join0"].ready


def test_repeated_messages_report_no_change():
    t = table(link("join0", 5), addr(5, "fe80::1"))
    assert t.apply(link("join0", 5)) is False
    assert t.apply(addr(5, "fe80::1")) is False
    assert t.apply(addr(5, "fe80::9", kind=RTM_DELADDR)) is False
    assert t.apply(link("gone", 9, kind=RTM_DELLINK)) is False


def test_ipv4_addresses_and_other_message_types_are_ignored():
    t = table(link("join0", 5))
    assert t.apply(addr(5, "192.0.2.1", family=socket.AF_INET)) is False
    assert t.apply({"header": {"type": 24}, "family": 10}) is False  # RTM_NEWROUTE
    assert t.snapshot()["join0"].link_local == ()


def test_addresses_of_a_link_not_yet_seen_appear_with_it():
    t = table(addr(7, "fe80::7"))
    assert t.snapshot() == {}
    t.apply(link("late", 7))
    assert t.snapshot()["late"].link_local == ("fe80::7",)


@pytest.mark.parametrize("msg", [
    {"family": 0, "index": 5},  # no header
    {"header": {"type": RTM_NEWLINK}, "family": 0, "flags": 1, "ifname": "x"},  # no index
    {"header": {"type": RTM_NEWLINK}, "family": 0, "index": 0, "flags": 1, "ifname": "x"},
    {"header": {"type": RTM_NEWLINK}, "family": 0, "index": 6, "flags": 1},  # new, no name
    {"header": {"type": RTM_NEWLINK}, "family": 0, "index": 5, "flags": 1,
     "ifname": b"\xc8\x00abc"},  # raw bytes where a name belongs
    {"header": {"type": RTM_NEWLINK}, "family": 0, "index": 5, "ifname": "x"},  # no flags
    {"header": {"type": RTM_NEWADDR}, "family": 10, "index": 5, "flags": 0},  # no address
    {"header": {"type": RTM_NEWADDR}, "family": 10, "index": 5, "flags": 0,
     "IFA_ADDRESS": "not-an-address"},
    {"header": {"type": RTM_NEWADDR}, "family": 10, "index": 5, "flags": 0,
     "IFA_ADDRESS": [1, 2]},
    {"header": {"type": RTM_NEWADDR}, "family": 10, "index": 5, "IFA_ADDRESS": "fe80::1"},
    {"header": {"type": RTM_DELADDR}, "family": 10, "index": "5", "IFA_ADDRESS": "fe80::1"},
])
def test_malformed_messages_raise_one_error_type_and_change_nothing(msg):
    t = table(link("join0", 5), addr(5, "fe80::1"))
    before = t.snapshot()
    with pytest.raises(MalformedMessage):
        t.apply(msg)
    assert t.snapshot() == before


# -- messages as pyroute2 parses them from kernel bytes ---------------------------------------

def encoded_link(name: str, index: int, flags: int, operstate: str) -> bytes:
    msg = ifinfmsg()
    msg["header"]["type"] = RTM_NEWLINK
    msg["family"] = socket.AF_UNSPEC
    msg["index"] = index
    msg["flags"] = flags
    msg["attrs"] = [("IFLA_IFNAME", name), ("IFLA_OPERSTATE", operstate)]
    msg.encode()
    return bytes(msg.data)


def encoded_addr(index: int, address: str, flags: int, kind: int = RTM_NEWADDR) -> bytes:
    msg = ifaddrmsg()
    msg["header"]["type"] = kind
    msg["family"] = socket.AF_INET6
    msg["prefixlen"] = 64
    msg["index"] = index
    msg["flags"] = flags & 0xFF
    msg["scope"] = 253
    msg["attrs"] = [("IFA_ADDRESS", address), ("IFA_FLAGS", flags)]
    msg.encode()
    return bytes(msg.data)


def test_messages_parsed_by_pyroute2_from_bytes():
    datagram = (encoded_link("join0", 5, RUNNING, "UP")
                + encoded_addr(5, "fe80::1", IFA_F_PERMANENT | IFA_F_TENTATIVE)
                + encoded_addr(5, "fd00::1", IFA_F_PERMANENT)
                + encoded_addr(5, "fe80::1", IFA_F_PERMANENT))
    t = LinkTable()
    changes = [t.apply(msg) for msg in MarshalRtnl().parse(datagram)]
    assert changes == [True, True, True, True]
    assert t.snapshot() == {"join0": LinkState("join0", 5, True, ("fe80::1",), ("fd00::1",))}


def test_random_bytes_never_raise_anything_but_malformed():
    """Whatever pyroute2 makes of garbage, the table either uses it or says it is malformed.
    (The watcher additionally catches anything, and re-reads the kernel's state.)"""
    rng = random.Random(8995)
    marshal = MarshalRtnl()
    valid = (encoded_link("join0", 5, RUNNING, "UP"), encoded_addr(5, "fe80::1", 0x80))
    for _ in range(3000):
        base = bytearray(rng.choice(valid))
        for _ in range(rng.randint(1, 8)):  # flip bytes after the length field
            base[rng.randrange(4, len(base))] = rng.randrange(256)
        if rng.random() < 0.3:
            base = base[:rng.randrange(16, len(base))]
            struct.pack_into("I", base, 0, len(base))
        t = table(link("join0", 5), addr(5, "fe80::1"))
        try:
            messages = list(marshal.parse(bytes(base)))
        except Exception:
            continue  # the watcher treats a parse failure as "re-read everything"
        for msg in messages:
            with contextlib.suppress(MalformedMessage):
                t.apply(msg)
            t.snapshot()
