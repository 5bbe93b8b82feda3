"""Registrar selection and health: the sans-IO table with a fake clock, the asyncio set with a
fake probe, and real failover/failback between two registrar namespaces."""

import asyncio
import logging
from collections.abc import Callable, Coroutine
from pathlib import Path

import pytest
from test_discovery_driver import Driver, driver

from joinproxyd.discovery.registrars import RegistrarSet, tcp_probe
from joinproxyd.discovery.registry import DISCOVERED_PREFERENCE, RegistrarTable, endpoint_key
from joinproxyd.metrics import Metrics
from joinproxyd.model import RegistrarEndpoint
from lab import Lab, Topology

A = RegistrarEndpoint(10, "fd4a:5044::100", 8443)
B = RegistrarEndpoint(20, "fd4a:5044::101", 8443)
G = RegistrarEndpoint(DISCOVERED_PREFERENCE, "fd4a:5044::102", 8443, source="grasp")
M = RegistrarEndpoint(DISCOVERED_PREFERENCE, "fe80::b:3", 443, source="mdns", scope_id=7)


def healthy(table: RegistrarTable, *endpoints: RegistrarEndpoint, ok: bool = True) -> None:
    for e in endpoints:
        state = table.get(e)
        assert state is not None
        table.probed(state, None if ok else "refused", 0.0, 2.0)


def active(table: RegistrarTable) -> str | None:
    state = table.select()
    return state.endpoint.key if state else None


# -- the table ---------------------------------------------------------------------------------
def test_lower_preference_wins_among_healthy():
    table = RegistrarTable()
    table.set_static([B, A])
    assert active(table) is None  # nobody probed yet: nobody is eligible
    healthy(table, A, B)
    assert active(table) == A.key
    healthy(table, A, ok=False)
    assert active(table) == B.key
    healthy(table, B, ok=False)
    assert active(table) is None
    healthy(table, A)
    assert active(table) == A.key


def test_discovered_registrars_rank_after_static_ones():
    table = RegistrarTable()
    table.set_static([RegistrarEndpoint(65535, "fd4a:5044::100", 8443)])
    table.offer(G, 180, now=0.0)
    healthy(table, A, G)
    assert active(table) == A.key
    assert table.get(G).endpoint.preference == DISCOVERED_PREFERENCE


def test_discovered_preference_can_rank_them_first():
    table = RegistrarTable(discovered_preference=5)
    table.set_static([A])
    table.offer(G, 180, now=0.0)
    healthy(table, A, G)
    assert active(table) == G.key


def test_ties_go_to_static_then_to_the_one_learned_first():
    table = RegistrarTable(discovered_preference=10)
    table.offer(G, 180, now=0.0)
    table.offer(M, None, now=0.0)
    table.set_static([RegistrarEndpoint(10, "fd4a:5044::200", 443)])
    healthy(table, G, M)
    assert active(table) == G.key  # learned before M
    static = RegistrarEndpoint(10, "fd4a:5044::200", 443)
    healthy(table, static)
    assert active(table) == static.key  # same preference, but configured
    assert [s.endpoint.key for s in table.states()] == [static.key, G.key, M.key]


def test_ttl_expiry_and_refresh_with_a_fake_clock():
    table = RegistrarTable()
    table.offer(G, 180, now=0.0)
    assert table.expire(179.9) == []
    assert table.next_deadline() == 0.0  # the first probe is due at once
    table.offer(G, 180, now=100.0)  # the next flood refreshes it
    assert table.expire(200.0) == []
    assert table.get(G).expiry() == 280.0
    gone = table.expire(280.0)
    assert [s.endpoint.key for s in gone] == [G.key]
    assert table.get(G) is None


def test_untimed_offers_stay_until_withdrawn():
    table = RegistrarTable()
    table.offer(M, None, now=0.0)
    assert table.expire(1e9) == []
    assert table.withdraw(M) is not None
    assert table.states() == []


def test_zero_ttl_withdraws():
    table = RegistrarTable()
    table.offer(G, 180, now=0.0)
    state, new = table.offer(G, 0, now=1.0)
    assert state is None and not new
    assert table.get(G) is None


def test_one_registrar_learned_several_ways_is_one_entry():
    table = RegistrarTable()
    table.set_static([A])
    as_grasp = RegistrarEndpoint(DISCOVERED_PREFERENCE, "FD4A:5044:0::100", 8443,
                                 source="grasp")
    table.offer(as_grasp, 180, now=0.0)
    assert len(table.states()) == 1
    state = table.get(A)
    assert state.sources == ("static", "grasp")
    assert state.endpoint.preference == 10 and state.endpoint.source == "static"
    assert state.expiry() is None  # configured: never expires
    table.set_static([])  # dropped from the configuration: grasp still vouches for it
    assert state.endpoint.source == "grasp"
    assert state.endpoint.preference == DISCOVERED_PREFERENCE
    assert table.expire(180.0) == [state]


