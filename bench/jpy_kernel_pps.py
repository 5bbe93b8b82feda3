"""The jpy relay in the kernel: pledge datagrams wrapped per second by jp_jpy_join (tc),
against the user-space relay's per-datagram work and against a bare tc redirect.

    sudo .venv/bin/python bench/jpy_kernel_pps.py [--seconds 1.0] [--rounds 3] [--quick]

Three namespaces, as bench/ipip_pps.py builds them: gen --veth-- proxy (join0 | bb0) --veth--
reg. trafgen (netsniff-ng) sends one frame as fast as one CPU can from gen into join0: a
64-byte UDP datagram from a pledge (fe80::1:1) to the proxy's join port on fe80::1 (a frame
from the wire: its checksum complete). jp_guard (XDP) runs on join0 in every path, as on every
join link (its rate set never to drop here). reg's end counts what arrives (jp_bare_redir as
a counting sink), and every figure is datagrams that reached it per second of wall time:

  kernel-jpy  jp_jpy_join on join0's tc ingress: match, AES-256 seal (bpf_crypto_encrypt of
              two blocks), 38 bytes of CBOR and header in, addresses, ports and checksum
              rewritten, bpf_redirect_neigh to bb0, i.e. the jpy relay's whole upstream job.
  bare-tc     jp_bare_tc on the same hook: the frame redirected unmodified to bb0, the least
              a tc program that moves a packet costs (the ratio kernel-jpy/bare-tc is the
              share of the bare redirect's rate the JPY work keeps).
  user-jpy    a user-space relay of the same job, on a UDP socket bound to [fe80::1%join0]:
              the port: recv, FlowHeaderSealer.seal (AES-SIV, the user-space relay's header),
              JpyMessage.encode, sendto the registrar. This is relays/jpy.py's per-datagram
              work without asyncio, counters and logging, so it is an upper bound of the real
              relay's rate (bench/jpy_relay.py measures the daemon itself): the ratio
              kernel-jpy/user-jpy understates the gain. It runs on the other CPU.

Rounds rotate the order; ratios are taken within a round, and the figures are medians
(min-max). With one generator on one CPU a fast path may be generator-bound: then its ratio
to bare-tc shows the sender's ceiling, not the program's cost, and the report says so when the
two are within 10 %. So the relay's own CPU per datagram is reported too: for the programs the
kernel's run-time accounting (BPF_ENABLE_STATS, on only while this runs), for user-jpy the
relay thread's CPU time (user and system: its recv and send included) per datagram, and the
datagrams/s one CPU could relay at that cost. The skb, tc and veth work around the programs is
common to all three paths and not in these costs. Target (issue 19): kernel-jpy >= 10 x
user-jpy.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from ipaddress import IPv6Address
from pathlib import Path

from ipip_pps import link, topology  # same three namespaces (run from bench/)
from scapy.layers.inet import UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from brski.jpy import FlowHeaderSealer, JpyMessage, PledgeEndpoint
from joinproxyd.kernel.bpf import BpfDatapath
from joinproxyd.kernel.bpf_layout import JP_JPY_MAX_CONTENT, JpyCfgC, JpyLinkC, Program
from joinproxyd.kernel.bpf_object import DEFAULT_OBJ_DIR
from joinproxyd.kernel.libbpf import enable_run_time_stats, prog_run_stats
from lab.netns import thread_in_namespace

PLEDGE, JOIN_LL, PORT = "fe80::1:1", "fe80::1", 5684
BACKBONE, REGISTRAR, JPY_PORT, SRC_PORT = "fd4a:5044::1", "fd4a:5044::86dd", 5684, 40404
PATHS = ("kernel-jpy", "bare-tc", "user-jpy")
TRAFGEN_FRAMES = 50_000_000


def frame(dst_mac: str, src_mac: str) -> bytes:
    return bytes(Ether(dst=dst_mac, src=src_mac) / IPv6(src=PLEDGE, dst=JOIN_LL, hlim=255)
                 / UDP(sport=40001, dport=PORT) / Raw(bytes(range(64))))


class UserJpy(threading.Thread):
    """relays/jpy.py's per-datagram upstream work, minus asyncio, metrics and logging."""

    def __init__(self, ns: str, ifindex: int) -> None:
        super().__init__(daemon=True)
        with thread_in_namespace(ns):
            self.rx = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            self.rx.bind((JOIN_LL, PORT, 0, ifindex))
            self.tx = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        self.rx.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE
        self.rx.settimeout(0.2)
        self.ifindex = ifindex
        self.sealer = FlowHeaderSealer(os.urandom(32), 1)
        self._halt = threading.Event()
        self.count, self.cpu = 0, 0.0

    def run(self) -> None:
        dst = (REGISTRAR, JPY_PORT)
        start = time.thread_time()
        try:
            self._loop(dst)
        finally:
            self.cpu = time.thread_time() - start

    def _loop(self, dst: tuple[str, int]) -> None:
        while not self._halt.is_set():
            try:
                data, addr = self.rx.recvfrom(2048)
            except TimeoutError:
                continue
            endpoint = PledgeEndpoint(IPv6Address(addr[0].split("%")[0]), addr[1],
                                      self.ifindex)
            self.tx.sendto(JpyMessage(self.sealer.seal(endpoint), data).encode(), dst)
            self.count += 1

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)
        self.rx.close()
        self.tx.close()


