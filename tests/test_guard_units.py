"""The guard's control and the BPF counters' export, without a kernel: a fake data plane
records what the control plane asks of it, and a fresh registry shows what Prometheus and
joinproxyctl get (habit 12)."""

from __future__ import annotations

import asyncio
import errno
import logging
from typing import Any

import pytest

from joinproxyd.config import GuardSettings, parse
from joinproxyd.ctl import render_status
from joinproxyd.daemon import Daemon
from joinproxyd.guard import Guard
from joinproxyd.kernel import KernelError
from joinproxyd.metrics import Metrics
from joinproxyd.model import JoinInterface

LOG = logging.getLogger("test.guard")


class FakeBpf:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.fail_attach: set[int] = set()

    def set_guard(self, rate: int, burst: int, ports: list[int]) -> None:
        self.calls.append(("set_guard", rate, burst, list(ports)))

    def attach_guard(self, index: int) -> str:
        if index in self.fail_attach:
            raise KernelError("attach: EBUSY (Device or resource busy)", errno=errno.EBUSY)
        self.calls.append(("attach", index))
        return "native"

    def detach_guard(self, index: int) -> None:
        self.calls.append(("detach", index))


class FakeDatapath:
    def __init__(self, fail: bool = False) -> None:
        self.bpf = FakeBpf()
        self.opened = False
        self.fail = fail

    async def get(self) -> FakeBpf:
        if self.fail:
            raise KernelError("open guard.bpf.o: EPERM (Operation not permitted)",
                              errno=errno.EPERM)
        self.opened = True
        return self.bpf


def link(name: str, index: int, port: int = 8443) -> JoinInterface:
    return JoinInterface(name, index, "fe80::1", (), ("circuit",), port, ("fe80::1",))


ON = GuardSettings(enabled=True, rate=20, burst=40)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_each_link_is_attached_once_and_settings_written_only_when_they_change() -> None:
    dp = FakeDatapath()
    guard = Guard(dp, LOG)  # type: ignore[arg-type]
    links = [link("join0", 3), link("join1", 4, 5684)]
    run(guard.reconcile(ON, links, [8443, 5684]))
    assert dp.bpf.calls == [("set_guard", 20, 40, [5684, 8443]), ("attach", 3), ("attach", 4)]
    run(guard.reconcile(ON, links, [8443, 5684]))
    assert len(dp.bpf.calls) == 3, "nothing changed, nothing done"
    run(guard.reconcile(GuardSettings(True, 100, 200), links, [8443, 5684]))
    assert dp.bpf.calls[3:] == [("set_guard", 100, 200, [5684, 8443])], "a reload: one write"
    # join1 goes away, join0 comes back with a new ifindex
    run(guard.reconcile(ON, [link("join0", 9)], [8443]))
    assert dp.bpf.calls[4:] == [("set_guard", 20, 40, [8443]), ("detach", 3), ("detach", 4),
                                ("attach", 9)]
    assert guard.status() == {"enabled": True, "running": True, "rate": 20, "burst": 40,
                              "ports": [8443], "interfaces": {"join0": "native"},
                              "error": None}
    run(guard.reconcile(GuardSettings(), [link("join0", 9)], [8443]))
    assert dp.bpf.calls[-1] == ("detach", 9)
    assert guard.status()["interfaces"] == {}


def test_a_guard_that_cannot_run_is_reported_not_raised(caplog: pytest.LogCaptureFixture
                                                        ) -> None:
    guard = Guard(FakeDatapath(fail=True), LOG)  # type: ignore[arg-type]
    run(guard.reconcile(ON, [link("join0", 3)], [8443]))
    run(guard.reconcile(ON, [link("join0", 3)], [8443]))
    assert guard.status()["error"] == ("the join-port guard cannot run: open guard.bpf.o: "
                                       "EPERM (Operation not permitted)")
    assert guard.status()["running"] is False
    assert sum("cannot run" in r.message for r in caplog.records) == 1, "logged once"

    dp = FakeDatapath()
    dp.bpf.fail_attach = {4}
    guard = Guard(dp, LOG)  # type: ignore[arg-type]
    run(guard.reconcile(ON, [link("join0", 3), link("join1", 4)], [8443]))
    assert guard.status()["interfaces"] == {"join0": "native"}
    assert guard.status()["error"] == "join1: attach: EBUSY (Device or resource busy)"
    dp.bpf.fail_attach = set()
    run(guard.reconcile(ON, [link("join0", 3), link("join1", 4)], [8443]))
    assert guard.status()["error"] is None and len(guard.status()["interfaces"]) == 2


