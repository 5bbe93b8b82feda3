#!/usr/bin/env python3
"""Run every benchmark of bench/ and write one report: `make bench`.

    run_all.py [--quick] [--only NAME,...] [--out DIR] [--note TEXT]
                                                         run, write DIR (build/bench):
                                                         report.json, NAME.png, summary.md,
                                                         logs/NAME.log
    run_all.py --readme [--out DIR] [--note TEXT]        render DIR/summary.md again from
                                                         DIR/report.json, copy it into
                                                         README.md between the markers

Each benchmark runs as its own process with BENCH_REPORT naming a file for its figures
(bench/_report.py), so one that crashes or hangs is recorded as failed and the others still
report; the runner then exits 1. Benchmarks that measure once per invocation are run several
times and their rounds concatenated, so every figure carries a spread. ``--quick`` runs each
with its smallest settings once: it checks that everything runs and reports, not how fast.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report  # bench/ is a folder of scripts, not a package

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
README = REPO / "README.md"
START, END = "<!-- bench-summary:start -->", "<!-- bench-summary:end -->"


@dataclass(frozen=True)
class Bench:
    name: str
    args: tuple[str, ...] = ()  # full run (the script's own defaults unless given)
    quick: tuple[str, ...] = ("--quick",)
    repeat: int = 1  # invocations in a full run (for scripts that measure once each)
    root: bool = False  # builds network namespaces
    timeout: float = 900.0
    extra_env: dict[str, str] = field(default_factory=dict)
    script: Path | None = None  # bench/NAME.py unless given

    @property
    def path(self) -> Path:
        return self.script or BENCH / f"{self.name}.py"


# In the order they run: in-process ones first (quick to fail), then the namespace labs.
BENCHES: tuple[Bench, ...] = (
    # The thread's CPU clock: a ratio of two in-process loops is steadier on a shared machine.
    Bench("voucher_sign_verify", args=("--clock", "cpu"),
          quick=("--seconds", "0.3", "--clock", "cpu")),
    Bench("jpy_seal_open", repeat=3),
    Bench("cbor_decode", repeat=3),
    Bench("masa_vouchers", args=("--clock", "cpu"),
          quick=("--pledges", "20", "--seconds", "0.3", "--clock", "cpu")),
    Bench("dtls_handshake"),
    Bench("jpy_relay", root=True),
    Bench("cojp_relay", root=True),
    Bench("coaps_relay", root=True),
    Bench("jpy_kernel_pps", root=True),
    Bench("ipip_pps", root=True),
    Bench("ipip_xdp_layouts", root=True),
    Bench("ipip_tunnel_vm", root=True, timeout=1500),  # Debian's stock kernel under QEMU
    Bench("relay_throughput", root=True),
    Bench("cojp_joins", root=True),
    Bench("enroll_rate", quick=("--pledges", "4", "--concurrency", "2", "--rounds", "1"),
          root=True),
    # 6 rounds (each a direct, a proxy and a HAProxy run, ~15 s): the same work's CPU time
    # moves by ±15 % from one run to the next on this host, and the median outlasts that
    Bench("enroll_proxy", args=("--rounds", "6"),
          quick=("--pledges", "4", "--concurrency", "2", "--rounds", "1", "--warmup", "0"),
          root=True),
    Bench("enroll_cluster", repeat=2, root=True, timeout=1800),
)
QUICK_TIMEOUT = 300.0
GRACE = 30.0  # seconds an overrunning benchmark has to clean up after SIGINT


def host_facts() -> dict[str, Any]:
    uname = os.uname()
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True, check=False).stdout.strip()
    return {"cpus": os.cpu_count(), "kernel": uname.release, "python": sys.version.split()[0],
            "commit": commit or None, "load_start": list(os.getloadavg())}


def run_process(argv: list[str], env: dict[str, str], log: IO[str], timeout: float
                ) -> str | None:
    """Run one benchmark process; what went wrong, or None. One that overruns gets SIGINT
    first, so its labs' context managers remove their namespaces and processes, and is
    killed (its whole process group) only if it does not stop within GRACE seconds."""
    # SIGINT's default action restored: a parent that ignores it (a shell's background job)
    # would otherwise pass that on, and Python then raises no KeyboardInterrupt
    child = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        code = child.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGINT)
        try:
            child.wait(GRACE)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
        return f"timed out after {timeout:.0f} s"
    return f"exit status {code}" if code else None


def run_one(bench: Bench, quick: bool, logs: Path) -> dict[str, Any]:
    """Run one benchmark (repeatedly in a full run) and return its entry of the report."""
    argv = [sys.executable, str(bench.path), *(bench.quick if quick else bench.args)]
    script = bench.path.relative_to(REPO) if bench.path.is_relative_to(REPO) else bench.path
    entry: dict[str, Any] = {"name": bench.name, "script": str(script),
                             "argv": argv[1:], "runs": 1 if quick else bench.repeat,
                             "status": "ok", "reason": None, "seconds": 0.0, "figures": [],
                             "log": str(logs / f"{bench.name}.log")}
    if bench.root and os.geteuid() != 0:
        entry.update(status="skipped", reason="needs root (network namespaces)")
        return entry
    runs: list[list[dict[str, Any]]] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"bench-{bench.name}-") as tmp, \
            (logs / f"{bench.name}.log").open("w") as log:
        for n in range(entry["runs"]):
            out = Path(tmp) / f"run{n}.json"
            env = {**os.environ, _report.ENV: str(out), **bench.extra_env}
            log.write(f"$ {' '.join(argv)}\n")
            log.flush()
            failure = run_process(argv, env, log, QUICK_TIMEOUT if quick else bench.timeout)
            figures = json.loads(out.read_text())["figures"] if out.exists() else []
            if figures:
                runs.append(figures)
            if failure is None and not figures:
                failure = "it recorded no figure"
            if failure is not None:
                entry.update(status="failed", reason=f"run {n + 1}: {failure} (see the log)")
                break
    entry["seconds"] = round(time.monotonic() - started, 1)
    entry["figures"] = _report.merge(runs)
    return entry


def fmt(value: float) -> str:
    """Three significant figures, thousands separated: a table for people."""
    if value == 0:
        return "0"
    digits = max(0, 2 - int(f"{abs(value):e}".split("e")[1]))
    return f"{value:,.{digits}f}"


def spread_text(s: dict[str, Any] | None) -> str:
    if not s:
        return ""
    if s["n"] == 1:
        return fmt(s["median"])
    return f"{fmt(s['median'])} ({fmt(s['min'])}–{fmt(s['max'])})"


def summary(report: dict[str, Any]) -> str:
    host = report["host"]
    # The load at the end counts the last benchmark's own processes: only the load before
    # the first one says whether other work was competing.
    load = (f"{host['load_start'][0]:.1f} at the start ({host['load_end'][0]:.1f} at the end, "
            f"the benchmarks' own included)")
    busy = host["load_start"][0] > (host["cpus"] or 1)
    lines = [
        f"Measured by `make bench` on {report['started'][:16].replace('T', ' ')} UTC, "
        f"commit {host['commit']}, {host['cpus']} vCPUs, 1-minute load {load}"
        + (f" ({report['note']})" if report.get("note") else "") + ". "
        + ("Quick mode, tiny rounds: the figures mean nothing. " if report["quick"] else "")
        + ("Other work competed for the CPUs (a load above their count), so the absolute "
           "figures are noisy: " if busy else "Absolute figures depend on the machine: ")
        + "compare the ratios, each against a baseline measured in the same run. "
        "Median (min–max) over the rounds (n); charts and every round in "
        "`build/bench/` (report.json, one PNG per benchmark).",
        "",
        "| benchmark | figure | median (min–max) | unit | n "
        "| against (same run), median (min–max) | ratio median (min–max) | target | met |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for bench in report["benchmarks"]:
        if bench["status"] != "ok":
            lines.append(f"| `{bench['name']}` | **{bench['status']}**: {bench['reason']} "
                         "| | | | | | | |")
        by_name = {fig["name"]: fig for fig in bench["figures"]}
        baselines = {fig["baseline"] for fig in bench["figures"]}
        for fig in bench["figures"]:
            if fig["name"] in baselines and not fig["ratio"] and fig["target"] is None:
                continue  # a baseline only: its figure is in the "against" column
            against = fig["baseline"] or ""
            if fig["baseline"] in by_name:
                against += f" {spread_text(by_name[fig['baseline']])}"
            target = ""
            if fig["target"] is not None:
                sign = "≥" if fig["better"] == "higher" else "≤"
                target = f"{sign} {fig['target']:g}" + ("×" if fig["ratio"] else "")
            met = {True: "yes", False: "no", None: ""}[fig["met"]]
            lines.append(
                f"| `{bench['name']}` | {fig['name']} | {spread_text(fig)} | {fig['unit']} "
                f"| {fig['n']} | {against} "
                f"| {'×' + spread_text(fig['ratio']) if fig['ratio'] else ''} "
                f"| {target} | {met} |")
    return "\n".join(lines) + "\n"


def rewrite_readme(readme: Path, table: str) -> str:
    """README's text with the section between the markers replaced by ``table``."""
    text = readme.read_text()
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise SystemExit(f"{readme}: needs exactly one {START} followed by one {END}")
    head, rest = text.split(START)
    _, tail = rest.split(END)
    return f"{head}{START}\n{table.rstrip()}\n{END}{tail}"


