"""IPIP join proxy: packets per second through the encapsulation, against a bare XDP redirect
and against a user-space relay doing the same job.

    sudo .venv/bin/python bench/ipip_pps.py [--seconds 1.0] [--rounds 3] [--quick]

Three namespaces: gen --veth-- proxy (join0 | bb0) --veth-- reg. Every frame is a 64-byte
UDP datagram from a pledge (fe80::1:1) to the registrar's announced link-local address
(fe80::1234) on the join port. reg's end runs jp_bare_redir as a counting sink (a veth only
takes redirected frames when its peer runs XDP). Five paths. Each round measures the three
live-frame paths `--pairs` times back to back (the order rotated every time, a ratio taken
within each set, so the machine's drift between sets cancels out), then the two veth-fed
paths once. Figures are medians (min-max) over every measurement, ratios medians over sets.
A live-frame path's figure is the kernel's own timing of its test run (BPF_PROG_TEST_RUN's
duration, which leaves out the time the thread was preempted: on a shared machine most of
the noise in wall time), scaled by the share of frames that reached the sink; the veth-fed
paths are frames at the sink per second of wall time. --program-time adds each XDP
program's own time per frame (kernel run-time stats); --xdp-only skips the veth-fed paths:

  bare-redirect  jp_bare_redir run in proxy with BPF_F_TEST_XDP_LIVE_FRAMES, as if received
                 on join0, redirected unmodified to bb0: the cost of moving a frame at all.
  push-floor     jp_bare_push the same way: 40 bytes pushed, the Ethernet header moved in
                 front, redirected. No parsing, lookup or header: the floor of any IPv6-in-
                 IPv6 encapsulation (the head adjustment, and in live-frame runs the frame
                 the kernel rebuilds around it), shown so the gap to bare-redirect can be
                 told apart from the cost of the encapsulation program itself.
  xdp-encap      jp_xdp_join the same way: match, 40 bytes pushed, the cached outer header
                 (jp_encap_cache) copied in, redirect.
                 Live-frame mode recycles pages without restoring their bytes, and the
                 encapsulation overwrites the frame's first 14 bytes with the end of the outer
                 header, i.e. the last 14 bytes of the registrar's address; the registrar here
                 is fd4a:5044::86dd so a recycled page still reads as the same IPv6 frame.
  tc-encap       frames generated live in gen and redirected into its veth, so they arrive on
                 join0 as real traffic: jp_guard (XDP) -> skb -> jp_tc_join -> bpf_redirect_neigh
                 to bb0. pps = encapsulations counted / wall time. Generator, guard, skb
                 allocation, tc and both veth hops share one CPU. (A repeat-count test run of a
                 tc program re-runs it on the same, already encapsulated skb: it would measure
                 the pass path, so it is not used.)
  userspace      the same generated traffic read on join0 by a Python relay (AF_PACKET socket,
                 same match as the program) that sends the inner packet through a raw IPv6
                 socket of protocol 41, the kernel adding the outer header; tc is detached.
                 It runs on the other CPU.

Where the kernel refuses live frames (BPF_PROG_TEST_RUN with BPF_F_TEST_XDP_LIVE_FRAMES
answers EPERM on some hosts of this kind), the three live-frame paths are measured veth-fed
instead, each program attached to join0's XDP hook and fed by trafgen (netsniff-ng, an
AF_PACKET TX_RING generator) from gen; tc-encap and userspace take the same generator. Every
path is then bounded by one generator on one CPU, so the ratios between the XDP paths mostly
show the sender's ceiling, not the programs' costs; the report says which generator ran.

Targets (issue 6): the encapsulation program in live frames >= 0.9 x bare-redirect and
>= 10 x the user-space relay, i.e. xdp-encap/bare-redirect and xdp-encap/userspace.
tc-encap/userspace is the same comparison for the skb path, shown without a target.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from joinproxyd.kernel import KernelError
from joinproxyd.kernel.bpf import BpfDatapath
from joinproxyd.kernel.bpf_layout import IpipJoin, Program
from joinproxyd.kernel.bpf_object import DEFAULT_OBJ_DIR
from joinproxyd.kernel.libbpf import enable_run_time_stats, prog_run_stats
from lab.netns import thread_in_namespace

PLEDGE, REG_LL, PORT = "fe80::1:1", "fe80::1234", 5684
OUTER_SRC, REGISTRAR = "fd4a:5044::1:1", "fd4a:5044::86dd"
ETH_P_IPV6 = 0x86DD
PATHS = ("bare-redirect", "push-floor", "xdp-encap", "tc-encap", "userspace")
LIVE = PATHS[:3]
GENERATOR_CHUNK = 200_000  # frames per live-frame run of the generator
TRAFGEN_FRAMES = 50_000_000  # trafgen's --num: far more than it can send before it is stopped


def sh(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done.stdout


def ipv6_udp_frame(dst_mac: bytes, src_mac: bytes) -> bytes:
    """64 bytes: Ethernet, IPv6 pledge -> registrar LL, UDP to the join port, 2 bytes."""
    payload = b"jp"
    udp_len = 8 + len(payload)
    src, dst = socket.inet_pton(socket.AF_INET6, PLEDGE), socket.inet_pton(socket.AF_INET6, REG_LL)
    pseudo = src + dst + udp_len.to_bytes(4, "big") + b"\0\0\0\x11"
    udp = (40001).to_bytes(2, "big") + PORT.to_bytes(2, "big") + udp_len.to_bytes(2, "big")
    total = sum(int.from_bytes(w, "big") for w in _words(pseudo + udp + b"\0\0" + payload))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    udp += ((~total & 0xFFFF) or 0xFFFF).to_bytes(2, "big") + payload
    ip6 = b"\x60\0\0\0" + udp_len.to_bytes(2, "big") + b"\x11\x40" + src + dst
    return dst_mac + src_mac + ETH_P_IPV6.to_bytes(2, "big") + ip6 + udp


def _words(data: bytes) -> Iterator[bytes]:
    data += b"\0" * (len(data) % 2)
    return (data[i:i + 2] for i in range(0, len(data), 2))


@dataclass
class Bench:
    """Every figure is frames that reached reg's sink per second of wall time: a frame the
    program handled but a veth dropped does not count."""

    gen: str
    proxy: str
    dp_proxy: BpfDatapath
    dp_gen: BpfDatapath
    dp_reg: BpfDatapath
    frame: bytes
    join0: int
    repeat: int
    seconds: float
    live_frames: bool = True  # False: the kernel refused them, every path is veth-fed
    workdir: Path | None = None
    own_ns: dict[str, list[float]] = field(default_factory=dict)

    def delivered(self) -> int:
        return self.dp_reg.counters()[(Program.BARE_REDIRECT.value, "drop")]

    def live(self, dp: BpfDatapath, ns: str, program: Program, ifindex: int,
             repeat: int) -> int:
        """Run program on `repeat` live frames: the kernel's own time per frame in ns."""
        with thread_in_namespace(ns):
            return dp.bench_run(program, self.frame, repeat=repeat, live=True, ifindex=ifindex)

    def live_pps(self, program: Program) -> float:
        """Frames per second of the kernel's own timing of a live-frame run (it leaves out
        the time the thread was preempted, which on a shared machine is most of the noise
        in wall time); every frame must have reached reg's sink."""
        before = self.delivered()
        fd = self.dp_proxy.prog_fd(program)
        t0, n0 = prog_run_stats(fd)
        ns = self.live(self.dp_proxy, self.proxy, program, self.join0, self.repeat)
        t1, n1 = prog_run_stats(fd)
        if n1 > n0:  # run time stats on: the program's own time per frame
            self.own_ns.setdefault(program.name, []).append((t1 - t0) / (n1 - n0))
        lost = self.repeat - (self.delivered() - before)
        if lost:
            print(f"  ({program.name}: {lost} of {self.repeat} frames not delivered)",
                  file=sys.stderr)
        return 1e9 / max(ns, 1) * (self.repeat - lost) / self.repeat

    def through(self, run: Callable[[], None]) -> float:
        before = self.delivered()
        start = time.perf_counter()
        run()
        elapsed = time.perf_counter() - start
        return (self.delivered() - before) / elapsed

    def fed(self, program: Program) -> float:
        """Without live frames: program on join0's XDP hook, frames from the generator."""
        if program == Program.XDP_JOIN:
            self.dp_proxy.set_ipip_xdp(True)
            self.dp_proxy.attach_guard(self.join0)  # the guard tail-calls jp_xdp_join
        else:
            self.dp_proxy.attach_xdp(self.join0, program)
        try:
            return self.through(self.generate)
        finally:
            self.dp_proxy.set_ipip_xdp(False)
            self.dp_proxy.attach_guard(self.join0)

    def bare_redirect(self) -> float:
        if not self.live_frames:
            return self.fed(Program.BARE_REDIRECT)
        return self.live_pps(Program.BARE_REDIRECT)

    def push_floor(self) -> float:
        if not self.live_frames:
            return self.fed(Program.BARE_PUSH)
        return self.live_pps(Program.BARE_PUSH)

    def xdp_encap(self) -> float:
        before = self.dp_proxy.counters()[(Program.XDP_JOIN.value, "encap")]
        if not self.live_frames:
            return self.fed(Program.XDP_JOIN)
        pps = self.live_pps(Program.XDP_JOIN)
        done = self.dp_proxy.counters()[(Program.XDP_JOIN.value, "encap")] - before
        if done != self.repeat:
            print(f"  (xdp-encap: {self.repeat - done} of {self.repeat} frames not "
                  "encapsulated)", file=sys.stderr)
        return pps

    def generate(self) -> None:
        """Offer frames into join0 from gen for about `seconds`."""
        if not self.live_frames:
            self.trafgen()
            return
        start = time.perf_counter()
        while time.perf_counter() - start < self.seconds:
            self.live(self.dp_gen, self.gen, Program.BARE_REDIRECT, 0, GENERATOR_CHUNK)

    def trafgen(self) -> None:
        """trafgen sends the frame on g0 as fast as one CPU can, until stopped."""
        assert self.workdir is not None
        conf = self.workdir / "frame.trafgen"
        if not conf.exists():
            conf.write_text("{ " + ", ".join(f"0x{b:02x}" for b in self.frame) + " }\n")
        gen = subprocess.Popen(["ip", "netns", "exec", self.gen, "trafgen", "--dev", "g0",
                                "--in", str(conf), "--num", str(TRAFGEN_FRAMES), "--cpus", "1",
                                "-q"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               start_new_session=True)
        try:
            time.sleep(self.seconds)
        finally:
            # trafgen sends from a child process per CPU: stop the whole group it leads
            os.killpg(gen.pid, signal.SIGINT)
            try:
                _, err = gen.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(gen.pid, signal.SIGKILL)
                _, err = gen.communicate()
        if gen.returncode not in (0, -signal.SIGINT, 130):
            raise RuntimeError(f"trafgen failed ({gen.returncode}): {err.decode().strip()}")

    def tc_encap(self) -> float:
        self.dp_proxy.attach_ipip_join(self.join0)
        return self.through(self.generate)

    def userspace(self) -> float:
        self.dp_proxy.detach_ipip_join(self.join0)
        relay = UserspaceRelay(self.proxy, "join0")
        try:
            relay.start()
            time.sleep(0.05)
            return self.through(self.generate)
        finally:
            relay.stop()


def live_frames_refusal(dp: BpfDatapath, ns: str, frame: bytes) -> str | None:
    """None if this kernel runs XDP programs on live frames, else why not (one line)."""
    try:
        with thread_in_namespace(ns):
            dp.test_run(Program.BARE_REDIRECT, frame, live=True)
    except KernelError as exc:
        if exc.errno in (errno.EPERM, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, 524):
            return str(exc)
        raise
    return None


class UserspaceRelay(threading.Thread):
    """What a relay without BPF does: read the pledge's frame, check it is IPv6/UDP to the
    registrar's link-local address and the join port, send the inner packet through a raw
    socket of protocol 41 (the kernel adds the outer header)."""

    def __init__(self, ns: str, ifname: str) -> None:
        super().__init__(daemon=True)
        with thread_in_namespace(ns):
            self.rx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_IPV6))
            self.rx.bind((ifname, ETH_P_IPV6))
            self.tx = socket.socket(socket.AF_INET6, socket.SOCK_RAW, 41)
            self.tx.bind((OUTER_SRC, 0))
        with contextlib.suppress(OSError):  # SO_RCVBUFFORCE: 8 MiB of backlog
            self.rx.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)
        self.rx.settimeout(0.2)
        self.count = 0
        self._halt = threading.Event()

    def run(self) -> None:
        buf = bytearray(2048)
        view = memoryview(buf)
        reg_ll = socket.inet_pton(socket.AF_INET6, REG_LL)
        port = PORT.to_bytes(2, "big")
        dst = (REGISTRAR, 0)
        while not self._halt.is_set():
            try:
                n = self.rx.recv_into(buf)
            except TimeoutError:
                continue
            if n < 58 or buf[20] != 17 or buf[38:54] != reg_ll or buf[56:58] != port:
                continue
            self.tx.sendto(view[14:n], dst)
            self.count += 1

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)
        self.rx.close()
        self.tx.close()


