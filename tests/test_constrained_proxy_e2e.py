"""Issue 14 acceptance: constrained pledges enroll through joinproxyd, in `coaps` and in `jpy`.

Real processes in namespaces: brski-masa and brski-registrar on registrar0 (CoAPS on UDP 5684,
JPY on UDP 5685), joinproxyd in the proxy namespace relaying its join link's UDP port 5684 in
one constrained mode, and `pledge-sim enroll --transport coaps` on pledge0, which sits on the
join link with a link-local address only (the proxy does not route). The pledges find the
proxy by CoRE discovery on their link (``?brski-jp=*`` answered by joinproxyd, not by the
registrar, which is not on that link) and run cBRSKI (COSE voucher) and EST-coaps through it.

One pledge namespace stands for 20 pledges here (one pledge-sim, 20 DTLS sockets), so the
coaps mode's per-pledge-address flow limit is raised; the limit itself is tested in
test_coaps_relay.py.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_ipip_daemon import bpffs, xdp_progs

from lab import Host, Lab, Topology, wait_for
from lab.brski_services import (
    PledgeRun,
    Services,
    enroll,
    ldevid_verifies,
    make_pki,
    spawn_enroll,
)
from lab.proxyd import ProxyDaemon, base_config
from lab.topology import PROXY_LL

pytestmark = pytest.mark.netns

REGISTRAR = "fd4a:5044::100"
COAPS_PORT, JPY_PORT, JOIN_PORT = 5684, 5685, 5684
FLEET = 20
MODES = ("coaps", "jpy")
# jpy twice: with its kernel path (tc programs, where the kernel has the BPF crypto kfuncs,
# as this one does) and forced into user space ([jpy] datapath = "user")
VARIANTS = ("coaps", "jpy", "jpy-user")

__all__ = ["bpffs"]  # the fixture, shared with test_ipip_daemon


def fleet(mode: str) -> list[str]:
    return [f"{mode}-{n:02d}" for n in range(FLEET)]


@dataclass
class Env:
    lab: Lab
    pki: Path
    work: Path
    services: Services


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    work = tmp_path_factory.mktemp("constrained-proxy")
    pki = make_pki(work / "pki", [s for m in VARIANTS for s in fleet(m)]
                   + [f"kill-{n}" for n in range(6)] + [f"legacy-{m}" for m in MODES])
    with Lab(Topology(pledges=1, registrars=1), log_dir=work / "logs") as lab:
        services = Services(lab.registrars[0], pki, work / "r0",
                            registrar_listen=[f"[{REGISTRAR}]:8443"], announce_interfaces=[],
                            coaps_listen=f"[::]:{COAPS_PORT}", jpy_listen=f"[::]:{JPY_PORT}")
        services.start()
        try:
            yield Env(lab, pki, work, services)
        finally:
            services.stop()
        assert "Traceback" not in services.log("registrar"), services.logs()


def proxy_config(run_dir: Path, mode: str, datapath: str = "auto") -> dict:
    return base_config(
        run_dir,
        join=[{"interfaces": ["join*"], "modes": [mode], "port": JOIN_PORT}],
        registrars={"discovery": ["static"], "constrained_mode": mode,
                    "static": [{"address": REGISTRAR, "port": 8443, "preference": 10,
                                "coaps_port": COAPS_PORT, "jpy_port": JPY_PORT}]},
        limits={"flows_per_pledge": 4 * FLEET, "flows_per_interface": 4 * FLEET},
        jpy={"datapath": datapath})


def start_proxy(env: Env, mode: str, name: str, datapath: str = "auto") -> ProxyDaemon:
    run_dir = env.work / name
    daemon = ProxyDaemon(env.lab, run_dir, proxy_config(run_dir, mode, datapath)).start()
    wait_for(lambda: daemon.ctl()["joining"], 15, f"joinproxyd ({mode}) to open joining")
    if mode == "jpy":  # status says which runs
        expected = "user" if datapath == "user" else "kernel"
        assert daemon.ctl()["relays"]["jpy"]["datapath"] == expected
    return daemon


def pledges(env: Env, out: str, serials: list[str], *args: str, timeout: float = 240
            ) -> PledgeRun:
    return enroll(env.lab.pledges[0], env.pki, env.work / out, "--transport", "coaps",
                  *(a for s in serials for a in ("--serial", s)), *args, timeout=timeout)


@pytest.mark.parametrize("variant", VARIANTS)
def test_twenty_constrained_pledges_enroll_through_the_proxy(env: Env, variant: str) -> None:
    mode, _, datapath = variant.partition("-")
    daemon = start_proxy(env, mode, f"proxy-{variant}", datapath or "auto")
    started = time.monotonic()
    run = pledges(env, f"out-{variant}", fleet(variant), "--concurrency", "10",
                  "--discovery-timeout", "5", "--deadline", "120")
    seconds = time.monotonic() - started
    print(f"{mode}: {FLEET} constrained pledges through joinproxyd in {seconds:.1f} s "
          f"(pledge-sim: {run.doc.get('seconds')} s)")
    assert run.ok, (run.stderr[-4000:], daemon.log()[-3000:], env.services.logs())
    assert sorted(r["serial"] for r in run.results) == fleet(variant)
    for r in run.results:
        # found by CoRE discovery on the join link: the proxy's join port, not the registrar
        assert (r["method"], r["proxy"]) == ("coap", f"[{PROXY_LL}%eth0]:{JOIN_PORT}"), r
        assert ldevid_verifies(env.pki, r["ldevid_path"]), r
    with env.services.store("registrar") as store:
        assert all(len(store.vouchers(s)) == 1 for s in fleet(variant))
    # Every attempt is one DTLS session: in coaps one flow (a fresh source port), in jpy none.
    attempts = sum(r["attempts"] for r in run.results)
    # A handshake (ClientHello twice, the client's flight) and rv, vs, sen, es: at least six
    # datagrams each way per pledge. The relay moves its counts into /metrics every second.
    counters = wait_for(lambda: (c := daemon.relay_counters(mode)).datagrams_up >= 6 * FLEET
                        and c.datagrams_down >= 6 * FLEET and c, 10,
                        f"the {mode} datagram counters", interval=0.3)
    print(counters.line())
    assert counters.flows == (attempts if mode == "coaps" else 0), (counters, attempts)
    assert counters.bytes_up > 0 and counters.bytes_down > counters.bytes_up  # vouchers, certs
    assert not counters.drops, counters
    daemon.stop()


@pytest.mark.parametrize("mode", MODES)
def test_a_pledge_of_older_drafts_finds_the_proxy_with_rt_brski_jp(env: Env, mode: str) -> None:
    """?rt=brski.jp gets <coaps://[fe80::1]:5684>;rt=brski.jp, a link-local address without a
    zone: the pledge takes the zone of the link the answer came on and enrolls."""
    daemon = start_proxy(env, mode, f"proxy-legacy-{mode}")
    run = pledges(env, f"out-legacy-{mode}", [f"legacy-{mode}"], "--core-query", "rt",
                  "--discovery-timeout", "5", "--deadline", "60", timeout=90)
    assert run.ok, (run.stderr[-3000:], daemon.log()[-3000:])
    [r] = run.results
    assert (r["method"], r["proxy"]) == ("coap", f"[{PROXY_LL}%eth0]:{JOIN_PORT}"), r
    assert ldevid_verifies(env.pki, r["ldevid_path"]), r
    assert daemon.ctl()["core_join_discovery"]["answered"] >= 1
    daemon.stop()


# -- kill -9 of the proxy in the middle of enrollments (coaps: the mode with per-flow state) -----

KILLED = [f"kill-{n}" for n in range(6)]


def udp_sockets(host: Host) -> list[str]:
    """Every UDP socket in the host's namespace (the proxy namespace runs only joinproxyd)."""
    return host.run(["ss", "-Huanp"]).stdout.strip().splitlines()


