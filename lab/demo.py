"""The demo behind `make demo`: pledges enroll through joinproxyd, for real, in four modes.

    pledge0..4   (join0, link-local only) --  circuit (TCP, HTTPS BRSKI)  -.
    pledge5..7   (join1, link-local only) --  coaps (stateful UDP relay)   -+- proxy -- bb0
    pledge8..10  (join2, link-local only) --  jpy (stateless, JPY header)  -'     |
    pledge11..14 (join3, link-local only) --  cojp (6TiSCH, stateless)    -'     |
                                  registrar0: brski-registrar (HTTPS, CoAPS, JPY, CoJP JRC)
                                              + brski-masa

Towards the registrar, discovery is GRASP (its AN_join_registrar flood on the backbone names
its TCP and CoAPS ports) and CoRE (its /.well-known/core names its JPY port, rt=brski.rjp);
joinproxyd uses both. On join0 joinproxyd floods
AN_Proxy, which the HTTPS pledges hear; on join1 and join2 it answers CoRE discovery
(GET coap://[ff02::fd]/.well-known/core?brski-jp=*), which is how the constrained pledges
(cBRSKI + EST-coaps over DTLS, ``pledge-sim --transport coaps``) find its join port. The
proxy does not route: the pledges reach the registrar only through a relay. On join3, three
PSK pledges and one EDHOC pledge send CoJP Join Requests (RFC 9031, OSCORE) to the proxy's
CoAP port; joinproxyd learned the JRC from the GRASP flood ("6TiSCH-JRC", lab/demo_cojp.py).
At the end the
relay counters per mode (datagrams, bytes, flows, drops) from joinproxyd's /metrics.
Everything lives in a temporary directory and the lab's namespaces, both removed at the end
(also on error or Ctrl-C). Exit status 0 only if every pledge enrolled through the proxy and
every LDevID verifies against the domain CA.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from . import demo_cojp
from .brski_services import Services, enroll_each, ldevid_verifies, make_pki, spawn_enroll
from .netns import LabError
from .proxyd import ProxyDaemon, base_config
from .topology import PROXY_LL, Host, Lab, Topology, wait_for

PLEDGES = 5
CONSTRAINED = 3  # per constrained mode
CONSTRAINED_MODES = ("coaps", "jpy")
COAPS_PORT, JPY_PORT = 5684, 5685  # the registrar's
UDP_JOIN_PORT = 5684  # the proxy's, on join1 and join2
COJP_LINK = f"join{len(CONSTRAINED_MODES) + 1}"  # the 6TiSCH pledges' (lab/demo_cojp.py)


def _pki(root: Path, serials: list[str]) -> Path:
    return make_pki(root, serials)


def _proxy_config(run_dir: Path) -> dict:
    return base_config(
        run_dir,
        daemon={"log_level": "info", "control_socket": str(run_dir / "control.sock"),
                "drain_seconds": 1},
        join=[{"interfaces": ["join0"], "modes": ["circuit"], "port": 8443},
              *({"interfaces": [f"join{n}"], "modes": [mode], "port": UDP_JOIN_PORT}
                for n, mode in enumerate(CONSTRAINED_MODES, 1)),
              {"interfaces": [COJP_LINK], "modes": ["cojp"]}],
        registrars={"discovery": ["grasp", "coap"], "static": [], "health_interval": 0.5,
                    "health_timeout": 0.5},
        announce={"interval": 1, "grasp": True, "mdns": False})


def _table(results: list[dict[str, Any]], seconds: float) -> str:
    from pledge_sim.report import table
    from pledge_sim.runner import EnrollResult

    return table([EnrollResult(**{k: v for k, v in r.items()
                                  if k in EnrollResult.__dataclass_fields__})
                  for r in results], seconds)


def _constrained(pledges: dict[str, list[Host]], pki: Path, work: Path) -> bool:
    """Each constrained mode's pledges, one pledge-sim per pledge host, all modes at once."""
    started = time.monotonic()
    running = {mode: [(f"demo-{mode}{i}",
                       spawn_enroll(host, pki, work / f"ldevid-{mode}", "--transport", "coaps",
                                    "--serial", f"demo-{mode}{i}", "--discovery-timeout", "5",
                                    "--deadline", "40"))
                      for i, host in enumerate(pledges[mode])]
               for mode in CONSTRAINED_MODES}
    done: dict[str, tuple[list[dict[str, Any]], float]] = {}
    for mode, sims in running.items():
        results: list[dict[str, Any]] = []
        for serial, sim in sims:
            run = sim.wait(60)
            results += run.results or [{"serial": serial, "ok": False, "code": "crashed",
                                        "reason": (run.stderr.strip().splitlines()
                                                   or ["no output"])[-1]}]
        done[mode] = results, time.monotonic() - started
    ok = True
    for n, mode in enumerate(CONSTRAINED_MODES, 1):
        results, seconds = done[mode]
        print(f"\nconstrained pledges on join{n} (CoRE discovery, DTLS, COSE vouchers, "
              f"EST-coaps) through joinproxyd in {mode} mode:")
        print(_table(results, seconds))
        for r in results:
            if not r.get("ok") and r.get("code") == "crashed":  # pledge-sim's own last line
                print(f"{r['serial']}: {r.get('reason')}")
        verified = sum(ldevid_verifies(pki, r.get("ldevid_path")) for r in results)
        print(f"openssl verify against the domain CA: {verified}/{CONSTRAINED} {mode} "
              "LDevIDs OK")
        through = all(str(r.get("proxy", "")) == f"[{PROXY_LL}%eth0]:{UDP_JOIN_PORT}"
                      for r in results)
        ok = ok and verified == CONSTRAINED and through and all(r.get("ok") for r in results)
    return ok


