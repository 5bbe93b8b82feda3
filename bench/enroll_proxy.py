"""Enrollment rate through joinproxyd's circuit proxy against direct to the registrar, and
through HAProxy as a reference relay, in the same run (issue 18 item 1).

    sudo .venv/bin/python bench/enroll_proxy.py [--pledges 200] [--concurrency 20]
                                                [--rounds 2] [--json] [--profile DIR]
                                                [--splice auto|on|off] [--reference none]
                                                [--pledge-sim-arg=--reconnect-after-voucher]

One namespace lab: the real brski-masa and brski-registrar on the registrar host (HTTPS,
BRSKI + EST, CMS vouchers), joinproxyd in circuit mode on the proxy (lab.registrar_cluster's
configuration, per-pledge limits lifted: one pledge host stands for the fleet), one
pledge-sim process per run. A "proxy" run enrolls from the join link through joinproxyd
(``[fe80::1%eth0]:8443``); a "direct" run enrolls from the proxy's namespace straight to the
registrar's backbone address (the proxy's host is on the backbone, like a pledge attached
beside the registrar; joinproxyd idles meanwhile). A "haproxy" run enrolls from the join
link through HAProxy (Debian's, TCP mode, one thread, no logging) on the proxy host, port
8444 of the same join link, forwarding to the same registrar: what a circuit costs when the
relay is a production TCP proxy written in C, i.e. the price of the second TCP connection
itself, measured beside ours. Each round does one run of each path with fresh serials, the
order reversed every other round so the machine's drift is shared; the ratios proxy/direct,
haproxy/direct and proxy/haproxy are taken within each round. A warm-up run (``--warmup``
pledges, direct) comes first, unmeasured: the registrar's first enrollments open its MASA
connections. pledge-sim writes its devices' LDevID files on tmpfs (/dev/shm): they are the
devices' own storage.

Reported per run: enrollments per second over pledge-sim's own enrolling time (and over
the whole process), the CPU time (user + system) of registrar, MASA, joinproxyd and HAProxy
from /proc before and after, and of pledge-sim from its rusage when it is reaped, per
enrollment; and the whole machine's busy CPU time per enrollment (/proc/stat, softirqs and
kernel threads included, other work on the machine too).

``--profile DIR`` samples every process with py-spy (``--nonblocking``, 200 Hz) and writes
collapsed stacks per run and process into DIR (``<run>-<process>.txt``), with a summary of
the hottest own-time frames; the rates of a profiled run are not comparable to others.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from enroll_rate import make_pki, memory_kib, run_measured  # bench/, beside this script
from prometheus_client.parser import text_string_to_metric_families

from lab import Lab, Topology
from lab.proxyd import ProxyDaemon
from lab.registrar_cluster import ULAS, proxy_config
from lab.registrar_setup import wait_ready, write_configs
from lab.topology import Host, wait_for

PY = sys.executable
PORT = 8443
PATHS = ("direct", "proxy")
REFERENCE = "haproxy"
REFERENCE_PORT = 8444
HAPROXY = shutil.which("haproxy")
MASA_PORT = 9443
METRICS_PORT = 9466  # the registrar's /metrics, on its host's loopback
PY_SPY = shutil.which("py-spy", path=str(Path(PY).parent)) or shutil.which("py-spy")
# pledge-sim's LDevID files stand for what each device keeps in its own flash, not for the
# proxy's or the registrar's disk: on tmpfs they do not charge this host's file system (on
# an ext4 /tmp, creating them cost 0.6-2.9 ms of CPU per pledge) to the rates compared.
# The registrar's and the MASA's stores stay on disk, with their fsyncs.
DEVICE_STORAGE = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())


def start_profiler(pid: int, out: Path) -> subprocess.Popen[bytes]:
    assert PY_SPY is not None
    return subprocess.Popen([PY_SPY, "record", "--nonblocking", "--rate", "200", "--format",
                             "raw", "--pid", str(pid), "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_profiler(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def hottest(collapsed: Path, top: int = 25) -> list[tuple[str, float]]:
    """(frame, share of samples) for the frames with the most own time."""
    own: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack.split(";")
        own[frames[-1]] += int(count)
        total += int(count)
    return [(frame, round(n / total, 3)) for frame, n in own.most_common(top)] if total else []


def loop_lag(host: Host) -> dict[str, float]:
    """The registrar's event-loop lag histogram (cumulative bucket counts by upper bound,
    "count", "sum"), from its /metrics."""
    text = host.run(["curl", "-sf", f"http://[::1]:{METRICS_PORT}/metrics"]).stdout
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "brski_registrar_event_loop_lag_seconds":
            continue
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                out[sample.labels["le"]] = sample.value
            elif sample.name.endswith(("_count", "_sum")):
                out[sample.name.rsplit("_", 1)[1]] = sample.value
    return out


def lag_summary(before: dict[str, float], after: dict[str, float]) -> dict[str, float | None]:
    """Over one run: ticks, mean lag, the share 10 ms or more late, and the bucket bound
    under which 99 % of ticks were (ms)."""
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    ticks = delta.get("count", 0.0)
    if not ticks:
        return {"ticks": 0, "mean_ms": None, "late_10ms_share": None, "p99_ms": None}
    bounds = sorted((float(k), v) for k, v in delta.items() if k not in ("count", "sum"))
    p99 = next((b for b, n in bounds if n >= 0.99 * ticks), float("inf"))
    under_10ms = next((n for b, n in bounds if b == 0.01), ticks)
    return {"ticks": int(ticks), "mean_ms": round(1000 * delta["sum"] / ticks, 2),
            "late_10ms_share": round(1 - under_10ms / ticks, 3),
            "p99_ms": None if p99 == float("inf") else round(1000 * p99, 1)}


def haproxy_config(registrar: str) -> str:
    """HAProxy as an operator would run a TCP relay: TCP mode, one thread (joinproxyd runs one
    event loop), no logging, timeouts as joinproxyd's defaults allow, listening on the join
    link only (SO_BINDTODEVICE) like joinproxyd's listener."""
    return (f"global\n  nbthread 1\n  maxconn 4096\n"
            f"defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n"
            f"  timeout server 60s\n"
            f"listen circuit\n  bind :::{REFERENCE_PORT} interface join0\n"
            f"  server registrar [{registrar}]:{PORT}\n")


