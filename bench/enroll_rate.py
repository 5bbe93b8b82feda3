"""Enrollment rate, HTTPS against constrained (CoAPS) in the same run, end to end.

    sudo .venv/bin/python bench/enroll_rate.py [--pledges 50] [--concurrency 10] [--rounds 2]
                                               [--json]

A namespace lab with the real brski-masa and brski-registrar on one host, the registrar
listening for HTTPS (BRSKI + EST, CMS vouchers) and CoAPS (cBRSKI + EST-coaps over DTLS, COSE
vouchers) at once, and one pledge-sim process per run on the registrar's link (address given,
so discovery time is not measured). Each round enrolls a fresh set of N serials over HTTPS and
another over CoAPS, the order alternating between rounds so the machine's drift is shared;
the ratio coaps/https is taken within each round. Per run it reports enrollments per second
over the pledge-sim run, the CPU time (user + system) each side spent during it — registrar
and MASA from /proc/<pid>/stat before and after, the pledge process from its rusage when it is
reaped (it is gone by the time /proc could be read) — and, at the end, the registrar's
resident memory (VmRSS now, VmHWM peak).
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

from lab import Lab, Topology
from lab.registrar_setup import wait_ready, write_configs

PY = sys.executable
PORT = 8443
COAPS_PORT = 5684
TRANSPORTS = ("https", "coaps")
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a live process, in seconds (proc(5): fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def machine_busy_seconds() -> float:
    """CPU time the whole machine spent busy so far, all CPUs (proc(5) /proc/stat "cpu":
    user, nice, system, irq, softirq; not idle, iowait or steal). Counts the kernel's work
    that no measured process is charged with (softirqs on an idle CPU, kernel threads)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    user, nice, system, _idle, _iowait, irq, softirq = map(int, fields[1:8])
    return (user + nice + system + irq + softirq) / TICK


def memory_kib(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def enroll(lab: Lab, work: Path, transport: str, serials: list[str], concurrency: int,
           registrar: object, masa: object, address: str) -> dict[str, object]:
    """One pledge-sim run of these serials over one transport, measured."""
    port = PORT if transport == "https" else COAPS_PORT
    argv = [PY, "-m", "pledge_sim.cli", "enroll", "--json", "--pki", str(work / "pki"),
            "--transport", transport, "--concurrency", str(concurrency),
            "--registrar", f"[{address}%eth0]:{port}", "--out", str(work / f"out-{transport}")]
    for serial in serials:
        argv += ["--serial", serial]
    pids = {"registrar": registrar.pid, "masa": masa.pid}  # type: ignore[attr-defined]
    return {"transport": transport, **run_measured(lab.pledges[0].cmd(argv),
                                                   work / f"report-{transport}.json", pids,
                                                   len(serials))}


def run_measured(argv: list[str], report: Path, pids: dict[str, int],
                 pledges: int) -> dict[str, object]:
    """One pledge-sim run (``argv`` as its host runs it), to its end: what it enrolled, and
    the CPU time each of ``pids`` and pledge-sim itself spent meanwhile."""
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    machine_before = machine_busy_seconds()
    started = time.monotonic()
    with report.open("wb") as out:
        child = subprocess.Popen(argv, stdout=out, stderr=subprocess.DEVNULL)
        # wait4: the child's own CPU, exact, as it is reaped ("ip netns exec" execs
        # pledge-sim in place, so this pid is pledge-sim).
        _pid, status, usage = os.wait4(child.pid, 0)
        exit_code = os.waitstatus_to_exitcode(status)
    elapsed = time.monotonic() - started
    machine = machine_busy_seconds() - machine_before
    cpu = {name: round(cpu_seconds(pid) - before[name], 3) for name, pid in pids.items()}
    cpu["pledges"] = round(usage.ru_utime + usage.ru_stime, 3)
    # py-spy, when it wraps pledge-sim (enroll_proxy --profile), talks on the same stdout
    doc = json.loads("\n".join(line for line in report.read_text().splitlines()
                               if not line.startswith("py-spy>")))
    enrolled = int(doc["enrolled"])
    return {
        "pledges": pledges,
        "enrolled": enrolled,
        "failed": int(doc["failed"]),
        "seconds": round(elapsed, 3),  # the pledge-sim process, start to exit
        "enrollments_per_second": round(enrolled / elapsed, 2),
        # pledge-sim's own clock: without interpreter start-up and loading the IDevIDs
        "enroll_seconds": float(doc["seconds"]),
        "enrollments_per_second_enrolling": round(enrolled / float(doc["seconds"]), 2),
        "cpu_seconds": cpu,
        "cpu_ms_per_enrollment": {k: round(1000 * v / max(enrolled, 1), 1)
                                  for k, v in cpu.items()},
        # Everything the machine did meanwhile, other work on it included: on a quiet
        # machine, what one enrollment costs end to end.
        "machine_cpu_ms_per_enrollment": round(1000 * machine / max(enrolled, 1), 1),
        "pledge_sim_exit": exit_code,
    }


def make_pki(work: Path, batches: dict[object, list[str]]) -> None:
    """One brski-pki in ``work/pki`` with an IDevID for every serial of every batch."""
    argv = [PY, "-m", "brski.cli.pki", "init", str(work / "pki")]
    for serials in batches.values():
        for serial in serials:
            argv += ["--serial", serial]
    subprocess.run(argv, check=True, capture_output=True, timeout=600)


def measure(pledges: int, concurrency: int, rounds: int) -> dict[str, object]:
    order = [TRANSPORTS if r % 2 == 0 else TRANSPORTS[::-1] for r in range(rounds)]
    batches = {(r, t): [f"bench-{t}-{r}-{i:03d}" for i in range(pledges)]
               for r in range(rounds) for t in TRANSPORTS}
    runs: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="enroll-bench-") as tmp:
        work = Path(tmp)
        make_pki(work, batches)  # type: ignore[arg-type]
        topology = Topology(pledges=1, registrars=1, pledges_on_backbone=True)
        with Lab(topology, log_dir=work / "logs") as lab:
            host = lab.registrars[0]
            address = host.address("eth0", link_local=True)
            registrar_toml, masa_toml = write_configs(
                work / "pki", work / "svc", registrar_listen=[f"[{address}%eth0]:{PORT}"],
                coaps_listen=f"[{address}%eth0]:{COAPS_PORT}",
                # info, not warning: the services say "ready" at info. Their access logs are
                # part of what a registrar costs.
                masa_listen=["[::1]:9443"], log_level="info")
            masa = host.spawn([PY, "-m", "registrar.masa_cli", "--config", str(masa_toml)],
                              name="masa")
            wait_ready(masa.log)
            registrar = host.spawn([PY, "-m", "registrar.cli", "--config", str(registrar_toml)],
                                   name="registrar")
            wait_ready(registrar.log)
            for r, transports in enumerate(order):
                for transport in transports:
                    run = enroll(lab, work, transport, batches[(r, transport)], concurrency,
                                 registrar, masa, address)
                    run["round"] = r + 1
                    runs.append(run)
            rss = memory_kib(registrar.pid)
    ratios = []
    for r in range(rounds):
        rate = {run["transport"]: run["enrollments_per_second_enrolling"]
                for run in runs if run["round"] == r + 1}
        if rate.get("https"):
            ratios.append(round(float(rate["coaps"]) / float(rate["https"]), 2))
    return {"pledges": pledges, "concurrency": concurrency, "rounds": rounds, "runs": runs,
            "ratio_coaps_https": ratios, "registrar_rss_kib": rss.get("VmRSS"),
            "registrar_peak_rss_kib": rss.get("VmHWM")}


