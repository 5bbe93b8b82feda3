"""Circuit relay: stream throughput, connection set-up rate and memory, against socat.

"joinproxyd" is the circuit relay spliced in the kernel ([circuit] splice = on: a sockhash and
an sk_skb verdict program move the bytes); "jp-asyncio" is a second joinproxyd beside it, on
port 8445, with splice = off (the asyncio relay). Both relay to the same server.

    sudo .venv/bin/python bench/relay_throughput.py [--seconds 2] [--rounds 3] [--quick]

A namespace lab with one pledge and one registrar host. The registrar runs bench/_tcpflow.py's
server (sink, source, echo and hold in one asyncio process); the proxy runs the real joinproxyd
(circuit mode on join0, port 8443) and, beside it, socat relaying the same traffic to the same
server: ``socat TCP6-LISTEN:9443,bind=[fe80::1%join0],fork,reuseaddr TCP6:[registrar]:8443``,
and the same with ``-b65536`` on port 9444 ("socat-b64k"), because socat's default 8 KiB
buffer alone halves its stream throughput. The pledge runs the clients.

Each round measures every path once per test, one after the other, the order rotated between
rounds, so a burst of load from elsewhere on this shared 2-vCPU machine hits them alike; the
ratios joinproxyd/socat are paired within a round and their median (min-max) is printed. A
"direct" run (client on the proxy host, straight to the server, no relay) shows what the two
traffic ends alone reach. With a relay, sender, relay and sink share two CPUs, so throughput
is CPU-bound for everyone; the relay's own CPU time per GB (or per connection), from
/proc/<pid>/stat, is the figure that contention does not blur.

  1. throughput, MB/s (10^6 bytes), of one long TCP stream up (pledge -> registrar sink) and
     down (registrar source -> pledge);
  2. connection set-up rate, connections/s: connect, send 16 bytes, read the echo, close, in
     a few client threads at once;
  3. joinproxyd's VmRSS idle, and with N circuits held open (default 1000), giving bytes per
     circuit; and the open-file limit it runs with, since every circuit costs it two fds.

  4. where a connection's CPU goes in each daemon: one more connection-rate run with the
     daemon's cProfile switched on (the daemons run under a wrapper, PROFILER, that costs
     nothing while off), its time booked to accept, limits, connect, splice, relay, close,
     metrics, logging and the event loop (CATEGORY_ROOTS), as shares of the unprofiled
     CPU per connection.

joinproxyd's admission limits are raised so they do not interfere, and it logs at "info" (its
default; a circuit's opening and closing are debug lines, refusals are info).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lab import Host, Lab, Topology, wait_for
from lab.proxyd import ProxyDaemon, base_config

PY = sys.executable
FLOW = str(Path(__file__).resolve().parent / "_tcpflow.py")
REGISTRAR = "fd4a:5044::100"
SERVER_PORT = 8443  # the registrar port joinproxyd's base_config relays to
JOIN_PORT = 8443  # joinproxyd's circuit listener on the join link
SOCAT_PORT = 9443  # socat's listener beside it, as the brief gives it (8 KiB buffer)
SOCAT_BIG_PORT = 9444  # the same with -b65536: socat's default 8 KiB read size costs it a
# lot of throughput, so this shows what socat can do with joinproxyd's chunk size
PROXY_LL = "fe80::1%eth0"  # the proxy as a pledge sees it
TICK = os.sysconf("SC_CLK_TCK")
ASYNCIO_PORT = 8445  # the second joinproxyd, splice = off
RELAYS = ("joinproxyd", "jp-asyncio", "socat", "socat-b64k")
DAEMONS = ("joinproxyd", "jp-asyncio")
PORTS = {"joinproxyd": JOIN_PORT, "jp-asyncio": ASYNCIO_PORT, "socat": SOCAT_PORT,
         "socat-b64k": SOCAT_BIG_PORT}

LIMITS = {  # out of the way: the benchmark measures the relay, not admission control
    "circuits_total": 100_000, "circuits_per_interface": 100_000,
    "circuits_per_pledge": 100_000, "new_circuits_per_second": 1_000_000,
    "new_circuits_burst": 1_000_000, "idle_timeout": 300, "circuit_lifetime": 3600,
}


def cpu_seconds(pid: int, children: bool = False) -> float:
    """utime + stime (+ reaped children's, for socat's forked relays); proc(5) fields 14-17."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / TICK