def relay_of(path: str) -> str:
    """The process that relays a path's circuits (its CPU column)."""
    return REFERENCE if path == REFERENCE else "joinproxyd"


def masa_connections(host: Host) -> int:
    """The registrar's established TCP connections to its MASA (kept alive and reused)."""
    done = host.run(["ss", "-Htn", "state", "established", f"( dport = :{MASA_PORT} )"])
    return len(done.stdout.splitlines())


def enroll(lab: Lab, work: Path, path: str, serials: list[str], concurrency: int,
           pids: dict[str, int], profile: Path | None, tag: str,
           extra: Sequence[str] = ()) -> dict[str, object]:
    """One pledge-sim run of these serials, direct or through the proxy, measured."""
    if path == "proxy":
        host, target = lab.pledges[0], f"[fe80::1%eth0]:{PORT}"
    elif path == REFERENCE:
        host, target = lab.pledges[0], f"[fe80::1%eth0]:{REFERENCE_PORT}"
    else:
        host, target = lab.proxy, f"[{ULAS[0]}]:{PORT}"
    argv = [PY, "-m", "pledge_sim.cli", "enroll", "--json", "--pki", str(work / "pki"),
            "--concurrency", str(concurrency), "--registrar", target,
            "--deadline", "300", "--out", str(work / "devices" / f"out-{tag}"), *extra]
    for serial in serials:
        argv += ["--serial", serial]
    if profile is not None:
        argv = [str(PY_SPY), "record", "--nonblocking", "--rate", "200", "--format", "raw",
                "--output", str(profile / f"{tag}-pledges.txt"), "--", *argv]
    profilers = ([start_profiler(pid, profile / f"{tag}-{name}.txt")  # py-spy: Python only
                  for name, pid in pids.items() if name != REFERENCE]
                 if profile is not None else [])
    registrar_host = lab.registrars[0]
    lag_before = loop_lag(registrar_host)
    run = run_measured(host.cmd(argv), work / f"report-{tag}.json", pids, len(serials))
    lag = lag_summary(lag_before, loop_lag(registrar_host))
    masa_conns = masa_connections(registrar_host)
    for proc in profilers:
        stop_profiler(proc)
    return {
        "path": path,
        **run,
        "registrar_loop_lag": lag,
        "registrar_masa_connections": masa_conns,
    }


