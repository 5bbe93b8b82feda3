"""DNS-SD over mDNS in namespaces: the proxy's _brski-proxy._tcp as pledges resolve it, the
registrar browser on the backbone, and each zeroconf confined to its own link."""

from collections.abc import Callable
from pathlib import Path

import pytest
from test_discovery_driver import Driver, driver

from joinproxyd.discovery.mdns import PROXY_SERVICE, REGISTRAR_SERVICE, _dns_label
from lab import Lab, Topology

CLEAN = {"event": "stopped", "tasks": [], "threads": []}


def test_instance_labels_are_dns_safe():
    assert _dns_label("border router.example-join0") == "border-router-example-join0"
    assert _dns_label("...") == "joinproxyd"
    assert len(_dns_label("x" * 100)) == 63


@pytest.fixture
def start(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[..., Driver]:
    return driver(request, tmp_path)


def ifindex(host, name: str) -> int:  # type: ignore[no-untyped-def]
    return int(host.run(["cat", f"/sys/class/net/{name}/ifindex"]).stdout)


@pytest.mark.netns
def test_pledge_resolves_the_proxy_and_sees_it_withdrawn(as_root, tmp_path, start):
    with Lab(Topology(pledges=1), log_dir=tmp_path) as lab:
        pledge = start(lab.pledges[0].ns, "mdns-resolve", "--service", PROXY_SERVICE)
        pledge.event("ready")
        proxy = start(lab.proxy.ns, "mdns-advertise", "--target", "join0:8443", "--enabled")
        found = pledge.event("resolved", timeout=15)
        assert found["name"] == f"proxy-join0.{PROXY_SERVICE}"
        assert found["port"] == 8443
        assert found["text"] == "00"  # RFC 6763 §6.1: one empty string, not an empty RDATA
        eth0 = ifindex(lab.pledges[0], "eth0")
        assert found["addresses"] == [f"fe80::1%{eth0}"]
        assert proxy.request("status", "status", interfaces=["join0"])["sent"] == {"join0": 1}

        proxy.send("enable", on=False)  # joining closed: goodbye packets
        pledge.event("removed", timeout=20, name=found["name"])  # goodbye: gone 1 s on
        assert proxy.request("status", "status")["registered"] == []
        assert proxy.close() == CLEAN


@pytest.mark.netns
def test_each_join_link_hears_only_its_own_proxy_address(as_root, tmp_path, start):
    with Lab(Topology(pledges=2, join_links=2), log_dir=tmp_path) as lab:
        lab.proxy.run(["ip", "addr", "add", "fe80::2/64", "dev", "join1", "nodad"])
        pledges = [start(p.ns, "mdns-resolve", "--service", PROXY_SERVICE)
                   for p in lab.pledges]
        for p in pledges:
            p.event("ready")
        proxy = start(lab.proxy.ns, "mdns-advertise", "--target", "join0:8443",
                      "--target", "join1:8444:fe80::2", "--enabled")
        on0 = pledges[0].event("resolved", timeout=15)
        on1 = pledges[1].event("resolved", timeout=15)
        assert (on0["name"], on0["port"]) == (f"proxy-join0.{PROXY_SERVICE}", 8443)
        assert (on1["name"], on1["port"]) == (f"proxy-join1.{PROXY_SERVICE}", 8444)
        assert on1["addresses"][0].startswith("fe80::2%")
        # Neither link ever hears the other link's advertisement.
        for p in pledges:
            p.quiet_for(1.0, "resolved")
        assert len([e for e in pledges[0].events if e["event"] == "resolved"]) == 1
        assert len([e for e in pledges[1].events if e["event"] == "resolved"]) == 1
        assert proxy.close() == CLEAN


@pytest.mark.netns
def test_browser_finds_a_registrar_on_the_backbone_and_its_removal(as_root, tmp_path, start):
    with Lab(Topology(pledges=0, registrars=1), log_dir=tmp_path) as lab:
        browser = start(lab.proxy.ns, "mdns-browse", "--interface", "bb0")
        browser.event("ready")
        registrar = start(lab.registrars[0].ns, "mdns-register", "--service",
                          REGISTRAR_SERVICE, "--name", "registrar0", "--port", "8443",
                          "--address", "fd4a:5044::100", "--address", "fe80::b:2")
        registrar.event("registered", timeout=15)
        ula = browser.event("registrar", timeout=15, key="[fd4a:5044::100]:8443")
        ll = browser.event("registrar", timeout=15, key="[fe80::b:2]:8443")
        assert (ula["source"], ula["scope_id"], ula["ttl"]) == ("mdns", 0, None)
        assert ll["scope_id"] == ifindex(lab.proxy, "bb0")
        status = browser.request("status", "status")
        assert status["found"] == {f"registrar0.{REGISTRAR_SERVICE}": [
            "[fd4a:5044::100]:8443", "[fe80::b:2]:8443"]}
        assert status["accepted"] >= 1

        registrar.request("unregister", "unregistered")
        gone = {browser.event("gone", timeout=10, key=k)["key"]
                for k in ("[fd4a:5044::100]:8443", "[fe80::b:2]:8443")}
        assert len(gone) == 2
        assert browser.request("status", "status")["found"] == {}
        assert browser.close() == CLEAN


@pytest.mark.netns
def test_a_registrar_announced_on_a_join_link_is_not_believed(as_root, tmp_path, start):
    with Lab(Topology(pledges=1, registrars=1), log_dir=tmp_path) as lab:
        # The proxy also runs mDNS on join0 (its own advertisement), so the host has joined
        # ff02::fb there and mDNS from the join link reaches it.
        start(lab.proxy.ns, "mdns-advertise", "--target", "join0:8443", "--enabled")
        browser = start(lab.proxy.ns, "mdns-browse", "--interface", "bb0")
        browser.event("ready")
        # A ULA is not tied to the link it was heard on: only confinement keeps it out.
        rogue = start(lab.pledges[0].ns, "mdns-register", "--service", REGISTRAR_SERVICE,
                      "--name", "rogue", "--port", "8443", "--address", "fe80::1:1",
                      "--address", "fd4a:5044::666")
        rogue.event("registered", timeout=15)
        real = start(lab.registrars[0].ns, "mdns-register", "--service", REGISTRAR_SERVICE,
                     "--name", "registrar0", "--port", "8443", "--address", "fd4a:5044::100")
        real.event("registered", timeout=15)
        browser.event("registrar", timeout=15, key="[fd4a:5044::100]:8443")
        browser.quiet_for(2.0, "registrar")
        keys = {e["key"] for e in browser.events if e["event"] == "registrar"}
        assert keys == {"[fd4a:5044::100]:8443"}
