"""Registrar discovery by GRASP: what a datagram yields (pure), and the listener in namespaces
hearing a registrar's flood, counting junk, and ignoring floods from join links."""

import contextlib
import logging
import os
import random
from collections.abc import Callable
from ipaddress import IPv6Address
from pathlib import Path

import cbor2
import pytest
from test_discovery_driver import Driver, driver

from brski import grasp
from joinproxyd.discovery.grasp import GraspRegistrarListener, Refused, registrars_in_flood
from joinproxyd.discovery.peerlog import PeerWarnings
from joinproxyd.metrics import Metrics
from joinproxyd.model import DropReason
from lab import Lab, Topology, wait_for

ULA = IPv6Address("fd4a:5044::100")
LL = IPv6Address("fe80::b:2")


def flood(*locators: grasp.IPv6Locator, ttl_ms: int = 180_000, **kw: object) -> bytes:
    return grasp.registrar_flood(lambda n: b"\x01" * n, ULA, list(locators), ttl_ms=ttl_ms,
                                 **kw).encode()


def tcp(address: IPv6Address, port: int | None = 8443, protocol: int = 6) -> grasp.IPv6Locator:
    return grasp.IPv6Locator(address, protocol, port)


def refused(data: bytes) -> DropReason:
    with pytest.raises(Refused) as info:
        registrars_in_flood(data, ifindex=5)
    return info.value.reason


# -- pure ---------------------------------------------------------------------------------------
def test_rfc8995_example_flood_yields_its_tcp_locator():
    endpoints, ttl = registrars_in_flood(flood(tcp(ULA)), ifindex=5)
    assert ttl == 180.0
    (e,) = endpoints
    assert (e.address, e.port, e.source, e.scope_id) == ("fd4a:5044::100", 8443, "grasp", 0)


def test_link_local_locators_get_the_backbone_scope():
    endpoints, _ = registrars_in_flood(flood(tcp(LL), tcp(ULA, 443)), ifindex=5)
    assert [(e.address, e.port, e.scope_id) for e in endpoints] == [
        ("fe80::b:2", 8443, 5), ("fd4a:5044::100", 443, 0)]


def test_only_usable_tcp_locators_count():
    # UDP (a constrained registrar), IPIP with a nil port, loopback, unspecified, multicast
    # and IPv4-mapped locators: none is somewhere to relay pledges' TCP to.
    useless = [tcp(ULA, 5684, 17), tcp(ULA, None, 41), tcp(ULA, None), tcp(ULA, 0),
               tcp(IPv6Address("::1")), tcp(IPv6Address("::")), tcp(IPv6Address("ff02::1")),
               tcp(IPv6Address("::ffff:10.0.0.1"))]
    assert refused(flood(*useless)) is DropReason.IRRELEVANT
    endpoints, _ = registrars_in_flood(flood(*useless, tcp(ULA)), ifindex=5)
    assert [e.address for e in endpoints] == ["fd4a:5044::100"]


def test_the_brski_discovery_spelling_is_accepted():
    data = bytes.fromhex(flood(tcp(ULA)).hex().replace(
        b"AN_join_registrar".hex(), b"AN_Join_Registrar".hex()))
    assert registrars_in_flood(data, ifindex=5)[0]


def test_other_objectives_and_messages_are_not_for_us():
    proxy = grasp.proxy_flood(os.urandom, IPv6Address("fe80::1"), 8443).encode()
    assert refused(proxy) is DropReason.IRRELEVANT
    # An M_DISCOVERY for the same objective: we only listen to floods.
    m_discovery = cbor2.dumps([1, 1234, LL.packed, ["AN_join_registrar", 4, 255, ""]])
    assert refused(m_discovery) is DropReason.MALFORMED


def test_oversized_and_junk_are_refused_by_reason():
    assert refused(b"\x00" * (grasp.GRASP_MAX_SIZE + 1)) is DropReason.OVERSIZED
    assert refused(b"") is DropReason.MALFORMED
    assert refused(b"\xff\xff") is DropReason.MALFORMED
    assert refused(flood(tcp(ULA))[:-3]) is DropReason.MALFORMED
    assert refused(flood(tcp(ULA)) + b"\x00") is DropReason.MALFORMED


def test_ttl_zero_is_passed_on_for_the_registrar_set_to_withdraw():
    assert registrars_in_flood(flood(tcp(ULA), ttl_ms=0), ifindex=5)[1] == 0.0


def test_random_and_mutated_bytes_only_ever_raise_refused():
    rnd = random.Random(8995)
    good = flood(tcp(ULA), tcp(LL))
    for _ in range(3000):
        if rnd.random() < 0.5:
            data = bytes(rnd.getrandbits(8) for _ in range(rnd.randrange(0, 80)))
        else:
            data = bytearray(good)
            for _ in range(rnd.randrange(1, 4)):
                data[rnd.randrange(len(data))] = rnd.getrandbits(8)
            data = bytes(data[: rnd.randrange(1, len(data) + 1)])
        with contextlib.suppress(Refused):  # anything else fails the test
            registrars_in_flood(data, ifindex=5)