def measure(pledges: int, concurrency: int, rounds: int, warmup: int,
            profile: Path | None, extra: Sequence[str] = (),
            splice: str = "auto", reference: bool = True) -> dict[str, object]:
    paths = (*PATHS, REFERENCE) if reference else PATHS
    order = [paths if r % 2 == 0 else paths[::-1] for r in range(rounds)]
    batches = {(r, p): [f"bench-{p}-{r}-{i:03d}" for i in range(pledges)]
               for r in range(rounds) for p in paths}
    # Not measured: the registrar's first enrollments open its MASA connections and fill
    # its tables, which would count against whichever path ran first.
    batches[(-1, "direct")] = [f"bench-warmup-{i:03d}" for i in range(warmup)]
    runs: list[dict[str, object]] = []
    with (tempfile.TemporaryDirectory(prefix="enroll-proxy-") as tmp,
          tempfile.TemporaryDirectory(prefix="enroll-proxy-devices-",
                                      dir=DEVICE_STORAGE) as devices):
        work = Path(tmp)
        (work / "devices").symlink_to(devices)
        make_pki(work, batches)  # type: ignore[arg-type]
        with Lab(Topology(pledges=1, registrars=1), log_dir=work / "logs") as lab:
            host = lab.registrars[0]
            registrar_toml, masa_toml = write_configs(
                work / "pki", work / "svc", registrar_listen=[f"[{ULAS[0]}]:{PORT}"],
                masa_listen=[f"[::1]:{MASA_PORT}"], log_level="info")
            masa = host.spawn([PY, "-m", "registrar.masa_cli", "--config", str(masa_toml)],
                              name="masa")
            wait_ready(masa.log)
            registrar = host.spawn([PY, "-m", "registrar.cli", "--config", str(registrar_toml),
                                    "--metrics", f"[::1]:{METRICS_PORT}"], name="registrar")
            wait_ready(registrar.log)
            config = proxy_config(work / "proxy", 0, 1, 9465)
            config["circuit"] = {**config.get("circuit", {}), "splice": splice}
            proxy = ProxyDaemon(lab, work / "proxy", config)
            proxy.start()
            wait_for(lambda: any(r["active"] for r in proxy.ctl()["registrars"]), 15,
                     "joinproxyd to use the registrar")
            assert proxy.process is not None
            pids = {"registrar": registrar.pid, "masa": masa.pid,
                    "joinproxyd": proxy.process.pid}
            if reference:
                assert HAPROXY is not None
                (work / "haproxy.cfg").write_text(haproxy_config(ULAS[0]))
                relay = lab.proxy.spawn([HAPROXY, "-db", "-f", str(work / "haproxy.cfg")],
                                        name="haproxy")
                wait_for(lambda: lab.proxy.run(["ss", "-Hltn", f"sport = :{REFERENCE_PORT}"]
                                               ).stdout.strip(), 10, "HAProxy to listen")
                pids[REFERENCE] = relay.pid
            if warmup:
                enroll(lab, work, "direct", batches[(-1, "direct")], concurrency, pids, None,
                       "warmup", extra)
            for r, paths in enumerate(order):
                for path in paths:
                    run = enroll(lab, work, path, batches[(r, path)], concurrency, pids,
                                 profile, f"r{r + 1}-{path}", extra)
                    run["round"] = r + 1
                    runs.append(run)
            rss = memory_kib(registrar.pid)
            proxy.stop()
    ratios: dict[str, list[float]] = {"proxy_direct": [], "haproxy_direct": [],
                                      "proxy_haproxy": []}
    for r in range(rounds):
        rate = {run["path"]: float(run["enrollments_per_second_enrolling"])  # type: ignore[arg-type]
                for run in runs if run["round"] == r + 1}
        for name in ratios:
            over, under = name.split("_")
            if rate.get(over) is not None and rate.get(under):
                ratios[name].append(round(rate[over] / rate[under], 3))
    return {"pledges": pledges, "concurrency": concurrency, "rounds": rounds,
            "pledge_sim_args": list(extra), "paths": list(paths), "runs": runs,
            **{f"ratio_{name}": values for name, values in ratios.items()},
            "registrar_rss_kib": rss.get("VmRSS"), "registrar_peak_rss_kib": rss.get("VmHWM")}


