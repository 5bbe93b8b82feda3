"""Links and IPv6 addresses as the kernel reports them, kept current over rtnetlink; and
the kernel's NAT66 flows (conntrack, over nfnetlink).

Why pyroute2's asyncio API (AsyncIPRoute) and not IPRoute in a thread: in 0.9.7 the async
classes are the core and IPRoute is a synchronous wrapper around them, so the async API is
the better-tested path. A socket bound to the link and IPv6-address multicast groups is read
by a task on the daemon's own event loop: no thread, no locks, no call_soon_threadsafe, and
on_change runs on the loop like every other control-plane callback.

How the picture is kept right:
- Subscribe first, then dump (on a second socket), then apply the queued events in order.
  An event older than the dump is harmless: the later events it raced with follow it, and
  every rtnetlink event carries the object's full state, so applying them converges.
- Two sockets: the monitor socket never sends a request, so no reply of ours can be mixed
  with broadcasts (notifications carry the sequence number of whoever caused them).
- Anything the watcher cannot trust (an undecodable datagram, a message missing its fields,
  a receive-buffer overflow: ENOBUFS) leads to a full re-dump, never to a dead watcher. A
  socket that failed (pyroute2 keeps such a socket failed for good) is replaced, with backoff.
- Link messages of family AF_BRIDGE are ignored: the bridge sends RTM_DELLINK with that family
  when a port leaves the bridge, and the port itself is still there.

LinkTable holds the state and does no I/O: tests feed it parsed messages.
"""

import asyncio
import contextlib
import errno
import ipaddress
import logging
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pyroute2 import AsyncIPRoute
from pyroute2.conntrack import AsyncConntrack, ConntrackEntry
from pyroute2.netlink.exceptions import NetlinkDumpInterrupted, NetlinkError
from pyroute2.netlink.rtnl import (
    RTM_DELADDR,
    RTM_DELLINK,
    RTM_NEWADDR,
    RTM_NEWLINK,
    RTMGRP_IPV6_IFADDR,
    RTMGRP_LINK,
)

from ..model import LinkState
from . import KernelError, describe_errno

# From the kernel's UAPI (linux/if.h, linux/if_addr.h); stable ABI.
IFF_UP = 0x1
IFF_LOWER_UP = 0x10000
IFA_F_DADFAILED = 0x08
IFA_F_TENTATIVE = 0x40
IPS_SRC_NAT = 0x10  # linux/netfilter/nf_conntrack_common.h
IPS_DST_NAT = 0x20
# TCP conntrack states in which a connection still carries data (nf_conntrack_tcp.h):
# SYN_SENT, SYN_RECV, ESTABLISHED, FIN_WAIT, CLOSE_WAIT, LAST_ACK.
TCP_OPEN_STATES = frozenset(range(1, 7))

COALESCE_SECONDS = 0.05  # bursts (a link coming up brings several messages) -> one on_change
BACKOFF_MIN = 0.1
BACKOFF_MAX = 5.0
DUMP_ATTEMPTS = 5  # a dump interrupted by concurrent changes (NLM_F_DUMP_INTR) is retried

_SITE_LOCAL = ipaddress.IPv6Network("fec0::/10")  # deprecated (RFC 3879): not routable


class MalformedMessage(ValueError):
    """An rtnetlink message without the fields its type must have."""


@dataclass
class _Link:
    name: str
    flags: int
    operstate: str

    @property
    def up(self) -> bool:
        # Administratively up *and* with carrier. Some drivers report operstate UNKNOWN
        # (no operstate support: lo, tun) and signal carrier only through IFF_LOWER_UP.
        return bool(self.flags & IFF_UP) and (self.operstate == "UP"
                                              or bool(self.flags & IFF_LOWER_UP))


def _require(msg: Mapping[str, Any], key: str) -> Any:
    value = msg.get(key)
    if value is None:
        raise MalformedMessage(f"no {key}")
    return value


def _index(msg: Mapping[str, Any]) -> int:
    index = _require(msg, "index")
    if not isinstance(index, int) or index <= 0:
        raise MalformedMessage(f"bad interface index {index!r}")
    return index


def _message_type(msg: Mapping[str, Any]) -> int | None:
    header = msg.get("header")
    if not isinstance(header, Mapping):
        raise MalformedMessage("no header")
    kind = header.get("type")
    return kind if isinstance(kind, int) else None


