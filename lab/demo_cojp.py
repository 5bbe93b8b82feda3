"""The demo's 6TiSCH part: CoJP pledges (RFC 9031) join the registrar's JRC through joinproxyd.

Three pledges hold a PSK and one authenticates with EDHOC (method 3, suite 2), each on its own
host on a join link that joinproxyd serves in cojp mode (its stateless CoAP join proxy). The
pledges are added to the JRC's store by the operator's commands (``brski-registrar cojp
add-pledge``); the JRC listens beside the registrar's CoAPS/JPY ports and is flooded by GRASP
under "6TiSCH-JRC", which is how joinproxyd learns it (and pings it: joining on the cojp link
opens only while it answers).
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .netns import LabError
from .topology import PROXY_LL, Host, LabProcess

PSK_PLEDGES = 3
EDHOC_PLEDGES = 1
PLEDGES = PSK_PLEDGES + EDHOC_PLEDGES
JRC_PORT = 5686  # 5683 is the registrar's CoRE discovery port in the demo
PROXY_PORT = 5683  # the proxy's CoJP port on the join link (RFC 9031)
NETWORK_ID = "cafe"


@dataclass
class CojpFleet:
    pledge_files: list[Path]  # one 'PLEDGE_ID PSK|edhoc' file per pledge host
    methods: list[str]
    edhoc_dir: Path
    jrc_credential: Path


def _cojp_cli(*argv: str) -> str:
    """brski-registrar cojp, in this process (it is quick): its stdout, or LabError."""
    from registrar.cojp_cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(argv))
    if rc != 0:
        raise LabError(f"brski-registrar cojp {' '.join(argv)}: {err.getvalue().strip()}")
    return out.getvalue()


def prepare(registrar_toml: Path, work: Path) -> CojpFleet:
    """Turn the JRC on in the registrar's configuration and add the pledges to its store."""
    work.mkdir(parents=True, exist_ok=True)
    jrc = work / "jrc"
    _cojp_cli("make-edhoc-credential", "--out", str(jrc), "--kid", "4a", "--subject", "jrc")
    with registrar_toml.open("a") as toml:
        toml.write(f'\n[cojp]\nenabled = true\nlisten = "[::]:{JRC_PORT}"\n'
                   f'network_id = "{NETWORK_ID}"\nshort_id_lease = 12\n'
                   f'edhoc_private_key = "{jrc}.key"\nedhoc_credential = "{jrc}.ccs"\n'
                   '[[cojp.link_layer_key]]\nkey_id = 1\n'
                   'key = "e6bf4287c2d7618d6a9687445ffd33e6"\n')
    files, methods = [], []
    for n in range(PLEDGES):
        pledge_id = f"02-00-00-00-00-00-de-{n:02x}"
        if n < PSK_PLEDGES:
            added = _cojp_cli("add-pledge", "--config", str(registrar_toml), "--id", pledge_id,
                              "--generate-psk")
            line, method = f"{pledge_id} {added.split('psk ')[1].split()[0]}", "psk"
        else:
            prefix = work / pledge_id.replace("-", "")
            _cojp_cli("make-edhoc-credential", "--out", str(prefix), "--kid", f"{n:02x}00")
            _cojp_cli("add-pledge", "--config", str(registrar_toml), "--id", pledge_id,
                      "--edhoc-credential", f"{prefix}.ccs")
            line, method = f"{pledge_id} edhoc", "edhoc"
        path = work / f"pledge-{n}.txt"
        path.write_text(line + "\n")
        files.append(path)
        methods.append(method)
    return CojpFleet(files, methods, work, jrc.with_suffix(".ccs"))


def _spawn(host: Host, fleet: CojpFleet, n: int, work: Path) -> tuple[LabProcess, Path]:
    from .proxyd import PYTHON

    report = work / f"report-{n}.json"
    argv = [PYTHON, "-m", "pledge_sim.cli", "cojp", "--jrc", f"[{PROXY_LL}%eth0]:{PROXY_PORT}",
            "--via-proxy", "--pledges", str(fleet.pledge_files[n]), "--state",
            str(work / f"state-{n}"), "--edhoc-dir", str(fleet.edhoc_dir), "--jrc-credential",
            str(fleet.jrc_credential), "--network-id", NETWORK_ID, "--timeout", "20", "--json"]
    return host.spawn(["sh", "-c", 'exec "$@" > "$0"', str(report), *argv],
                      name=f"pledge-sim-cojp{n}"), report


def run(hosts: list[Host], fleet: CojpFleet, work: Path, link: str) -> bool:
    """One pledge-sim cojp per pledge host, all at once; a table; True if all joined."""
    started = time.monotonic()
    running = [_spawn(host, fleet, n, work) for n, host in enumerate(hosts)]
    rows: list[dict[str, Any]] = []
    for n, (process, report) in enumerate(running):
        try:
            process.popen.wait(60)
        except subprocess.TimeoutExpired:
            process.stop()
        try:
            doc = json.loads(report.read_text())
            result = doc["results"][0]
        except (OSError, ValueError, KeyError, IndexError):
            tail = (process.log().strip().splitlines() or ["no output"])[-1]
            result = {"pledge_id": fleet.pledge_files[n].read_text().split()[0], "ok": False,
                      "reason": tail}
        rows.append({**result, "method": fleet.methods[n], "host": hosts[n].name})
    seconds = time.monotonic() - started
    print(f"\n6TiSCH pledges on {link} (CoJP join request over OSCORE, PSK or EDHOC) through "
          "joinproxyd in cojp mode (stateless: the return address sealed in the token):")
    print(f"{'pledge':<18} {'host':<10} {'method':<6} {'short-id':<8} {'keys':>4} "
          f"{'seconds':>7}  result")
    for r in rows:
        print(f"{r['pledge_id']:<18} {r['host']:<10} {r['method']:<6} "
              f"{r.get('short_id') or '-':<8} {r.get('keys', '-'):>4} "
              f"{r.get('seconds', 0):7.2f}  "
              f"{'ok' if r.get('ok') else 'FAILED: ' + str(r.get('reason'))}")
    joined = sum(bool(r.get("ok")) for r in rows)
    print(f"{joined} joined, {len(rows) - joined} failed in {seconds:.1f} s")
    return joined == len(rows) == PLEDGES