def run() -> int:
    from joinproxyd.ctl import render_status

    started = time.monotonic()
    serials = [f"demo-{i}" for i in range(PLEDGES)]
    constrained = [f"demo-{m}{i}" for m in CONSTRAINED_MODES for i in range(CONSTRAINED)]
    ok = False
    with tempfile.TemporaryDirectory(prefix="joinproxy-demo-") as tmp:
        work = Path(tmp)
        pki = _pki(work / "pki", serials + constrained)
        with Lab(Topology(pledges=PLEDGES, registrars=1), log_dir=work / "logs") as lab:
            small = {mode: lab.add_join_link(CONSTRAINED)[1] for mode in CONSTRAINED_MODES}
            sixtisch = lab.add_join_link(demo_cojp.PLEDGES)[1]
            print(lab.describe())
            registrar = lab.registrars[0]
            services = Services(registrar, pki, work / "registrar",
                                coaps_listen=f"[::]:{COAPS_PORT}", jpy_listen=f"[::]:{JPY_PORT}")
            fleet = demo_cojp.prepare(services.tomls["registrar"], work / "cojp")
            services.start()
            print(f"registrar0: MASA and registrar up, flooding AN_join_registrar for "
                  f"[{registrar.address('eth0', link_local=True)}]:8443 (TCP), "
                  f"{COAPS_PORT} (CoAPS) and {demo_cojp.JRC_PORT} (CoJP JRC, \"6TiSCH-JRC\") "
                  f"on the backbone, its JPY port {JPY_PORT} in CoRE discovery; "
                  f"{demo_cojp.PSK_PLEDGES} PSK and {demo_cojp.EDHOC_PLEDGES} EDHOC pledges "
                  "added to the JRC's store")
            proxy = ProxyDaemon(lab, work / "proxy", _proxy_config(work / "proxy")).start()
            links = {"join0", *(f"join{n}" for n in range(1, len(CONSTRAINED_MODES) + 1)),
                     COJP_LINK}
            try:
                wait_for(lambda: (status := proxy.ctl())["joining"] and links <= {
                    i["name"] for i in status["interfaces"]}
                    and all(m["open"] for m in status["joining_modes"].values()), 15,
                    "joinproxyd to hear the registrar's GRASP flood and serve every join link")
            except LabError:
                print(proxy.log()[-2000:])
                raise
            print(f"proxy: joinproxyd found the registrar by GRASP and CoRE; announces AN_Proxy "
                  f"[{PROXY_LL}]:8443 on join0 and answers CoRE discovery with its UDP join "
                  f"port {UDP_JOIN_PORT} on join1 (coaps) and join2 (jpy); relays CoJP on "
                  f"{COJP_LINK} to the JRC it learned by GRASP and pings")
            ula = registrar.address("eth0", link_local=False)
            blocked = lab.pledges[0].run(["ping", "-6", "-c", "1", "-W", "1", ula], check=False)
            print(f"pledge0 -> registrar {ula}: "
                  f"{'unreachable, as it must be' if blocked.returncode != 0 else 'REACHABLE'}")
            enrolling = time.monotonic()
            results = enroll_each(lab.pledges[:PLEDGES], pki, work / "ldevid", serials,
                                  "--discover", "grasp", "--deadline", "40")
            print(_table(results, time.monotonic() - enrolling))
            verified = sum(ldevid_verifies(pki, r.get("ldevid_path")) for r in results)
            print(f"openssl verify against the domain CA: {verified}/{PLEDGES} LDevIDs OK")
            through_proxy = all(str(r.get("proxy", "")).startswith(f"[{PROXY_LL}%")
                                for r in results if r.get("ok"))
            small_ok = _constrained(small, pki, work)
            cojp_ok = demo_cojp.run(sixtisch, fleet, work / "cojp", COJP_LINK)
            # The UDP relays move their counts into /metrics once a second: let the last
            # pledges' datagrams be counted before status and counters are shown.
            time.sleep(1.2)
            print("\njoinproxyctl status:\n" + render_status(proxy.ctl()))
            counted = _print_counters(proxy)
            proxy.stop()
            ok = (blocked.returncode != 0 and verified == PLEDGES and through_proxy
                  and all(r.get("ok") for r in results) and small_ok and cojp_ok and counted)
    print(f"lab removed; demo {'passed' if ok else 'FAILED'} in {time.monotonic() - started:.1f} s")
    return 0 if ok else 1


def _print_counters(proxy: ProxyDaemon) -> bool:
    """The relay counters per constrained mode; True if each mode relayed both ways."""
    counters = [proxy.relay_counters(mode) for mode in (*CONSTRAINED_MODES, "cojp")]
    print("\nrelay counters per mode (joinproxyd /metrics):")
    for c in counters:
        print("  " + c.line())
    return all(c.datagrams_up and c.datagrams_down for c in counters)
