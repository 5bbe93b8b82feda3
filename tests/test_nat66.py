"""NAT66 without a kernel: the ruleset builder (a pure function) and the mode's decisions,
with a fake table and a /proc/sys in a temporary directory."""

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from joinproxyd.config import Limits
from joinproxyd.kernel import KernelError
from joinproxyd.kernel.netlink import NatFlow
from joinproxyd.kernel.nftables import CounterValue, NftablesError
from joinproxyd.metrics import Metrics
from joinproxyd.model import DropReason, JoinInterface, LinkState, RegistrarEndpoint
from joinproxyd.relays.base import RelayContext
from joinproxyd.relays.nat66 import (
    COUNTERS,
    Nat66Mode,
    build_ruleset,
    recorded_forwarding,
    refusal,
)

JOIN0 = JoinInterface("join0", 5, "fe80::1", ("fd4a:5044:0:100::1",), ("nat66",), 8443)
JOIN1 = JoinInterface("join1", 6, "fe80::1", ("fd4a:5044:0:101::1",), ("nat66", "circuit"),
                      9443)
BARE = JoinInterface("join2", 7, "fe80::1", (), ("nat66",), 8443)  # no ULA/global prefix
REGISTRAR = RegistrarEndpoint(100, "fd4a:5044::100", 443)
LINK_LOCAL_REGISTRAR = RegistrarEndpoint(100, "fe80::b:2", 443, scope_id=3)
BACKBONE = LinkState("bb0", 3, True, ("fe80::b:1",), ("fd4a:5044::1",))

IIF = {"meta": {"key": "iifname"}}
OIF = {"meta": {"key": "oifname"}}
NOT_LINK_LOCAL = {"match": {"op": "!=", "left": {"payload": {"protocol": "ip6",
                                                             "field": "saddr"}},
                            "right": {"prefix": {"addr": "fe80::", "len": 10}}}}
CT_DNAT = {"match": {"op": "in", "left": {"ct": {"key": "status"}}, "right": "dnat"}}


def dport(port: int, l4: str = "tcp") -> dict:
    return {"match": {"op": "==", "left": {"payload": {"protocol": l4, "field": "dport"}},
                      "right": port}}


def rules(spec: list[dict], chain: str) -> list[list[dict]]:
    return [o["rule"]["expr"] for o in spec if "rule" in o and o["rule"]["chain"] == chain]


# -- the builder -----------------------------------------------------------------------------

DADDR_REGISTRAR = {"match": {"op": "==", "left": {"payload": {"protocol": "ip6",
                                                              "field": "daddr"}},
                             "right": "fd4a:5044::100"}}
ESTABLISHED = {"match": {"op": "in", "left": {"ct": {"key": "state"}},
                         "right": ["established", "related"]}}