def readme(out: Path, note: str | None) -> int:
    """Render OUT/summary.md again from OUT/report.json (with NOTE, if given, kept in the
    report) and copy it into README.md."""
    source = out / "report.json"
    if not source.exists():
        print(f"run_all: {source} missing: run `make bench` first", file=sys.stderr)
        return 2
    report = json.loads(source.read_text())
    problems = _report.check_report(report)
    if problems:
        print(f"run_all: {source} is malformed:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    if note is not None:
        report["note"] = note
        source.write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    table = summary(report)
    (out / "summary.md").write_text(table)
    README.write_text(rewrite_readme(README, table))
    print(f"README.md: the Benchmarks summary replaced from {source}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="every benchmark once with its smallest settings (a smoke run)")
    p.add_argument("--only", default="", help="comma-separated benchmark names")
    p.add_argument("--out", type=Path, default=REPO / "build" / "bench")
    p.add_argument("--readme", action="store_true",
                   help="only render OUT/summary.md again from OUT/report.json and copy it "
                   "into README.md between the markers")
    p.add_argument("--note", help="a remark on the conditions, for the summary's header "
                   "(e.g. what else ran)")
    args = p.parse_args()
    if args.readme:
        return readme(args.out, args.note)
    known = {b.name: b for b in BENCHES}
    wanted = [n for n in args.only.split(",") if n]
    unknown = [n for n in wanted if n not in known]
    if unknown:
        print(f"run_all: no benchmark {', '.join(unknown)} (known: {', '.join(known)})",
              file=sys.stderr)
        return 2
    benches = [known[n] for n in wanted] if wanted else list(BENCHES)
    logs = args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "schema": _report.SCHEMA, "quick": args.quick, "note": args.note,
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": host_facts(), "benchmarks": []}
    for bench in benches:
        print(f"bench: {bench.name} ...", end=" ", flush=True)
        entry = run_one(bench, args.quick, logs)
        report["benchmarks"].append(entry)
        print(f"{entry['status']} in {entry['seconds']:.0f} s"
              + (f": {entry['reason']}" if entry["reason"] else ""), flush=True)
    report["host"]["load_end"] = list(os.getloadavg())
    problems = _report.check_report(report)
    if problems:  # a benchmark recorded something malformed: say so, still write it
        print("run_all: the report is malformed:\n  " + "\n  ".join(problems), file=sys.stderr)
    (args.out / "report.json").write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    from _charts import draw  # matplotlib: imported only when there is something to draw
    for entry in report["benchmarks"]:
        entry["chart"] = draw(entry, args.out) if entry["figures"] else None
    (args.out / "report.json").write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    (args.out / "summary.md").write_text(summary(report))
    failed = [b["name"] for b in report["benchmarks"] if b["status"] == "failed"]
    print(f"bench: report in {args.out}/report.json, summary in {args.out}/summary.md"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed or problems else 0


if __name__ == "__main__":
    sys.exit(main())