def status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name == key:
            return int(value.split()[0])
    raise KeyError(key)


def machine_cpu_seconds() -> float:
    """Busy time of every CPU (all but idle and iowait), from /proc/stat: it includes the
    kernel's softirq and workqueue time, where a spliced circuit's bytes are moved."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / TICK


def nofile_limit(pid: int) -> str:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return f"{soft} soft / {hard} hard"
    return "?"


# The daemons run under this wrapper: cProfile, with the thread's CPU time as its clock (so a
# blocked epoll_wait costs nothing and a syscall's kernel time counts), off until PROFILE_ON
# and written to the file named by the first argument at PROFILE_OFF. Off, it costs nothing.
PROFILE_ON, PROFILE_OFF = signal.SIGRTMIN + 1, signal.SIGRTMIN + 2
PROFILER = f"""
import cProfile, runpy, signal, sys, time
out = sys.argv[1]
sys.argv = ["joinproxyd", *sys.argv[2:]]
profile = cProfile.Profile(time.thread_time)
def stop(*_):
    profile.disable()
    profile.dump_stats(out)
signal.signal({int(PROFILE_ON)}, lambda *_: profile.enable())
signal.signal({int(PROFILE_OFF)}, stop)
runpy.run_module("joinproxyd", run_name="__main__", alter_sys=True)
"""

# Where a circuit's CPU goes: each profiled function's own time is booked to the nearest
# of these on its callers' chain (split among callers by their share of its time).
# (file name ending, function or "*") -> category
CATEGORY_ROOTS: dict[tuple[str, str], str] = {
    ("asyncio/base_events.py", "_run_once"): "event loop",
    ("relays/circuit.py", "_accept"): "accept",
    ("relays/circuit.py", "admit"): "accept",
    ("joinproxyd/limits.py", "*"): "limits",
    ("relays/circuit.py", "connect"): "connect",
    ("relays/circuit.py", "_connect_done"): "connect",
    ("relays/circuit.py", "_connected"): "connect",
    ("relays/circuit.py", "_splice"): "splice",
    ("relays/circuit_splice.py", "*"): "splice",
    ("kernel/bpf.py", "*"): "splice",
    ("kernel/libbpf.py", "*"): "splice",
    ("prometheus_client/metrics.py", "*"): "metrics",
    ("prometheus_client/values.py", "*"): "metrics",
    ("joinproxyd/metrics.py", "*"): "metrics",
    ("logging/__init__.py", "*"): "logging",
    ("joinproxyd/logs.py", "*"): "logging",
    ("relays/circuit.py", "_readable"): "relay",
    ("relays/circuit.py", "_writable"): "relay",
    ("relays/circuit.py", "_eof"): "relay",
    ("relays/circuit.py", "_shut"): "relay",
    ("relays/circuit.py", "close"): "close",
    ("relays/circuit.py", "closed"): "close",
    ("relays/circuit.py", "_flush_then_close"): "close",
}
CATEGORIES = ("accept", "limits", "connect", "splice", "relay", "close", "metrics", "logging",
              "event loop", "other")


def _root(func: tuple[str, int, str]) -> str | None:
    path, _, name = func
    for (suffix, fname), category in CATEGORY_ROOTS.items():
        if path.endswith(suffix) and fname in ("*", name):
            return category
    return None


def breakdown(stats_path: Path) -> dict[str, float]:
    """CPU seconds per category from a cProfile dump (see CATEGORY_ROOTS)."""
    import pstats
    stats = pstats.Stats(str(stats_path)).stats  # type: ignore[attr-defined]
    memo: dict[tuple[str, int, str], dict[str, float]] = {}

    def share(func: tuple[str, int, str]) -> dict[str, float]:
        if func in memo:
            return memo[func]
        memo[func] = {"other": 1.0}  # a cycle back here books to "other"
        root = _root(func)
        if root is not None:
            memo[func] = {root: 1.0}
            return memo[func]
        callers = stats[func][4] if func in stats else {}
        weights = {c: v[3] for c, v in callers.items() if c in stats}
        total = sum(weights.values())
        if not total:
            return memo[func]
        mix: dict[str, float] = {}
        for caller, weight in weights.items():
            for category, part in share(caller).items():
                mix[category] = mix.get(category, 0.0) + part * weight / total
        memo[func] = mix
        return mix

    seconds = dict.fromkeys(CATEGORIES, 0.0)
    for func, (_, _, own, _, _) in stats.items():
        for category, part in share(func).items():
            seconds[category] += own * part
    return seconds


def flow(host: Host, *argv: str, timeout: float = 60) -> dict[str, float]:
    done = host.run([PY, FLOW, *argv], timeout=timeout)
    return json.loads(done.stdout)


@dataclass
class Series:
    """One figure, measured once per round on each path (direct, joinproxyd, socat...)."""

    unit: str
    paths: tuple[str, ...]
    values: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=dict)  # relay CPU per unit of work
    machine: dict[str, list[float]] = field(default_factory=dict)  # all CPUs, per unit

    def add(self, path: str, value: float, cpu_per_unit: float | None = None,
            machine_per_unit: float | None = None) -> None:
        self.values.setdefault(path, []).append(value)
        if cpu_per_unit is not None:
            self.cpu.setdefault(path, []).append(cpu_per_unit)
        if machine_per_unit is not None:
            self.machine.setdefault(path, []).append(machine_per_unit)

    def ratios(self, baseline: str, relay: str = "joinproxyd") -> list[float]:
        """relay/baseline, paired by round (both measured within seconds)."""
        jp, base = self.values.get(relay, []), self.values.get(baseline, [])
        return [a / b for a, b in zip(jp, base, strict=True) if b > 0]


class Bench:
    def __init__(self, lab: Lab, daemons: dict[str, ProxyDaemon], socat_pids: dict[str, int],
                 seconds: float, concurrency: int) -> None:
        self.lab = lab
        self.pledge = lab.pledges[0]
        self.daemons = daemons
        self.daemon_pids = {}
        for name, daemon in daemons.items():
            assert daemon.process is not None
            self.daemon_pids[name] = daemon.process.pid
        self.socat_pids = socat_pids
        self.seconds = seconds
        self.concurrency = concurrency

    def target(self, path: str) -> tuple[Host, str, int]:
        """Who runs the client, and where it connects, for each path."""
        if path == "direct":
            return self.lab.proxy, REGISTRAR, SERVER_PORT
        return self.pledge, PROXY_LL, PORTS[path]

    def reachable(self, port: int) -> bool:
        done = self.pledge.run(["socat", "-u", "OPEN:/dev/null", f"TCP6:[{PROXY_LL}]:{port}"],
                               check=False)
        return done.returncode == 0

    def relay_cpu(self, path: str) -> float:
        if path in self.daemon_pids:
            return cpu_seconds(self.daemon_pids[path])
        if path in self.socat_pids:
            return cpu_seconds(self.socat_pids[path], children=True)
        return 0.0

    def timed(self, path: str, run: Callable[[], dict[str, float]]
              ) -> tuple[dict[str, float], float, float]:
        before, machine = self.relay_cpu(path), machine_cpu_seconds()
        result = run()
        machine = machine_cpu_seconds() - machine
        if path in self.socat_pids:
            time.sleep(0.1)  # socat's children are reaped (and their CPU booked) on SIGCHLD
        return result, self.relay_cpu(path) - before, machine

    def stream(self, path: str, direction: str, series: Series) -> None:
        host, addr, port = self.target(path)
        result, cpu, machine = self.timed(path, lambda: flow(
            host, "send" if direction == "up" else "recv", addr, str(port),
            "--seconds", str(self.seconds)))
        mb = result["bytes"] / 1e6
        series.add(path, mb / result["seconds"],
                   cpu / (mb / 1000) if mb and path != "direct" else None,
                   machine / (mb / 1000) if mb else None)

    def rate(self, path: str, series: Series) -> None:
        host, addr, port = self.target(path)
        result, cpu, _ = self.timed(path, lambda: flow(
            host, "rate", addr, str(port), "--seconds", str(self.seconds),
            "--concurrency", str(self.concurrency)))
        if result["errors"]:
            print(f"  ({path}: {result['errors']:.0f} failed connections)", file=sys.stderr)
        n = result["connections"]
        series.add(path, n / result["seconds"],
                   cpu / n * 1e6 if n and path != "direct" else None)

    def profile(self, name: str, stats_path: Path) -> dict[str, float]:
        """One more connection-rate run against daemon `name` with its profiler on: CPU
        microseconds per connection by category (profiled, so inflated; shares are what
        count), plus "connections"."""
        pid = self.daemon_pids[name]
        stats_path.unlink(missing_ok=True)
        os.kill(pid, PROFILE_ON)
        host, addr, port = self.target(name)
        try:
            result = flow(host, "rate", addr, str(port), "--seconds", str(self.seconds),
                          "--concurrency", str(self.concurrency))
        finally:
            os.kill(pid, PROFILE_OFF)
        wait_for(lambda: stats_path.exists() and stats_path.stat().st_size > 0, 20,
                 f"{name}'s profile")
        time.sleep(0.2)  # written by the handler in one go; let it finish
        n = result["connections"] or 1
        per_conn = {c: v / n * 1e6 for c, v in breakdown(stats_path).items()}
        per_conn["connections"] = result["connections"]
        return per_conn

    def active(self, name: str = "joinproxyd") -> int:
        return int(self.daemons[name].ctl()["relays"]["circuit"]["active"])

    def hold(self, count: int, name: str = "joinproxyd") -> dict[str, float]:
        """RSS before and with `count` circuits held open from one pledge process."""
        pid = self.daemon_pids[name]
        # Warm-up: the first circuits import and allocate things once; not per circuit.
        self.hold_open(min(50, count), lambda: None, name)
        time.sleep(0.5)
        before = status_kib(pid, "VmRSS")
        held: dict[str, float] = {}

        def measure() -> None:
            wait_for(lambda: self.active(name) >= count, 20, f"{count} active circuits")
            held["rss_kib"] = status_kib(pid, "VmRSS")
            held["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
            held["spliced"] = self.daemons[name].ctl()["relays"]["circuit"]["splice"][
                "spliced_now"]

        self.hold_open(count, measure, name)
        return {"rss_before_kib": before, "rss_held_kib": held["rss_kib"],
                "fds_held": held["fds"], "count": count, "spliced": held["spliced"],
                "bytes_per_circuit": (held["rss_kib"] - before) * 1024 / count}

    def hold_open(self, count: int, while_held: Callable[[], None],
                  name: str = "joinproxyd") -> None:
        # After a storm the registrar's health probe may have timed out (joining closed,
        # circuits refused): wait until joining is open again.
        wait_for(lambda: self.daemons[name].ctl()["joining"], 20, f"{name} joining")
        argv = [PY, FLOW, "hold", PROXY_LL, str(PORTS[name]), "--count", str(count)]
        child = subprocess.Popen(self.pledge.cmd(argv), stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert child.stdout is not None and child.stdin is not None
            line = child.stdout.readline()
            if not line.startswith("ready"):
                log = self.daemons[name].log().splitlines()[-15:] if name in self.daemons \
                    else []
                raise RuntimeError(f"holding {count} circuits failed: {line!r} "
                                   f"{child.stderr.read() if child.stderr else ''}\n"
                                   f"{name}'s log, last lines:\n" + "\n".join(log))
            while_held()
            child.stdin.close()
            child.wait(30)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        wait_for(lambda: self.active(name) == 0, 20, "held circuits to close")


def median_range(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    mid = format(statistics.median(values), fmt)
    if len(values) == 1:
        return mid
    return f"{mid} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def report_breakdown(profiles: dict[str, dict[str, float]], series: Series) -> None:
    """Per-connection CPU by category: the profiled shares applied to the unprofiled
    CPU per connection measured in the rounds (cProfile inflates Python code more than
    syscalls, so the microseconds are an estimate; the shares are measured)."""
    if not profiles:
        return
    print("\nper-connection CPU by category (cProfile on the thread's CPU clock, one extra "
          "rate run per daemon; us = share x the unprofiled us/conn above)")
    names = list(profiles)
    print(f"{'':<24}" + "".join(f"{n:>19}" for n in names))
    scale = {}
    for name in names:
        profiled = sum(v for k, v in profiles[name].items() if k != "connections")
        measured = statistics.median(series.cpu[name]) if series.cpu.get(name) else profiled
        scale[name] = (measured / profiled if profiled else 0.0, profiled)
    for category in CATEGORIES:
        cells = []
        for name in names:
            factor, profiled = scale[name]
            us = profiles[name].get(category, 0.0)
            cells.append(f"{us * factor:6.0f} us {100 * us / profiled if profiled else 0:4.1f}%")
        print(f"  {category:<22}" + "".join(f"{c:>19}" for c in cells))
    print(f"  {'(profiled us/conn)':<22}" + "".join(f"{scale[n][1]:>19.0f}" for n in names))


def report(series: dict[str, Series], memories: dict[str, dict[str, float]], idle_kib: int,
           nofile: str, rounds: int) -> None:
    memory = memories["joinproxyd"]
    columns = ("direct", *RELAYS)
    width = 19
    print(f"\nrelay_throughput: medians over {rounds} round(s), (min-max) when more than one")
    print(f"{'':<24}" + "".join(f"{c:>{width}}" for c in columns))
    for name, s in series.items():
        cells = [median_range(s.values.get(p, []), ".0f") for p in columns]
        print(f"{name + ' ' + s.unit:<24}" + "".join(f"{c:>{width}}" for c in cells))
        label = "  relay CPU us/conn" if s.unit == "conn/s" else "  relay CPU s/GB"
        fmt = ".0f" if s.unit == "conn/s" else ".2f"
        cells = [median_range(s.cpu.get(p, []), fmt) if p in s.cpu else "" for p in columns]
        print(f"{label:<24}" + "".join(f"{c:>{width}}" for c in cells))
        if s.machine:
            cells = [median_range(s.machine.get(p, []), ".2f") for p in columns]
            print(f"{'  machine CPU s/GB':<24}" + "".join(f"{c:>{width}}" for c in cells))
    print("(relay CPU: user+system time of the relay process(es); direct has no relay. "
          "A spliced circuit's bytes move in softirq and kworker time, which no process is "
          "charged: machine CPU is all CPUs' busy time, senders and sinks included)")
    print()
    for name, s in series.items():
        for baseline in ("direct", *RELAYS[1:]):
            if baseline in s.paths:
                ratio = median_range(s.ratios(baseline), ".2f")
                print(f"ratio joinproxyd/{baseline:<11} {name:<12} {ratio}")
        for baseline in ("direct", "socat", "socat-b64k"):
            if "jp-asyncio" in s.paths and baseline in s.paths:
                ratio = median_range(s.ratios(baseline, "jp-asyncio"), ".2f")
                print(f"ratio jp-asyncio/{baseline:<11} {name:<12} {ratio}")
    print()
    print(f"joinproxyd RSS idle                {idle_kib / 1024:8.1f} MiB")
    print(f"joinproxyd RSS before holding      {memory['rss_before_kib'] / 1024:8.1f} MiB"
          "  (after the tests above and a warm-up)")
    print(f"joinproxyd RSS, {memory['count']:>5.0f} circuits open"
          f"{memory['rss_held_kib'] / 1024:8.1f} MiB  ({memory['fds_held']:.0f} fds open)")
    print(f"joinproxyd RSS per circuit         {memory['bytes_per_circuit']:8.0f} bytes")
    print(f"joinproxyd open-file limit         {nofile} (2 fds per circuit)")
    print(f"joinproxyd spliced circuits held   {memory['spliced']:8.0f} of {memory['count']:.0f}")
    other = memories.get("jp-asyncio")
    if other is not None:
        print(f"jp-asyncio RSS per circuit         {other['bytes_per_circuit']:8.0f} bytes"
              f"  ({other['spliced']:.0f} spliced)")


def run(seconds: float, rounds: int, circuits: int, concurrency: int,
        profile: bool = True) -> int:
    streams = ("direct", *RELAYS)
    series = {"stream up": Series("MB/s", streams), "stream down": Series("MB/s", streams),
              # socat's buffer size does not matter for 16-byte exchanges
              "connections": Series("conn/s", ("direct", "joinproxyd", "jp-asyncio", "socat"))}
    with tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp:
        work = Path(tmp)
        with Lab(Topology(pledges=1, registrars=1), log_dir=work / "logs") as lab:
            # Tens of thousands of short connections from one address: let connect() reuse
            # ports still in TIME_WAIT rather than run out of ephemeral ports (clients on the
            # pledge, joinproxyd's and socat's registrar-side connections on the proxy).
            for host in (lab.pledges[0], lab.proxy):
                host.run(["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"])
            server = lab.registrars[0].spawn(
                [PY, FLOW, "server", "--listen", REGISTRAR, "--port", str(SERVER_PORT)],
                name="flow-server")
            wait_for(lambda: "listening" in server.log(), 10, "the flow server")
            config = base_config(
                work / "proxy", limits=LIMITS,
                daemon={"log_level": "info"},
                # probes and floods are background noise here, keep them rare
                registrars={"health_interval": 2.0, "health_timeout": 3.0},
                announce={"interval": 30, "mdns": False})
            config["circuit"] = {"splice": "on"}
            daemon = ProxyDaemon(lab, work / "proxy", config, command=[
                PY, "-c", PROFILER, str(work / "joinproxyd.pstats")]).start()
            asyncio_config = base_config(
                work / "proxy-asyncio", limits=LIMITS, daemon={"log_level": "info"},
                registrars={"health_interval": 2.0, "health_timeout": 3.0},
                announce={"interval": 30, "mdns": False, "grasp": False},
                metrics={"listen": "[::1]:9466"}, circuit={"splice": "off"},
                join=[{"interfaces": ["join*"], "modes": ["circuit"], "port": ASYNCIO_PORT}])
            other = ProxyDaemon(lab, work / "proxy-asyncio", asyncio_config, command=[
                PY, "-c", PROFILER, str(work / "jp-asyncio.pstats")]).start()
            daemons = {"joinproxyd": daemon, "jp-asyncio": other}
            for d in daemons.values():
                wait_for(lambda d=d: d.ctl()["joining"], 10, "a healthy registrar")
            splice = daemon.ctl()["relays"]["circuit"]["splice"]
            if not splice["running"]:
                raise RuntimeError(f"the kernel splice is not running: {splice['reason']}")
            assert daemon.process is not None
            time.sleep(0.5)
            idle_kib = status_kib(daemon.process.pid, "VmRSS")
            nofile = nofile_limit(daemon.process.pid)
            socats = {}
            for name, extra in (("socat", []), ("socat-b64k", ["-b65536"])):
                socats[name] = lab.proxy.spawn(
                    ["socat", *extra,
                     f"TCP6-LISTEN:{PORTS[name]},bind=[fe80::1%join0],fork,reuseaddr",
                     f"TCP6:[{REGISTRAR}]:{SERVER_PORT}"], name=name).pid
            bench = Bench(lab, daemons, socats, seconds, concurrency)
            for name in socats:
                wait_for(lambda port=PORTS[name]: bench.reachable(port), 10, f"{name} listening")
            for r in range(rounds):
                for name, s in series.items():
                    order = s.paths[r % len(s.paths):] + s.paths[:r % len(s.paths)]
                    for path in order:  # rotated: no path always runs first or last
                        if s.unit == "conn/s":
                            bench.rate(path, s)
                        else:
                            bench.stream(path, name.split()[1], s)
                print(f"round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
            profiles = {name: bench.profile(name, work / f"{name}.pstats")
                        for name in DAEMONS} if profile else {}
            memories = {name: bench.hold(circuits, name) for name in DAEMONS}
            for d in daemons.values():
                d.stop()
    report(series, memories, idle_kib, nofile, rounds)
    report_breakdown(profiles, series["connections"])
    from _report import record  # make bench (bench/run_all.py): the same figures

    # "joinproxyd" runs splice = on, "jp-asyncio" the default relay (splice off or auto).
    targets = {("connections", "jp-asyncio", "socat"): 1.2,  # issue 18 item 5
               ("stream up", "joinproxyd", "direct"): 0.8,  # issue 19 item 2: the splice
               ("stream down", "joinproxyd", "direct"): 0.8}
    for name, s in series.items():
        for path in ("direct", "socat", "socat-b64k"):  # the baselines
            if path in s.paths:
                record(f"{name}: {path}", s.values.get(path, []), s.unit)
        cpu_unit = "µs/conn" if s.unit == "conn/s" else "s/GB"
        for relay in DAEMONS:
            label = "spliced" if relay == "joinproxyd" else "asyncio"
            record(f"{name}: {label} relay CPU", s.cpu.get(relay, []), cpu_unit,
                   better="lower")
            for baseline in ("direct", "socat", "socat-b64k"):
                if baseline in s.paths:
                    record(f"{name}: {label} vs {baseline}", s.values.get(relay, []), s.unit,
                           baseline=f"{name}: {baseline}", ratios=s.ratios(baseline, relay),
                           target=targets.get((name, relay, baseline)))
    for name, memory in memories.items():
        label = "spliced" if name == "joinproxyd" else "asyncio"
        record(f"{label} RSS per circuit", memory["bytes_per_circuit"], "bytes",
               better="lower")
    return 0


# -- the kernel's splice alone: which sockmap set-up moves bytes fastest ---------------------
# Each variant is a bare splicer in the proxy namespace (floor_proxy below: accept, connect,
# SplicedCircuit.start, nothing else; no joinproxyd), on a port of its own. With --variants
# the streams run through each and straight to the server (direct), rotated per round.
VARIANTS: dict[str, dict[str, int]] = {
    "stream-verdict": {"attach": 5},  # BPF_SK_SKB_STREAM_VERDICT, kernel's buffer autotuning
    "skb-verdict": {"attach": 38},  # BPF_SK_SKB_VERDICT (5.13+): no stream wrapper
    "stream+nodelay0": {"attach": 5, "nodelay": 0},  # Nagle on the egress sockets
    "stream+snd4M": {"attach": 5, "snd": 4 << 20},  # SO_SNDBUFFORCE 4 MiB on both sockets
    "stream+rcv4M": {"attach": 5, "rcv": 4 << 20},  # SO_RCVBUFFORCE 4 MiB on both sockets
    "stream+buf4M": {"attach": 5, "snd": 4 << 20, "rcv": 4 << 20},
}
VARIANT_PORT = 9450


async def floor_proxy(port: int, attach: int, snd: int, rcv: int, nodelay: int) -> None:
    """Splice every connection to [port] on join0 to the registrar, as joinproxyd does, and
    nothing else: the kernel's sockmap path with the least user space around it."""
    import asyncio
    import socket

    from joinproxyd.kernel.bpf import Splicer
    from joinproxyd.relays.circuit_splice import SplicedCircuit

    splicer = Splicer(attach=attach)
    loop = asyncio.get_running_loop()
    listener = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("fe80::1", port, 0, socket.if_nametoindex("join0")))
    listener.listen(64)
    listener.setblocking(False)

    class Owner:
        spliced: SplicedCircuit | None = None

        def close(self, abort: bool = False) -> None:
            if self.spliced is not None and not self.spliced.closed:
                # The program counts skbs as well as bytes: their mean size tells whether
                # the bytes came in MSS-sized segments or merged ones.
                sizes = []
                for end in (self.spliced.pledge, self.spliced.registrar):
                    row = splicer.side(end.cookie)
                    # a stream's direction only, not the other side's one-line request
                    big = row is not None and row.bytes > 1_000_000 and row.segments
                    sizes.append(row.bytes // row.segments if big else 0)
                print(f"skb-bytes up {sizes[0]} down {sizes[1]}", flush=True)
                self.spliced.close(abort)

        def touch(self) -> None:
            pass

    print("listening", flush=True)
    while True:
        pledge, _ = await loop.sock_accept(listener)
        registrar = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        registrar.setblocking(False)
        for sock in (pledge, registrar):
            if snd:
                sock.setsockopt(socket.SOL_SOCKET, 32, snd)  # SO_SNDBUFFORCE
            if rcv:
                sock.setsockopt(socket.SOL_SOCKET, 33, rcv)  # SO_RCVBUFFORCE
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, nodelay)
        await loop.sock_connect(registrar, (REGISTRAR, SERVER_PORT))
        owner = Owner()
        owner.spliced = SplicedCircuit(splicer, owner, pledge, registrar)
        owner.spliced.start(5.0)


