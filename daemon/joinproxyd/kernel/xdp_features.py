"""What a network device can do with XDP, as the kernel reports it over generic netlink.

The ipip mode's XDP fast path (relays/ipip_xdp.py) redirects frames from a join link straight
to the backbone device. A native XDP redirect hands the frame to the target driver's
ndo_xdp_xmit; a device without one drops it, counted nowhere but a trace point. Whether the
backbone has one is in its xdp_features (Linux 6.3+, family "netdev"):

    NETDEV_CMD_DEV_GET {NETDEV_A_DEV_IFINDEX: u32} -> NETDEV_A_DEV_XDP_FEATURES: u64

The numbers are the kernel's UAPI (include/uapi/linux/netdev.h, generated from
Documentation/netlink/specs/netdev.yaml; Debian 12's linux-libc-dev 6.1 predates the file).
The flags can change while the device exists: a veth advertises NDO_XMIT only while its peer
can take XDP frames (an XDP program of its own in native mode, or GRO on), so a caller reads
them again whenever it decides.

A kernel without the family (before 6.3) answers ENOENT to the family lookup: read() returns
None and leaves the meaning to the caller. Through pyroute2's asyncio generic netlink socket,
on the caller's event loop (the reply is one message from the kernel, no thread needed).
"""

from __future__ import annotations

import asyncio
import errno
from typing import Any

from pyroute2.netlink import NLM_F_REQUEST, genlmsg
from pyroute2.netlink.generic import AsyncGenericNetlinkSocket

from . import KernelError, describe_errno

FAMILY = "netdev"
NETDEV_CMD_DEV_GET = 1
# enum netdev_xdp_act
XDP_ACT = {
    "basic": 1 << 0,  # XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX
    "redirect": 1 << 1,  # can XDP_REDIRECT frames it receives
    "ndo-xmit": 1 << 2,  # implements ndo_xdp_xmit: takes frames redirected to it
    "xsk-zerocopy": 1 << 3,
    "hw-offload": 1 << 4,
    "rx-sg": 1 << 5,
    "ndo-xmit-sg": 1 << 6,
}
NDO_XMIT = XDP_ACT["ndo-xmit"]
TIMEOUT = 2.0  # the kernel answers at once; this only bounds a wedged socket


class _NetdevMsg(genlmsg):
    prefix = "NETDEV_A_DEV_"
    nla_map = (
        ("NETDEV_A_DEV_UNSPEC", "none"),
        ("NETDEV_A_DEV_IFINDEX", "uint32"),
        ("NETDEV_A_DEV_PAD", "none"),
        ("NETDEV_A_DEV_XDP_FEATURES", "uint64"),
    )


class _Socket(AsyncGenericNetlinkSocket):
    # pyroute2 logs a missing family at error level on the root logger; here that is an
    # answer (an old kernel), said once by the caller.
    module_err_level = "debug"


class _NoFamily(Exception):
    pass


async def _query(ifindex: int, family: str) -> int:
    async with _Socket() as sock:
        try:
            await sock.bind(family, _NetdevMsg)
        except Exception as exc:
            if getattr(exc, "code", None) == errno.ENOENT:
                raise _NoFamily from None
            raise
        msg = _NetdevMsg()
        msg["cmd"] = NETDEV_CMD_DEV_GET
        msg["version"] = 1
        msg["attrs"] = [("NETDEV_A_DEV_IFINDEX", ifindex)]
        replies: list[Any] = [r async for r in await sock.nlm_request(
            msg, msg_type=sock.prid, msg_flags=NLM_F_REQUEST)]
    for reply in replies:
        features = reply.get_attr("NETDEV_A_DEV_XDP_FEATURES")
        if features is not None:
            return int(features)
    raise KernelError(f"ifindex {ifindex}: the kernel's answer has no xdp-features")


async def read(ifindex: int, *, family: str = FAMILY) -> int | None:
    """The device's NETDEV_XDP_ACT_* flags; None if the kernel has no netdev family.
    KernelError otherwise (ENODEV: no such device). ``family`` is for tests."""
    try:
        return await asyncio.wait_for(_query(ifindex, family), TIMEOUT)
    except _NoFamily:
        return None
    except KernelError:
        raise
    except TimeoutError:
        raise KernelError(f"ifindex {ifindex}: read xdp-features: no answer in {TIMEOUT:g} s",
                          errno=errno.ETIMEDOUT) from None
    except Exception as exc:
        code = getattr(exc, "code", None) or getattr(exc, "errno", None)
        if isinstance(code, int) and code > 0:
            raise KernelError(f"ifindex {ifindex}: read xdp-features: {describe_errno(code)}",
                              errno=code) from None
        raise KernelError(f"ifindex {ifindex}: read xdp-features: {exc}") from None


def names(features: int) -> list[str]:
    """The flags by their netlink spec names, for status and logs."""
    return [name for name, bit in XDP_ACT.items() if features & bit]