def test_ruleset_for_one_join_interface():
    spec = build_ruleset([JOIN0], REGISTRAR, "bb0")
    assert spec == [
        {"counter": {"name": "no-registrar"}},
        {"counter": {"name": "not-to-registrar"}},
        {"counter": {"name": "unsolicited"}},
        {"counter": {"name": "flows-join0"}},
        {"counter": {"name": "upstream-join0"}},
        {"counter": {"name": "downstream-join0"}},
        {"chain": {"name": "prerouting", "type": "nat", "hook": "prerouting", "prio": -100,
                   "policy": "accept"}},
        {"chain": {"name": "postrouting", "type": "nat", "hook": "postrouting", "prio": 100,
                   "policy": "accept"}},
        {"chain": {"name": "forward", "type": "filter", "hook": "forward", "prio": 0,
                   "policy": "accept"}},
        {"rule": {"chain": "prerouting", "expr": [
            {"match": {"op": "==", "left": IIF, "right": "join0"}},
            NOT_LINK_LOCAL,
            dport(8443),
            {"dnat": {"addr": "fd4a:5044::100", "port": 443}}]}},
        {"rule": {"chain": "postrouting", "expr": [
            {"match": {"op": "==", "left": OIF, "right": "bb0"}},
            {"match": {"op": "==", "left": IIF, "right": "join0"}},
            DADDR_REGISTRAR, dport(443),
            {"counter": "flows-join0"},
            {"masquerade": None}]}},
        {"rule": {"chain": "forward", "expr": [
            {"match": {"op": "==", "left": IIF, "right": "join0"}}, CT_DNAT,
            {"counter": "upstream-join0"}, {"accept": None}]}},
        # A pledge that addressed the registrar itself (no dnat status in conntrack).
        {"rule": {"chain": "forward", "expr": [
            {"match": {"op": "==", "left": IIF, "right": "join0"}}, DADDR_REGISTRAR,
            dport(443), {"counter": "upstream-join0"}, {"accept": None}]}},
        {"rule": {"chain": "forward", "expr": [
            {"match": {"op": "==", "left": IIF, "right": "join0"}},
            {"counter": "not-to-registrar"}, {"drop": None}]}},
        {"rule": {"chain": "forward", "expr": [
            {"match": {"op": "==", "left": OIF, "right": "join0"}}, ESTABLISHED,
            {"counter": "downstream-join0"}, {"accept": None}]}},
        {"rule": {"chain": "forward", "expr": [
            {"match": {"op": "==", "left": OIF, "right": "join0"}},
            {"counter": "unsolicited"}, {"drop": None}]}},
    ]
    json.dumps(spec)  # plain JSON, as libnftables wants it


def test_draining_admits_only_open_flows_and_makes_no_new_ones():
    spec = build_ruleset([JOIN0], REGISTRAR, "bb0", draining=True)
    text = json.dumps(spec)
    assert '{"dnat":' not in text and "masquerade" not in text
    assert rules(spec, "prerouting")[0][-1] == {"counter": "no-registrar"}
    forward = rules(spec, "forward")
    assert forward[1] == [{"match": {"op": "==", "left": IIF, "right": "join0"}},
                          DADDR_REGISTRAR, dport(443), ESTABLISHED,
                          {"counter": "upstream-join0"}, {"accept": None}]


def test_each_interface_gets_its_own_port_and_counters():
    spec = build_ruleset([JOIN1, JOIN0], REGISTRAR, "bb0")  # any order in, sorted out
    prerouting = rules(spec, "prerouting")
    assert [(r[0]["match"]["right"], r[2]["match"]["right"]) for r in prerouting] == \
        [("join0", 8443), ("join1", 9443)]
    forward = rules(spec, "forward")
    assert [expr[0]["match"]["right"] for expr in forward] == [
        "join0", "join0", "join1", "join1", {"set": ["join0", "join1"]},
        "join0", "join1", {"set": ["join0", "join1"]}]
    # One masquerade rule per join interface, each counting that interface's new flows.
    assert [r[-2] for r in rules(spec, "postrouting")] == [
        {"counter": "flows-join0"}, {"counter": "flows-join1"}]


@pytest.mark.parametrize(("registrar", "backbone"), [
    (None, "bb0"), (LINK_LOCAL_REGISTRAR, "bb0"), (REGISTRAR, None),
    (RegistrarEndpoint(100, "fd4a:5044::100", 443, protocol=132), "bb0"),  # SCTP
])
def test_no_usable_registrar_means_no_nat_only_counting(registrar, backbone):
    spec = build_ruleset([JOIN0], registrar, backbone)
    text = json.dumps(spec)
    assert '{"dnat":' not in text and "masquerade" not in text
    assert rules(spec, "prerouting") == [[
        {"match": {"op": "==", "left": IIF, "right": "join0"}}, NOT_LINK_LOCAL, dport(8443),
        {"counter": "no-registrar"}]]
    assert rules(spec, "postrouting") == []
    # Pledges stay fenced in all the same (and replies of flows still open get out).
    assert [r[-1] for r in rules(spec, "forward")] == [
        {"accept": None}, {"drop": None}, {"accept": None}, {"drop": None}]