def print_table(r: dict[str, object]) -> None:
    runs = r["runs"]
    assert isinstance(runs, list)
    print(f"enroll_proxy: {r['pledges']} pledges a run at concurrency {r['concurrency']}, "
          f"{r['rounds']} round(s); enrollments/s over the time spent enrolling (and over "
          "the whole pledge-sim process)")
    print(f"{'round':>5} {'path':<7} {'enrolled':>8} {'per s':>7} {'(process)':>9}"
          f" {'CPU ms/enrollment: registrar':>29} {'masa':>6} {'relay':>6} {'pledges':>8}"
          f" {'total':>6} {'machine':>8}   {'registrar loop lag: mean':>24} {'p99':>5}"
          f" {'>=10ms':>6} {'MASA conns':>10}")
    for run in runs:
        per = run["cpu_ms_per_enrollment"]
        relay = per.get(relay_of(run["path"]), 0.0)
        lag = run["registrar_loop_lag"]
        print(f"{run['round']:>5} {run['path']:<7} {run['enrolled']:>4}/{run['pledges']:<3} "
              f"{run['enrollments_per_second_enrolling']:>7.1f} "
              f"{run['enrollments_per_second']:>9.1f} {per['registrar']:>29.1f} "
              f"{per['masa']:>6.1f} {relay:>6.1f} {per['pledges']:>8.1f} "
              f"{sum(per.values()):>6.1f} {run['machine_cpu_ms_per_enrollment']:>8.1f}   "
              f"{_ms(lag['mean_ms']):>22}ms {_ms(lag['p99_ms']):>5}"
              f" {_share(lag['late_10ms_share']):>6} {run['registrar_masa_connections']:>10}")
    for name, target in (("proxy_direct", " (target >= 0.95)"), ("haproxy_direct", ""),
                         ("proxy_haproxy", "")):
        ratios = r[f"ratio_{name}"]
        assert isinstance(ratios, list)
        if not ratios:
            continue
        spread = f"  ({min(ratios):.2f}-{max(ratios):.2f})" if len(ratios) > 1 else ""
        print(f"ratio {name.replace('_', '/')} {statistics.median(ratios):.2f}{spread}{target}")
    print(f"registrar RSS {r['registrar_rss_kib']} KiB (peak {r['registrar_peak_rss_kib']} KiB)")