def test_link_local_registrars_differ_by_scope():
    one = RegistrarEndpoint(1, "fe80::b:2", 443, source="grasp", scope_id=3)
    two = RegistrarEndpoint(1, "fe80::b:2", 443, source="grasp", scope_id=4)
    assert endpoint_key(one) != endpoint_key(two)
    # A scope on a global address means nothing and is ignored.
    assert endpoint_key(RegistrarEndpoint(1, "fd00::1", 1, scope_id=9)) == ("fd00::1", 1, 0)


def test_due_and_reschedule():
    table = RegistrarTable()
    table.set_static([A, B])
    assert len(table.due(0.0)) == 2
    for state in table.states():
        table.probed(state, None, 0.0, 60.0)
    assert table.due(59.0) == []
    assert table.next_deadline() == 60.0
    table.reschedule(10.0, 5.0)  # a shorter interval applies from now
    assert table.next_deadline() == 15.0


# -- the asyncio set, with a fake probe ----------------------------------------------------------
class FakeRegistrars:
    def __init__(self) -> None:
        self.up: set[str] = set()
        self.probes = 0

    async def probe(self, endpoint: RegistrarEndpoint, timeout: float) -> str | None:
        self.probes += 1
        return None if endpoint.address in self.up else "Connection refused"


def run(coro: Coroutine[None, None, None]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(30):  # in this task: no helper task to see in all_tasks()
            await coro

    asyncio.run(bounded())


async def until(predicate: Callable[[], bool], timeout: float = 5) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def test_set_fails_over_fails_back_and_reports_only_changes():
    async def main() -> None:
        fake = FakeRegistrars()
        changes: list[str | None] = []
        metrics = Metrics()
        rset = RegistrarSet(static=[A, B], health_interval=0.05, health_timeout=0.05,
                            metrics=metrics, log=logging.getLogger("test"),
                            on_change=lambda e: changes.append(e.key if e else None),
                            probe=fake.probe)
        fake.up = {A.address, B.address}
        await rset.start()
        await until(lambda: changes == [A.key])
        fake.up = {B.address}
        await until(lambda: changes == [A.key, B.key])
        fake.up = set()
        await until(lambda: changes == [A.key, B.key, None])
        assert rset.active is None
        fake.up = {A.address, B.address}
        await until(lambda: changes == [A.key, B.key, None, A.key])
        probes = fake.probes
        await until(lambda: fake.probes > probes + 6)
        assert changes == [A.key, B.key, None, A.key]  # steady: no more callbacks
        sample = metrics.registry.get_sample_value
        assert sample("joinproxyd_registrar_up", {"registrar": B.key, "source": "static"}) == 1
        assert sample("joinproxyd_registrar_active", {"registrar": A.key}) == 1
        assert sample("joinproxyd_registrar_active", {"registrar": B.key}) == 0
        status = {s["address"]: s for s in rset.status()}
        assert status[A.address]["active"] and not status[B.address]["active"]
        assert status[A.address]["healthy"] is True
        assert status[A.address]["last_probe"] is not None
        await rset.stop()
        assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []

    run(main())


def test_withdrawing_the_active_registrar_switches_at_once():
    async def main() -> None:
        fake = FakeRegistrars()
        fake.up = {G.address, "fe80::b:3"}
        changes: list[str | None] = []
        metrics = Metrics()
        rset = RegistrarSet(static=[], health_interval=0.05, health_timeout=0.05,
                            metrics=metrics, log=logging.getLogger("test"),
                            on_change=lambda e: changes.append(e.key if e else None),
                            probe=fake.probe)
        await rset.start()
        rset.offer(G, 180)
        rset.offer(M, None)
        await until(lambda: changes == [G.key])
        rset.withdraw(G)
        assert changes == [G.key, M.key]  # no need to wait for a probe
        assert rset.active is not None and rset.active.scope_id == 7
        rset.offer(M, 0)  # ttl 0: gone
        assert changes[-1] is None
        assert metrics.registry.get_sample_value(
            "joinproxyd_registrar_up", {"registrar": G.key, "source": "grasp"}) is None
        await rset.stop()

    run(main())


def test_a_failing_change_handler_does_not_stop_health_checks():
    async def main() -> None:
        fake = FakeRegistrars()
        fake.up = {A.address}
        calls: list[object] = []

        def handler(e: object) -> None:
            calls.append(e)
            raise RuntimeError("bug in the control plane")

        rset = RegistrarSet(static=[A], health_interval=0.05, health_timeout=0.05,
                            metrics=Metrics(), log=logging.getLogger("test"),
                            on_change=handler, probe=fake.probe)
        await rset.start()
        await until(lambda: len(calls) == 1)
        fake.up = set()
        await until(lambda: len(calls) == 2)
        await rset.stop()

    run(main())


def test_reconfigure_adds_and_removes_static_registrars():
    async def main() -> None:
        fake = FakeRegistrars()
        fake.up = {A.address, B.address}
        changes: list[str | None] = []
        rset = RegistrarSet(static=[B], health_interval=10, health_timeout=0.05,
                            metrics=Metrics(), log=logging.getLogger("test"),
                            on_change=lambda e: changes.append(e.key if e else None),
                            probe=fake.probe)
        await rset.start()
        await until(lambda: changes == [B.key])
        # A new, more preferred registrar is probed at once, not after the 10 s interval.
        rset.reconfigure([A, B], 10, 0.05)
        await until(lambda: changes == [B.key, A.key])
        rset.reconfigure([B], 10, 0.05)
        assert changes == [B.key, A.key, B.key]
        assert [s["address"] for s in rset.status()] == [B.address]
        await rset.stop()

    run(main())


def test_stop_right_after_a_change_does_not_hang():
    # Regression: with asyncio.wait_for (3.11), a cancel that met a just-set wake-up event was
    # swallowed and stop() waited a whole health interval (here it would be an hour).
    async def main() -> None:
        fake = FakeRegistrars()
        rset = RegistrarSet(static=[A], health_interval=3600, health_timeout=0.05,
                            metrics=Metrics(), log=logging.getLogger("test"),
                            on_change=lambda e: None, probe=fake.probe)
        loop = asyncio.get_running_loop()
        for _ in range(20):
            await rset.start()
            await asyncio.sleep(0.01)
            rset.offer(G, 60)  # sets the wake-up event...
            began = loop.time()
            await rset.stop()  # ...and the cancel arrives with it
            assert loop.time() - began < 1.0

    run(main())


def test_tcp_probe_on_loopback():
    async def main() -> None:
        server = await asyncio.start_server(lambda r, w: w.close(), "::1", 0)
        port = server.sockets[0].getsockname()[1]
        assert await tcp_probe(RegistrarEndpoint(1, "::1", port), 1.0) is None
        server.close()
        await server.wait_closed()
        error = await tcp_probe(RegistrarEndpoint(1, "::1", port), 1.0)
        assert error is not None and "refused" in error.lower()

    run(main())


# -- real namespaces -----------------------------------------------------------------------------
@pytest.fixture
def start(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[..., Driver]:
    return driver(request, tmp_path)


@pytest.mark.netns
def test_failover_and_failback_between_two_registrar_hosts(as_root, tmp_path, start):
    with Lab(Topology(pledges=0, registrars=2), log_dir=tmp_path) as lab:
        first = lab.registrars[0].address("eth0", link_local=False)
        second = lab.registrars[1].address("eth0", link_local=False)
        listeners = [start(r.ns, "tcp-listen", "--port", "8443") for r in lab.registrars]
        for listener in listeners:
            listener.event("ready")
        health = start(lab.proxy.ns, "health", "--static", f"[{first}]:8443/10",
                       "--static", f"[{second}]:8443/20", "--interval", "1",
                       "--timeout", "0.5")
        health.event("active", registrar=f"[{first}]:8443")

        listeners[0].close()  # the preferred registrar dies
        mark = len(health.events)
        health.event("active", timeout=10, since=mark, registrar=f"[{second}]:8443")

        listeners[0] = start(lab.registrars[0].ns, "tcp-listen", "--port", "8443")
        mark = len(health.events)
        health.event("active", timeout=10, since=mark, registrar=f"[{first}]:8443")

        for listener in listeners:
            listener.close()
        mark = len(health.events)
        health.event("active", timeout=10, since=mark, registrar=None)
        status = health.request("status", "status")
        assert status["active"] is None
        assert {(s["address"], s["healthy"]) for s in status["registrars"]} == {
            (first, False), (second, False)}
        assert all("refused" in s["last_error"].lower() for s in status["registrars"])
        assert health.close() == {"event": "stopped", "tasks": [], "threads": []}


@pytest.mark.netns
def test_link_local_registrar_is_probed_through_its_scope(as_root, tmp_path, start):
    with Lab(Topology(pledges=0, registrars=1), log_dir=tmp_path) as lab:
        listener = start(lab.registrars[0].ns, "tcp-listen", "--port", "8443")
        listener.event("ready")
        health = start(lab.proxy.ns, "health", "--interval", "0.5")
        health.event("ready")
        # What GRASP or mDNS would offer: the registrar's link-local address on bb0.
        health.send("offer", endpoint="[fe80::b:2%bb0]:8443", source="grasp", ttl=60)
        health.event("active", registrar="[fe80::b:2]:8443")
        status = health.request("status", "status")
        (entry,) = status["registrars"]
        assert entry["scope_id"] > 0 and entry["source"] == "grasp"
        assert 0 < entry["expires_in"] <= 60