def test_refusal_reasons():
    assert refusal(REGISTRAR, "bb0") is None
    assert refusal(None, "bb0") == "no registrar is known"
    assert "link-local" in (refusal(LINK_LOCAL_REGISTRAR, "bb0") or "")
    assert refusal(REGISTRAR, None) == "the backbone interface is not known"


def test_udp_registrar_gets_udp_rules():
    udp = RegistrarEndpoint(100, "fd4a:5044::100", 5684, protocol=17)
    spec = build_ruleset([JOIN0], udp, "bb0")
    assert rules(spec, "prerouting")[0][2] == dport(8443, "udp")
    assert rules(spec, "postrouting")[0][3] == dport(5684, "udp")
    assert rules(spec, "forward")[1][2] == dport(5684, "udp")


def test_no_interfaces_means_empty_chains():
    spec = build_ruleset([], REGISTRAR, "bb0")
    assert [next(iter(o)) for o in spec] == ["counter"] * 3 + ["chain"] * 3


def test_forwarding_note_round_trips_through_the_table():
    spec = build_ruleset([JOIN0], REGISTRAR, "bb0", forwarding_before="0")
    assert spec[-2:] == [
        {"chain": {"name": "state"}},
        {"rule": {"chain": "state", "expr": [{"return": None}],
                  "comment": "net.ipv6.conf.all.forwarding=0 before joinproxyd"}}]
    listed = [{"table": {"family": "ip6", "name": "joinproxyd"}}] + [
        {kind: {"family": "ip6", "table": "joinproxyd", **body}}
        for obj in spec for kind, body in obj.items()]
    assert recorded_forwarding(listed) == "0"
    assert recorded_forwarding(build_ruleset([JOIN0], REGISTRAR, "bb0")) is None


@pytest.mark.parametrize("rule", [
    {"chain": "state", "comment": "net.ipv6.conf.all.forwarding=0; rm -rf before joinproxyd"},
    {"chain": "state", "comment": "something else"},
    {"chain": "forward", "comment": "net.ipv6.conf.all.forwarding=0 before joinproxyd"},
    {"chain": "state"},
])
def test_only_our_exact_note_is_believed(rule):
    assert recorded_forwarding([{"rule": rule}]) is None


# -- the mode, with a fake table --------------------------------------------------------------

class FakeTable:
    """An nftables table in memory: what was applied, and counters a test can set."""

    def __init__(self, leftover: list[dict] | None = None) -> None:
        self.objects: list[dict] = list(leftover or [])
        self.applied: list[list[dict]] = []
        self.live: dict[str, int] = {}
        self.fail: NftablesError | None = None
        self.on_apply: list[Any] = []

    def apply(self, spec: list[dict]) -> None:
        if self.fail is not None:
            raise self.fail
        for hook in self.on_apply:
            hook()
        self.applied.append(spec)
        self.objects = [{"table": {"family": "ip6", "name": "joinproxyd"}}] + [
            {kind: {"family": "ip6", "table": "joinproxyd", **body}}
            for obj in spec for kind, body in obj.items()]
        self.live = {}  # a new table counts from zero

    def delete(self) -> None:
        self.objects = []
        self.live = {}

    def exists(self) -> bool:
        return bool(self.objects)

    def list(self) -> list[dict]:
        return list(self.objects)

    def counters(self) -> dict[str, CounterValue]:
        return {name: CounterValue(n, n * 80) for name, n in self.live.items()} \
            if self.objects else {}


@pytest.fixture
def proc(tmp_path: Path) -> Path:
    knob = tmp_path / "net" / "ipv6" / "conf" / "all" / "forwarding"
    knob.parent.mkdir(parents=True)
    knob.write_text("0\n")
    return tmp_path


def forwarding(proc: Path) -> str:
    return (proc / "net/ipv6/conf/all/forwarding").read_text().strip()


