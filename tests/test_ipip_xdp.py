"""The ipip XDP fast path's control: the ipip.xdp key, the decision (pure), the guard as the
fast path's dispatcher when it is off (a fake data plane), and the xdp_features reader
against real veths in a namespace of the test's own (a veth takes XDP-redirected frames
only while its peer has GRO on or a native XDP program)."""

from __future__ import annotations

import asyncio
import errno
import logging
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from joinproxyd.config import ConfigError, GuardSettings, parse
from joinproxyd.guard import Guard
from joinproxyd.kernel import KernelError, xdp_features
from joinproxyd.model import JoinInterface
from joinproxyd.relays.ipip_xdp import NO_FAMILY, Backbone, Decision, decide, probe
from lab import netns
from lab.netns import ifindex, thread_in_namespace

LOG = logging.getLogger("test.ipip_xdp")
REPO = Path(__file__).resolve().parent.parent
MINIMAL: dict[str, Any] = {"backbone": {"interface": "bb0"},
                           "join": [{"interfaces": ["join*"], "modes": ["ipip"]}]}
VETH_QUIET = 0b0100011  # basic, redirect, rx-sg: what a veth says with a peer that takes none
VETH_TAKES = 0b1100111  # ... and ndo-xmit, ndo-xmit-sg


def ipip(**keys: Any) -> dict[str, Any]:
    return {**MINIMAL, "ipip": {"backbone_prefix": "fd4a:5044::1:0/112", **keys}}


# -- the key ----------------------------------------------------------------------------------

def test_the_key_defaults_to_auto_and_takes_on_and_off() -> None:
    assert parse(ipip()).ipip.xdp == "auto"
    assert parse(ipip(xdp="on")).ipip.xdp == "on"
    assert parse(ipip(xdp="off")).ipip.xdp == "off"


