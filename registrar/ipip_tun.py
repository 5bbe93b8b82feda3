"""A TUN device per IPIP proxy: the virtual interface that makes its join link a scope of its
own on the registrar (each proxy's fe80::/10 is a different link).

Set up synchronously (under a millisecond typically, a few at worst, measured) inside the
packet handler that saw the proxy's first packet, so that packet is delivered at once and there
is no half-configured state to track: TUNSETIFF, SIOCSIFMTU and SIOCSIFFLAGS ioctls, then one
rtnetlink RTM_NEWADDR with IFA_F_NODAD, written by hand (a few dozen bytes) rather than through
pyroute2, whose API is asynchronous, and a wait for the kernel's RTM_NEWROUTE of the address's
local route. Both matter, measured here: an address added by ioctl (SIOCSIFADDR) stays
tentative until the kernel's DAD worker runs, even on an IFF_NOARP device where DAD is then
skipped, and even a NODAD address gets its local route from a work queue; in either window the
first SYN, written right after, was dropped (5 times in 20, 4 in 50).

The device is not persistent: it disappears when its file descriptor is closed, including when
the registrar is killed, so nothing is left behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import struct
import time
from ipaddress import IPv6Address

log = logging.getLogger(__name__)

TUN_PATH = "/dev/net/tun"
TUNSETIFF = 0x400454CA  # _IOW('T', 202, int)
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000  # no 4-byte packet-information prefix: reads and writes are bare packets
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCSIFMTU = 0x8922
IFF_UP = 0x0001
# rtnetlink (linux/netlink.h, linux/rtnetlink.h, linux/if_addr.h)
RTM_NEWADDR = 20
RTM_NEWROUTE = 24
RTMGRP_IPV6_ROUTE = 0x400
RTN_LOCAL = 2
RTA_DST, RTA_OIF = 1, 4
NLMSG_ERROR = 2
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE = 0x1, 0x4, 0x200, 0x400
IFA_ADDRESS, IFA_LOCAL = 1, 2
IFA_F_NODAD, IFA_F_PERMANENT = 0x02, 0x80
_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
_RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, proto, scope, type
_SEQ = 1
MAX_PACKET = 65535 + 40  # an IPv6 header plus the largest non-jumbo payload

# Per-device IPv6 settings, written before the device goes up: no kernel-made link-local
# address (the device must hold only the announced one, which is the source of every reply)
# and no router solicitations (nothing on a proxy's join link routes for the registrar).
# disable_ipv6=0 because a host default of 1 would leave the device without IPv6 at all.
_SYSCTLS = (("disable_ipv6", "0"), ("addr_gen_mode", "1"), ("accept_ra", "0"),
            ("router_solicitations", "0"))


class TunDevice:
    """An up TUN device (IFF_TUN | IFF_NO_PI) holding one IPv6 address; non-blocking fd."""

    def __init__(self, fd: int, name: str, index: int) -> None:
        self.fd = fd
        self.name = name
        self.index = index

    @classmethod
    def create(cls, name: str, address: IPv6Address, *, prefixlen: int = 64,
               mtu: int = 1460) -> TunDevice:
        """Create, configure and bring up ``name``; OSError (device gone) on any failure."""
        fd = os.open(TUN_PATH, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            ifr = fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(),
                                                         IFF_TUN | IFF_NO_PI))
            actual = ifr[:16].split(b"\0", 1)[0].decode()
            for key, value in _SYSCTLS:
                _sysctl(actual, key, value)
            with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as ctl:
                fcntl.ioctl(ctl, SIOCSIFMTU, struct.pack("16si", actual.encode(), mtu))
                flags = struct.unpack_from(
                    "H", fcntl.ioctl(ctl, SIOCGIFFLAGS, struct.pack("16sH", actual.encode(), 0)),
                    16)[0]
                fcntl.ioctl(ctl, SIOCSIFFLAGS,
                            struct.pack("16sH", actual.encode(), flags | IFF_UP))
            index = socket.if_nametoindex(actual)
            add_address_nodad(index, address, prefixlen)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, actual, index)

    def read(self) -> bytes | None:
        """One packet, or None when none is waiting."""
        try:
            return os.read(self.fd, MAX_PACKET)
        except BlockingIOError:
            return None

    def write(self, packet: bytes) -> None:
        os.write(self.fd, packet)

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


def add_address_nodad(index: int, address: IPv6Address, prefixlen: int,
                      timeout: float = 1.0) -> None:
    """``ip -6 addr add ADDRESS/PREFIXLEN dev INDEX nodad``, then wait until the kernel's local
    route for the address exists: the kernel inserts it from a work queue after the address
    (even with NODAD), and until then packets to the address are not delivered (4 times in 50
    here, for up to 3 ms). Raises OSError with the kernel's errno if the address is refused."""
    attrs = b"".join(struct.pack("=HH", 4 + 16, kind) + address.packed
                     for kind in (IFA_LOCAL, IFA_ADDRESS))
    body = _IFADDRMSG.pack(socket.AF_INET6, prefixlen, IFA_F_NODAD | IFA_F_PERMANENT, 0,
                           index) + attrs
    flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
    request = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), RTM_NEWADDR, flags, _SEQ, 0) + body
    acked = routed = False
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as nl:
        nl.bind((0, RTMGRP_IPV6_ROUTE))  # before the request: no notification can be missed
        nl.settimeout(timeout)  # the kernel answers in microseconds; never hang the loop
        nl.sendto(request, (0, 0))
        deadline = time.monotonic() + timeout
        while not (acked and routed):
            try:
                data = nl.recv(65536)
            except OSError as exc:  # timeout, or ENOBUFS if routes churn: carry on unsure
                if not acked:
                    raise
                log.warning("no local route for %s on ifindex %d yet (%s): its first "
                            "packets may be lost", address, index, exc)
                return
            for kind, seq, payload in _netlink_messages(data):
                if kind == NLMSG_ERROR and seq == _SEQ:
                    (error,) = struct.unpack_from("=i", payload)
                    if error:
                        raise OSError(-error, f"adding {address}/{prefixlen}: "
                                              f"{os.strerror(-error)}")
                    acked = True
                elif kind == RTM_NEWROUTE and _is_local_route(payload, address, index):
                    routed = True
            nl.settimeout(max(0.001, deadline - time.monotonic()))


