"""Optional capabilities stay unloaded unless configured (issue 11, defect 1), on a machine that
has them all (this one: python3-nftables and libbpf1 installed).

The daemon is run from the checkout in a namespace lab and its memory map read from /proc: a
circuit-only configuration with the guard off loads neither libnftables nor libbpf; with the
guard on, libbpf and not libnftables; the nftables binding is loaded only with nat66. (Before
the fix every start loaded libnftables, for the NAT66 leftover check.) The OpenWrt side, where
these are missing, is tests/test_ipk_payload.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from test_ipip_daemon import bpffs, show

from lab import Lab, Topology, wait_for
from lab.proxyd import ProxyDaemon, base_config, echo_registrar, talk

__all__ = ["bpffs"]  # the fixture, shared with test_ipip_daemon
pytestmark = pytest.mark.netns


@pytest.fixture
def lab(as_root: None, tmp_path: Path) -> Iterator[Lab]:
    with Lab(Topology(pledges=1, registrars=1, join_ula=True),
             log_dir=tmp_path / "logs") as lab:
        yield lab


def libraries(daemon: ProxyDaemon) -> set[str]:
    assert daemon.process is not None
    maps = Path(f"/proc/{daemon.process.pid}/maps").read_text()
    return {Path(line.split()[-1]).name.split(".so")[0] for line in maps.splitlines()
            if ".so" in line}


@pytest.mark.parametrize(("modes", "guard", "loaded", "not_loaded"), [
    (["circuit"], False, set(), {"libnftables", "libbpf"}),
    (["circuit"], True, {"libbpf"}, {"libnftables"}),
    (["circuit", "nat66"], False, {"libnftables"}, {"libbpf"}),
])
def test_only_what_is_configured_is_loaded(lab: Lab, bpffs: Path, tmp_path: Path,
                                           modes: list[str], guard: bool, loaded: set[str],
                                           not_loaded: set[str]) -> None:
    run_dir = tmp_path / "proxy"
    echo_registrar(lab.registrars[0], "r0")
    daemon = ProxyDaemon(lab, run_dir, base_config(
        run_dir, daemon={"log_level": "info", "bpf_pin_dir": str(bpffs / "joinproxyd")},
        join=[{"interfaces": ["join*"], "modes": modes, "port": 8443}],
        guard={"enabled": guard, "rate": 20, "burst": 40}))
    try:
        daemon.start()
        wait_for(lambda: daemon.ctl()["joining"] or None, 15, "joining open")
        assert talk(lab.pledges[0], "hello").splitlines() == ["r0", "hello"]
        libs = libraries(daemon)
        assert loaded <= libs, sorted(libs)
        assert not not_loaded & libs, sorted(not_loaded & libs)
        assert daemon.stop() == 0
        assert "Traceback" not in daemon.log()
    finally:
        show(daemon)


def test_a_killed_nat66_runs_table_is_found_and_removed_by_a_circuit_only_start(
        lab: Lab, bpffs: Path, tmp_path: Path) -> None:
    """The leftover table is looked for over plain netlink; the binding is loaded only
    because there is one to remove."""
    run_dir = tmp_path / "proxy"
    echo_registrar(lab.registrars[0], "r0")
    config = base_config(run_dir, daemon={"log_level": "info"},
                         join=[{"interfaces": ["join*"], "modes": ["circuit", "nat66"],
                                "port": 8443}])
    daemon = ProxyDaemon(lab, run_dir, config)

    def tables() -> list[str]:
        out = lab.proxy.run(["nft", "list", "tables"]).stdout
        return [line.strip() for line in out.splitlines() if line.strip()]

    def forwarding() -> str:
        return lab.proxy.run(["sysctl", "-n", "net.ipv6.conf.all.forwarding"]).stdout.strip()

    try:
        before = forwarding()
        daemon.start()
        wait_for(lambda: daemon.ctl()["joining"] or None, 15, "joining open")
        wait_for(lambda: "table ip6 joinproxyd" in tables() or None, 10, "the nat66 table")
        daemon.kill()
        assert "table ip6 joinproxyd" in tables() and forwarding() == "1"
        config["join"][0]["modes"] = ["circuit"]
        daemon.write_config(config)
        daemon.start()
        assert "table ip6 joinproxyd" not in tables()
        assert forwarding() == before
        assert "removed the nftables table ip6 joinproxyd left by an earlier run" in daemon.log()
        assert daemon.stop() == 0
    finally:
        show(daemon)