def record_figures(r: dict[str, object]) -> None:
    """make bench (bench/run_all.py): the printed figures, one value per round."""
    from _report import record

    runs, paths = r["runs"], r["paths"]
    assert isinstance(runs, list) and isinstance(paths, list)
    for path in paths:
        mine = [run for run in runs if run["path"] == path]
        rates = [run["enrollments_per_second_enrolling"] for run in mine]
        if path == "direct":
            record("direct enrollments", rates, "enrollments/s")
        elif path == "proxy":  # issue 18 item 1: >= 60/s through the proxy, >= 0.95 of direct
            record("proxy enrollments", rates, "enrollments/s", target=60)
            record("proxy/direct", rates, "enrollments/s", baseline="direct enrollments",
                   ratios=r["ratio_proxy_direct"], target=0.95)  # type: ignore[arg-type]
        else:  # the reference relay: what the second TCP connection costs with C relaying it
            record("haproxy enrollments", rates, "enrollments/s")
            record("haproxy/direct", rates, "enrollments/s", baseline="direct enrollments",
                   ratios=r["ratio_haproxy_direct"])  # type: ignore[arg-type]
            record("proxy/haproxy", [run["enrollments_per_second_enrolling"] for run in runs
                                     if run["path"] == "proxy"], "enrollments/s",
                   baseline="haproxy enrollments",
                   ratios=r["ratio_proxy_haproxy"])  # type: ignore[arg-type]
        for part in ("registrar", "masa", relay_of(path), "pledges"):
            record(f"{path} CPU {part}", [run["cpu_ms_per_enrollment"][part] for run in mine],
                   "ms/enrollment", better="lower")
        record(f"{path} CPU machine", [run["machine_cpu_ms_per_enrollment"] for run in mine],
               "ms/enrollment", better="lower")


def _ms(value: object) -> str:
    return "-" if value is None else f"{value:g}"


def _share(value: object) -> str:
    return "-" if value is None else f"{100 * float(value):.1f}%"  # type: ignore[arg-type]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pledges", type=int, default=200, help="per run")
    p.add_argument("--concurrency", type=int, default=20)
    p.add_argument("--rounds", type=int, default=2, help="each: one direct and one proxy run")
    p.add_argument("--warmup", type=int, default=40,
                   help="pledges enrolled first, not measured (0: none)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help="py-spy every process into DIR (collapsed stacks and a summary)")
    p.add_argument("--reference", choices=(REFERENCE, "none"), default=REFERENCE,
                   help="run the reference relay (HAProxy) too (default), or not")
    p.add_argument("--splice", choices=("auto", "on", "off"), default="auto",
                   help="joinproxyd's [circuit] splice (auto: the asyncio relay); a run with "
                        "another setting is not recorded for make bench")
    p.add_argument("--pledge-sim-arg", action="append", default=[], metavar="ARG",
                   help="pass ARG to every pledge-sim run (repeatable), e.g. "
                        "--pledge-sim-arg=--reconnect-after-voucher for the old connection "
                        "pattern; such a run's figures are not recorded for make bench")
    args = p.parse_args()
    if os.geteuid() != 0:
        print("enroll_proxy: run as root (it creates network namespaces)", file=sys.stderr)
        return 2
    if min(args.pledges, args.concurrency, args.rounds) < 1 or args.warmup < 0:
        print("enroll_proxy: --pledges, --concurrency and --rounds must be at least 1, "
              "--warmup at least 0",
              file=sys.stderr)
        return 2
    if args.reference == REFERENCE and HAPROXY is None:
        print("enroll_proxy: the reference relay needs haproxy (make setup installs it), "
              "or --reference none", file=sys.stderr)
        return 2
    if args.profile is not None:
        if PY_SPY is None:
            print("enroll_proxy: --profile needs py-spy (.venv/bin/pip install py-spy)",
                  file=sys.stderr)
            return 2
        args.profile.mkdir(parents=True, exist_ok=True)
    r = measure(args.pledges, args.concurrency, args.rounds, args.warmup, args.profile,
                args.pledge_sim_arg, args.splice, args.reference == REFERENCE)
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        print_table(r)
    if not args.pledge_sim_arg and args.splice == "auto":
        record_figures(r)
    if args.profile is not None:
        summary = {f.stem: hottest(f) for f in sorted(args.profile.glob("*.txt"))
                   if f.stat().st_size}
        (args.profile / "summary.json").write_text(json.dumps(summary, indent=1))
    runs = r["runs"]
    assert isinstance(runs, list)
    return 0 if all(run["failed"] == 0 and run["pledge_sim_exit"] == 0 for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