class FakeFlows:
    """Conntrack as a list the test edits; each read can also run a hook."""

    def __init__(self) -> None:
        self.flows: list[NatFlow] = []
        self.reads = 0
        self.on_read: Any = None
        self.fail: KernelError | None = None

    async def __call__(self) -> list[NatFlow]:
        self.reads += 1
        if self.fail is not None:
            raise self.fail
        if self.on_read is not None:
            self.on_read(self)
        return list(self.flows)


def flow(source: str = "fd4a:5044:0:100::100", tcp_state: int | None = 3,
         target: str = "fd4a:5044::100", target_port: int = 443, protocol: int = 6) -> NatFlow:
    return NatFlow(protocol, source, 40000, "fd4a:5044:0:100::1", 8443, target, target_port,
                   tcp_state)


def make_mode(proc: Path, table: FakeTable, backbone: LinkState | None = BACKBONE,
              flows: FakeFlows | None = None) -> Nat66Mode:
    ctx = RelayContext(Metrics(), Limits, lambda: backbone, logging.getLogger("test.nat66"))
    return Nat66Mode(ctx, table=table, sysctl_root=proc,  # type: ignore[arg-type]
                     flows=flows or FakeFlows())


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_forwarding_goes_on_after_the_table_and_back_on_close(proc):
    table = FakeTable()
    table.on_apply.append(lambda: seen.append(forwarding(proc)))
    seen: list[str] = []
    mode = make_mode(proc, table)
    run(mode.reconcile([JOIN0], REGISTRAR))
    assert seen == ["0"]  # the table was in place while forwarding was still off
    assert forwarding(proc) == "1"
    assert mode.status()["forwarding"] == {"now": "1", "before": "0"}
    assert recorded_forwarding(table.list()) == "0"
    run(mode.close(0))
    assert forwarding(proc) == "0"
    assert table.objects == []


def test_serving_nothing_restores_forwarding_and_removes_the_table(proc):
    table = FakeTable()
    mode = make_mode(proc, table)
    run(mode.reconcile([JOIN0], REGISTRAR))
    run(mode.reconcile([], REGISTRAR))
    assert forwarding(proc) == "0" and table.objects == []
    assert mode.status()["forwarding"]["before"] is None


def test_forwarding_already_on_is_left_on(proc):
    (proc / "net/ipv6/conf/all/forwarding").write_text("1\n")
    mode = make_mode(proc, FakeTable())
    run(mode.reconcile([JOIN0], REGISTRAR))
    run(mode.close(0))
    assert forwarding(proc) == "1"


def test_after_a_crash_the_value_from_before_the_crashed_run_is_restored(proc, caplog):
    caplog.set_level(logging.INFO, logger="test.nat66")
    crashed = FakeTable()
    crashed.apply(build_ruleset([JOIN0], REGISTRAR, "bb0", forwarding_before="0"))
    (proc / "net/ipv6/conf/all/forwarding").write_text("1\n")  # what the crashed run left
    mode = make_mode(proc, crashed)
    run(mode.reconcile([JOIN0], REGISTRAR))
    assert "left by an earlier run" in caplog.text
    assert mode.status()["forwarding"]["before"] == "0"
    run(mode.close(0))
    assert forwarding(proc) == "0"


def test_a_leftover_table_is_cleaned_even_if_nothing_is_served(proc):
    leftover = FakeTable()
    leftover.apply(build_ruleset([JOIN0], REGISTRAR, "bb0", forwarding_before="0"))
    (proc / "net/ipv6/conf/all/forwarding").write_text("1\n")
    mode = make_mode(proc, leftover)
    run(mode.reconcile([], REGISTRAR))
    assert leftover.objects == [] and forwarding(proc) == "0"


def test_close_without_ever_serving_touches_nothing(proc):
    table = FakeTable()
    mode = make_mode(proc, table)
    run(mode.close(5))
    assert table.applied == [] and forwarding(proc) == "0"