class Bench:
    def __init__(self, gen: str, proxy: str, dp: BpfDatapath, dp_reg: BpfDatapath,
                 join0: int, seconds: float, conf: Path) -> None:
        self.gen, self.proxy, self.dp, self.dp_reg = gen, proxy, dp, dp_reg
        self.join0, self.seconds, self.conf = join0, seconds, conf
        self.costs: dict[str, list[float]] = {p: [] for p in PATHS}  # ns per datagram

    def _run_stats(self, program: Program) -> tuple[int, int]:
        return prog_run_stats(self.dp.prog_fd(program))

    def delivered(self) -> int:
        return self.dp_reg.counters()[(Program.BARE_REDIRECT.value, "drop")]

    def through(self) -> float:
        before = self.delivered()
        start = time.perf_counter()
        self.trafgen()
        time.sleep(0.2)  # what is still in flight arrives
        return (self.delivered() - before) / (time.perf_counter() - start - 0.2)

    def trafgen(self) -> None:
        gen = subprocess.Popen(["ip", "netns", "exec", self.gen, "trafgen", "--dev", "g0",
                                "--in", str(self.conf), "--num", str(TRAFGEN_FRAMES),
                                "--cpus", "1", "-q"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, start_new_session=True)
        try:
            time.sleep(self.seconds)
        finally:
            os.killpg(gen.pid, signal.SIGINT)
            try:
                _, err = gen.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(gen.pid, signal.SIGKILL)
                _, err = gen.communicate()
        if gen.returncode not in (0, -signal.SIGINT, 130):
            raise RuntimeError(f"trafgen failed ({gen.returncode}): {err.decode().strip()}")

    def tc(self, program: Program, path: str) -> float:
        self.dp.attach_tc(self.join0, program)
        ns, runs = self._run_stats(program)
        try:
            return self.through()
        finally:
            self.dp.detach_tc(self.join0, program)
            ns2, runs2 = self._run_stats(program)
            if runs2 > runs:
                self.costs[path].append((ns2 - ns) / (runs2 - runs))

    def kernel_jpy(self) -> float:
        before = self.dp.jpy_stats()["up"]
        pps = self.tc(Program.JPY_JOIN, "kernel-jpy")
        stats = self.dp.jpy_stats()
        if stats["up"] == before:
            raise RuntimeError(f"jp_jpy_join wrapped nothing: {stats}")
        return pps

    def bare_tc(self) -> float:
        return self.tc(Program.BARE_TC, "bare-tc")

    def user_jpy(self) -> float:
        relay = UserJpy(self.proxy, self.join0)
        relay.start()
        try:
            time.sleep(0.05)
            return self.through()
        finally:
            relay.stop()
            if relay.count:
                self.costs["user-jpy"].append(relay.cpu * 1e9 / relay.count)


def run(seconds: float, rounds: int, obj_dir: Path, workdir: Path
        ) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, list[float]]]:
    results: dict[str, list[float]] = {p: [] for p in PATHS}
    ratios: dict[str, list[float]] = {"kernel-jpy/user-jpy": [], "kernel-jpy/bare-tc": []}
    with topology() as (gen, proxy, reg), \
            BpfDatapath.open(obj_dir, pin_dir=None, netns=proxy,
                             objects=("guard", "bare", "jpy")) as dp, \
            BpfDatapath.open(obj_dir, pin_dir=None, netns=reg, objects=("bare",)) as dp_reg:
        join0, join0_mac = link(proxy, "join0")
        bb0, _ = link(proxy, "bb0")
        _, g0_mac = link(gen, "g0")
        dp_reg.set_bare_target(0)  # counting sink
        dp_reg.attach_xdp("r0", Program.BARE_REDIRECT)
        dp.set_bare_target(bb0)
        dp.set_guard(rate_pps=10_000_000, burst=1_000_000, ports=[PORT])
        dp.attach_guard(join0)
        cfg = JpyCfgC(backbone_ifindex=bb0, current_slot=0, src_port=SRC_PORT,
                      registrar_port=JPY_PORT, max_content=JP_JPY_MAX_CONTENT)
        cfg.backbone_addr[:] = IPv6Address(BACKBONE).packed
        cfg.registrar_addr[:] = IPv6Address(REGISTRAR).packed
        link_cfg = JpyLinkC(port=PORT, relay=1)
        link_cfg.addr[:] = IPv6Address(JOIN_LL).packed
        dp.set_jpy(cfg, {join0: link_cfg})
        dp.set_jpy_key(0, 1, os.urandom(32))
        conf = workdir / "frame.trafgen"
        conf.write_text("{ " + ", ".join(f"0x{b:02x}" for b in frame(
            ":".join(f"{b:02x}" for b in join0_mac), ":".join(f"{b:02x}" for b in g0_mac)))
            + " }\n")
        bench = Bench(gen, proxy, dp, dp_reg, join0, seconds, conf)
        stats_fd = enable_run_time_stats()
        measure = {"kernel-jpy": bench.kernel_jpy, "bare-tc": bench.bare_tc,
                   "user-jpy": bench.user_jpy}
        bench.kernel_jpy()  # warm up: neighbour, caches
        bench.costs["kernel-jpy"].clear()
        for r in range(rounds):
            order = PATHS[r % 3:] + PATHS[:r % 3]
            got = {path: measure[path]() for path in order}
            for path, value in got.items():
                results[path].append(value)
            ratios["kernel-jpy/user-jpy"].append(got["kernel-jpy"] / max(got["user-jpy"], 1))
            ratios["kernel-jpy/bare-tc"].append(got["kernel-jpy"] / max(got["bare-tc"], 1))
            print(f"round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
        os.close(stats_fd)
        stats = dp.jpy_stats()
        drops = {k: v for k, v in stats.items() if v and k not in ("up", "bytes_up")}
        if drops:
            print(f"  (kernel JPY counters besides up: {drops})", file=sys.stderr)
    return results, ratios, bench.costs


def fmt(values: list[float]) -> str:
    med = statistics.median(values)
    return f"{med:12,.0f}" if len(values) == 1 else \
        f"{med:12,.0f}  ({min(values):,.0f}-{max(values):,.0f})"


def report(results: dict[str, list[float]], ratios: dict[str, list[float]],
           costs: dict[str, list[float]], rounds: int) -> None:
    labels = {"kernel-jpy": "kernel JPY wrap (guard + tc, AES)",
              "bare-tc": "bare tc redirect (guard + tc)",
              "user-jpy": "user-space JPY work (AES-SIV)"}
    print(f"\njpy_kernel_pps: 64-byte pledge datagrams, datagrams/s delivered wrapped to "
          f"the registrar, medians over {rounds} round(s), trafgen on one CPU")
    for path in PATHS:
        print(f"{labels[path]:<40}{fmt(results[path])}")
    for name, values in ratios.items():
        goal = "  target >= 10" if name == "kernel-jpy/user-jpy" else ""
        spread = f"  ({min(values):.2f}-{max(values):.2f})" if len(values) > 1 else ""
        print(f"ratio {name:<22}{statistics.median(values):.2f}{spread}{goal}")
    if statistics.median(ratios["kernel-jpy/bare-tc"]) > 0.9:
        print("(kernel-jpy and bare-tc within 10 %: both likely bounded by the generator)")
    print("\nthe relay's own CPU per datagram (programs: kernel run-time stats; user: thread "
          "CPU time), and what one CPU could relay at that cost:")
    for path in PATHS:
        if costs[path]:
            ns = statistics.median(costs[path])
            print(f"{labels[path]:<40}{ns:9,.0f} ns  {1e9 / ns:12,.0f} datagrams/s/CPU")
    if costs["kernel-jpy"] and costs["user-jpy"]:
        print(f"cost ratio user-jpy/kernel-jpy   "
              f"{statistics.median(costs['user-jpy']) / statistics.median(costs['kernel-jpy']):.1f}"
              "  (target >= 10)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=1.0, help="per measurement")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="one short round (smoke test)")
    p.add_argument("--obj-dir", type=Path, default=DEFAULT_OBJ_DIR)
    args = p.parse_args()
    if os.geteuid() != 0:
        print("jpy_kernel_pps: run as root (it creates network namespaces)", file=sys.stderr)
        return 1
    if shutil.which("trafgen") is None:
        print("jpy_kernel_pps: trafgen missing (Debian: netsniff-ng; make setup installs it)",
              file=sys.stderr)
        return 1
    if args.quick:
        args.seconds, args.rounds = 0.3, 1
    with tempfile.TemporaryDirectory(prefix="jpy_kernel_pps-") as workdir:
        results, ratios, costs = run(args.seconds, args.rounds, args.obj_dir, Path(workdir))
    report(results, ratios, costs, args.rounds)
    from _report import record  # make bench (bench/run_all.py): the same figures

    for path in dict.fromkeys(name.split("/")[1] for name in ratios):  # the baselines
        record(path, results[path], "datagrams/s")
    for name, values in ratios.items():
        num, den = name.split("/")
        record(f"{num} vs {den}", results[num], "datagrams/s", baseline=den, ratios=values,
               target=10 if name == "kernel-jpy/user-jpy" else None)
    for path, values in costs.items():
        record(f"{path} CPU", values, "ns/datagram", better="lower")
    return 0


if __name__ == "__main__":
    sys.exit(main())
