"""Kernel state across kill -9 in the ipip mode (issue 11, defect 8): whose clsact is it?

The ipip mode's tc programs need a clsact qdisc on the join link and on the backbone. The
daemon adds one where there is none and removes it when it is done, and never removes one
that was there before it. After kill -9 the restarted daemon must still know which qdiscs a
run of its own added: it claims each in <runtime dir>/clsact.json before adding it
(kernel/qdisc_record.py). Checked here, in namespaces, with the real daemon:

- kill -9, restart, clean stop: no clsact left on the join link or the backbone, and nothing
  else the daemon made either (XDP programs, tc filters, pins, proxy neighbour entries, the
  backbone address, the join link's sysctls back to the operator's values, no record files);
- an operator's clsact (with a filter of the operator's on one of them) made before the
  daemon started survives a clean stop, and a kill -9, restart and stop as well.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_ipip_daemon import (
    ONE_EACH,
    OPERATOR_KNOBS,
    backbone_address,
    bpffs,
    hooks,
    ipip_config,
    link_knobs,
    proxy_entries,
    relaying,
    set_link_knobs,
    show,
)

from lab import Host, Lab, Topology, wait_for
from lab.proxyd import ProxyDaemon, echo_registrar

__all__ = ["bpffs"]  # the fixture, shared with test_ipip_daemon
pytestmark = pytest.mark.netns
LINKS = ("join0", "bb0")


@pytest.fixture
def lab(as_root: None, tmp_path: Path) -> Iterator[Lab]:
    with Lab(Topology(pledges=1, registrars=1), log_dir=tmp_path / "logs") as lab:
        yield lab


def qdiscs(host: Host, dev: str) -> list[str]:
    out = host.run(["tc", "-j", "qdisc", "show", "dev", dev]).stdout
    return [q["kind"] for q in json.loads(out or "[]")]


def clsact_on(host: Host) -> dict[str, bool]:
    return {dev: "clsact" in qdiscs(host, dev) for dev in LINKS}


def foreign_filters(host: Host, dev: str) -> list[str]:
    out = host.run(["tc", "-j", "filter", "show", "dev", dev, "egress"]).stdout
    return [f["kind"] for f in json.loads(out or "[]") if "options" in f]


def test_kill_9_restart_and_stop_leave_no_clsact_and_nothing_else(
        lab: Lab, bpffs: Path, tmp_path: Path) -> None:
    pin_dir = bpffs / "joinproxyd"
    run_dir = tmp_path / "proxy"
    set_link_knobs(lab.proxy, "join0", OPERATOR_KNOBS)
    assert clsact_on(lab.proxy) == {"join0": False, "bb0": False}
    echo_registrar(lab.registrars[0], "r0")  # for the health probe
    daemon = ProxyDaemon(lab, run_dir, ipip_config(run_dir, pin_dir, static=True))
    try:
        daemon.start()
        wait_for(lambda: relaying(daemon), 15, "the ipip mode relaying")
        assert hooks(lab.proxy) == ONE_EACH
        assert clsact_on(lab.proxy) == {"join0": True, "bb0": True}
        outer_src = backbone_address(lab.proxy)
        claimed = json.loads((run_dir / "clsact.json").read_text())
        assert sorted(claimed["qdiscs"].values()) == sorted(LINKS)

        daemon.kill()
        daemon.start()
        wait_for(lambda: relaying(daemon), 15, "the restarted ipip mode relaying")
        assert hooks(lab.proxy) == ONE_EACH
        assert daemon.stop() == 0

        assert clsact_on(lab.proxy) == {"join0": False, "bb0": False}, daemon.log()[-3000:]
        # and nothing else of the daemon's is left behind
        assert hooks(lab.proxy) == {k: [] for k in ONE_EACH}
        assert not pin_dir.exists()
        assert proxy_entries(lab.proxy) == ""
        assert outer_src not in lab.proxy.run(["ip", "-6", "addr", "show", "dev", "bb0"]).stdout
        assert link_knobs(lab.proxy, "join0") == OPERATOR_KNOBS
        assert not (run_dir / "clsact.json").exists()
        assert not (run_dir / "ipip-knobs.json").exists()
    finally:
        show(daemon)


def test_a_killed_runs_clsact_is_removed_by_a_start_without_bpf(
        lab: Lab, bpffs: Path, tmp_path: Path) -> None:
    """kill -9, then a configuration that runs nothing in BPF: the start cleans up."""
    pin_dir = bpffs / "joinproxyd"
    run_dir = tmp_path / "proxy"
    echo_registrar(lab.registrars[0], "r0")
    config = ipip_config(run_dir, pin_dir, static=True)
    daemon = ProxyDaemon(lab, run_dir, config)
    try:
        daemon.start()
        wait_for(lambda: relaying(daemon), 15, "the ipip mode relaying")
        daemon.kill()
        assert clsact_on(lab.proxy) == {"join0": True, "bb0": True}
        config["join"][0]["modes"] = ["circuit"]
        config["guard"] = {"enabled": False}
        daemon.write_config(config)
        daemon.start()
        assert clsact_on(lab.proxy) == {"join0": False, "bb0": False}, daemon.log()[-3000:]
        assert daemon.stop() == 0
    finally:
        show(daemon)


def test_an_operators_clsact_survives_stop_and_kill_9(
        lab: Lab, bpffs: Path, tmp_path: Path) -> None:
    pin_dir = bpffs / "joinproxyd"
    run_dir = tmp_path / "proxy"
    for dev in LINKS:
        lab.proxy.run(["tc", "qdisc", "add", "dev", dev, "clsact"])
    # on the backbone, a filter of the operator's too (egress: the daemon uses ingress; a
    # classic BPF one that matches everything, the one classifier this kernel has)
    lab.proxy.run(["tc", "filter", "add", "dev", "bb0", "egress", "pref", "7", "protocol",
                   "all", "bpf", "bytecode", "1,6 0 0 4294967295,"])
    echo_registrar(lab.registrars[0], "r0")
    daemon = ProxyDaemon(lab, run_dir, ipip_config(run_dir, pin_dir, static=True))
    try:
        daemon.start()
        wait_for(lambda: relaying(daemon), 15, "the ipip mode relaying")
        assert hooks(lab.proxy) == ONE_EACH
        assert not (run_dir / "clsact.json").exists(), "nothing of ours to claim"
        assert daemon.stop() == 0
        assert clsact_on(lab.proxy) == {"join0": True, "bb0": True}
        assert hooks(lab.proxy) == {k: [] for k in ONE_EACH}

        daemon.start()
        wait_for(lambda: relaying(daemon), 15, "the ipip mode relaying again")
        daemon.kill()
        daemon.start()
        wait_for(lambda: relaying(daemon), 15, "the restarted ipip mode relaying")
        assert daemon.stop() == 0
        assert clsact_on(lab.proxy) == {"join0": True, "bb0": True}
        assert foreign_filters(lab.proxy, "bb0") == ["bpf"]
        assert hooks(lab.proxy) == {k: [] for k in ONE_EACH}
    finally:
        show(daemon)