def link(ns: str, dev: str) -> tuple[int, bytes]:
    info = json.loads(sh("ip", "-n", ns, "-j", "link", "show", "dev", dev))[0]
    return info["ifindex"], bytes.fromhex(info["address"].replace(":", ""))


@contextlib.contextmanager
def topology() -> Iterator[tuple[str, str, str]]:
    tag = secrets.token_hex(3)
    names = (f"jpbg{tag}", f"jpbp{tag}", f"jpbr{tag}")
    gen, proxy, reg = names
    try:
        for ns in names:
            sh("ip", "netns", "add", ns)
            for key in ("all.accept_dad", "default.accept_dad"):
                sh("ip", "netns", "exec", ns, "sysctl", "-qw", f"net.ipv6.conf.{key}=0")
        sh("ip", "link", "add", "g0", "netns", gen, "type", "veth", "peer", "name", "join0",
           "netns", proxy)
        sh("ip", "link", "add", "bb0", "netns", proxy, "type", "veth", "peer", "name", "r0",
           "netns", reg)
        for ns, dev in ((gen, "g0"), (proxy, "join0"), (proxy, "bb0"), (reg, "r0")):
            sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", proxy, "addr", "add", "fe80::1/64", "dev", "join0", "nodad")
        for addr in ("fd4a:5044::1/64", f"{OUTER_SRC}/64"):
            sh("ip", "-n", proxy, "addr", "add", addr, "dev", "bb0", "nodad")
        sh("ip", "-n", reg, "addr", "add", f"{REGISTRAR}/64", "dev", "r0", "nodad")
        _, r0_mac = link(reg, "r0")
        sh("ip", "-n", proxy, "-6", "neigh", "replace", REGISTRAR, "lladdr",
           ":".join(f"{b:02x}" for b in r0_mac), "dev", "bb0", "nud", "permanent")
        # bpf_fib_lookup (the XDP path) answers only for a forwarding device
        sh("ip", "netns", "exec", proxy, "sysctl", "-qw", "net.ipv6.conf.bb0.forwarding=1")
        yield gen, proxy, reg
    finally:
        for ns in names:
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