@pytest.mark.parametrize(("value", "shown"), [
    ("yes", "'yes'"), ("Auto", "'Auto'"), ("", "''"), (True, "true"), (1, "1"), (["on"], "['on']"),
])
def test_anything_else_is_refused_naming_the_key(value: Any, shown: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(ipip(xdp=value))
    assert str(info.value) == f'ipip.xdp: must be "auto", "on" or "off" (got {shown})'
    assert info.value.key == "ipip.xdp"


# -- the decision ---------------------------------------------------------------------------------

def bb(features: int | None = VETH_TAKES, forwarding: str | None = "1",
       unknown: str | None = None) -> Backbone:
    return Backbone("bb0", features, unknown, forwarding)


def test_off_never_and_nothing_without_a_link_or_a_backbone() -> None:
    for setting in ("auto", "on", "off"):
        assert decide("off", True, bb()) == \
            Decision(False, "ipip.xdp is off: the tc program encapsulates")
        if setting != "off":
            assert decide(setting, False, bb()) == Decision(False, "ipip serves no link")
            assert decide(setting, True, None) == \
                Decision(False, "the backbone interface is not up")


def test_auto_needs_ndo_xmit_and_forwarding() -> None:
    assert decide("auto", True, bb()) == Decision(
        True, "ipip.xdp is auto, and bb0 takes XDP-redirected frames (ndo-xmit) with "
              "forwarding on")
    quiet = decide("auto", True, bb(VETH_QUIET))
    assert not quiet.active and not quiet.warn
    assert quiet.why.startswith("ipip.xdp is auto, and bb0 does not take XDP-redirected "
                                "frames (no ndo-xmit in its xdp_features")
    no_fwd = decide("auto", True, bb(forwarding="0"))
    assert not no_fwd.active
    assert "net.ipv6.conf.bb0.forwarding is 0: bpf_fib_lookup finds the XDP program no next " \
           "hop" in no_fwd.why
    assert "forwarding is unreadable" in decide("auto", True, bb(forwarding=None)).why


def test_auto_is_off_when_the_kernel_cannot_tell() -> None:
    old = decide("auto", True, bb(None, unknown=NO_FAMILY))
    assert old == Decision(False, "ipip.xdp is auto, and whether bb0 takes XDP-redirected "
                                  f"frames is not known: {NO_FAMILY}")
    assert "ENODEV" in decide("auto", True, bb(None, unknown="ifindex 9: ENODEV")).why


def test_on_obeys_and_warns_about_what_the_kernel_says() -> None:
    assert decide("on", True, bb()) == Decision(True, "ipip.xdp is on")
    both = decide("on", True, bb(VETH_QUIET, forwarding="0"))
    assert both.active and both.warn
    assert "bb0 does not take XDP-redirected frames" in both.why
    assert "frames from a link whose guard runs in native XDP are dropped" in both.why
    assert "net.ipv6.conf.bb0.forwarding is 0" in both.why
    unknown = decide("on", True, bb(None, unknown=NO_FAMILY))
    assert unknown.active and unknown.warn and NO_FAMILY in unknown.why


def test_the_backbone_as_status_names_the_flags() -> None:
    assert bb(VETH_TAKES).as_status() == {
        "name": "bb0", "forwarding": "1", "unknown": None,
        "xdp_features": ["basic", "redirect", "ndo-xmit", "rx-sg", "ndo-xmit-sg"]}
    assert bb(None, unknown=NO_FAMILY).as_status()["xdp_features"] is None


# -- the guard as the dispatcher ----------------------------------------------------------------

class FakeBpf:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def set_guard(self, rate: int, burst: int, ports: Any, *syn: int) -> None:
        self.calls.append(("set_guard", rate, burst, list(ports)))

    def attach_guard(self, index: int) -> str:
        self.calls.append(("attach", index))
        return "native"

    def detach_guard(self, index: int) -> None:
        self.calls.append(("detach", index))


class FakeDatapath:
    def __init__(self) -> None:
        self.bpf = FakeBpf()
        self.opened = False

    async def get(self) -> FakeBpf:
        self.opened = True
        return self.bpf


def link(name: str, index: int, modes: tuple[str, ...] = ("ipip",)) -> JoinInterface:
    return JoinInterface(name, index, "fe80::1", (), modes, 8443, ("fe80::1234",))


def test_with_the_guard_off_its_program_limits_nothing_on_the_fast_paths_links() -> None:
    dp = FakeDatapath()
    guard = Guard(dp, LOG)  # type: ignore[arg-type]
    join0, join1, lan0 = link("join0", 3), link("join1", 4), link("lan0", 5, ("circuit",))
    off, on = GuardSettings(enabled=False), GuardSettings(enabled=True, rate=20, burst=40)

    async def run() -> None:
        await guard.reconcile(off, [join0, join1, lan0], [8443], dispatch=[join0, join1])
        assert dp.bpf.calls == [("set_guard", 0, 1, []), ("attach", 3), ("attach", 4)]
        status = guard.status()
        assert guard.dispatcher and status["enabled"] is False
        assert status["interfaces"] == {"join0": "native", "join1": "native"}
        assert status["ports"] == []
        dp.bpf.calls.clear()
        # turned on by a reload: the real settings, and every link
        await guard.reconcile(on, [join0, join1, lan0], [8443], dispatch=[join0, join1])
        assert dp.bpf.calls == [("set_guard", 20, 40, [8443]), ("attach", 5)]
        assert not guard.dispatcher
        dp.bpf.calls.clear()
        # off again, and the fast path off too: nothing stays
        await guard.reconcile(off, [join0, join1, lan0], [8443])
        assert sorted(dp.bpf.calls) == [("detach", 3), ("detach", 4), ("detach", 5)]
        assert guard.status()["interfaces"] == {} and not guard.dispatcher

    asyncio.run(run())


def test_with_the_guard_off_and_no_fast_path_no_bpf_is_opened() -> None:
    dp = FakeDatapath()
    guard = Guard(dp, LOG)  # type: ignore[arg-type]
    asyncio.run(guard.reconcile(GuardSettings(enabled=False), [link("join0", 3)], [8443]))
    assert not dp.opened and dp.bpf.calls == []


# -- xdp_features against real veths -------------------------------------------------------

def sh(*argv: str) -> str:
    return netns.run(argv)


@pytest.fixture
def veth(as_root: None) -> Iterator[str]:
    """A namespace with the veth pair bb0 <-> peer, both up, GRO off on both."""
    ns = f"jpxf{secrets.token_hex(4)}"
    netns.add_namespace(ns)
    try:
        netns.add_veth(ns, "bb0", ns, "peer")
        for dev in ("bb0", "peer"):
            netns.link_up(ns, dev)
            sh("ip", "netns", "exec", ns, "ethtool", "-K", dev, "gro", "off")
        yield ns
    finally:
        netns.delete_namespace(ns)


def read(ns: str, dev: str = "bb0", **kwargs: Any) -> int | None:
    index = ifindex(ns, dev)
    with thread_in_namespace(ns):
        return asyncio.run(xdp_features.read(index, **kwargs))


def takes(ns: str) -> bool:
    features = read(ns)
    assert features is not None and features & xdp_features.XDP_ACT["redirect"]
    return bool(features & xdp_features.NDO_XMIT)


@pytest.mark.netns
def test_a_veth_takes_redirected_frames_only_while_its_peer_has_gro_or_native_xdp(
        veth: str) -> None:
    ns, obj = veth, str(REPO / "ebpf" / "bare_redirect.bpf.o")
    assert not takes(ns), "peer without XDP and without GRO"
    sh("ip", "netns", "exec", ns, "ethtool", "-K", "peer", "gro", "on")
    assert takes(ns), "peer with GRO"
    sh("ip", "netns", "exec", ns, "ethtool", "-K", "peer", "gro", "off")
    assert not takes(ns)
    sh("ip", "-n", ns, "link", "set", "peer", "xdpgeneric", "obj", obj, "sec", "xdp")
    assert not takes(ns), "a generic XDP program gives the peer no NAPI to take frames with"
    sh("ip", "-n", ns, "link", "set", "peer", "xdpgeneric", "off")
    sh("ip", "-n", ns, "link", "set", "peer", "xdpdrv", "obj", obj, "sec", "xdp")
    assert takes(ns), "peer with a native XDP program"
    sh("ip", "-n", ns, "link", "set", "peer", "xdpdrv", "off")
    assert not takes(ns)


@pytest.mark.netns
def test_the_probe_reads_flags_and_forwarding(veth: str) -> None:
    ns = veth
    sh("ip", "netns", "exec", ns, "ethtool", "-K", "peer", "gro", "on")
    sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.bb0.forwarding=1")
    index = ifindex(ns, "bb0")
    with thread_in_namespace(ns):
        backbone = asyncio.run(probe("bb0", index))
    assert backbone.takes_redirects and backbone.forwarding == "1" and backbone.unknown is None
    assert decide("auto", True, backbone).active
    with thread_in_namespace(ns):
        gone = asyncio.run(probe("nosuch0", 99999))
    assert gone.features is None and gone.forwarding is None
    assert gone.unknown == "ifindex 99999: read xdp-features: ENODEV (No such device)"
    assert not decide("auto", True, gone).active


@pytest.mark.netns
def test_no_device_is_an_error_and_no_family_is_none(veth: str) -> None:
    with thread_in_namespace(veth), pytest.raises(KernelError) as info:
        asyncio.run(xdp_features.read(99999))
    assert info.value.errno == errno.ENODEV
    # an old kernel (before 6.3) has no netdev family: stood in for by a name none has
    assert read(veth, family="jpnosuchfamily") is None
