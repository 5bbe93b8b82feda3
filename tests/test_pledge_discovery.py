"""pledge-sim discovery on a real link: GRASP floods and mDNS services, each method alone.

A stand-in announcer runs in the registrar's namespace (brski.grasp builds the flood; zeroconf
registers the service), so these tests need no registrar and show which method found what.
"""

from __future__ import annotations

import json
import sys

import pytest

from lab import Host, Lab, LabProcess, Topology, wait_for

pytestmark = pytest.mark.netns
PY = sys.executable

GRASP_ANNOUNCER = """
import ipaddress, os, socket, sys, time
from brski import grasp
address, port = ipaddress.IPv6Address(sys.argv[1]), int(sys.argv[2])
sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, socket.if_nametoindex("eth0"))
print("announcing", flush=True)
while True:
    # Junk first: the listener must drop it and still take the good flood after it.
    sock.sendto(b"\\xff\\x00junk", ("ff02::13%eth0", grasp.GRASP_PORT))
    flood = grasp.proxy_flood(os.urandom, address, port)
    sock.sendto(flood.encode(), ("ff02::13%eth0", grasp.GRASP_PORT))
    time.sleep(0.3)
"""

MDNS_ANNOUNCER = """
import asyncio, socket, sys
from zeroconf import IPVersion, ServiceInfo
from zeroconf.asyncio import AsyncZeroconf
async def main():
    zc = AsyncZeroconf(ip_version=IPVersion.V6Only, interfaces=[socket.if_nametoindex("eth0")])
    info = ServiceInfo("_brski-proxy._tcp.local.", "test-proxy._brski-proxy._tcp.local.",
                       port=int(sys.argv[2]), parsed_addresses=[sys.argv[1]],
                       server="test-proxy.local.")
    await zc.async_register_service(info)
    print("announcing", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


def announce(host: Host, script: str, port: int) -> LabProcess:
    address = host.address("eth0", link_local=True)
    proc = host.spawn([PY, "-c", script, address, str(port)], name="announcer")
    wait_for(lambda: "announcing" in proc.log() or not proc.alive(), 20, "the announcer")
    assert proc.alive(), proc.log()
    return proc


def discover(host: Host, method: str) -> tuple[int, dict, str]:
    done = host.run([PY, "-m", "pledge_sim.cli", "discover", "--methods", method,
                     "--timeout", "8", "--json"], check=False, timeout=60)
    return done.returncode, json.loads(done.stdout or "{}"), done.stderr


def test_grasp_flood_is_found_and_junk_is_dropped(as_root, tmp_path):
    with Lab(Topology(pledges=1, pledges_on_backbone=True), log_dir=tmp_path) as lab:
        announce(lab.registrars[0], GRASP_ANNOUNCER, 4443)
        rc, doc, err = discover(lab.pledges[0], "grasp")
        assert rc == 0, err
        assert doc["candidates"] == [{"host": "fe80::b:2%eth0", "port": 4443, "method": "grasp"}]
        assert doc["dropped"] >= 1


def test_mdns_service_is_found(as_root, tmp_path):
    with Lab(Topology(pledges=1, pledges_on_backbone=True), log_dir=tmp_path) as lab:
        announce(lab.registrars[0], MDNS_ANNOUNCER, 4444)
        rc, doc, err = discover(lab.pledges[0], "mdns")
        assert rc == 0, err
        assert {"host": "fe80::b:2%eth0", "port": 4444, "method": "mdns"} in doc["candidates"]


def test_nothing_announced_is_a_clear_failure(as_root, tmp_path):
    with Lab(Topology(pledges=1, pledges_on_backbone=True), log_dir=tmp_path) as lab:
        done = lab.pledges[0].run([PY, "-m", "pledge_sim.cli", "discover", "--timeout", "1"],
                                  check=False, timeout=60)
        assert done.returncode == 1
        assert done.stderr.strip() == "pledge-sim: nothing found within 1 s"