def run_variants(seconds: float, rounds: int) -> int:
    """Two phases in one lab: as the lab is (the pledge sends MSS-sized segments: its veth
    has checksum offload off, hence no TSO, and the proxy's veth merges nothing; GRO on
    join0 changed nothing in a trial run), then with TSO on the pledge (64 KiB segments
    arrive, as from a NIC that does GRO)."""
    paths = ("direct", *VARIANTS)
    phases: dict[str, dict[str, Series]] = {
        phase: {"stream up": Series("MB/s", paths), "stream down": Series("MB/s", paths)}
        for phase in ("lab default", "pledge TSO on")}
    with (tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp,
          Lab(Topology(pledges=1, registrars=1), log_dir=Path(tmp) / "logs") as lab):
        server = lab.registrars[0].spawn(
            [PY, FLOW, "server", "--listen", REGISTRAR, "--port", str(SERVER_PORT)],
            name="flow-server")
        wait_for(lambda: "listening" in server.log(), 10, "the flow server")
        procs = {}
        for i, (name, knobs) in enumerate(VARIANTS.items()):
            PORTS[name] = VARIANT_PORT + i
            procs[name] = lab.proxy.spawn(
                [PY, __file__, "--floor-proxy", str(PORTS[name]), str(knobs["attach"]),
                 str(knobs.get("snd", 0)), str(knobs.get("rcv", 0)),
                 str(knobs.get("nodelay", 1))],
                name=f"floor-{name}")
        for name, proc in procs.items():
            wait_for(lambda proc=proc: "listening" in proc.log(), 10, f"{name} up")
        bench = Bench(lab, {}, {}, seconds, 1)
        skb_sizes: dict[str, str] = {}
        for phase, series in phases.items():
            seen = len(procs["stream-verdict"].log())
            if phase == "pledge TSO on":  # the pledge hands 64 KiB segments to its veth
                bench.pledge.run(["ethtool", "-K", "eth0", "tx", "on", "tso", "on"])
            for r in range(rounds):
                for name, s in series.items():
                    order = s.paths[r % len(s.paths):] + s.paths[:r % len(s.paths)]
                    for path in order:
                        bench.stream(path, name.split()[1], s)
                print(f"{phase}: round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
            skb_sizes[phase] = _skb_sizes(procs["stream-verdict"].log()[seen:])
    for phase, series in phases.items():
        print(f"\nsplice variants, {phase} (bare splicer, no joinproxyd): medians over "
              f"{rounds} round(s)")
        print(f"{'':<24}" + "".join(f"{p:>19}" for p in paths))
        for name, s in series.items():
            cells = [median_range(s.values.get(p, []), ".0f") for p in paths]
            print(f"{name + ' MB/s':<24}" + "".join(f"{c:>19}" for c in cells))
            cells = [median_range(s.machine.get(p, []), ".2f") for p in paths]
            print(f"{'  machine CPU s/GB':<24}" + "".join(f"{c:>19}" for c in cells))
            cells = [median_range(s.ratios("direct", p), ".2f") for p in paths]
            print(f"{'  x direct':<24}" + "".join(f"{c:>19}" for c in cells))
        print(f"mean bytes per skb through the program (stream-verdict): {skb_sizes[phase]}")
    return 0


def _skb_sizes(log: str) -> str:
    """The floor proxy's per-circuit skb sizes ("skb-bytes up U down D"), as ranges."""
    up, down = [], []
    for line in log.splitlines():
        if line.startswith("skb-bytes"):
            fields = line.split()
            for values, text in ((up, fields[2]), (down, fields[4])):
                if int(text):
                    values.append(float(text))
    return f"up {median_range(up, '.0f')}, down {median_range(down, '.0f')}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=2.0, help="length of each measurement")
    p.add_argument("--rounds", type=int, default=3, help="measurements of each path")
    p.add_argument("--circuits", type=int, default=1000, help="circuits held for RSS")
    p.add_argument("--concurrency", type=int, default=4,
                   help="client threads in the connection-rate test")
    p.add_argument("--quick", action="store_true",
                   help="smallest settings, for the smoke test: 1 round of 0.3 s, 50 circuits "
                   "(the figures mean little)")
    p.add_argument("--no-profile", action="store_true",
                   help="skip the profiled connection-rate run (the per-connection breakdown)")
    p.add_argument("--variants", action="store_true",
                   help="instead: the kernel splice alone (no joinproxyd) in each VARIANTS "
                   "set-up against direct TCP")
    p.add_argument("--floor-proxy", nargs=5, type=int, help=argparse.SUPPRESS,
                   metavar=("PORT", "ATTACH", "SNDBUF", "RCVBUF", "NODELAY"))  # --variants
    args = p.parse_args()
    if args.floor_proxy:
        import asyncio
        asyncio.run(floor_proxy(*args.floor_proxy))
        return 0
    if os.geteuid() != 0:
        print("relay_throughput: run as root (it creates network namespaces)", file=sys.stderr)
        return 2
    if args.quick:
        args.seconds, args.rounds, args.circuits = 0.3, 1, 50
    if args.variants:
        return run_variants(args.seconds, args.rounds)
    return run(args.seconds, args.rounds, args.circuits, args.concurrency,
               not args.no_profile)


if __name__ == "__main__":
    sys.exit(main())