def _netlink_messages(data: bytes) -> list[tuple[int, int, bytes]]:
    """(type, seq, payload) of each message in a netlink datagram."""
    out = []
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, _flags, seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size:
            break
        out.append((kind, seq, data[offset + _NLMSGHDR.size:offset + length]))
        offset += (length + 3) & ~3  # NLMSG_ALIGN
    return out


def _is_local_route(payload: bytes, address: IPv6Address, index: int) -> bool:
    """Is this RTM_NEWROUTE the kernel's local route for ``address`` on ``index``?"""
    if len(payload) < _RTMSG.size:
        return False
    family, dst_len, _src, _tos, _table, _proto, _scope, kind, _flags = \
        _RTMSG.unpack_from(payload)
    if family != socket.AF_INET6 or dst_len != 128 or kind != RTN_LOCAL:
        return False
    attrs: dict[int, bytes] = {}
    offset = _RTMSG.size
    while offset + 4 <= len(payload):
        length, attr = struct.unpack_from("=HH", payload, offset)
        if length < 4:
            break
        attrs[attr] = payload[offset + 4:offset + length]
        offset += (length + 3) & ~3  # RTA_ALIGN
    oif = attrs.get(RTA_OIF, b"")
    return attrs.get(RTA_DST) == address.packed and len(oif) == 4 \
        and struct.unpack("=I", oif)[0] == index


def _sysctl(ifname: str, key: str, value: str) -> None:
    path = f"/proc/sys/net/ipv6/conf/{ifname}/{key}"
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as exc:
        # Best effort: the device still works without these; say so once per device.
        log.debug("cannot set %s=%s: %s", path, value, exc)
