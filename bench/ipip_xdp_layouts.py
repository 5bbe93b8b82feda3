"""Compare builds of the XDP encapsulation in one run: each build's jp_xdp_join against the
push floor (jp_bare_push) and a bare redirect, on live frames, paired within sets.

    sudo .venv/bin/python bench/ipip_xdp_layouts.py [--sets 20] [--repeat 200000] DIR...

Each DIR holds a build of the BPF objects (ipip.bpf.o, guard.bpf.o, bare_redirect.bpf.o);
the first DIR's bare programs are the baselines. Figures are the kernel's own time per
frame of each live-frame test run (BPF_PROG_TEST_RUN with BPF_F_TEST_XDP_LIVE_FRAMES),
which leaves out the time the thread was preempted; ratios are throughput ratios
(floor ns / encap ns) taken within each set, reported as median (min-max)."""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

from ipip_pps import OUTER_SRC, PORT, REG_LL, REGISTRAR, ipv6_udp_frame, link, topology

from joinproxyd.kernel.bpf import BpfDatapath
from joinproxyd.kernel.bpf_layout import IpipJoin, Program
from joinproxyd.kernel.bpf_object import DEFAULT_OBJ_DIR
from lab.netns import thread_in_namespace


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("dirs", nargs="*", type=Path,
                   help="builds of the BPF objects (default: the one the daemon loads)")
    p.add_argument("--sets", type=int, default=20)
    p.add_argument("--repeat", type=int, default=200_000)
    p.add_argument("--quick", action="store_true", help="a few short sets (smoke test)")
    args = p.parse_args()
    if os.geteuid() != 0:
        print("ipip_xdp_layouts: run as root", file=sys.stderr)
        return 1
    if args.quick:
        args.sets, args.repeat = 3, 20_000
    args.dirs = args.dirs or [DEFAULT_OBJ_DIR]
    names = [d.name or str(d) for d in args.dirs]
    ns_of: dict[str, list[float]] = {k: [] for k in ["bare", "push", *names]}
    ratio: dict[str, list[float]] = {n: [] for n in names}
    with topology() as (gen, proxy, reg):
        dps = [BpfDatapath.open(d, pin_dir=None, netns=proxy, objects=("ipip", "bare"))
               for d in args.dirs]
        with BpfDatapath.open(args.dirs[0], pin_dir=None, netns=reg,
                              objects=("bare",)) as dp_reg:
            try:
                join0, join0_mac = link(proxy, "join0")
                bb0, _ = link(proxy, "bb0")
                _, g0_mac = link(gen, "g0")
                dp_reg.set_bare_target(0)
                dp_reg.attach_xdp("r0", Program.BARE_REDIRECT)
                for dp in dps:
                    dp.set_bare_target(bb0)
                    dp.set_ipip({join0: IpipJoin(registrar_ll=REG_LL, outer_src=OUTER_SRC,
                                                 registrar=REGISTRAR, backbone_ifindex=bb0,
                                                 ports=(PORT,))})
                frame = ipv6_udp_frame(join0_mac, g0_mac)
                runs = [("bare", dps[0], Program.BARE_REDIRECT),
                        ("push", dps[0], Program.BARE_PUSH)]
                runs += [(n, dp, Program.XDP_JOIN) for n, dp in zip(names, dps, strict=True)]

                def timed(dp: BpfDatapath, prog: Program) -> int:
                    with thread_in_namespace(proxy):
                        return dp.bench_run(prog, frame, repeat=args.repeat, live=True,
                                            ifindex=join0)

                for _, dp, prog in runs:  # warm up
                    timed(dp, prog)
                encaps = {n: dp.counters()[(Program.XDP_JOIN.value, "encap")]
                          for n, dp in zip(names, dps, strict=True)}
                for s in range(args.sets):
                    k = s % len(runs)
                    got = {name: timed(dp, prog) for name, dp, prog in runs[k:] + runs[:k]}
                    for name, ns in got.items():
                        ns_of[name].append(ns)
                    for n in names:
                        ratio[n].append(got["push"] / got[n])
                for n, dp in zip(names, dps, strict=True):
                    done = dp.counters()[(Program.XDP_JOIN.value, "encap")] - encaps[n]
                    if done != args.sets * args.repeat:
                        print(f"  ({n}: {args.sets * args.repeat - done} frames not "
                              "encapsulated)", file=sys.stderr)
            finally:
                for dp in dps:
                    dp.close()
    print(f"live frames, 64-byte UDP, {args.sets} sets of {args.repeat:,} frames per path; "
          "ns per frame median (min-max)")
    for name, values in ns_of.items():
        print(f"  {name:<14}{statistics.median(values):7.1f} ns  ({min(values)}-{max(values)})"
              f"  {1e3 / statistics.median(values):6.2f} Mpps")
    for n in names:
        v = ratio[n]
        print(f"ratio {n}/push-floor  {statistics.median(v):.3f}  ({min(v):.3f}-{max(v):.3f})"
              "  target >= 0.95")
    v = [b / p for b, p in zip(ns_of["bare"], ns_of["push"], strict=True)]
    print(f"ratio push-floor/bare-redirect  {statistics.median(v):.3f}  "
          f"({min(v):.3f}-{max(v):.3f})")
    from _report import record  # make bench (bench/run_all.py): the same figures

    def mpps(ns: list[float]) -> list[float]:  # the kernel's time per frame, as a rate
        return [1e3 / x for x in ns]

    record("push floor", mpps(ns_of["push"]), "Mpps (kernel time)")
    record("bare redirect", mpps(ns_of["bare"]), "Mpps (kernel time)")
    for n in names:  # issue 18 item 4: >= 0.95 of the push floor
        record(f"xdp encap ({n}) vs push floor", mpps(ns_of[n]), "Mpps (kernel time)",
               baseline="push floor", ratios=ratio[n], target=0.95)
    return 0


if __name__ == "__main__":
    sys.exit(main())
