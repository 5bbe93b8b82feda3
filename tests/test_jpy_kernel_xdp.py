"""The JPY relay's XDP wrap (jp_jpy_xdp_join, ebpf/jpy.bpf.c) through BPF_PROG_TEST_RUN: it
gives the same JPY message as the tc program for every content size, with the backbone's
MACs from bpf_fib_lookup, and hands everything it does not finish on to tc (XDP_PASS,
unchanged): a checksum that does not verify (a local sender's CHECKSUM_PARTIAL datagram, or a
corrupt one), no next hop, a closed window, too big. A fuzzed stream never yields a malformed
frame. Then the guard's tail call reaches it (jp_guard -> jp_guard_next).

A namespace of the test's own holds a veth pair: the join link (the test runs' ingress
device) and the backbone (IPv6 forwarding on, the registrar's MAC as a permanent neighbour).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import secrets
import subprocess
import sys
from collections.abc import Iterator
from ipaddress import IPv6Address
from pathlib import Path

import pytest
from scapy.layers.inet import UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from brski.jpy import BlockHeaderSealer, JpyMessage, PledgeEndpoint
from joinproxyd.kernel import KernelError, xdp_features
from joinproxyd.kernel.bpf import BpfDatapath
from joinproxyd.kernel.bpf_layout import JP_JPY_MAX_CONTENT, JpyCfgC, JpyLinkC, Program
from joinproxyd.relays.ipip_xdp import Backbone
from joinproxyd.relays.jpy_kernel import decide_xdp
from lab import netns
from lab.netns import thread_in_namespace

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, BPF)")

XDP_DROP, XDP_PASS, XDP_REDIRECT = 1, 2, 4
TC_ACT_REDIRECT = 7
JOIN_LL, PLEDGE = "fe80::aa", "fe80::1:2:3:4"
BACKBONE, REGISTRAR = "fd00:bb::1", "fd00:bb::100"
REG_MAC = "02:00:00:00:01:00"
JOIN_PORT, SRC_PORT, REG_PORT, PLEDGE_PORT = 5684, 40001, 7634, 50123
KEY = bytes(range(32))


class Lab:
    def __init__(self, ns: str, dp: BpfDatapath, join: int, backbone: int,
                 backbone_mac: str) -> None:
        self.ns, self.dp, self.join, self.backbone = ns, dp, join, backbone
        self.backbone_mac = backbone_mac

    def run(self, program: Program, frame: bytes) -> tuple[int, bytes]:
        with thread_in_namespace(self.ns):
            return self.dp.test_run(program, frame, ifindex=self.join)

    def configure(self, relay: int = 1, backbone: int | None = None) -> None:
        cfg = JpyCfgC(backbone_ifindex=self.backbone if backbone is None else backbone,
                      current_slot=0, src_port=SRC_PORT, registrar_port=REG_PORT,
                      max_content=JP_JPY_MAX_CONTENT)
        cfg.backbone_addr[:] = IPv6Address(BACKBONE).packed
        cfg.registrar_addr[:] = IPv6Address(REGISTRAR).packed
        link = JpyLinkC(port=JOIN_PORT, relay=relay)
        link.addr[:] = IPv6Address(JOIN_LL).packed
        self.dp.set_jpy(cfg, {self.join: link})


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    ns = f"jpyx{secrets.token_hex(3)}"
    netns.add_namespace(ns)
    try:
        netns.ip(ns, "link", "add", "j0", "type", "veth", "peer", "name", "b0")
        for dev in ("j0", "b0"):
            netns.link_up(ns, dev)
        netns.ip(ns, "addr", "add", f"{JOIN_LL}/64", "dev", "j0", "nodad")
        netns.ip(ns, "addr", "add", f"{BACKBONE}/64", "dev", "b0", "nodad")
        netns.ip(ns, "-6", "neigh", "replace", REGISTRAR, "lladdr", REG_MAC, "dev", "b0",
                 "nud", "permanent")
        netns.sysctl(ns, "net.ipv6.conf.b0.forwarding", "1")
        backbone_mac = next(link["address"] for link in netns.links(ns)
                            if link["ifname"] == "b0")
        dp = BpfDatapath.open(pin_dir=None, netns=ns, objects=("jpy", "guard"))
        try:
            lab = Lab(ns, dp, netns.ifindex(ns, "j0"), netns.ifindex(ns, "b0"), backbone_mac)
            lab.configure()
            dp.set_jpy_key(0, 9, KEY)
            yield lab
        finally:
            dp.close()
    finally:
        netns.delete_namespace(ns)


def pledge_frame(content: bytes, src: str = PLEDGE, chksum: int | None = None) -> bytes:
    udp = UDP(sport=PLEDGE_PORT, dport=JOIN_PORT)
    if chksum is not None:
        udp.chksum = chksum
    return bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
                 / IPv6(src=src, dst=JOIN_LL, hlim=255) / udp / Raw(content))


def checksum_ok(frame: bytes) -> bool:
    pkt = Ether(frame)
    got = pkt[UDP].chksum
    del pkt[UDP].chksum
    return Ether(bytes(pkt))[UDP].chksum == got


def test_wraps_every_content_size_as_the_tc_program_does(lab: Lab) -> None:
    sealer = BlockHeaderSealer(KEY, 9)
    rng = random.Random(2)
    before = lab.dp.jpy_stats()
    for size in range(JP_JPY_MAX_CONTENT + 1):
        frame = pledge_frame(rng.randbytes(size))
        rc, out = lab.run(Program.JPY_XDP_JOIN, frame)
        assert rc == XDP_REDIRECT, size
        tc_rc, tc_out = lab.run(Program.JPY_JOIN, frame)
        assert tc_rc == TC_ACT_REDIRECT, size
        # the same IPv6 packet as tc's (which leaves the MACs to bpf_redirect_neigh)
        assert out[14:] == tc_out[14:], size
        pkt = Ether(out)
        assert (pkt.dst, pkt.src) == (REG_MAC, lab.backbone_mac)
        assert checksum_ok(out), size
        assert pkt[IPv6].plen == len(out) - 54 and pkt[UDP].len == pkt[IPv6].plen
        msg = JpyMessage.decode(bytes(pkt[UDP].payload))
        assert msg.encode() == bytes(pkt[UDP].payload), "not the preferred CBOR encoding"
        assert msg.content == bytes(Ether(frame)[UDP].payload)
        assert sealer.open(msg.header) == PledgeEndpoint(IPv6Address(PLEDGE), PLEDGE_PORT,
                                                         lab.join)
    after = lab.dp.jpy_stats()
    n = JP_JPY_MAX_CONTENT + 1
    assert (after["up"] - before["up"], after["xdp_up"] - before["xdp_up"]) == (2 * n, n)


def test_what_it_does_not_finish_goes_on_to_tc_unchanged(lab: Lab) -> None:
    good = pledge_frame(b"hello")
    partial = bytearray(good)
    partial[60:62] = b"\x12\x34"  # a local sender's pseudo-header sum, or corruption
    cases = {
        "wrong checksum": bytes(partial),
        "too big": pledge_frame(bytes(JP_JPY_MAX_CONTENT + 1)),
        "not link-local": pledge_frame(b"x", src="fd00::5"),
        "other port": bytes(Ether() / IPv6(src=PLEDGE, dst=JOIN_LL) / UDP(dport=5683)),
        "truncated": good[:-1],
        "ICMPv6": bytes(Ether() / IPv6(src=PLEDGE, dst=JOIN_LL, nh=58) / Raw(bytes(8))),
    }
    before = lab.dp.jpy_stats()
    for what, frame in cases.items():
        assert lab.run(Program.JPY_XDP_JOIN, frame) == (XDP_PASS, frame), what
    assert lab.dp.jpy_stats() == before, "XDP counted what tc will count"
    # window closed, no next hop (a backbone without forwarding), no registrar
    for settings in ({"relay": 0}, {"backbone": 1}, {"backbone": 0}):
        lab.configure(**settings)
        try:
            assert lab.run(Program.JPY_XDP_JOIN, good) == (XDP_PASS, good), settings
        finally:
            lab.configure()


def test_a_wrong_checksum_stays_wrong_through_tc(lab: Lab) -> None:
    """What XDP passes on for its checksum, tc wraps with the checksum still wrong."""
    frame = bytearray(pledge_frame(b"corrupt"))
    frame[60] ^= 0x40
    rc, out = lab.run(Program.JPY_JOIN, bytes(frame))
    assert rc == TC_ACT_REDIRECT and not checksum_ok(out)


def mutate(rng: random.Random, frame: bytes) -> bytes:
    data = bytearray(frame)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(4)
        if op == 0 and data:
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif op == 1:
            del data[rng.randrange(14, len(data) + 1):]
        elif op == 2:
            data += rng.randbytes(rng.randint(1, 40))
        elif len(data) > 62:  # lengths, addresses and the checksum, where parsers go wrong
            pos = rng.choice([18, 19, 20, 24, 38, 52, 58, 59, 60, 61])
            data[pos] = rng.randrange(256)
    return bytes(data)


def test_fuzzed_stream_never_yields_a_malformed_frame(lab: Lab) -> None:
    rng = random.Random(int(os.environ.get("BRSKI_FUZZ_SEED", "19")))
    sealer = BlockHeaderSealer(KEY, 9)
    seeds = [pledge_frame(rng.randbytes(n)) for n in (0, 1, 23, 24, 255, 256, 300, 1194)]
    verdicts = {XDP_PASS: 0, XDP_REDIRECT: 0}
    for _ in range(int(os.environ.get("BRSKI_FUZZ_EXAMPLES", "3000"))):
        frame = mutate(rng, rng.choice(seeds))
        try:
            rc, out = lab.run(Program.JPY_XDP_JOIN, frame)
        except KernelError as exc:  # the test run refuses frames shorter than Ethernet
            assert exc.errno == errno.EINVAL and len(frame) < 14, frame.hex()
            continue
        assert rc in verdicts, frame.hex()
        verdicts[rc] += 1
        if rc == XDP_PASS:
            assert out == frame, "a passed frame was modified"
            continue
        pkt = Ether(out)
        assert pkt[IPv6].plen == len(out) - 54 and pkt[UDP].len == pkt[IPv6].plen, frame.hex()
        assert checksum_ok(out) and checksum_ok(frame), frame.hex()
        msg = JpyMessage.decode(bytes(pkt[UDP].payload))
        assert sealer.open(msg.header).ifindex == lab.join
        assert msg.content == bytes(Ether(frame)[UDP].payload)
    assert all(verdicts.values()), verdicts


def test_the_guard_tail_calls_it(lab: Lab) -> None:
    lab.dp.set_guard(rate_pps=1000, burst=1000, ports=[JOIN_PORT])
    lab.dp.set_jpy_xdp(True)
    try:
        rc, out = lab.run(Program.GUARD, pledge_frame(b"via the guard"))
        assert rc == XDP_REDIRECT
        assert JpyMessage.decode(bytes(Ether(out)[UDP].payload)).content == b"via the guard"
    finally:
        lab.dp.set_jpy_xdp(False)
    assert lab.run(Program.GUARD, pledge_frame(b"x"))[0] == XDP_PASS


RESTART_OBJECTS = ("ipip", "guard", "jpy")


@contextlib.contextmanager
def predecessor_with_xdp_wrap(tmp_path: Path) -> Iterator[Path]:
    """A bpffs of its own where a daemon left its programs pinned with the jpy XDP wrap in
    the guard's slot (stopped without detaching); its pin directory. Unpinned and unmounted
    afterwards."""
    mnt = tmp_path / "bpffs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "bpf", "bpf", str(mnt)], check=True)
    pin_dir = mnt / "joinproxyd"
    try:
        first = BpfDatapath.open(pin_dir=pin_dir, objects=RESTART_OBJECTS)
        assert first.set_jpy_xdp(True)
        first.close(detach=False)
        yield pin_dir
    finally:
        with contextlib.suppress(KernelError):
            BpfDatapath.open(pin_dir=pin_dir, objects=RESTART_OBJECTS).close(unpin=True)
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def guard_slot(pin_dir: Path) -> list[int]:
    """The program ids in the pinned jp_guard_next, as bpftool reads them."""
    slot = json.loads(subprocess.run(
        ["bpftool", "-j", "map", "dump", "pinned", str(pin_dir / "jp_guard_next")],
        check=True, capture_output=True, text=True).stdout)
    return [int.from_bytes(bytes(int(b, 16) for b in entry["value"]), "little")
            for entry in slot]


def test_a_restart_hands_the_guards_slot_to_the_new_xdp_wrap(tmp_path: Path) -> None:
    """A pinned jp_guard_next that held a killed daemon's jp_jpy_xdp_join points at the next
    start's own (not at ipip's fast path, which a jpy-only proxy would never turn off)."""
    with (predecessor_with_xdp_wrap(tmp_path) as pin_dir,
          BpfDatapath.open(pin_dir=pin_dir, objects=RESTART_OBJECTS) as second):
        assert second.jpy_xdp_runs and not second.status()["ipip_xdp"]
        assert guard_slot(pin_dir) == [second.prog_id(Program.JPY_XDP_JOIN)]
        # ipip's fast path, turned on, takes the slot first; off again, jpy's is back
        second.set_ipip_xdp(True)
        assert not second.jpy_xdp_runs and second.status()["jpy_xdp"] is False
        second.set_ipip_xdp(False)
        assert second.jpy_xdp_runs


RESTART_UNPRIVILEGED = """
import json, sys
from pathlib import Path
from joinproxyd.kernel.bpf import BpfDatapath
from joinproxyd.kernel.bpf_layout import Program
from joinproxyd.kernel.libbpf import prog_name_by_id
dp = BpfDatapath.open(pin_dir=Path(sys.argv[1]), objects=("ipip", "guard", "jpy"))
mine = dp.prog_id(Program.JPY_XDP_JOIN)
print(json.dumps({"jpy_xdp": dp.jpy_xdp_runs, "ipip_xdp": dp.status()["ipip_xdp"],
                  "jpy_prog": mine, "kernel_names_it": prog_name_by_id(mine)}))