def test_kill_9_mid_enrollment_then_the_pledges_retries_succeed(env: Env, bpffs: Path) -> None:
    """The MASA is frozen (SIGSTOP), so every pledge stops at /rv with its DTLS session
    through a proxy flow; joinproxyd is killed with SIGKILL there, the MASA thawed and the
    proxy restarted. The old flows are gone with the old process: the registrar's answers on
    them go nowhere, the pledges' CoAP retransmissions open new flows that the registrar's
    DTLS sessions do not know, so each pledge gives the attempt up (--request-timeout) and
    enrolls with a new DTLS session through the new proxy. Nothing of either run is left:
    no UDP socket, no XDP program, no pinned map."""
    proxy = env.lab.proxy
    pin_dir = bpffs / "joinproxyd"
    run_dir = env.work / "proxy-kill"
    config = proxy_config(run_dir, "coaps")
    config["daemon"] = {**config["daemon"], "bpf_pin_dir": str(pin_dir)}
    config["guard"] = {"enabled": True, "rate": 2000, "burst": 4000}
    daemon = ProxyDaemon(env.lab, run_dir, config).start()
    wait_for(lambda: daemon.ctl()["joining"], 15, "joinproxyd to open joining")
    assert xdp_progs(proxy, "join0") == ["jp_guard"]
    masa = env.services.process("masa")
    masa.signal(signal.SIGSTOP)
    try:
        sim = spawn_enroll(env.lab.pledges[0], env.pki, env.work / "out-kill",
                           "--transport", "coaps", *(a for s in KILLED for a in ("--serial", s)),
                           "--registrar", f"[{PROXY_LL}%eth0]:{JOIN_PORT}",
                           "--concurrency", str(len(KILLED)), "--request-timeout", "4",
                           "--deadline", "90")

        def at_rv() -> bool:  # every pledge through its handshake, its voucher request sent
            flows = [f for f in daemon.ctl("circuits") if f["mode"] == "coaps"]
            return len(flows) >= len(KILLED) and sum(
                f["datagrams_up"] >= 4 and f["datagrams_down"] >= 3 for f in flows
            ) >= len(KILLED)
        wait_for(at_rv, 20, "every pledge to wait for its voucher through the proxy")
        daemon.kill()
        assert not [s for s in udp_sockets(proxy) if f":{JOIN_PORT} " in s]
        print(f"after kill -9: XDP on join0 {xdp_progs(proxy, 'join0')}, "
              f"pins {sorted(p.name for p in pin_dir.iterdir()) if pin_dir.exists() else []}")
    finally:
        masa.signal(signal.SIGCONT)
    daemon.start()
    wait_for(lambda: daemon.ctl()["joining"], 15, "the restarted joinproxyd to open joining")
    run = sim.wait(150)
    print("kill -9 run:", {r["serial"]: (r["attempts"], r["seconds"]) for r in run.results})
    assert run.ok, (run.stderr[-4000:], daemon.log()[-3000:], env.services.logs())
    for r in run.results:
        assert r["attempts"] >= 2, r  # the attempt the kill broke, then a new one
        assert r["proxy"] == f"[{PROXY_LL}%eth0]:{JOIN_PORT}", r
        assert ldevid_verifies(env.pki, r["ldevid_path"]), r
    with env.services.store("registrar") as store:
        assert all(store.vouchers(s) for s in KILLED)
    counters = daemon.relay_counters("coaps")  # the new run's: what the retries took
    assert counters.flows >= len(KILLED), counters
    assert daemon.stop() == 0
    assert udp_sockets(proxy) == []
    assert xdp_progs(proxy, "join0") == []
    assert not pin_dir.exists()