def record_figures(r: dict[str, object]) -> None:
    """make bench (bench/run_all.py): the printed figures, one value per round."""
    from _report import record

    runs, ratios = r["runs"], r["ratio_coaps_https"]
    assert isinstance(runs, list) and isinstance(ratios, list)
    for transport in TRANSPORTS:
        mine = [run for run in runs if run["transport"] == transport]
        paired = transport == "coaps"
        record(f"{transport} enrollments",
               [run["enrollments_per_second_enrolling"] for run in mine], "enrollments/s",
               baseline="https enrollments" if paired else None, ratios=ratios if paired else None)
        for part in ("registrar", "masa", "pledges"):
            record(f"{transport} CPU {part}", [run["cpu_ms_per_enrollment"][part] for run in mine],
                   "ms/enrollment", better="lower")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pledges", type=int, default=50, help="per run")
    p.add_argument("--concurrency", type=int, default=10)
    p.add_argument("--rounds", type=int, default=2, help="each: one HTTPS and one CoAPS run")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if os.geteuid() != 0:
        print("enroll_rate: run as root (it creates network namespaces)", file=sys.stderr)
        return 2
    if min(args.pledges, args.concurrency, args.rounds) < 1:
        print("enroll_rate: --pledges, --concurrency and --rounds must be at least 1",
              file=sys.stderr)
        return 2
    r = measure(args.pledges, args.concurrency, args.rounds)
    record_figures(r)
    runs = r["runs"]
    assert isinstance(runs, list)
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        print(f"enroll_rate: {r['pledges']} pledges a run at concurrency {r['concurrency']}, "
              f"{r['rounds']} round(s); enrollments/s over the time spent enrolling (and over "
              "the whole pledge-sim process)")
        print(f"{'round':>5} {'transport':<9} {'enrolled':>8} {'per s':>7} {'(process)':>9}"
              f" {'CPU ms/enrollment: registrar':>29} {'masa':>6} {'pledges':>8}")
        for run in runs:
            per = run["cpu_ms_per_enrollment"]
            print(f"{run['round']:>5} {run['transport']:<9} "
                  f"{run['enrolled']:>4}/{run['pledges']:<3} "
                  f"{run['enrollments_per_second_enrolling']:>7.1f} "
                  f"{run['enrollments_per_second']:>9.1f} {per['registrar']:>29.1f} "
                  f"{per['masa']:>6.1f} {per['pledges']:>8.1f}")
        ratios = r["ratio_coaps_https"]
        assert isinstance(ratios, list)
        spread = f"  ({min(ratios):.2f}-{max(ratios):.2f})" if len(ratios) > 1 else ""
        print(f"ratio coaps/https {statistics.median(ratios):.2f}{spread}" if ratios
              else "ratio coaps/https n/a")
        print(f"registrar RSS {r['registrar_rss_kib']} KiB "
              f"(peak {r['registrar_peak_rss_kib']} KiB)")
    ok = all(run["failed"] == 0 and run["pledge_sim_exit"] == 0 for run in runs)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
