"""Enrollment rate: N pledges (default 50) at concurrency C (default 10), end to end.

    sudo .venv/bin/python bench/enroll_rate.py [--pledges 50] [--concurrency 10] [--json]

A namespace lab with the real brski-masa and brski-registrar on one host and one pledge-sim
process on the registrar's link (address given, so discovery time is not measured). Reports
enrollments per second over the pledge-sim run, the CPU time (user + system) each side spent
during it — registrar and MASA from /proc/<pid>/stat before and after, the pledge process from
its rusage when it is reaped (it is gone by the time /proc could be read) — and the
registrar's resident memory (VmRSS now, VmHWM peak).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lab import Lab, Topology
from lab.registrar_setup import wait_ready, write_configs

PY = sys.executable
PORT = 8443
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a live process, in seconds (proc(5): fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def memory_kib(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def measure(pledges: int, concurrency: int) -> dict[str, object]:
    serials = [f"bench-{i:03d}" for i in range(pledges)]
    with tempfile.TemporaryDirectory(prefix="enroll-bench-") as tmp:
        work = Path(tmp)
        argv = [PY, "-m", "brski.cli.pki", "init", str(work / "pki")]
        for serial in serials:
            argv += ["--serial", serial]
        subprocess.run(argv, check=True, capture_output=True, timeout=300)
        topology = Topology(pledges=1, registrars=1, pledges_on_backbone=True)
        with Lab(topology, log_dir=work / "logs") as lab:
            host = lab.registrars[0]
            address = host.address("eth0", link_local=True)
            registrar_toml, masa_toml = write_configs(
                work / "pki", work / "svc", registrar_listen=[f"[{address}%eth0]:{PORT}"],
                # info, not warning: the services say "ready" at info. Their access logs are
                # part of what a registrar costs.
                masa_listen=["[::1]:9443"], log_level="info")
            masa = host.spawn([PY, "-m", "registrar.masa_cli", "--config", str(masa_toml)],
                              name="masa")
            wait_ready(masa.log)
            registrar = host.spawn([PY, "-m", "registrar.cli", "--config", str(registrar_toml)],
                                   name="registrar")
            wait_ready(registrar.log)
            before = {"registrar": cpu_seconds(registrar.pid), "masa": cpu_seconds(masa.pid)}
            argv = [PY, "-m", "pledge_sim.cli", "enroll", "--json", "--pki", str(work / "pki"),
                    "--count", str(pledges), "--concurrency", str(concurrency),
                    "--registrar", f"[{address}%eth0]:{PORT}", "--out", str(work / "out")]
            report = work / "report.json"
            started = time.monotonic()
            with report.open("wb") as out:
                child = subprocess.Popen(lab.pledges[0].cmd(argv), stdout=out,
                                         stderr=subprocess.DEVNULL)
                # wait4: the child's own CPU, exact, as it is reaped ("ip netns exec" execs
                # pledge-sim in place, so this pid is pledge-sim).
                _pid, status, usage = os.wait4(child.pid, 0)
                child.returncode = os.waitstatus_to_exitcode(status)
            elapsed = time.monotonic() - started
            after = {"registrar": cpu_seconds(registrar.pid), "masa": cpu_seconds(masa.pid)}
            rss = memory_kib(registrar.pid)
            doc = json.loads(report.read_text())
    cpu = {name: round(after[name] - before[name], 3) for name in before}
    cpu["pledges"] = round(usage.ru_utime + usage.ru_stime, 3)
    enrolled = int(doc["enrolled"])
    return {
        "pledges": pledges,
        "concurrency": concurrency,
        "enrolled": enrolled,
        "failed": int(doc["failed"]),
        "seconds": round(elapsed, 3),  # the pledge-sim process, start to exit
        "enrollments_per_second": round(enrolled / elapsed, 2),
        # pledge-sim's own clock: without interpreter start-up and loading 50 IDevIDs
        "enroll_seconds": float(doc["seconds"]),
        "enrollments_per_second_enrolling": round(enrolled / float(doc["seconds"]), 2),
        "cpu_seconds": cpu,
        "cpu_ms_per_enrollment": {k: round(1000 * v / max(enrolled, 1), 1)
                                  for k, v in cpu.items()},
        "registrar_rss_kib": rss.get("VmRSS"),
        "registrar_peak_rss_kib": rss.get("VmHWM"),
        "pledge_sim_exit": child.returncode,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pledges", type=int, default=50)
    p.add_argument("--concurrency", type=int, default=10)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if os.geteuid() != 0:
        print("enroll_rate: run as root (it creates network namespaces)", file=sys.stderr)
        return 2
    r = measure(args.pledges, args.concurrency)
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        cpu, per = r["cpu_seconds"], r["cpu_ms_per_enrollment"]
        assert isinstance(cpu, dict) and isinstance(per, dict)
        total = sum(cpu.values())
        print(f"{r['enrolled']}/{r['pledges']} pledges enrolled at concurrency "
              f"{r['concurrency']} in {r['seconds']:.2f} s: "
              f"{r['enrollments_per_second']:.1f} enrollments/s "
              f"({r['enrollments_per_second_enrolling']:.1f}/s over the "
              f"{r['enroll_seconds']:.2f} s spent enrolling, without pledge-sim's start-up)")
        print(f"{'CPU time':<10} {'seconds':>8} {'share':>6} {'ms/enrollment':>14}"
              "   (pledges: the whole pledge-sim process, start-up included)")
        for name in ("registrar", "masa", "pledges"):
            share = 100 * cpu[name] / total if total else 0.0
            print(f"{name:<10} {cpu[name]:>8.2f} {share:>5.0f}% {per[name]:>14.1f}")
        print(f"registrar RSS {r['registrar_rss_kib']} KiB "
              f"(peak {r['registrar_peak_rss_kib']} KiB)")
    return 0 if r["failed"] == 0 and r["pledge_sim_exit"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