def test_a_failed_apply_is_reported_once_and_forwarding_stays_off(proc, caplog):
    table = FakeTable()
    table.fail = NftablesError("nftables: Could not process rule: Operation not supported", 95)
    mode = make_mode(proc, table)
    run(mode.reconcile([JOIN0], REGISTRAR))
    run(mode.reconcile([JOIN0], REGISTRAR))
    assert forwarding(proc) == "0"
    assert mode.status()["error"] == "nftables: Could not process rule: Operation not supported"
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    table.fail = None
    run(mode.reconcile([JOIN0], REGISTRAR))
    assert mode.status()["error"] is None and forwarding(proc) == "1"


def test_a_forwarding_knob_that_cannot_be_written_is_an_error(proc):
    knob = proc / "net/ipv6/conf/all/forwarding"
    knob.unlink()
    knob.mkdir()  # reading and writing it now fail with EISDIR
    mode = make_mode(proc, FakeTable())
    run(mode.reconcile([JOIN0], REGISTRAR))
    assert "EISDIR" in (mode.status()["error"] or "")
    assert mode.status()["relaying"] is False


def test_drop_counters_add_up_across_table_replacements(proc):
    table = FakeTable()
    mode = make_mode(proc, table)
    run(mode.reconcile([JOIN0], REGISTRAR))
    table.live = {"not-to-registrar": 5, "unsolicited": 1}
    run(mode.reconcile([JOIN0, JOIN1], REGISTRAR))  # a new table: the kernel's count resets
    table.live = {"not-to-registrar": 2}
    assert mode.status()["drops"] == {"no-registrar": 0, "not-to-registrar": 7,
                                      "unsolicited": 1}
    assert set(mode.drops()) == set(COUNTERS)
    assert DropReason.NO_REGISTRAR.value in COUNTERS


def test_refusals_are_logged_once_per_change(proc, caplog):
    caplog.set_level(logging.INFO, logger="test.nat66")
    mode = make_mode(proc, FakeTable())
    for _ in range(3):
        run(mode.reconcile([JOIN0], None))
    assert caplog.text.count("nat66 relays nothing: no registrar is known") == 1
    for _ in range(2):
        run(mode.reconcile([JOIN0], LINK_LOCAL_REGISTRAR))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "link-local" in warnings[0]
    run(mode.reconcile([JOIN0], REGISTRAR))
    run(mode.reconcile([JOIN0], REGISTRAR))
    assert caplog.text.count("nat66 relays pledges on join0:8443 to [fd4a:5044::100]:443") == 1
    assert mode.status()["relaying"] is True


def test_missing_backbone_refuses(proc, caplog):
    mode = make_mode(proc, FakeTable(), backbone=None)
    run(mode.reconcile([JOIN0], REGISTRAR))
    assert not mode.status()["relaying"]
    assert "backbone interface is not known" in caplog.text


def test_link_without_a_prefix_is_warned_about_once_per_episode(proc, caplog):
    mode = make_mode(proc, FakeTable())
    run(mode.reconcile([BARE, JOIN0], REGISTRAR))
    run(mode.reconcile([BARE, JOIN0], REGISTRAR))
    message = "join2 has no ULA or global prefix"
    assert caplog.text.count(message) == 1
    record = next(r for r in caplog.records if message in r.getMessage())
    assert record.levelno == logging.WARNING
    assert "circuit mode" in record.getMessage()
    # The prefix comes, and goes again: a new warning.
    with_prefix = JoinInterface("join2", 7, "fe80::1", ("fd00::1",), ("nat66",), 8443)
    run(mode.reconcile([with_prefix], REGISTRAR))
    run(mode.reconcile([BARE], REGISTRAR))
    assert caplog.text.count(message) == 2


