"""When the ipip mode's XDP fast path runs (ipip.xdp), decided from what the kernel says.

jp_xdp_join (ebpf/ipip.bpf.c) is the XDP twin of the tc encapsulation: it wraps a pledge's
packet and redirects it to the backbone before the kernel has built an skb for it. A packet
it cannot finish (no next hop known yet, too big for the backbone) goes on to jp_tc_join, so
turning it on never loses the slow path. It runs only when the join-port guard tail-calls it
(jp_guard's one program-array slot, written by kernel/bpf.py set_ipip_xdp): a link's XDP hook
holds one program, and the guard's verdict comes first.

    ipip.xdp = "off"   never
               "on"    whenever ipip serves a link and the backbone is up
               "auto"  (the default) the same, but only when the backbone can take the frames:
                       - its xdp_features have NDO_XMIT (kernel/xdp_features.py): a native XDP
                         redirect to a device without ndo_xdp_xmit drops the frame, silently.
                         A veth advertises it only while its peer has an XDP program or GRO on.
                       - net.ipv6.conf.<backbone>.forwarding is 1: bpf_fib_lookup, which gives
                         the XDP program its next hop, answers only for a forwarding device;
                         without it every packet would be handed on to tc, for nothing.
                       A kernel without xdp_features (before 6.3) cannot tell: auto is off.

"on" obeys even against what the kernel says, with a warning: a join link whose XDP runs in
generic mode (a bridge, say) redirects through the stack, to any device, which a proxy's
operator may know and the flags cannot say.

With the guard turned off ([guard] enabled = false) the fast path still needs jp_guard on the
ipip links, as the dispatcher: guard.py attaches it there, told rate 0, which limits nothing
(the program counts "pass" and tail-calls). The daemon hands it those links (xdp_dispatch).

Decided again at every reconcile, as the backbone, its flags or its forwarding knob may have
changed since. Those two change with no event the daemon reconciles on, so with "auto" the
daemon also probes the backbone every XDP_RECHECK_SECONDS (daemon.py) and reconciles when the
decision would change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..kernel import KernelError, ndp, xdp_features


@dataclass(frozen=True)
class Backbone:
    """What the kernel says about the backbone device, for decide()."""

    name: str
    features: int | None  # NETDEV_XDP_ACT_* flags; None: not known, `unknown` says why
    unknown: str | None = None
    forwarding: str | None = None  # net.ipv6.conf.<name>.forwarding; None: unreadable

    @property
    def takes_redirects(self) -> bool:
        return self.features is not None and bool(self.features & xdp_features.NDO_XMIT)

    def as_status(self) -> dict[str, Any]:
        return {"name": self.name, "forwarding": self.forwarding,
                "xdp_features": None if self.features is None
                else xdp_features.names(self.features),
                "unknown": self.unknown}


@dataclass(frozen=True)
class Decision:
    active: bool
    why: str
    warn: bool = False  # "on" against what the kernel says


def decide(setting: str, serving: bool, backbone: Backbone | None) -> Decision:
    """Pure: the fast path on or off, and why (see the module docstring). `serving`: ipip
    serves a link; `backbone`: None when it is not up."""
    if setting == "off":
        return Decision(False, "ipip.xdp is off: the tc program encapsulates")
    if not serving:
        return Decision(False, "ipip serves no link")
    if backbone is None:
        return Decision(False, "the backbone interface is not up")
    name = backbone.name
    no_redirects = (f"{name} does not take XDP-redirected frames (no ndo-xmit in its "
                    "xdp_features; a veth has it only while its peer has an XDP program or "
                    "GRO on)")
    unknown = f"whether {name} takes XDP-redirected frames is not known: {backbone.unknown}"
    no_forwarding = (f"net.ipv6.conf.{name}.forwarding is {backbone.forwarding or 'unreadable'}"
                     ": bpf_fib_lookup finds the XDP program no next hop without it, so every "
                     "packet would go on to tc")
    if setting == "on":
        caveats = []
        if backbone.features is None:
            caveats.append(unknown)
        elif not backbone.takes_redirects:
            caveats.append(no_redirects + ": frames from a link whose guard runs in native "
                           "XDP are dropped")
        if backbone.forwarding != "1":
            caveats.append(no_forwarding)
        return Decision(True, "; ".join(["ipip.xdp is on", *caveats]), warn=bool(caveats))
    if backbone.features is None:
        return Decision(False, f"ipip.xdp is auto, and {unknown}")
    if not backbone.takes_redirects:
        return Decision(False, f"ipip.xdp is auto, and {no_redirects}")
    if backbone.forwarding != "1":
        return Decision(False, f"ipip.xdp is auto, and {no_forwarding}")
    return Decision(True, f"ipip.xdp is auto, and {name} takes XDP-redirected frames "
                          "(ndo-xmit) with forwarding on")


NO_FAMILY = ("the kernel has no generic netlink family netdev (xdp_features, Linux 6.3 and "
             "later)")


async def probe(name: str, index: int) -> Backbone:
    """Read the backbone's flags and forwarding knob; failures become `unknown`/None."""
    features: int | None = None
    unknown: str | None = None
    try:
        features = await xdp_features.read(index)
        if features is None:
            unknown = NO_FAMILY
    except KernelError as exc:
        unknown = str(exc)
    try:
        forwarding: str | None = ndp.forwarding(name)
    except (KernelError, ValueError):
        forwarding = None
    return Backbone(name, features, unknown, forwarding)
