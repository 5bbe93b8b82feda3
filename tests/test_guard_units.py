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
from joinproxyd.daemon import Daemon, guarded_ports
from joinproxyd.guard import Guard
from joinproxyd.kernel import KernelError
from joinproxyd.metrics import Metrics
from joinproxyd.model import JoinInterface

LOG = logging.getLogger("test.guard")


class FakeBpf:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.fail_attach: set[int] = set()
        self.by_source: dict[tuple[str, int, int], int] = {}

    def set_guard(self, rate: int, burst: int, ports: list[int], *syn: int) -> None:
        self.calls.append(("set_guard", rate, burst, list(ports), *syn))

    def attach_guard(self, index: int) -> str:
        if index in self.fail_attach:
            raise KernelError("attach: EBUSY (Device or resource busy)", errno=errno.EBUSY)
        self.calls.append(("attach", index))
        return "native"

    def detach_guard(self, index: int) -> None:
        self.calls.append(("detach", index))

    def guard_drops_by_source(self) -> dict[tuple[str, int, int], int]:
        return dict(self.by_source)


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

    def kernel_drops(self, programs: Any) -> dict[str, int]:
        return {"rate-limit": sum(self.bpf.by_source.values())}


def link(name: str, index: int, port: int = 8443) -> JoinInterface:
    return JoinInterface(name, index, "fe80::1", (), ("circuit",), port, ("fe80::1",))


