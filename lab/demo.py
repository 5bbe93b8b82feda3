"""The demo behind `make demo`: five pledges enroll through joinproxyd, for real.

    pledge0..4  (join link, link-local only)  --  proxy: joinproxyd, circuit mode
                                                      |  backbone
                                          registrar0: brski-registrar + brski-masa

Discovery is GRASP on both sides: the registrar floods AN_join_registrar on the backbone,
joinproxyd hears it, and floods AN_Proxy on the join link, where each pledge-sim hears it.
The proxy does not route: the pledges reach the registrar only through the circuit relay.
Then three constrained pledges (cBRSKI + EST-coaps over DTLS, ``pledge-sim --transport coaps``)
enroll directly with the registrar's CoAPS endpoint from a host on its link (the proxy's
namespace, on the backbone), until joinproxyd relays DTLS too.
Everything lives in a temporary directory and the lab's namespaces, both removed at the end
(also on error or Ctrl-C). Exit status 0 only if every pledge enrolled through the proxy and
every LDevID verifies against the domain CA.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from .brski_services import Services, enroll, enroll_each, ldevid_verifies, make_pki
from .netns import LabError
from .proxyd import ProxyDaemon, base_config
from .topology import PROXY_LL, Lab, Topology, wait_for

PLEDGES = 5
CONSTRAINED = 3
COAPS_PORT = 5684


def _pki(root: Path, serials: list[str]) -> Path:
    return make_pki(root, serials)


def _proxy_config(run_dir: Path) -> dict:
    return base_config(
        run_dir,
        daemon={"log_level": "info", "control_socket": str(run_dir / "control.sock"),
                "drain_seconds": 1},
        registrars={"discovery": ["grasp"], "static": [], "health_interval": 0.5,
                    "health_timeout": 0.5},
        announce={"interval": 1, "grasp": True, "mdns": False})


def run() -> int:
    from joinproxyd.ctl import render_status
    from pledge_sim.report import table
    from pledge_sim.runner import EnrollResult

    started = time.monotonic()
    serials = [f"demo-{i}" for i in range(PLEDGES)]
    constrained = [f"demo-c{i}" for i in range(CONSTRAINED)]
    ok = False
    with tempfile.TemporaryDirectory(prefix="joinproxy-demo-") as tmp:
        work = Path(tmp)
        pki = _pki(work / "pki", serials + constrained)
        with Lab(Topology(pledges=PLEDGES, registrars=1), log_dir=work / "logs") as lab:
            print(lab.describe())
            registrar = lab.registrars[0]
            Services(registrar, pki, work / "registrar",
                     coaps_listen=f"[::]:{COAPS_PORT}").start()
            print(f"registrar0: MASA and registrar up, flooding AN_join_registrar for "
                  f"[{registrar.address('eth0', link_local=True)}]:8443 on the backbone")
            proxy = ProxyDaemon(lab, work / "proxy", _proxy_config(work / "proxy")).start()
            try:
                wait_for(lambda: proxy.ctl()["joining"], 15,
                         "joinproxyd to hear the registrar's GRASP flood")
            except LabError:
                print(proxy.log()[-2000:])
                raise
            print(f"proxy: joinproxyd found the registrar by GRASP and announces AN_Proxy "
                  f"[{PROXY_LL}]:8443 on join0")
            ula = registrar.address("eth0", link_local=False)
            blocked = lab.pledges[0].run(["ping", "-6", "-c", "1", "-W", "1", ula], check=False)
            print(f"pledge0 -> registrar {ula}: "
                  f"{'unreachable, as it must be' if blocked.returncode != 0 else 'REACHABLE'}")
            enrolling = time.monotonic()
            results = enroll_each(lab.pledges, pki, work / "ldevid", serials,
                                  "--discover", "grasp", "--deadline", "40")
            print(table([EnrollResult(**{k: v for k, v in r.items()
                                         if k in EnrollResult.__dataclass_fields__})
                         for r in results], time.monotonic() - enrolling))
            verified = sum(ldevid_verifies(pki, r.get("ldevid_path")) for r in results)
            print(f"openssl verify against the domain CA: {verified}/{PLEDGES} LDevIDs OK")
            through_proxy = all(str(r.get("proxy", "")).startswith(f"[{PROXY_LL}%")
                                for r in results if r.get("ok"))
            print("\njoinproxyctl status:\n" + render_status(proxy.ctl()))
            proxy.stop()
            reg_ll = registrar.address("eth0", link_local=True)
            print(f"\nconstrained pledges (CoAPS/DTLS, COSE vouchers, EST-coaps), direct to "
                  f"[{reg_ll}%bb0]:{COAPS_PORT} from the backbone:")
            args = [a for s in constrained for a in ("--serial", s)]
            small = enroll(lab.proxy, pki, work / "ldevid-coaps", "--transport", "coaps",
                           "--registrar", f"[{reg_ll}%bb0]:{COAPS_PORT}", "--deadline", "40",
                           *args, timeout=60, verbose=False)
            print(table([EnrollResult(**{k: v for k, v in r.items()
                                         if k in EnrollResult.__dataclass_fields__})
                         for r in small.results], float(small.doc.get("seconds", 0.0))))
            if not small.results:  # pledge-sim itself failed: its one-line reason
                print(small.stderr.strip().splitlines()[-1] if small.stderr.strip()
                      else f"pledge-sim exited {small.rc} without a report")
            small_verified = sum(ldevid_verifies(pki, r.get("ldevid_path"))
                                 for r in small.results)
            print(f"openssl verify against the domain CA: {small_verified}/{CONSTRAINED} "
                  "constrained LDevIDs OK")
            ok = (blocked.returncode != 0 and verified == PLEDGES and through_proxy
                  and all(r.get("ok") for r in results)
                  and small.ok and small_verified == CONSTRAINED)
    print(f"lab removed; demo {'passed' if ok else 'FAILED'} in {time.monotonic() - started:.1f} s")
    return 0 if ok else 1
