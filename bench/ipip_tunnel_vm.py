"""IPIP join proxy: the kernel tunnel datapath (ip6ip6 + u32/mirred + nftables fwd,
kernel/ip6tnl.py) against the BPF datapath, packets per second, in Debian's stock kernel
under QEMU/TCG (this machine's kernel has no ip6tnl; shared/docs/stock-kernel-vm.md).

    sudo .venv/bin/python bench/ipip_tunnel_vm.py [--seconds 1] [--rounds 8]

On the host it boots the VM of `make test-vm` (tools/vm/run-vm.sh, the repository shared
read-only) and runs itself inside with --guest. In the guest, the namespaces of
bench/ipip_pps.py: gen --veth-- proxy (join0 | bb0) --veth-- reg, 64-byte UDP frames from a
pledge to the registrar's link-local address and join port, generated as live XDP frames
in gen (BPF_F_TEST_XDP_LIVE_FRAMES, which this kernel allows) and counted where they reach
reg (jp_bare_redir as a sink). jp_guard (guard off) sits on join0's XDP hook in every path,
as on a served link, which also makes join0 take the generator's frames. Three paths, each
round in a rotated order:

  kernel    ip6tnl.apply(): u32 on join0's ingress, mirred to the ip6ip6 tunnel, out of bb0
  bpf-tc    jp_tc_join on join0's tc ingress (the skb path, like the tunnel's)
  bpf-xdp   jp_xdp_join tail-called from jp_guard (no skb at all)

pps = frames counted at reg / wall time. As in bench/ipip_pps.py's tc-encap, the generator
and join0's NAPI processing share one CPU (the generator's frames are processed in softirq
between its batches). Short rounds, many of them, ratios taken within each round: the
host's other load slows TCG unevenly. Everything runs on the guest's CPUs, which TCG
emulates some ten to fifty times slower than the host runs them: only the ratios between
paths of the same run mean anything, not the absolute figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PATHS = ("kernel", "bpf-tc", "bpf-xdp")
FIGURES = "ipip_tunnel_vm figures: "  # the guest's one JSON line for the host


def guest(seconds: float, rounds: int) -> int:
    from ipip_pps import (
        OUTER_SRC,
        PORT,
        REG_LL,
        REGISTRAR,
        Bench,
        ipv6_udp_frame,
        link,
        sh,
        topology,
    )

    from joinproxyd.kernel import ip6tnl
    from joinproxyd.kernel.bpf import BpfDatapath
    from joinproxyd.kernel.bpf_layout import IpipJoin, Program
    from lab.netns import thread_in_namespace

    print(f"kernel {os.uname().release}, {os.cpu_count()} CPUs (TCG)", flush=True)
    results: dict[str, list[float]] = {p: [] for p in PATHS}
    ratios: dict[str, list[float]] = {"kernel/bpf-tc": [], "kernel/bpf-xdp": []}
    with topology() as (gen, proxy, reg), \
            BpfDatapath.open(pin_dir=None, netns=proxy,
                             objects=("ipip", "guard", "bare")) as dp_proxy, \
            BpfDatapath.open(pin_dir=None, netns=gen, objects=("bare",)) as dp_gen, \
            BpfDatapath.open(pin_dir=None, netns=reg, objects=("bare",)) as dp_reg:
        join0, join0_mac = link(proxy, "join0")
        bb0, _ = link(proxy, "bb0")
        g0, g0_mac = link(gen, "g0")
        dp_reg.set_bare_target(0)
        dp_reg.attach_xdp("r0", Program.BARE_REDIRECT)
        dp_gen.set_bare_target(g0)
        dp_proxy.set_ipip({join0: IpipJoin(registrar_ll=REG_LL, outer_src=OUTER_SRC,
                                           registrar=REGISTRAR, backbone_ifindex=bb0,
                                           ports=(PORT,))})
        dp_proxy.set_guard(rate_pps=0, burst=1, ports=[PORT])  # rate 0: off, passes all
        dp_proxy.attach_guard(join0)
        bench = Bench(gen, proxy, dp_proxy, dp_gen, dp_reg, ipv6_udp_frame(join0_mac, g0_mac),
                      join0, 0, seconds)
        spec = ip6tnl.TunnelSpec(join_name="join0", join_index=join0, backbone_index=bb0,
                                 local=OUTER_SRC, remote=REGISTRAR, registrar_ll=REG_LL,
                                 ports=(PORT,))

        def tunnel_tx() -> int:
            # (not ip6tnl.stats: this process's sysfs shows the guest's root namespace)
            out = sh("ip", "-n", proxy, "-j", "-s", "link", "show", "dev", spec.name)
            return int(json.loads(out)[0]["stats64"]["tx"]["packets"])

        def kernel() -> float:
            with thread_in_namespace(proxy):
                ip6tnl.apply(spec)
            before = tunnel_tx()
            try:
                pps = bench.through(bench.generate)
                if tunnel_tx() == before:
                    raise RuntimeError("the tunnel relayed nothing")
                return pps
            finally:
                with thread_in_namespace(proxy):
                    ip6tnl.remove(join0)

        def bpf_tc() -> float:
            try:
                return bench.tc_encap()
            finally:
                dp_proxy.detach_ipip_join(join0)

        measure = {"kernel": kernel, "bpf-tc": bpf_tc,
                   "bpf-xdp": lambda: bench.fed(Program.XDP_JOIN)}
        for path in PATHS:  # warm up: neighbours, page pools, the tunnel module's paths
            measure[path]()
        for r in range(rounds):
            order = PATHS[r % 3:] + PATHS[:r % 3]
            got = {path: measure[path]() for path in order}
            for path, value in got.items():
                results[path].append(value)
            ratios["kernel/bpf-tc"].append(got["kernel"] / max(got["bpf-tc"], 1))
            ratios["kernel/bpf-xdp"].append(got["kernel"] / max(got["bpf-xdp"], 1))
            print(f"round {r + 1}/{rounds}: " + ", ".join(f"{p} {v:,.0f}"
                                                          for p, v in got.items()), flush=True)
        with thread_in_namespace(proxy):
            left = ip6tnl.ours()
        if left:
            raise RuntimeError(f"tunnels left behind: {left}")
    print(f"\nipip_tunnel_vm: 64-byte UDP frames, packets/s in the VM (TCG), {rounds} round(s) "
          f"of {seconds:g} s, median (min-max)")
    for path, values in results.items():
        print(f"{path:<10}{statistics.median(values):>10,.0f}  "
              f"({min(values):,.0f}-{max(values):,.0f})")
    for name, values in ratios.items():
        print(f"ratio {name:<16}{statistics.median(values):.2f}  "
              f"({min(values):.2f}-{max(values):.2f})")
    print(FIGURES + json.dumps({"results": results, "ratios": ratios}), flush=True)
    return 0


RUN_SH = """#!/bin/sh
modprobe -a ip6_tunnel veth act_mirred cls_u32 sch_ingress nft_fwd_netdev || exit 90
mount -t tmpfs tmpfs /mnt && mkdir /mnt/repo &&
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,cache=loose,ro repo /mnt/repo || exit 93
export PYTHONPATH=/mnt/repo/bench:/mnt/repo:/mnt/repo/daemon:\\
/mnt/repo/.venv/lib/python3.11/site-packages PYTHONDONTWRITEBYTECODE=1
python3 /mnt/repo/bench/ipip_tunnel_vm.py --guest --seconds {seconds} --rounds {rounds}
"""


def host(seconds: float, rounds: int) -> int:
    rootfs = Path(os.environ.get("VM_ROOTFS", "/var/tmp/joinproxyd-vm/rootfs"))
    if not (rootfs / "boot").is_dir():
        subprocess.run([str(REPO / "tools" / "vm" / "build-rootfs.sh"), str(rootfs)],
                       check=True)
    with tempfile.TemporaryDirectory(prefix="ipip_tunnel_vm-") as tmp:
        job = Path(tmp)
        (job / "run.sh").write_text(RUN_SH.format(seconds=seconds, rounds=rounds))
        (job / "run.sh").chmod(0o755)
        start = time.monotonic()
        done = subprocess.run([str(REPO / "tools" / "vm" / "run-vm.sh"), "--timeout", "900",
                               str(job)], check=False,
                              env={**os.environ, "ROOTFS": str(rootfs), "REPO": str(REPO)})
        out = (job / "output.log").read_text() if (job / "output.log").exists() else ""
        if done.returncode != 0 and not out:
            out = (job / "serial.log").read_text()[-4000:]
        print("".join(line for line in out.splitlines(keepends=True)
                      if not line.startswith(FIGURES)), end="")
        print(f"(VM run {time.monotonic() - start:.0f} s, exit {done.returncode})",
              file=sys.stderr)
        record_figures(out)
        return done.returncode


def record_figures(out: str) -> None:
    """make bench (bench/run_all.py): the guest's figures, from its one JSON line."""
    from _report import record

    line = next((x for x in out.splitlines() if x.startswith(FIGURES)), None)
    if line is None:
        return
    doc = json.loads(line[len(FIGURES):])
    results, ratios = doc["results"], doc["ratios"]
    record("bpf-tc", results["bpf-tc"], "packets/s")
    record("bpf-xdp", results["bpf-xdp"], "packets/s")
    record("kernel tunnel vs bpf-tc", results["kernel"], "packets/s", baseline="bpf-tc",
           ratios=ratios["kernel/bpf-tc"])
    record("kernel tunnel vs bpf-xdp", results["kernel"], "packets/s", baseline="bpf-xdp",
           ratios=ratios["kernel/bpf-xdp"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=1.0, help="per path and round")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--guest", action="store_true", help="measure here (inside the VM)")
    p.add_argument("--quick", action="store_true", help="two short rounds (smoke test)")
    args = p.parse_args()
    if args.quick:
        args.seconds, args.rounds = 0.3, 2
    if os.geteuid() != 0:
        print("ipip_tunnel_vm: run as root", file=sys.stderr)
        return 1
    return guest(args.seconds, args.rounds) if args.guest else host(args.seconds, args.rounds)


if __name__ == "__main__":
    sys.exit(main())