Ratios = dict[tuple[str, str], list[float]]


def run(seconds: float, rounds: int, pairs: int, repeat: int, obj_dir: Path, workdir: Path,
        xdp_only: bool = False, program_time: bool = False
        ) -> tuple[dict[str, list[float]], Ratios, str | None, dict[str, list[float]]]:
    results: dict[str, list[float]] = {p: [] for p in PATHS}
    ratios: Ratios = {pair: [] for pair, _ in RATIOS}
    with topology() as (gen, proxy, reg), \
            BpfDatapath.open(obj_dir, pin_dir=None, netns=proxy,
                             objects=("ipip", "guard", "bare")) as dp_proxy, \
            BpfDatapath.open(obj_dir, pin_dir=None, netns=gen, objects=("bare",)) as dp_gen, \
            BpfDatapath.open(obj_dir, pin_dir=None, netns=reg, objects=("bare",)) as dp_reg:
        join0, join0_mac = link(proxy, "join0")
        bb0, _ = link(proxy, "bb0")
        g0, g0_mac = link(gen, "g0")
        dp_reg.set_bare_target(0)  # sink
        dp_reg.attach_xdp("r0", Program.BARE_REDIRECT)
        dp_gen.set_bare_target(g0)
        dp_proxy.set_bare_target(bb0)
        dp_proxy.set_ipip({join0: IpipJoin(registrar_ll=REG_LL, outer_src=OUTER_SRC,
                                           registrar=REGISTRAR, backbone_ifindex=bb0,
                                           ports=(PORT,))})
        # the guard on join0, as on every join link; generous enough never to drop here
        dp_proxy.set_guard(rate_pps=10_000_000, burst=1_000_000, ports=[PORT])
        dp_proxy.attach_guard(join0)
        frame = ipv6_udp_frame(join0_mac, g0_mac)
        refusal = live_frames_refusal(dp_gen, gen, frame)
        if refusal is not None and shutil.which("trafgen") is None:
            raise RuntimeError(f"this kernel refuses live frames ({refusal}) and trafgen "
                               "(Debian: netsniff-ng) is not installed")
        bench = Bench(gen, proxy, dp_proxy, dp_gen, dp_reg, frame, join0, repeat, seconds,
                      live_frames=refusal is None, workdir=workdir)
        if refusal is not None:
            print(f"  (live frames refused: {refusal}; every path is fed by trafgen)",
                  file=sys.stderr)
        measure: dict[str, Callable[[], float]] = {
            "bare-redirect": bench.bare_redirect, "push-floor": bench.push_floor,
            "xdp-encap": bench.xdp_encap, "tc-encap": bench.tc_encap,
            "userspace": bench.userspace}
        stats_fd = enable_run_time_stats() if program_time else None
        bench.bare_redirect()  # warm up: page pools, neighbour, caches
        bench.xdp_encap()
        turn = 0
        for r in range(rounds):
            live: list[dict[str, float]] = []
            for _ in range(pairs):
                order = LIVE[turn % 3:] + LIVE[:turn % 3]
                turn += 1
                got = {path: measure[path]() for path in order}
                live.append(got)
                for path, value in got.items():
                    results[path].append(value)
                for (num, den), values in ratios.items():
                    if num in LIVE and den in LIVE and got[den] > 0:
                        values.append(got[num] / got[den])
            veth = ("tc-encap", "userspace") if r % 2 == 0 else ("userspace", "tc-encap")
            got = {path: measure[path]() for path in (() if xdp_only else veth)}
            for path, value in got.items():
                results[path].append(value)
            got["xdp-encap"] = statistics.median(s["xdp-encap"] for s in live)
            for (num, den), values in ratios.items():
                if den == "userspace" and got.get(den, 0) > 0:
                    values.append(got[num] / got[den])
            print(f"round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
        sys.stderr.flush()
        if stats_fd is not None:
            os.close(stats_fd)
        drops = {k: v for k, v in dp_proxy.drops().items() if v}
        if drops:
            print(f"  (drops counted in the proxy: {drops})", file=sys.stderr)
    return results, ratios, refusal, bench.own_ns


def fmt(values: list[float]) -> str:
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:12,.0f}"
    return f"{med:12,.0f}  ({min(values):,.0f}-{max(values):,.0f})"