dp.close(detach=False)
"""


def test_a_restart_without_cap_sys_admin_keeps_the_xdp_wrap(tmp_path: Path) -> None:
    """The unit grants CAP_BPF, CAP_NET_ADMIN, CAP_NET_RAW and CAP_PERFMON, not
    CAP_SYS_ADMIN: the kernel then will not name a program by id, and the new daemon must
    know its predecessor's jp_jpy_xdp_join from the pin it adopted (it used to fall back to
    ipip's slot, and the jpy XDP wrap stayed off until the next start)."""
    with predecessor_with_xdp_wrap(tmp_path) as pin_dir:
        caps = "-all,+net_admin,+net_raw,+bpf,+perfmon"
        done = subprocess.run(
            ["setpriv", f"--inh-caps={caps}", f"--ambient-caps={caps}",
             f"--bounding-set={caps}", "--", sys.executable, "-c", RESTART_UNPRIVILEGED,
             str(pin_dir)], capture_output=True, text=True, timeout=60,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        assert done.returncode == 0, done.stderr[-2000:]
        got = json.loads(done.stdout.splitlines()[-1])
        assert got["kernel_names_it"] is None  # the restart really lacked CAP_SYS_ADMIN
        assert got["jpy_xdp"] is True and got["ipip_xdp"] is False, got
        assert guard_slot(pin_dir) == [got["jpy_prog"]]


def test_the_daemon_turns_the_xdp_wrap_on_only_where_the_backbone_allows() -> None:
    ndo_xmit = xdp_features.NDO_XMIT | xdp_features.XDP_ACT["basic"]
    cases = [
        (None, False, "no backbone"),
        (Backbone("bb0", None, unknown="no netdev family"), False, "not known"),
        (Backbone("bb0", xdp_features.XDP_ACT["basic"], forwarding="1"), False, "ndo-xmit"),
        (Backbone("bb0", ndo_xmit, forwarding="0"), False, "forwarding is 0"),
        (Backbone("bb0", ndo_xmit, forwarding=None), False, "unreadable"),
        (Backbone("bb0", ndo_xmit, forwarding="1"), True, "takes XDP-redirected frames"),
    ]
    for backbone, active, why in cases:
        decision = decide_xdp(backbone)
        assert decision.active is active and why in decision.why, (backbone, decision)