def test_status_is_json_ready(proc):
    mode = make_mode(proc, FakeTable())
    run(mode.reconcile([JOIN0], REGISTRAR))
    status = mode.status()
    json.dumps(status)
    assert status["interfaces"] == [{"interface": "join0", "port": 8443,
                                     "routable": ["fd4a:5044:0:100::1"]}]
    assert status["registrar"] == "[fd4a:5044::100]:443"
    assert status["table"] == "ip6 joinproxyd"
    assert mode.circuits() == []


def test_metrics_have_nat66_drop_series(proc):
    mode = make_mode(proc, FakeTable())
    value = mode.ctx.metrics.registry.get_sample_value(
        "joinproxyd_drops_total", {"mode": "nat66", "reason": "no-registrar"})
    assert value == 0


# -- draining and the flow list ------------------------------------------------------------------

def shutdown_drops(mode: Nat66Mode) -> float | None:
    return mode.ctx.metrics.registry.get_sample_value(
        "joinproxyd_drops_total", {"mode": "nat66", "reason": "shutdown"})


def test_close_stops_relaying_first_then_waits_for_open_flows(proc):
    table, flows = FakeTable(), FakeFlows()
    mode = make_mode(proc, table, flows=flows)
    run(mode.reconcile([JOIN0], REGISTRAR))
    flows.flows = [flow(), flow(tcp_state=7)]  # one open, one in TIME_WAIT

    def finish_on_third_read(fake: FakeFlows) -> None:
        # While draining: the table no longer relays, but still fences pledges in.
        assert '{"dnat":' not in json.dumps(table.applied[-1])
        assert "masquerade" not in json.dumps(table.applied[-1])
        assert rules(table.applied[-1], "forward") == \
            rules(build_ruleset([JOIN0], REGISTRAR, "bb0", draining=True), "forward")
        assert forwarding(proc) == "1"
        if fake.reads >= 3:
            fake.flows = [flow(tcp_state=7)]

    flows.on_read = finish_on_third_read
    run(mode.close(10))
    assert flows.reads == 3
    assert table.objects == [] and forwarding(proc) == "0"
    assert shutdown_drops(mode) == 0


def test_flows_still_open_at_the_deadline_are_cut_and_counted(proc, caplog):
    caplog.set_level(logging.INFO, logger="test.nat66")
    flows = FakeFlows()
    mode = make_mode(proc, FakeTable(), flows=flows)
    run(mode.reconcile([JOIN0], REGISTRAR))
    flows.flows = [flow(), flow(source="fd4a:5044:0:100::101")]
    run(mode.close(0.3))
    assert shutdown_drops(mode) == 2
    assert "2 flow(s) still open after 0.3 s are cut" in caplog.text
    assert forwarding(proc) == "0"


def test_only_flows_to_registrars_this_run_relayed_to_count(proc):
    flows = FakeFlows()
    mode = make_mode(proc, FakeTable(), flows=flows)
    run(mode.reconcile([JOIN0], REGISTRAR))
    flows.flows = [flow(target="fd00::99"), flow(target_port=444), flow(protocol=17),
                   flow(tcp_state=None)]
    run(mode.close(5))
    assert flows.reads == 1 and shutdown_drops(mode) == 0


def test_close_without_relaying_does_not_wait(proc):
    flows = FakeFlows()
    mode = make_mode(proc, FakeTable(), flows=flows)
    run(mode.reconcile([JOIN0], None))
    run(mode.close(5))
    assert flows.reads == 0 and forwarding(proc) == "0"


def test_unreadable_conntrack_still_cleans_up(proc):
    table, flows = FakeTable(), FakeFlows()
    flows.fail = KernelError("cannot read conntrack: EPERM (Operation not permitted)", 1)
    mode = make_mode(proc, table, flows=flows)
    run(mode.reconcile([JOIN0], REGISTRAR))
    run(mode.close(5))
    assert table.objects == [] and forwarding(proc) == "0"
    assert "conntrack" in (mode.status()["error"] or "")


