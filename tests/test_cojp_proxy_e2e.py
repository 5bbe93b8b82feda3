"""Issue 15 acceptance: CoJP pledges join the real JRC through joinproxyd's stateless cojp mode.

Real processes in namespaces: brski-registrar with its JRC ([cojp], UDP 5683) on registrar0,
joinproxyd in the proxy namespace with the cojp mode on its join link, and ``pledge-sim cojp
--via-proxy`` on pledge0, a link-local-only host on the join link. Each request leaves the pledge
with Proxy-Scheme and Uri-Host, crosses the proxy with the pledge's return address sealed in an
RFC 8974 extended token, and the JRC (aiocoap with the extended-token codec) answers under
OSCORE, PSK or EDHOC-derived. The proxy keeps no per-pledge state: its resident memory after a
second fleet run is what it was after the first. aiocoap-client, with an OSCORE credentials
file and --proxy, joins through the proxy too.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_cojp_jrc_lab import Fleet, cli, make_fleet

from brski import cojp
from lab import Lab, Topology, wait_for
from lab.proxyd import PYTHON, ProxyDaemon, base_config
from lab.registrar_setup import READY_MARK
from lab.topology import PROXY_LL

pytestmark = pytest.mark.netns

REGISTRAR = "fd4a:5044::100"
JRC_PORT = 5683


@pytest.fixture
def lab(as_root: None, tmp_path: Path) -> Iterator[Lab]:
    with Lab(Topology(pledges=1), log_dir=tmp_path / "logs") as lab:
        yield lab


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def run_fleet(lab: Lab, fleet: Fleet, state: Path) -> dict:
    done = lab.pledges[0].run(
        [PYTHON, "-m", "pledge_sim.cli", "cojp", "--jrc", f"[{PROXY_LL}%eth0]:{JRC_PORT}",
         "--via-proxy", "--pledges", str(fleet.pledges_file), "--count", "40",
         "--concurrency", "10", "--state", str(state), "--edhoc-dir", str(fleet.edhoc_keys),
         "--jrc-credential", str(fleet.jrc_credential), "--json"], check=False, timeout=240)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    return json.loads(done.stdout)


def test_twenty_psk_and_twenty_edhoc_pledges_join_through_the_proxy(lab: Lab,
                                                                    tmp_path: Path) -> None:
    fleet = make_fleet(tmp_path)
    registrar = lab.registrars[0].spawn(
        [PYTHON, "-m", "registrar.cli", "--config", str(fleet.registrar_toml)], name="registrar")
    wait_for(lambda: READY_MARK in registrar.log(), 30, "the registrar")
    config = base_config(
        tmp_path / "proxy", join=[{"interfaces": ["join*"], "modes": ["cojp"]}],
        registrars={"discovery": ["static"],
                    "static": [{"address": REGISTRAR, "port": 8443, "preference": 10,
                                "cojp_port": JRC_PORT}]},
        # 40 pledges, 10 at a time, EDHOC's two exchanges and a join each: well over the
        # default 5/s that protects a constrained mesh
        cojp={"rate": 500.0, "burst": 100})
    daemon = ProxyDaemon(lab, tmp_path / "proxy", config).start()
    wait_for(lambda: daemon.ctl()["joining"], 15, "joinproxyd (cojp) to open joining")

    first = run_fleet(lab, fleet, tmp_path / "state")
    assert first["joined"] == 40 and first["failed"] == 0, first
    assert len({r["short_id"] for r in first["results"]}) == 40
    counters = wait_for(lambda: (c := daemon.relay_counters("cojp")).datagrams_down >= 60
                        and c, 10, "the cojp counters", interval=0.3)
    # 20 PSK joins, 20 × (EDHOC message_1, message_3, join): at least 80 each way
    assert counters.datagrams_up >= 80 and counters.datagrams_down >= 80, counters
    assert counters.flows == 0, counters  # stateless: no flow is ever opened
    assert set(counters.drops) <= {"rate-limit"}, counters
    assert daemon.process is not None
    after_first = rss_kib(daemon.process.pid)

    second = run_fleet(lab, fleet, tmp_path / "state")
    assert second["joined"] == 40 and second["failed"] == 0, second
    for before, after in zip(first["results"][:20], second["results"][:20], strict=True):
        assert int(after["request_piv"], 16) > int(before["request_piv"], 16)
    after_second = rss_kib(daemon.process.pid)
    # 40 more pledges and twice the datagrams: no state to keep, so no growth beyond the
    # allocator's noise
    assert after_second - after_first < 1024, (after_first, after_second)
    log = registrar.log()
    assert log.count("joined (network cafe, role node, psk)") == 40
    assert log.count("joined (network cafe, role node, edhoc)") == 40
    print(f"cojp through joinproxyd: {first.get('seconds')} s, then {second.get('seconds')} s "
          f"for 40 pledges; proxy RSS {after_first} KiB, then {after_second} KiB; "
          + counters.line())

    # An independent client through the proxy: aiocoap-client with an OSCORE credentials file
    # and --proxy sends the request to the proxy with Proxy-Scheme and Uri-Host 6tisch.arpa.
    other = "00-12-4b-00-14-b5-d9-e4"
    added = cli("add-pledge", "--config", str(fleet.registrar_toml), "--id", other,
                "--generate-psk")
    assert added.returncode == 0, added.stderr
    context = tmp_path / "aiocoap-client-ctx"
    subprocess.run([sys.executable, "-c",
                    "import sys; from pathlib import Path; from pledge_sim import cojp; "
                    "cojp.write_context(Path(sys.argv[1]), bytes.fromhex(sys.argv[2]), "
                    "bytes.fromhex(sys.argv[3]))", str(context), other.replace("-", ""),
                    added.stdout.split("psk ")[1].split()[0]], check=True)
    credentials = tmp_path / "credentials.json"
    credentials.write_text(json.dumps({"coap://6tisch.arpa/*":
                                       {"oscore": {"basedir": f"{context}/"}}}))
    payload = tmp_path / "join-request.cbor"
    payload.write_bytes(bytes.fromhex("a10542cafe"))  # RFC 9031 App. A's Join_Request
    client = str(Path(sys.executable).parent / "aiocoap-client")
    done = lab.pledges[0].run(
        ["sh", "-c", f"{client} --credentials {credentials} --proxy "
         f"'coap://[{PROXY_LL}%eth0]:{JRC_PORT}' -m POST --payload @{payload} "
         "coap://6tisch.arpa/j | od -An -tx1"], check=False, timeout=60)
    answer = bytes.fromhex(done.stdout.replace(" ", "").replace("\n", ""))
    assert answer, (done.stdout, done.stderr, daemon.log()[-2000:])
    assert cojp.decode_configuration(answer).short_identifier is not None
    assert "pledge 00124b0014b5d9e4 joined" in registrar.log()

    daemon.stop()
    registrar.stop()
    assert "Traceback" not in registrar.log() + daemon.log()
