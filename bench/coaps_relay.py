"""coaps relay: datagrams/s against a bare asyncio UDP relay, and memory per flow.

    sudo .venv/bin/python bench/coaps_relay.py [--seconds 3] [--rounds 3] [--flows 10000]
                                               [--quick]

A namespace lab with one pledge and one registrar host. The registrar runs a UDP echo server
(bench/_udpflow.py echo) on 5684. The proxy runs the real joinproxyd, coaps mode on join0
port 5684, and beside it bench/_udpflow.py's bare asyncio UDP relay on port 5685 (per client
address and port a connected socket towards the same echo server; no limits, no expiry, no
counters, no logging), so both relays forward the same datagrams to the same server in the
same run. The pledge runs the load: 8 flows, each keeping 8 datagrams of 100 bytes in flight
(a DTLS handshake flight is a few such datagrams).

  1. echoes/s (each echo is two relayed datagrams, up and down) through joinproxyd and
     through the bare relay, measured alternately per round (order rotated) on this shared
     machine; the ratio joinproxyd/bare per round and its median are printed;
  2. joinproxyd's VmRSS idle and with N flows (default 10,000: N pledge source ports, each
     answered once, then held), giving bytes per flow; each flow also costs the kernel a
     socket (not in RSS) and the process one file descriptor.

joinproxyd's flow limits and idle timeout are raised so they do not interfere; it logs at
"info" (its default), so the log line per opened flow is part of what a flow costs.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lab import Lab, Topology, wait_for
from lab.proxyd import ProxyDaemon, base_config

PY = sys.executable
FLOW = str(Path(__file__).resolve().parent / "_udpflow.py")
REGISTRAR = "fd4a:5044::100"
COAPS_PORT = 5684
JOIN_PORT = 5684
BARE_PORT = 5685
PROXY_LL = "fe80::1"


def status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name == key:
            return int(value.split()[0])
    raise KeyError(key)


def run(seconds: float, rounds: int, flows: int, load_flows: int, window: int) -> int:
    with tempfile.TemporaryDirectory(prefix="coaps-bench-") as tmp:
        work = Path(tmp)
        with Lab(Topology(pledges=1, registrars=1), log_dir=work / "logs") as lab:
            lab.registrars[0].spawn(["sh", "-c", "echo up; exec " + " ".join(
                [PY, FLOW, "echo", str(COAPS_PORT)])], name="udp-echo")
            lab.registrars[0].spawn(  # the health probe's TCP port
                ["socat", "TCP6-LISTEN:8443,fork,reuseaddr", "SYSTEM:true"], name="tcp")
            config = base_config(
                work / "proxy",
                join=[{"interfaces": ["join*"], "modes": ["coaps"], "port": JOIN_PORT}],
                registrars={"static": [{"address": REGISTRAR, "port": 8443,
                                        "preference": 10, "coaps_port": COAPS_PORT}],
                            "health_interval": 2.0, "health_timeout": 1.0},
                limits={"flows_per_pledge": 100_000, "flows_per_interface": 100_000,
                        "flow_idle_timeout": 600},
                daemon={"log_level": "info"},
                announce={"interval": 30, "mdns": False})
            daemon = ProxyDaemon(lab, work / "proxy", config).start()
            wait_for(lambda: daemon.ctl()["joining"], 10, "a healthy registrar")
            bare = lab.proxy.spawn([PY, FLOW, "relay", PROXY_LL, str(BARE_PORT), "join0",
                                    REGISTRAR, str(COAPS_PORT)], name="bare-relay")
            wait_for(lambda: "relay ready" in bare.log(), 10, "the bare relay")
            assert daemon.process is not None
            pid = daemon.process.pid
            time.sleep(0.5)
            idle_kib = status_kib(pid, "VmRSS")
            rates: dict[str, list[float]] = {"joinproxyd": [], "bare": []}
            ports = {"joinproxyd": JOIN_PORT, "bare": BARE_PORT}
            for r in range(rounds):
                order = list(rates) if r % 2 == 0 else list(reversed(rates))
                for name in order:
                    done = lab.pledges[0].run(
                        [PY, FLOW, "load", PROXY_LL, str(ports[name]), str(seconds),
                         str(load_flows), str(window), "100"], timeout=seconds + 60)
                    rates[name].append(float(done.stdout.split("rate ")[1]))
                print(f"round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
            time.sleep(1.5)  # the sweeper moves counts into the metrics once a second
            counted = sum(daemon.sample("joinproxyd_relayed_datagrams_total", mode="coaps",
                                        direction=d) for d in ("upstream", "downstream"))
            # memory: flows held open (the load's flows count too: subtract them)
            before_flows = len(daemon.ctl("circuits"))
            before_kib = status_kib(pid, "VmRSS")
            holder = subprocess.Popen(
                lab.pledges[0].cmd([PY, FLOW, "hold", PROXY_LL, str(JOIN_PORT), str(flows)]),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert holder.stdout is not None
            held_line = holder.stdout.readline().strip()
            held = int(held_line.split()[1]) if held_line.startswith("held") else 0
            time.sleep(0.5)
            after_flows = len(daemon.ctl("circuits"))
            after_kib = status_kib(pid, "VmRSS")
            fds = len(list(Path(f"/proc/{pid}/fd").iterdir()))
            assert holder.stdin is not None
            holder.stdin.close()
            holder.wait(30)
            daemon.stop()
    print(f"coaps relay, {load_flows} flows x {window} datagrams of 100 bytes in flight, "
          f"{seconds:g} s per run, {rounds} rounds")
    for name, values in rates.items():
        print(f"{name:<12} echoes/s   median {statistics.median(values):10.1f}   "
              f"({', '.join(f'{v:.0f}' for v in values)})  = 2 relayed datagrams each")
    ratios = [j / b for j, b in zip(rates["joinproxyd"], rates["bare"], strict=True) if b]
    print(f"ratio joinproxyd/bare datagrams/s  {statistics.median(ratios):.2f} "
          f"(min {min(ratios):.2f}, max {max(ratios):.2f})")
    print(f"joinproxyd's own count of datagrams relayed in the runs: {counted:.0f} "
          f"(vs 2 x {sum(rates['joinproxyd']) * seconds:.0f} echoes measured by the client)")
    new_flows = after_flows - before_flows
    per_flow = (after_kib - before_kib) * 1024 / new_flows if new_flows else float("nan")
    print(f"joinproxyd RSS idle                {idle_kib} KiB")
    print(f"joinproxyd RSS with {after_flows} flows     {after_kib} KiB "
          f"(+{after_kib - before_kib} KiB for {new_flows} new flows; hold client saw {held})")
    print(f"joinproxyd RSS per flow            {per_flow:.0f} bytes")
    print(f"joinproxyd open fds with the flows {fds} (1 per flow)")
    from _report import record  # make bench (bench/run_all.py): the same figures

    record("bare", rates["bare"], "echoes/s")
    record("joinproxyd", rates["joinproxyd"], "echoes/s", baseline="bare", ratios=ratios,
           target=0.8)
    record("joinproxyd RSS per flow", per_flow, "bytes", better="lower")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--flows", type=int, default=10_000)
    parser.add_argument("--quick", action="store_true", help="1 s, 2 rounds, 500 flows")
    args = parser.parse_args()
    if args.quick:
        return run(1.0, 2, 500, 8, 8)
    return run(args.seconds, args.rounds, args.flows, 8, 8)


if __name__ == "__main__":
    sys.exit(main())