def test_circuits_lists_open_flows_of_this_run(proc):
    flows = FakeFlows()
    mode = make_mode(proc, FakeTable(), flows=flows)
    assert mode.circuits() == []  # never relayed: not even asked
    run(mode.reconcile([JOIN0], REGISTRAR))
    flows.flows = [flow(source="fd4a:5044:0:100::101"), flow(), flow(tcp_state=8),
                   flow(target="fd00::99")]
    assert mode.circuits() == [
        {"interface": "join0", "pledge": "[fd4a:5044:0:100::100]:40000",
         "proxy": "[fd4a:5044:0:100::1]:8443", "registrar": "[fd4a:5044::100]:443"},
        {"interface": "join0", "pledge": "[fd4a:5044:0:100::101]:40000",
         "proxy": "[fd4a:5044:0:100::1]:8443", "registrar": "[fd4a:5044::100]:443"},
    ]
    flows.fail = KernelError("cannot read conntrack: EPERM (Operation not permitted)", 1)
    assert mode.circuits() == []


def nat66_traffic(mode: Nat66Mode) -> tuple[float | None, ...]:
    registry = mode.ctx.metrics.registry
    return (registry.get_sample_value("joinproxyd_circuits_total", {"mode": "nat66"}),
            *(registry.get_sample_value("joinproxyd_relayed_bytes_total",
                                        {"mode": "nat66", "direction": direction})
              for direction in ("upstream", "downstream")))


def test_relayed_flows_and_bytes_are_counted_across_table_replacements(proc):
    table = FakeTable()
    mode = make_mode(proc, table)
    run(mode.reconcile([JOIN0], REGISTRAR))
    assert nat66_traffic(mode) == (0, 0, 0)
    # FakeTable counts 80 bytes per packet.
    table.live = {"flows-join0": 2, "upstream-join0": 5, "downstream-join0": 4,
                  "not-to-registrar": 7}
    run(mode.reconcile([JOIN0], RegistrarEndpoint(100, "fd4a:5044::200", 443)))  # replaced
    assert nat66_traffic(mode) == (2, 400, 320)
    table.live = {"flows-join0": 1, "upstream-join0": 1, "downstream-join0": 1}
    run(mode.close(0))
    assert nat66_traffic(mode) == (3, 480, 400)
    assert mode.traffic == {"join0": {"flows": 3, "upstream_bytes": 480,
                                      "downstream_bytes": 400}}


def test_traffic_counters_are_polled_between_reconciles(proc, monkeypatch):
    monkeypatch.setattr("joinproxyd.relays.nat66.TRAFFIC_POLL_SECONDS", 0.01)
    table = FakeTable()
    mode = make_mode(proc, table)

    async def scenario() -> tuple[float | None, ...]:
        await mode.reconcile([JOIN0], REGISTRAR)
        table.live = {"flows-join0": 1, "upstream-join0": 2, "downstream-join0": 3}
        await asyncio.sleep(0.1)
        seen = nat66_traffic(mode)
        await asyncio.sleep(0.1)  # read again: the same values add nothing
        assert nat66_traffic(mode) == seen
        await mode.close(0)
        return seen

    assert run(scenario()) == (1, 160, 240)
    assert mode.status()["traffic"] == {"join0": {"flows": 1, "upstream_bytes": 160,
                                                  "downstream_bytes": 240}}


def test_traffic_during_the_drain_is_counted_too(proc):
    table, flows = FakeTable(), FakeFlows()
    mode = make_mode(proc, table, flows=flows)
    run(mode.reconcile([JOIN0], REGISTRAR))
    table.live = {"flows-join0": 1, "upstream-join0": 2, "downstream-join0": 2}
    flows.flows = [flow()]

    def flow_ends(fake: FakeFlows) -> None:
        # The draining table (new, counting from zero) carried the rest of the flow.
        table.live = {"upstream-join0": 3, "downstream-join0": 1}
        fake.flows = []

    flows.on_read = flow_ends
    run(mode.close(10))
    assert nat66_traffic(mode) == (1, (2 + 3) * 80, (2 + 1) * 80)
