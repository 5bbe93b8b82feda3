"""The demo behind `make demo`: five pledges enroll, for real, in network namespaces.

    registrar0: brski-masa (on ::1) + brski-registrar (on its link-local address, announcing
                itself by GRASP and mDNS)
    pledge0..4: one pledge-sim each, on the registrar's link, link-local addresses only

Everything lives in a temporary directory and the lab's namespaces, both removed at the end
(also on error or Ctrl-C). Exit status 0 only if every pledge enrolled and every LDevID
verifies against the domain CA.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .netns import LabError
from .topology import Host, Lab, LabProcess, Topology

PLEDGES = 5
PORT = 8443
PY = sys.executable


def _pki(root: Path, serials: list[str]) -> Path:
    argv = [PY, "-m", "brski.cli.pki", "init", str(root)]
    for serial in serials:
        argv += ["--serial", serial]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise LabError(f"brski-pki: {done.stderr.strip()}")
    return root


def _services(host: Host, pki: Path, work: Path) -> list[LabProcess]:
    # Imported here: the lab itself does not depend on the registrar package.
    from registrar.labsetup import wait_ready, write_configs

    address = host.address("eth0", link_local=True)
    registrar_toml, masa_toml = write_configs(
        pki, work, registrar_listen=[f"[{address}%eth0]:{PORT}"], masa_listen=["[::1]:9443"],
        announce_interfaces=["eth0"], grasp_period=1.0)
    started = []
    for name, module, toml in (("masa", "registrar.masa_cli", masa_toml),
                               ("registrar", "registrar.cli", registrar_toml)):
        proc = host.spawn([PY, "-m", module, "--config", str(toml)], name=name)
        started.append(proc)
        try:
            wait_ready(proc.log, timeout=20)
        except TimeoutError as exc:
            last = proc.log().strip().splitlines()[-1:] or ["(no output)"]
            raise LabError(f"{name} did not start: {last[0]}") from exc
    return started


def _enroll(lab: Lab, pki: Path, work: Path, serials: list[str]) -> list[dict]:
    """One pledge-sim per pledge namespace, all at once; their JSON reports merged."""
    running = []
    for host, serial in zip(lab.pledges, serials, strict=True):
        report = work / f"{serial}.json"
        argv = ["sh", "-c", 'exec "$@" > "$0"', str(report), PY, "-m", "pledge_sim.cli",
                "enroll", "--json", "--pki", str(pki), "--serial", serial,
                "--out", str(work / "ldevid"), "--deadline", "40"]
        running.append((host.spawn(argv, name="pledge-sim"), report, serial))
    results = []
    for proc, report, serial in running:
        proc.popen.wait(60)
        try:
            results += json.loads(report.read_text())["results"]
        except (OSError, ValueError, KeyError):
            last = proc.log().strip().splitlines()[-1:] or ["no output"]
            results.append({"serial": serial, "ok": False, "code": "crashed", "reason": last[0]})
    return results


def _verify(ca: Path, results: list[dict]) -> int:
    good = 0
    for r in results:
        if r.get("ldevid_path"):
            done = subprocess.run(["openssl", "verify", "-CAfile", str(ca), r["ldevid_path"]],
                                  capture_output=True, text=True, timeout=30, check=False)
            good += done.returncode == 0
    return good


def run() -> int:
    from pledge_sim.report import table
    from pledge_sim.runner import EnrollResult

    started = time.monotonic()
    serials = [f"demo-{i}" for i in range(PLEDGES)]
    with tempfile.TemporaryDirectory(prefix="joinproxy-demo-") as tmp:
        work = Path(tmp)
        pki = _pki(work / "pki", serials)
        topology = Topology(pledges=PLEDGES, registrars=1, pledges_on_backbone=True)
        with Lab(topology, log_dir=work / "logs") as lab:
            print(lab.describe())
            registrar = lab.registrars[0]
            _services(registrar, pki, work / "svc")
            print(f"registrar0: MASA and registrar up, announcing "
                  f"[{registrar.address('eth0', link_local=True)}]:{PORT}")
            # Before enrollment a pledge has a link-local address only: nothing routed.
            ula = registrar.address("eth0", link_local=False)
            blocked = lab.pledges[0].run(["ping", "-6", "-c", "1", "-W", "1", ula], check=False)
            print(f"pledge0 -> registrar {ula}: "
                  f"{'unreachable, as it must be' if blocked.returncode != 0 else 'REACHABLE'}")
            enrolling = time.monotonic()
            results = _enroll(lab, pki, work, serials)
            print(table([EnrollResult(**{k: v for k, v in r.items()
                                         if k in EnrollResult.__dataclass_fields__})
                         for r in results], time.monotonic() - enrolling))
            verified = _verify(pki / "domain/ca.crt", results)
            print(f"openssl verify against the domain CA: {verified}/{PLEDGES} LDevIDs OK")
            ok = (blocked.returncode != 0 and verified == PLEDGES
                  and all(r.get("ok") for r in results))
    print(f"lab removed; demo {'passed' if ok else 'FAILED'} in {time.monotonic() - started:.1f} s")
    return 0 if ok else 1