def test_more_join_ports_than_the_program_holds_are_reported() -> None:
    guard = Guard(FakeDatapath(), LOG)  # type: ignore[arg-type]
    run(guard.reconcile(ON, [link("join0", 3)], list(range(1000, 1010))))
    assert guard.status()["ports"] == list(range(1000, 1008))
    assert "ports [1008, 1009] are not guarded" in guard.status()["error"]


# -- export ---------------------------------------------------------------------------------------

def test_bpf_packets_are_read_at_scrape_time() -> None:
    metrics = Metrics()
    r = metrics.registry
    assert r.get_sample_value("joinproxyd_bpf_packets_total",
                              {"program": "jp_guard", "action": "drop"}) is None
    counts = {("jp_guard", "drop"): 5, ("jp_guard", "allow"): 0, ("jp_tc_join", "encap"): 9}
    metrics.bpf_packets.set_source(lambda: counts)
    assert r.get_sample_value("joinproxyd_bpf_packets_total",
                              {"program": "jp_guard", "action": "drop"}) == 5
    counts[("jp_guard", "drop")] = 6  # no copy anywhere: the next scrape reads the kernel
    assert r.get_sample_value("joinproxyd_bpf_packets_total",
                              {"program": "jp_guard", "action": "drop"}) == 6
    assert r.get_sample_value("joinproxyd_bpf_packets_total",
                              {"program": "jp_guard", "action": "allow"}) == 0


class FakeReader:
    """What Daemon reads from its Datapath at scrape time."""

    def kernel_drops(self, programs: Any) -> dict[str, int]:
        assert [p.value for p in programs] == ["jp_guard"]
        return {"rate-limit": 7}

    def counters(self) -> dict[tuple[str, str], int]:
        return {("jp_guard", "drop"): 7, ("jp_guard", "allow"): 3}

    def status(self) -> dict[str, Any]:
        return {"pin_dir": "/sys/fs/bpf/joinproxyd", "attached": [
            {"hook": "xdp", "ifindex": 3, "program": "jp_guard", "mode": "native"}],
            "counters": {"jp_guard/drop": 7, "jp_guard/allow": 3, "jp_guard/pass": 0}}


def test_guard_drops_join_the_drop_family_and_the_status(tmp_path: Any) -> None:
    config = parse({"backbone": {"interface": "bb0"}, "join": [{"interfaces": ["join*"]}],
                    "guard": {"enabled": True},
                    "daemon": {"control_socket": str(tmp_path / "ctl.sock")}})
    daemon = Daemon(config, None)
    daemon.datapath = FakeReader()  # type: ignore[assignment]
    daemon.metrics.bpf_packets.set_source(daemon.datapath.counters)
    daemon.metrics.drops.declare("guard")
    r = daemon.metrics.registry
    assert r.get_sample_value("joinproxyd_drops_total",
                              {"mode": "guard", "reason": "rate-limit"}) == 7
    assert r.get_sample_value("joinproxyd_drops_total",
                              {"mode": "guard", "reason": "table-full"}) == 0
    status = daemon.status()
    assert status["counters"]['joinproxyd_bpf_packets_total{action="drop",program="jp_guard"}'] \
        == 7
    text = render_status(status)
    assert "guard: 20 packets/s per source, burst 40, ports none on no link" in text
    assert "xdp   3        jp_guard  native" in text
    assert "  jp_guard: allow 3, drop 7" in text
    status["bpf"] = None
    status["guard"] = {"enabled": False}
    text = render_status(status)
    assert "guard: off\n" in text and "BPF data plane: not loaded" in text
    status["guard"] = {"enabled": False, "interfaces": {"join0": "native"}}
    assert "guard: off (its program stays on join0 to start the XDP encapsulation, " \
        "limiting nothing)" in render_status(status)