RATIOS: tuple[tuple[tuple[str, str], str | None], ...] = (
    (("xdp-encap", "bare-redirect"), ">= 0.90"),
    (("xdp-encap", "userspace"), ">= 10"),
    (("tc-encap", "userspace"), None),
    (("push-floor", "bare-redirect"), None),
    (("xdp-encap", "push-floor"), ">= 0.95"),  # issue 18 item 4
)


def report(results: dict[str, list[float]], ratios: Ratios, rounds: int, pairs: int,
           refusal: str | None, own_ns: dict[str, list[float]] | None = None) -> None:
    how = "live frames" if refusal is None else "veth-fed, trafgen"
    labels = {
        "bare-redirect": f"bare XDP redirect ({how})",
        "push-floor": f"push 40 bytes + redirect ({how})",
        "xdp-encap": f"XDP encap ({how})",
        "tc-encap": "tc encap (veth-fed, guard + tc)",
        "userspace": "user-space relay (AF_PACKET + raw 41)",
    }
    print(f"\nipip_pps: 64-byte UDP frames, packets/s, medians over {rounds} round(s) "
          f"of {pairs} set(s) of the XDP paths")
    if refusal is not None:
        print(f"generator: trafgen on one CPU (the kernel refuses live frames: {refusal}); "
              "the XDP paths are bounded by it, so their ratios show the sender's ceiling")
    for path in PATHS:
        if results[path]:
            print(f"{labels[path]:<42}{fmt(results[path])}")
    print()
    for (num, den), target in RATIOS:
        values = ratios[(num, den)]
        value = f"{statistics.median(values):.2f}" if values else "n/a"
        spread = f"  ({min(values):.2f}-{max(values):.2f})" if len(values) > 1 else ""
        goal = f"  target {target}" if target else ""
        print(f"ratio {num}/{den:<14} {value}{spread}{goal}")
    if own_ns:
        print("\nthe programs' own time per frame (kernel run-time stats, ns, median (min-max)):")
        for name, values in own_ns.items():
            print(f"  {name:<16}{statistics.median(values):7.1f}  "
                  f"({min(values):.1f}-{max(values):.1f})")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=1.0, help="per veth-fed measurement")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--pairs", type=int, default=5,
                   help="sets per round (each set: the three XDP paths)")
    p.add_argument("--repeat", type=int, default=2_000_000, help="frames per live-frame run")
    p.add_argument("--quick", action="store_true", help="one short round (smoke test)")
    p.add_argument("--program-time", action="store_true",
                   help="also report each XDP program's own time per frame (kernel run-time "
                        "stats, which slow every program a little while on)")
    p.add_argument("--xdp-only", action="store_true",
                   help="only the three XDP paths (no tc-encap, no user-space relay)")
    p.add_argument("--obj-dir", type=Path, default=DEFAULT_OBJ_DIR,
                   help="where the built BPF objects are (to compare builds)")
    args = p.parse_args()
    if os.geteuid() != 0:
        print("ipip_pps: run as root (it creates network namespaces)", file=sys.stderr)
        return 1
    if args.quick:
        args.seconds, args.rounds, args.pairs, args.repeat = 0.3, 1, 1, 300_000
    with tempfile.TemporaryDirectory(prefix="ipip_pps-") as workdir:
        results, ratios, refusal, own_ns = run(args.seconds, args.rounds, args.pairs,
                                               args.repeat, args.obj_dir, Path(workdir),
                                               args.xdp_only, args.program_time)
    report(results, ratios, args.rounds, args.pairs, refusal, own_ns)
    from _report import record  # make bench (bench/run_all.py): the same figures

    for path in dict.fromkeys(den for (_, den), _ in RATIOS):  # the baselines
        if results.get(path):
            record(path, results[path], "packets/s")
    for (num, den), target in RATIOS:  # paired within sets, as printed
        if results.get(num) and results.get(den):
            record(f"{num} vs {den}", results[num], "packets/s", baseline=den,
                   ratios=ratios[(num, den)],
                   target=float(target.split()[-1]) if target else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
