"""What the ipip mode asks of IPv6 neighbour discovery, over rtnetlink (pyroute2).

    proxy entries   ``ip -6 neigh add proxy <registrar link-local> dev <join>``: the join link
                    answers neighbour solicitations for the registrar's announced address, so
                    pledges send to it (protocols.md §7: "MUST be answered by the JP with
                    proxy Neighbor Discovery")
    addresses       one /128 per IPIP join link on the backbone, added nodad: the outer
                    source of that link's packets and where the registrar's replies come back
    sysctls         on the join link: proxy_ndp=1 and forwarding=1, because the kernel
                    answers a solicitation for a proxy entry only on an interface with both
                    (ndisc_recv_ns). The per-interface forwarding knob does not make the
                    router forward anything (ip6_forward reads net.ipv6.conf.all.forwarding);
                    it makes the link behave as a router's for ND. neigh proxy_delay=0, so a
                    pledge's solicitation is answered at once rather than after a random
                    delay of up to 0.8 s.

Everything added here carries protocol PROTO (NDA_PROTOCOL, IFA_PROTO), so a later run tells
what a killed daemon left behind from what an operator configured, the way BPF programs are
told apart by name. An address or entry that exists without our mark is the operator's and is
never removed.

The calls block for a few milliseconds (pyroute2's synchronous IPRoute, which cannot run
inside a running event loop): the daemon calls them through ``asyncio.to_thread``.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from . import KernelError, describe_errno

PROTO = 0x4A  # "J": joinproxyd's mark on the proxy entries and addresses it adds
NTF_PROXY = 0x08
IFA_F_NODAD = 0x02
IFA_F_PERMANENT = 0x80
PROC_SYS = Path("/proc/sys")
T = TypeVar("T")


@contextmanager
def _iproute() -> Iterator[Any]:
    from pyroute2 import IPRoute  # imported lazily: only the ipip mode needs it

    ipr = IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


def _call(what: str, fn: Callable[[Any], T]) -> T:
    try:
        with _iproute() as ipr:
            return fn(ipr)
    except KernelError:
        raise
    except Exception as exc:
        code = getattr(exc, "code", None)
        if isinstance(code, int) and code > 0:
            raise KernelError(f"{what}: {describe_errno(code)}", errno=code) from None
        raise KernelError(f"{what}: {exc}") from None


def _plain(address: str) -> str:
    return ipaddress.IPv6Address(address.split("%")[0]).compressed


# -- proxy neighbour entries ------------------------------------------------------------------

def proxies() -> list[tuple[int, str]]:
    """(ifindex, address) of every IPv6 proxy entry this module added (by any run)."""

    def dump(ipr: Any) -> list[tuple[int, str]]:
        # NTF_PROXY in the request makes the kernel dump the proxy table (pneigh) only.
        found = ipr.neigh("dump", family=socket.AF_INET6, flags=NTF_PROXY, dump_filter=None)
        return sorted((int(n["ifindex"]), _plain(n.get_attr("NDA_DST"))) for n in found
                      if n["flags"] & NTF_PROXY and n.get_attr("NDA_PROTOCOL") == PROTO)

    return _call("list proxy neighbour entries", dump)


def add_proxy(ifindex: int, address: str) -> None:
    """Answer neighbour solicitations for address on the link (idempotent)."""
    _call(f"ifindex {ifindex}: add proxy neighbour {address}",
          lambda ipr: ipr.neigh("replace", dst=_plain(address), ifindex=ifindex,
                                family=socket.AF_INET6, flags=NTF_PROXY, NDA_PROTOCOL=PROTO))


def del_proxy(ifindex: int, address: str) -> bool:
    """Stop answering for address on the link; False if there was no such entry (or the
    link is gone, taking its entries with it)."""

    def delete(ipr: Any) -> bool:
        try:
            ipr.neigh("del", dst=_plain(address), ifindex=ifindex, family=socket.AF_INET6,
                      flags=NTF_PROXY)
        except Exception as exc:
            if getattr(exc, "code", None) in (errno.ENOENT, errno.ENODEV):
                return False
            raise
        return True

    return _call(f"ifindex {ifindex}: remove proxy neighbour {address}", delete)


# -- backbone addresses -----------------------------------------------------------------------

def addresses() -> list[tuple[int, str, bool]]:
    """(ifindex, address, ours) of every IPv6 address with a global or ULA scope."""

    def dump(ipr: Any) -> list[tuple[int, str, bool]]:
        return sorted((int(a["index"]), _plain(a.get_attr("IFA_ADDRESS")),
                       a.get_attr("IFA_PROTO") == PROTO)
                      for a in ipr.addr("dump", family=socket.AF_INET6) if a["scope"] == 0)

    return _call("list addresses", dump)


def add_address(ifindex: int, address: str) -> bool:
    """Add address/128 (nodad: it is ours by configuration, and a DAD wait would delay the
    link's first packets) with our mark. Returns whether this call added it; an address
    already there is left as it is (and is not ours to remove unless it carries our mark)."""

    def add(ipr: Any) -> bool:
        try:
            ipr.addr("add", index=ifindex, address=_plain(address), prefixlen=128,
                     IFA_FLAGS=IFA_F_NODAD | IFA_F_PERMANENT, IFA_PROTO=PROTO)
        except Exception as exc:
            if getattr(exc, "code", None) == errno.EEXIST:
                return False
            raise
        return True

    return _call(f"ifindex {ifindex}: add address {address}/128", add)


def del_address(ifindex: int, address: str) -> bool:
    """Remove address/128; False if it was not there (or the link is gone)."""

    def delete(ipr: Any) -> bool:
        try:
            ipr.addr("del", index=ifindex, address=_plain(address), prefixlen=128)
        except Exception as exc:
            if getattr(exc, "code", None) in (errno.EADDRNOTAVAIL, errno.ENOENT, errno.ENODEV):
                return False
            raise
        return True

    return _call(f"ifindex {ifindex}: remove address {address}/128", delete)


# -- per-link knobs ------------------------------------------------------------------------------

def _knob(ifname: str, knob: str, root: Path) -> Path:
    if not ifname or "/" in ifname or ifname in (".", ".."):
        raise ValueError(f"not an interface name: {ifname!r}")
    # The path, not the dotted key: an interface name may contain dots (VLANs, eth0.100).
    table = "neigh" if knob == "proxy_delay" else "conf"
    return root / "net" / "ipv6" / table / ifname / knob


def link_index(ifname: str) -> int | None:
    """The link's ifindex now, None if no link has that name (in the calling thread's
    namespace): tells the link whose knobs were recorded from a later one with its name."""
    try:
        return socket.if_nametoindex(ifname)
    except OSError:
        return None


PROXY_KNOBS = {"proxy_ndp": "1", "forwarding": "1", "proxy_delay": "0"}
# Only a matter of latency: a system that keeps /proc/sys/net/ipv6/neigh read-only (a
# hardened unit) still gets its answers, up to 0.8 s later.
OPTIONAL_KNOBS = frozenset({"proxy_delay"})


def read_knobs(ifname: str, root: Path = PROC_SYS) -> dict[str, str]:
    out = {}
    for knob in PROXY_KNOBS:
        path = _knob(ifname, knob, root)
        try:
            out[knob] = path.read_text().strip()
        except OSError as exc:
            if knob in OPTIONAL_KNOBS:
                continue
            raise KernelError(f"cannot read {path}: {describe_errno(exc.errno or 0)}",
                              exc.errno) from None
    return out


def forwarding(ifname: str, root: Path = PROC_SYS) -> str:
    """net.ipv6.conf.<ifname>.forwarding (the ipip XDP path needs it on the backbone)."""
    path = _knob(ifname, "forwarding", root)
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise KernelError(f"cannot read {path}: {describe_errno(exc.errno or 0)}",
                          exc.errno) from None


def write_knobs(ifname: str, values: dict[str, str], root: Path = PROC_SYS) -> list[str]:
    """Set the knobs; KernelError for a required one that cannot be set. Returns why each
    optional one that could not be set was not (for the caller to log once)."""
    skipped = []
    for knob, value in values.items():
        path = _knob(ifname, knob, root)
        try:
            path.write_text(f"{value}\n")
        except OSError as exc:
            why = f"cannot set {path}={value}: {describe_errno(exc.errno or 0)}"
            if knob in OPTIONAL_KNOBS:
                skipped.append(why)
                continue
            raise KernelError(why, exc.errno) from None
    return skipped
