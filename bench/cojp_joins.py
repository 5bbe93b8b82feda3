"""CoJP joins per second at the JRC, PSK against EDHOC in the same run, end to end.

    sudo .venv/bin/python bench/cojp_joins.py [--pledges 50] [--concurrency 10] [--rounds 2]
                                              [--quick] [--json]

A namespace lab with the real brski-registrar ([cojp] with an EDHOC key) on one host and
pledge-sim cojp on its link (the JRC addressed directly: the stateless proxy's own cost is
bench territory of the relay). N pledges with PSKs and N with EDHOC credentials are added with
the operator commands; each round joins every PSK pledge and then every EDHOC pledge (the order
alternates between rounds, so the machine's drift is shared) and reports joins per second over
the pledge-sim run and the registrar's CPU seconds (user + system) during it. A PSK join costs
the JRC three committed store writes (replay window, sequence-number reservation, the cached
response); an EDHOC join a handshake (two P-256 ECDH operations on each side) and one write.
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
JRC = "[fe80::b:2%eth0]:5683"
KINDS = ("psk", "edhoc")
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def cojp(*args: str) -> str:
    done = subprocess.run([PY, "-m", "registrar.cli", "cojp", *args], capture_output=True,
                          text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise SystemExit(f"cojp {args[0]}: {done.stderr.strip()}")
    return done.stdout


def provision(work: Path, toml: Path, count: int) -> dict[str, Path]:
    """N PSK and N EDHOC pledges in the store; one pledges file per kind."""
    files = {}
    keys = work / "edhoc"
    keys.mkdir()
    for kind in KINDS:
        lines = []
        for n in range(count):
            pledge_id = f"{0x10 if kind == 'psk' else 0x20:02x}000000{n:08x}"
            if kind == "psk":
                out = cojp("add-pledge", "--config", str(toml), "--id", pledge_id,
                           "--generate-psk")
                lines.append(f"{pledge_id} {out.split('psk ')[1].split()[0]}")
            else:
                cojp("make-edhoc-credential", "--out", str(keys / pledge_id), "--kid",
                     f"{n:08x}")
                cojp("add-pledge", "--config", str(toml), "--id", pledge_id,
                     "--edhoc-credential", str(keys / f"{pledge_id}.ccs"))
                lines.append(f"{pledge_id} edhoc")
        files[kind] = work / f"{kind}.txt"
        files[kind].write_text("\n".join(lines) + "\n")
    return files


def run(lab: Lab, work: Path, pledges: Path, concurrency: int, registrar_pid: int
        ) -> dict[str, float]:
    argv = [PY, "-m", "pledge_sim.cli", "cojp", "--json", "--jrc", JRC, "--pledges",
            str(pledges), "--concurrency", str(concurrency), "--state", str(work / "state"),
            "--edhoc-dir", str(work / "edhoc"), "--jrc-credential", str(work / "jrc.ccs"),
            "--timeout", "60"]
    cpu = cpu_seconds(registrar_pid)
    started = time.monotonic()
    done = lab.pledges[0].run(argv, check=False, timeout=900)
    elapsed = time.monotonic() - started
    cpu = cpu_seconds(registrar_pid) - cpu
    if done.returncode != 0:
        raise SystemExit(f"pledge-sim cojp failed: {done.stderr.strip()[-2000:]}")
    report = json.loads(done.stdout)
    return {"joins": report["joined"], "seconds": round(elapsed, 3),
            "joins_per_s": round(report["joined"] / elapsed, 1),
            "registrar_cpu_s": round(cpu, 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pledges", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="5 pledges, 1 round (smoke test)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.pledges, args.rounds = 5, 1
    with tempfile.TemporaryDirectory(prefix="bench-cojp-") as tmp, \
            Lab(Topology(pledges=1, pledges_on_backbone=True)) as lab:
        work = Path(tmp)
        subprocess.run([PY, "-m", "brski.cli.pki", "init", str(work / "pki"), "--serial", "B"],
                       check=True, capture_output=True, timeout=120)
        toml, _ = write_configs(work / "pki", work / "svc", masa_listen=["[::1]:9443"],
                                registrar_listen=["[fd4a:5044::100]:8443"], mdns=False,
                                grasp=False)
        cojp("make-edhoc-credential", "--out", str(work / "jrc"), "--kid", "4a")
        with toml.open("a") as out:
            out.write(f'\n[cojp]\nenabled = true\nedhoc_private_key = "{work / "jrc.key"}"\n'
                      f'edhoc_credential = "{work / "jrc.ccs"}"\n')
        files = provision(work, toml, args.pledges)
        registrar = lab.registrars[0].spawn([PY, "-m", "registrar.cli", "--config", str(toml)],
                                            name="registrar")
        wait_ready(registrar.log, 30, alive=registrar.alive)
        results: dict[str, list[dict[str, float]]] = {kind: [] for kind in KINDS}
        for round_ in range(args.rounds):
            order = KINDS if round_ % 2 == 0 else tuple(reversed(KINDS))
            for kind in order:
                results[kind].append(run(lab, work, files[kind], args.concurrency,
                                         registrar.pid))
        registrar.stop()
    summary = {kind: statistics.median(r["joins_per_s"] for r in rs)
               for kind, rs in results.items()}
    if args.json:
        print(json.dumps({"rounds": results, "median_joins_per_s": summary}, indent=2))
    else:
        for kind in KINDS:
            for r in results[kind]:
                print(f"{kind:<6} {r['joins_per_s']:8.1f} joins/s  ({r['joins']} in "
                      f"{r['seconds']:.2f} s, registrar CPU {r['registrar_cpu_s']:.2f} s)")
        print(f"ratio edhoc/psk {summary['edhoc'] / summary['psk']:.2f}")
    from _report import record  # make bench (bench/run_all.py): the same figures, per round

    for kind in KINDS:
        record(kind, [r["joins_per_s"] for r in results[kind]], "joins/s",
               baseline="psk" if kind == "edhoc" else None)
        record(f"{kind} registrar CPU", [1000 * r["registrar_cpu_s"] / max(r["joins"], 1)
                                         for r in results[kind]], "ms/join", better="lower")
    return 0


if __name__ == "__main__":
    sys.exit(main())