ON = GuardSettings(enabled=True, rate=20, burst=40, syn_rate=10, syn_burst=20)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_each_link_is_attached_once_and_settings_written_only_when_they_change() -> None:
    dp = FakeDatapath()
    guard = Guard(dp, LOG)  # type: ignore[arg-type]
    links = [link("join0", 3), link("join1", 4, 5684)]
    run(guard.reconcile(ON, links, [8443, 5684]))
    assert dp.bpf.calls == [("set_guard", 20, 40, [5684, 8443], 10, 20), ("attach", 3),
                            ("attach", 4)]
    run(guard.reconcile(ON, links, [8443, 5684]))
    assert len(dp.bpf.calls) == 3, "nothing changed, nothing done"
    run(guard.reconcile(GuardSettings(True, 100, 200, 30, 60), links, [8443, 5684]))
    assert dp.bpf.calls[3:] == [("set_guard", 100, 200, [5684, 8443], 30, 60)], \
        "a reload: one write"
    # join1 goes away, join0 comes back with a new ifindex
    run(guard.reconcile(ON, [link("join0", 9)], [8443]))
    assert dp.bpf.calls[4:] == [("set_guard", 20, 40, [8443], 10, 20), ("detach", 3),
                                ("detach", 4), ("attach", 9)]
    assert guard.status() == {"enabled": True, "running": True, "rate": 20, "burst": 40,
                              "syn_rate": 10, "syn_burst": 20, "ports": [8443],
                              "interfaces": {"join0": "native"}, "dropped_most": [],
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
    assert ("guard: per source UDP 20 datagrams/s burst 40, TCP 10 SYNs/s burst 20, ports "
            "none on no link") in text
    assert "xdp   3        jp_guard  native" in text
    assert "  jp_guard: allow 3, drop 7" in text
    status["guard"]["dropped_most"] = [{"source": "fe80::1:1", "interface": "join0",
                                        "protocol": "tcp", "drops": 7}]
    assert "  dropped 7 tcp from fe80::1:1 on join0\n" in render_status(status)
    status["bpf"] = None
    status["guard"] = {"enabled": False}
    text = render_status(status)
    assert "guard: off\n" in text and "BPF data plane: not loaded" in text
    status["guard"] = {"enabled": False, "interfaces": {"join0": "native"}}
    assert "guard: off (its program stays on join0 to start the XDP encapsulation, " \
        "limiting nothing)" in render_status(status)


# -- configuration: UDP datagrams and TCP SYNs have rates of their own ------------------------

GUARD_MINIMAL = {"backbone": {"interface": "bb0"}, "join": [{"interfaces": ["join*"]}]}


def test_syn_rate_and_burst_are_read_with_defaults() -> None:
    assert parse({**GUARD_MINIMAL, "guard": {"enabled": True}}).guard == \
        GuardSettings(True, rate=20, burst=40, syn_rate=10, syn_burst=20)
    guard = parse({**GUARD_MINIMAL, "guard": {"enabled": True, "syn_rate": 3,
                                              "syn_burst": 7}}).guard
    assert (guard.syn_rate, guard.syn_burst) == (3, 7)


@pytest.mark.parametrize(("guard", "message"), [
    ({"syn_rate": 0}, "guard.syn_rate: must be an integer between 1 and 10000000 (got 0)"),
    ({"syn_rate": 1.5}, "guard.syn_rate: must be an integer between 1 and 10000000 (got 1.5)"),
    ({"syn_burst": 0}, "guard.syn_burst: must be an integer between 1 and 1000000 (got 0)"),
    ({"syn_burst": "20"},
     "guard.syn_burst: must be an integer between 1 and 1000000 (got '20')"),
])
def test_bad_syn_settings_name_the_key_and_the_reason(guard: dict[str, Any],
                                                      message: str) -> None:
    from joinproxyd.config import ConfigError

    with pytest.raises(ConfigError) as info:
        parse({**GUARD_MINIMAL, "guard": guard})
    assert str(info.value) == message


def test_the_shipped_guard_fits_a_pledge_burst() -> None:
    """The shipped numbers against what a well-behaved pledge sends in a burst (the reasoning
    is in packaging/joinproxyd.toml): six TCP connections at once, each SYN retransmitted
    once; a whole cBRSKI enrollment over DTLS (about 20 datagrams) twice over."""
    import tomllib
    from pathlib import Path

    shipped = Path(__file__).resolve().parent.parent / "packaging" / "joinproxyd.toml"
    guard = parse(tomllib.loads(shipped.read_text())).guard
    assert guard.enabled
    assert guard.syn_burst >= 2 * 6 and guard.syn_rate >= 2 * 2  # [limits] new circuits: 2/s
    assert guard.burst >= 2 * 20 and guard.rate >= 20


def test_sources_losing_packets_are_logged_once_per_episode(caplog: pytest.LogCaptureFixture
                                                            ) -> None:
    caplog.set_level(logging.INFO, logger="test.guard")
    dp = FakeDatapath()
    guard = Guard(dp, LOG)  # type: ignore[arg-type]

    def lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if "drops" in r.getMessage()]

    async def scenario() -> None:
        await guard.reconcile(ON, [link("join0", 3)], [8443])
        await guard.report_drops()
        assert lines() == [], "nothing dropped, nothing said"
        dp.bpf.by_source = {("fe80::1:1", 3, 6): 500, ("fe80::1:2", 3, 17): 3}
        await guard.report_drops()
        assert lines() == [
            "join-port guard drops TCP SYNs from fe80::1:1 on join0: over 10/s, burst 20 "
            "(500 dropped so far)",
            "join-port guard drops UDP datagrams from fe80::1:2 on join0: over 20/s, burst 40 "
            "(3 dropped so far)"]
        dp.bpf.by_source[("fe80::1:1", 3, 6)] = 900  # still flooding: not said again
        await guard.report_drops()
        assert len(lines()) == 2
        await guard.report_drops()  # nothing new dropped: the episodes are over
        dp.bpf.by_source[("fe80::1:2", 3, 17)] = 4  # a new episode
        await guard.report_drops()
        assert lines()[2:] == ["join-port guard drops UDP datagrams from fe80::1:2 on join0: "
                               "over 20/s, burst 40 (4 dropped so far)"]
        assert guard.status()["dropped_most"] == [
            {"source": "fe80::1:1", "interface": "join0", "protocol": "tcp", "drops": 900},
            {"source": "fe80::1:2", "interface": "join0", "protocol": "udp", "drops": 4}]
        pledges = {r.__dict__.get("PLEDGE") for r in caplog.records if "drops" in r.getMessage()}
        assert pledges == {"fe80::1:1", "fe80::1:2"}, "the journal field names the source"
        await guard.close()
        assert guard._reporter is None

    run(scenario())


def test_a_flood_of_many_sources_is_summed_up() -> None:
    dp = FakeDatapath()
    guard = Guard(dp, LOG)  # type: ignore[arg-type]
    dp.bpf.by_source = {(f"fe80::2:{i:x}", 3, 17): 100 + i for i in range(25)}

    async def scenario() -> list[dict[str, Any]]:
        await guard.reconcile(ON, [link("join0", 3)], [8443])
        await guard.report_drops()
        await guard.close()
        return guard.status()["dropped_most"]

    top = run(scenario())
    assert [entry["drops"] for entry in top] == list(range(124, 114, -1))


def test_the_core_discovery_port_is_guarded_where_a_constrained_link_answers_it() -> None:
    config = parse({"backbone": {"interface": "bb0"},
                    "join": [{"interfaces": ["join0"], "modes": ["circuit"]}]})
    circuit = JoinInterface("join0", 3, "fe80::1", (), ("circuit",), 8443)
    coaps = JoinInterface("join1", 4, "fe80::1", (), ("coaps",), 5684)
    jpy = JoinInterface("join2", 5, "fe80::1", (), ("jpy",), 5686)
    assert guarded_ports(config, [circuit], None) == [8443]
    assert guarded_ports(config, [circuit, coaps], None) == [5683, 5684, 8443]
    assert guarded_ports(config, [jpy], None) == [5683, 5686]