class LinkTable:
    """The links and IPv6 addresses of one network namespace, fed rtnetlink messages."""

    def __init__(self) -> None:
        self.links: dict[int, _Link] = {}
        self.addresses: dict[int, dict[str, int]] = {}  # ifindex -> address -> IFA flags

    def apply(self, msg: Mapping[str, Any]) -> bool:
        """Apply one parsed message (a pyroute2 nlmsg or a dict shaped like one).

        Returns True if the state changed; raises MalformedMessage if the message lacks what
        its type must carry. Message types this table does not track are ignored.
        """
        kind = _message_type(msg)
        if kind in (RTM_NEWLINK, RTM_DELLINK):
            return self._apply_link(kind, msg)
        if kind in (RTM_NEWADDR, RTM_DELADDR):
            return self._apply_address(kind, msg)
        return False

    def _apply_link(self, kind: int, msg: Mapping[str, Any]) -> bool:
        if msg.get("family", socket.AF_UNSPEC) != socket.AF_UNSPEC:
            return False  # AF_BRIDGE port notifications: not about the link's existence
        index = _index(msg)
        if kind == RTM_DELLINK:
            gone = self.links.pop(index, None)
            addresses = self.addresses.pop(index, None)
            return gone is not None or bool(addresses)
        name = msg.get("ifname")
        old = self.links.get(index)
        if name is None and old is not None:
            name = old.name
        if not isinstance(name, str) or not name:
            raise MalformedMessage(f"link {index} without a usable name ({name!r})")
        flags = _require(msg, "flags")
        if not isinstance(flags, int):
            raise MalformedMessage(f"link {index} with flags {flags!r}")
        new = _Link(name=name, flags=flags, operstate=str(msg.get("operstate") or "UNKNOWN"))
        self.links[index] = new
        return new != old

    def _apply_address(self, kind: int, msg: Mapping[str, Any]) -> bool:
        if msg.get("family") != socket.AF_INET6:
            return False
        index = _index(msg)
        # IFA_LOCAL is present (and is ours) only on point-to-point links with a peer.
        raw = msg.get("IFA_LOCAL") or _require(msg, "IFA_ADDRESS")
        try:
            address = str(ipaddress.IPv6Address(raw))
        except (ValueError, TypeError):
            raise MalformedMessage(f"not an IPv6 address: {raw!r}") from None
        on_link = self.addresses.setdefault(index, {})
        if kind == RTM_DELADDR:
            changed = on_link.pop(address, None) is not None
        else:
            # IFA_FLAGS (32 bits) supersedes the 8-bit ifa_flags when present.
            flags = msg.get("IFA_FLAGS")
            flags = flags if flags is not None else _require(msg, "flags")
            if not isinstance(flags, int):
                raise MalformedMessage(f"address {address} with flags {flags!r}")
            changed = on_link.get(address) != flags
            on_link[address] = flags
        if not on_link:
            del self.addresses[index]
        return changed

    def snapshot(self) -> dict[str, LinkState]:
        result: dict[str, LinkState] = {}
        for index, link in sorted(self.links.items()):
            link_local: list[ipaddress.IPv6Address] = []
            routable: list[ipaddress.IPv6Address] = []
            for text, flags in self.addresses.get(index, {}).items():
                if flags & (IFA_F_TENTATIVE | IFA_F_DADFAILED):
                    continue  # not usable: DAD has not finished, or found a duplicate
                ip = ipaddress.IPv6Address(text)
                if ip.is_link_local:
                    link_local.append(ip)
                elif not (ip.is_loopback or ip.is_multicast or ip.is_unspecified
                          or ip in _SITE_LOCAL):
                    routable.append(ip)  # ULA or global
            result[link.name] = LinkState(
                name=link.name, index=index, up=link.up,
                link_local=tuple(str(ip) for ip in sorted(link_local)),
                routable=tuple(str(ip) for ip in sorted(routable)))
        return result


def _errno_of(exc: BaseException) -> int | None:
    """The errno behind a pyroute2 failure: NetlinkError.code, or OSError.errno."""
    code = exc.code if isinstance(exc, NetlinkError) else getattr(exc, "errno", None)
    return code if isinstance(code, int) and code > 0 else None


def _explain(exc: BaseException) -> str:
    code = _errno_of(exc)
    return describe_errno(code) if code is not None else f"{type(exc).__name__}: {exc}"