# -- real namespaces ------------------------------------------------------------------------------
@pytest.fixture
def start(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[..., Driver]:
    return driver(request, tmp_path)


def metrics_of(listener: Driver) -> dict:
    return listener.request("metrics", "metrics")


@pytest.mark.netns
def test_listener_hears_a_registrar_flood_on_the_backbone(as_root, tmp_path, start):
    with Lab(Topology(pledges=0, registrars=1), log_dir=tmp_path) as lab:
        listener = start(lab.proxy.ns, "grasp-listen", "--interface", "bb0")
        listener.event("ready")
        bb0 = int(lab.proxy.run(["cat", "/sys/class/net/bb0/ifindex"]).stdout)
        sender = start(lab.registrars[0].ns, "send-flood", "--registrar",
                       "[fd4a:5044::100]:8443", "--registrar", "[fe80::b:2]:443",
                       "--ttl-ms", "60000")
        sender.event("sent")
        ula = listener.event("registrar", key="[fd4a:5044::100]:8443")
        assert (ula["source"], ula["scope_id"], ula["ttl"]) == ("grasp", 0, 60.0)
        ll = listener.event("registrar", key="[fe80::b:2]:443")
        assert ll["scope_id"] == bb0
        assert metrics_of(listener)["accepted"] == 2
        assert listener.close() == {"event": "stopped", "tasks": [], "threads": []}


@pytest.mark.netns
def test_malformed_and_oversized_floods_are_counted_and_ignored(as_root, tmp_path, start):
    with Lab(Topology(pledges=0, registrars=1), log_dir=tmp_path) as lab:
        listener = start(lab.proxy.ns, "grasp-listen", "--interface", "bb0")
        listener.event("ready")
        registrar = lab.registrars[0].ns
        start(registrar, "send-flood", "--raw", "ffff00").event("sent")
        start(registrar, "send-flood", "--junk", "3000").event("sent", size=3000)
        wait_for(lambda: metrics_of(listener)["drops"]["oversized"] == 1, 10,
                 "the oversized flood to be counted", interval=0.2)
        m = metrics_of(listener)
        assert m["drops"]["malformed"] == 1 and m["accepted"] == 0
        assert not [e for e in listener.events if e["event"] == "registrar"]
        # ...and the listener is still listening.
        start(registrar, "send-flood", "--registrar", "[fd4a:5044::100]:8443").event("sent")
        listener.event("registrar", key="[fd4a:5044::100]:8443")
        assert "Traceback" not in listener.log()
        assert "dropped (malformed)" in listener.log()


@pytest.mark.netns
def test_floods_from_a_join_link_are_not_heard(as_root, tmp_path, start):
    with Lab(Topology(pledges=1, registrars=1), log_dir=tmp_path) as lab:
        # Another socket on the router joins ff02::13 on join0, so floods from the join link
        # do reach the proxy host; the backbone listener must still not take them.
        listener = start(lab.proxy.ns, "grasp-listen", "--interface", "bb0",
                         "--also-join", "join0")
        listener.event("ready")
        start(lab.pledges[0].ns, "send-flood", "--registrar", "[fe80::1:1]:8443").event("sent")
        listener.event("other-socket", interface="join0")
        listener.quiet_for(1.0, "registrar")
        assert not [e for e in listener.events if e["event"] == "registrar"]
        m = metrics_of(listener)
        assert m["accepted"] == 0 and sum(m["drops"].values()) == 0
        # The same flood from the backbone is heard (and the two sockets share port 7017).
        start(lab.registrars[0].ns, "send-flood", "--registrar",
              "[fd4a:5044::100]:8443").event("sent")
        listener.event("registrar", key="[fd4a:5044::100]:8443")


# -- the listener's handling, without a socket -----------------------------------------------------
def make_listener(handler: Callable[..., None]) -> tuple[GraspRegistrarListener, Metrics]:
    metrics = Metrics()
    listener = GraspRegistrarListener(interface="bb0", ifindex=5, on_registrar=handler,
                                      metrics=metrics, log=logging.getLogger("test"))
    return listener, metrics


def test_received_datagrams_are_counted_by_outcome(caplog):
    got: list[tuple[str, float]] = []
    listener, metrics = make_listener(lambda e, ttl: got.append((e.key, ttl)))
    listener.received(flood(tcp(ULA)), "fe80::b:2")
    for _ in range(5):
        listener.received(b"\xff", "fe80::b:9")
    listener.received(b"\x00" * 4096, "fe80::b:9")
    sample = metrics.registry.get_sample_value
    assert got == [("[fd4a:5044::100]:8443", 180.0)]
    assert sample("joinproxyd_discovery_messages_total", {"method": "grasp"}) == 1
    assert sample("joinproxyd_drops_total", {"mode": "discovery", "reason": "malformed"}) == 5
    assert sample("joinproxyd_drops_total", {"mode": "discovery", "reason": "oversized"}) == 1
    # One warning per reason, however many datagrams: the counters carry the volume.
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2


def test_a_failing_registrar_handler_is_logged_not_raised(caplog):
    def broken(endpoint: object, ttl: float) -> None:
        raise RuntimeError("bug")

    listener, _ = make_listener(broken)
    listener.received(flood(tcp(ULA)), "fe80::b:2")  # must not raise
    assert any("registrar handler failed" in r.message for r in caplog.records)


def test_peer_warnings_are_rate_limited_per_reason(caplog):
    now = [0.0]
    warnings = PeerWarnings(logging.getLogger("test"), period=60, clock=lambda: now[0])
    with caplog.at_level(logging.DEBUG):
        for _ in range(3):
            warnings.warn("malformed", "junk from %s", "a")
        warnings.warn("oversized", "big from %s", "b")
        now[0] = 61.0
        warnings.warn("malformed", "junk from %s", "c")
    shown = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert shown == ["junk from a", "big from b",
                     "junk from c (2 more like it since the last warning)"]
