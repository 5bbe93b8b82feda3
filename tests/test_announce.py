"""The AN_Proxy announcer: its pure parts, then the real floods as pledges on join links hear
them (decoded with brski.grasp), on/off, new targets, and send errors."""

import asyncio
import errno
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
from test_discovery_driver import Driver, driver

from brski import grasp
from joinproxyd.discovery.announce import (
    JITTER,
    ProxyAnnouncer,
    flood_ttl_ms,
    send_drop_reason,
)
from joinproxyd.metrics import Metrics
from joinproxyd.model import DropReason, JoinInterface
from lab import Lab, Topology, wait_for

JOIN0 = JoinInterface("join0", 7, "fe80::1", (), ("circuit",), 8443)


# -- pure -----------------------------------------------------------------------------------------
def test_ttl_is_rfc8995s_unless_the_interval_is_long():
    assert flood_ttl_ms(30) == grasp.DEFAULT_TTL_MS == 180_000
    assert flood_ttl_ms(60) == 180_000
    assert flood_ttl_ms(600) == 1_800_000  # three intervals: one lost flood is harmless


def test_send_errors_map_to_drop_reasons():
    assert send_drop_reason(errno.ENOBUFS) is DropReason.RATE_LIMIT
    assert send_drop_reason(errno.EAGAIN) is DropReason.RATE_LIMIT
    assert send_drop_reason(errno.ENETDOWN) is DropReason.SEND_ERROR
    assert send_drop_reason(errno.ENODEV) is DropReason.SEND_ERROR
    assert send_drop_reason(None) is DropReason.SEND_ERROR


def test_jitter_stays_within_ten_percent():
    for raw in (b"\x00\x00", b"\x80\x00", b"\xff\xff"):
        a = ProxyAnnouncer(interval=30, metrics=Metrics(), log=logging.getLogger("t"),
                           rng=lambda n, raw=raw: raw[:n] if n == 2 else b"\x00" * n)
        assert 30 * (1 - JITTER) <= a._jittered() <= 30 * (1 + JITTER)


def test_configuring_before_the_loop_runs_is_kept():
    a = ProxyAnnouncer(interval=30, metrics=Metrics(), log=logging.getLogger("t"))
    a.set_targets([JOIN0])
    a.set_enabled(True)
    a.interval = 10  # the daemon's reload assigns the attribute
    assert a.status() == {"enabled": True, "interval": 10, "interfaces": ["join0"]}

    async def main() -> None:
        await a.stop()  # stop without ever having run is fine

    asyncio.run(main())


# -- real namespaces ------------------------------------------------------------------------------
@pytest.fixture
def start(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[..., Driver]:
    return driver(request, tmp_path)


def sent(announcer: Driver, *names: str) -> dict:
    return announcer.request("metrics", "metrics", interfaces=list(names))


@pytest.mark.netns
def test_pledge_hears_and_decodes_the_proxy_flood(as_root, tmp_path, start):
    with Lab(Topology(pledges=1), log_dir=tmp_path) as lab:
        pledge = start(lab.pledges[0].ns, "recv-flood", "--interface", "eth0")
        pledge.event("ready")
        announcer = start(lab.proxy.ns, "announce", "--target", "join0:8443",
                          "--interval", "1", "--enabled")
        flood = pledge.event("flood", timeout=5)
        assert flood["objectives"] == [["AN_Proxy", 4, 1, ""]]
        assert flood["locators"] == [["fe80::1", 6, 8443]]
        assert flood["initiator"] == "fe80::1"
        assert flood["ttl_ms"] == 180_000
        assert flood["sender"] == "fe80::1"  # sent from the link-local it names
        assert flood["hop_limit"] == 1
        # ...and again every interval (1 s, ±10 %).
        pledge.event("flood", timeout=3, since=pledge.events.index(flood) + 1)
        counts = sent(announcer, "join0")
        assert counts["sent"]["join0"] >= 2 and sum(counts["drops"].values()) == 0
        assert announcer.close() == {"event": "stopped", "tasks": [], "threads": []}


@pytest.mark.netns
def test_disabled_sends_nothing_and_enabling_floods_at_once(as_root, tmp_path, start):
    with Lab(Topology(pledges=1), log_dir=tmp_path) as lab:
        pledge = start(lab.pledges[0].ns, "recv-flood", "--interface", "eth0")
        pledge.event("ready")
        announcer = start(lab.proxy.ns, "announce", "--target", "join0:8443",
                          "--interval", "0.5")
        announcer.event("ready")
        assert pledge.quiet_for(2.0, "flood") == []
        state = sent(announcer, "join0")
        assert state["sent"]["join0"] == 0 and not state["socket_open"]

        announcer.send("enable", on=True)
        mark = len(pledge.events)
        pledge.event("flood", timeout=0.5, since=mark)  # at once, not after an interval

        announcer.send("enable", on=False)
        pledge.quiet_for(0.3, "flood")  # one may already be on its way
        assert pledge.quiet_for(2.0, "flood") == []
        assert not sent(announcer, "join0")["socket_open"]  # no socket while silent


@pytest.mark.netns
def test_each_join_link_gets_its_own_locator_and_new_links_are_flooded_at_once(
        as_root, tmp_path, start):
    with Lab(Topology(pledges=2, join_links=2), log_dir=tmp_path) as lab:
        # A second link-local address on join1, so the two links' floods differ.
        lab.proxy.run(["ip", "addr", "add", "fe80::2/64", "dev", "join1", "nodad"])
        hear = [start(p.ns, "recv-flood", "--interface", "eth0") for p in lab.pledges]
        for h in hear:
            h.event("ready")
        announcer = start(lab.proxy.ns, "announce", "--target", "join0:8443",
                          "--interval", "30", "--enabled")
        assert hear[0].event("flood", timeout=5)["locators"] == [["fe80::1", 6, 8443]]
        announcer.send("targets", targets=["join0:8443", "join1:8444:fe80::2"])
        flood1 = hear[1].event("flood", timeout=2)
        assert flood1["locators"] == [["fe80::2", 6, 8444]]
        assert flood1["sender"] == "fe80::2"
        # join0 was already announced and unchanged: not flooded again before its interval.
        assert len([e for e in hear[0].events if e["event"] == "flood"]) == 1
        assert len([e for e in hear[1].events if e["event"] == "flood"]) == 1
        counts = sent(announcer, "join0", "join1")["sent"]
        assert counts == {"join0": 1, "join1": 1}


@pytest.mark.netns
def test_a_send_error_is_counted_and_announcing_resumes(as_root, tmp_path, start):
    with Lab(Topology(pledges=1), log_dir=tmp_path) as lab:
        pledge = start(lab.pledges[0].ns, "recv-flood", "--interface", "eth0")
        pledge.event("ready")
        announcer = start(lab.proxy.ns, "announce", "--target", "join0:8443",
                          "--interval", "0.3", "--enabled")
        pledge.event("flood", timeout=5)
        lab.proxy.run(["ip", "link", "set", "join0", "down"])
        try:
            wait_for(lambda: sent(announcer, "join0")["drops"]["send-error"] >= 1, 5,
                     "a failed send to be counted", interval=0.2)
        finally:
            lab.proxy.run(["ip", "link", "set", "join0", "up"])
            # Going down flushed the link's IPv6 addresses; put the link-local back.
            lab.proxy.run(["ip", "addr", "replace", "fe80::1/64", "dev", "join0", "nodad"])
        mark = len(pledge.events)
        pledge.event("flood", timeout=5, since=mark)
        log = announcer.log()
        assert "AN_Proxy flood on join0 not sent" in log and "Traceback" not in log