class InterfaceWatcher:
    """Keeps a name -> LinkState picture of the namespace and reports its changes.

    on_change(snapshot) runs on the event loop after the picture changed, at most once per
    COALESCE_SECONDS; it is not called for the snapshot start() returns. ``netns`` makes the
    watcher look at another network namespace (tests); the daemon watches its own.
    """

    def __init__(self, on_change: Callable[[dict[str, LinkState]], None],
                 log: logging.Logger, *, netns: str | None = None) -> None:
        self.on_change = on_change
        self.log = log
        self._socket_args: dict[str, Any] = {"netns": netns, "flags": 0} if netns else {}
        self.table = LinkTable()
        self._monitor: AsyncIPRoute | None = None
        self._task: asyncio.Task[None] | None = None
        self._flush_handle: asyncio.TimerHandle | None = None
        self._cached: dict[str, LinkState] | None = None
        self._delivered: dict[str, LinkState] = {}
        self._need_resync = False

    # -- life cycle ---------------------------------------------------------------------------
    async def start(self) -> dict[str, LinkState]:
        """Subscribe, dump links and addresses, start monitoring; return the first picture."""
        if self._task is not None:
            raise RuntimeError("InterfaceWatcher already started")
        try:
            await self._open()
            await self._resync()
        except Exception as exc:
            self._close_monitor()
            if isinstance(exc, KernelError):
                raise
            raise KernelError(f"cannot watch links over rtnetlink: {_explain(exc)}",
                              _errno_of(exc)) from exc
        self._delivered = self.snapshot()
        self._task = asyncio.create_task(self._run(), name="interface-watcher")
        return self._delivered

    async def stop(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._close_monitor()

    def snapshot(self) -> dict[str, LinkState]:
        if self._cached is None:
            self._cached = self.table.snapshot()
        return dict(self._cached)

    # -- sockets ------------------------------------------------------------------------------
    async def _open(self) -> None:
        monitor = AsyncIPRoute(groups=RTMGRP_LINK | RTMGRP_IPV6_IFADDR, **self._socket_args)
        try:
            await monitor.bind()
        except BaseException:
            monitor.close()
            raise
        self._monitor = monitor

    def _close_monitor(self) -> None:
        monitor, self._monitor = self._monitor, None
        if monitor is not None:
            with contextlib.suppress(Exception):  # closing a failed socket may fail again
                monitor.close()

    async def _dump(self) -> list[Any]:
        for attempt in range(DUMP_ATTEMPTS):
            try:
                async with AsyncIPRoute(**self._socket_args) as ipr:
                    links = [msg async for msg in await ipr.link("dump")]
                    addresses = [msg async for msg in await ipr.addr("dump",
                                                                     family=socket.AF_INET6)]
                return links + addresses
            except NetlinkDumpInterrupted:
                self.log.debug("link dump interrupted by a change (attempt %d)", attempt + 1)
        raise KernelError("link dump interrupted by changes too often")

    async def _resync(self) -> None:
        """Rebuild the table from a full dump (events queued meanwhile are applied after)."""
        table = LinkTable()
        for msg in await self._dump():
            try:
                table.apply(msg)
            except MalformedMessage as exc:
                self.log.warning("ignoring a malformed rtnetlink dump entry: %s", exc)
        self.table = table
        self._changed()

    # -- monitoring ---------------------------------------------------------------------------
    async def _run(self) -> None:
        backoff = BACKOFF_MIN
        undecodable = 0
        while True:
            try:
                if self._monitor is None:
                    await self._open()
                    self._need_resync = True
                if self._need_resync:
                    self._need_resync = False
                    await self._resync()
                assert self._monitor is not None
                received = 0
                # One get() yields the messages of one datagram.
                async for msg in self._monitor.get():
                    received += 1
                    self._handle(msg)
                if received == 0:
                    # Only a closed socket yields nothing; treat it as a failure.
                    raise ConnectionResetError("rtnetlink monitor socket closed")
                backoff = BACKOFF_MIN
                undecodable = 0
            except asyncio.CancelledError:
                raise
            except (OSError, NetlinkError) as exc:
                # The socket failed (pyroute2 keeps it failed): replace it.
                code = _errno_of(exc)
                if code == errno.ENOBUFS:  # events came faster than we read them
                    self.log.info("rtnetlink receive buffer overflowed; re-reading links")
                else:
                    self.log.warning("rtnetlink monitor failed (%s); reopening in %.1f s",
                                     _explain(exc), backoff)
                self._close_monitor()
                self._need_resync = True
                await asyncio.sleep(BACKOFF_MIN if code == errno.ENOBUFS else backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
            except Exception as exc:
                # A datagram pyroute2 could not parse (NetlinkDecodeError, or struct.error
                # for a truncated one). The socket is fine but the rest of that datagram is
                # lost, so re-read everything. Should it keep happening, start afresh.
                undecodable += 1
                self.log.warning("undecodable rtnetlink message (%s: %s); re-reading links",
                                 type(exc).__name__, exc)
                self._need_resync = True
                if undecodable >= 3:
                    self._close_monitor()
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, BACKOFF_MAX)

    def _handle(self, msg: Any) -> None:
        try:
            changed = self.table.apply(msg)
        except Exception as exc:  # malformed or surprising: never let it end the watcher
            self.log.warning("ignoring a malformed rtnetlink message (%s); re-reading links",
                             exc)
            self._need_resync = True
            return
        if changed:
            self._changed()

    def _changed(self) -> None:
        self._cached = None
        if self._flush_handle is None and self._task is not None:
            loop = asyncio.get_running_loop()
            self._flush_handle = loop.call_later(COALESCE_SECONDS, self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        current = self.snapshot()
        if current == self._delivered:
            return  # changed and changed back within the window
        self._delivered = current
        try:
            self.on_change(dict(current))
        except Exception:
            self.log.exception("link change handler failed")



# -- NAT flows (conntrack) ---------------------------------------------------------------------

@dataclass(frozen=True)
class NatFlow:
    """One NATed IPv6 conntrack entry (destination NAT, source NAT or both), as seen from
    the pledge's side. A flow the pledge addressed to the registrar itself is only
    source-NATed: its destination and target are the same."""

    protocol: int  # IPPROTO_TCP, IPPROTO_UDP, ...
    source: str  # the pledge
    source_port: int
    destination: str  # what the pledge connected to (the proxy's address)
    destination_port: int
    target: str  # where the kernel sends it (the registrar)
    target_port: int
    tcp_state: int | None  # nf_conntrack TCP state; None for other protocols

    @property
    def open(self) -> bool:
        """Still carrying a connection. Only TCP can tell: a UDP entry merely waits for its
        timeout, so it never counts as open."""
        return self.tcp_state in TCP_OPEN_STATES


# ConntrackEntry's constructor arguments, in order ("" is the message's family field).
_ENTRY_ATTRS = ("", "CTA_TUPLE_ORIG", "CTA_TUPLE_REPLY", "CTA_STATUS", "CTA_TIMEOUT",
                "CTA_PROTOINFO", "CTA_MARK", "CTA_ID", "CTA_USE", "CTA_ZONE")


async def nat_flows(*, netns: str | None = None) -> list[NatFlow]:
    """Every IPv6 conntrack entry with destination or source NAT, in this (or the named)
    namespace."""
    args: dict[str, Any] = {"netns": netns, "flags": 0} if netns else {}
    flows = []
    nat = IPS_DST_NAT | IPS_SRC_NAT
    try:
        async with AsyncConntrack(nfgen_family=socket.AF_INET6, **args) as ct:
            messages = []
            try:
                # The kernel filters by status since 5.15 (all bits of the mask must match,
                # so one dump per bit); older kernels answer EINVAL.
                for bit in (IPS_DST_NAT, IPS_SRC_NAT):
                    messages += [m async for m in await ct.dump(status=bit, status_mask=bit)]
            except NetlinkError as exc:
                if exc.code != errno.EINVAL:
                    raise
                messages = [m async for m in await ct.dump()]
    except (OSError, NetlinkError) as exc:
        raise KernelError(f"cannot read conntrack: {_explain(exc)}", _errno_of(exc)) from exc
    seen: set[Any] = set()
    for msg in messages:
        try:
            entry = ConntrackEntry(*(msg.get_attr(name) if name else msg["nfgen_family"]
                                     for name in _ENTRY_ATTRS))
        except Exception:  # an entry pyroute2 cannot make sense of is not one of ours
            continue
        if not (entry.status or 0) & nat:
            continue
        orig, reply = entry.tuple_orig, entry.tuple_reply
        key = (orig.proto, orig.saddr, orig.sport, orig.daddr, orig.dport)
        if key in seen:  # both NAT bits: in both dumps
            continue
        seen.add(key)
        state = entry.protoinfo.state if entry.protoinfo is not None else None
        flows.append(NatFlow(orig.proto, orig.saddr, orig.sport or 0, orig.daddr,
                             orig.dport or 0, reply.saddr, reply.sport or 0, state))
    return flows
